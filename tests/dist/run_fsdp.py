"""QDyLoRA steps under torch's own FSDP on CPU (gloo), launched by tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/dist/run_fsdp.py --model M --data D --out O

accelerate runs FSDP only on accelerators (on CPU processes it silently falls back to DDP,
which qdylora refuses), so this drives torch's FSDP1 (`FullyShardedDataParallel`) and FSDP2
(`fully_shard`) directly, each wrapping every decoder layer: the same rank
machinery the trainer uses (`RankSampler`, `DynamicRank`), a global batch split over the
processes, SGD. With one process it runs the same steps unsharded: the reference.
Outputs per run (fsdp1-slice, fsdp2-mask, ...: engine x truncation) in --out/<run>/, as
tests/dist/run_engine.py writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SEQ = 32


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--runs", default="fsdp1-slice,fsdp1-mask,fsdp2-slice,fsdp2-mask", help="ENGINE-TRUNCATION, ...")
    return p.parse_args()


def batches(args: argparse.Namespace, tokenizer) -> list[dict[str, torch.Tensor]]:
    """The global batches, in order, padded to SEQ tokens (no shuffling: every run sees the same)."""
    from qdylora.data import DataSpec, tokenize

    ds = tokenize(DataSpec(args.data, max_length=SEQ), tokenizer)
    out = []
    for step in range(args.steps):
        rows = [ds[i] for i in range(step * args.global_batch, (step + 1) * args.global_batch)]
        ids = torch.full((len(rows), SEQ), tokenizer.pad_token_id)
        labels = torch.full((len(rows), SEQ), -100)
        mask = torch.zeros((len(rows), SEQ), dtype=torch.long)
        for j, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on this process (FSDP2 keeps DTensor shards)."""
    from torch.distributed.tensor import DTensor

    value = p.full_tensor() if isinstance(p, DTensor) else p
    return value.detach().clone().contiguous()


def main() -> None:
    args = parse()
    dist.init_process_group("gloo")
    for run in args.runs.split(","):
        engine, truncation = run.split("-")
        train_once(args, engine, truncation, Path(args.out) / run)
    dist.destroy_process_group()


def train_once(args: argparse.Namespace, engine: str, truncation: str, out: Path) -> None:
    """engine: fsdp1 (FullyShardedDataParallel), fsdp2 (fully_shard), or anything with one process."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers import set_seed
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from qdylora import QDyLoraConfig, load_model
    from qdylora.data import load_tokenizer
    from qdylora.distributed import Engine, check_quant_storage
    from qdylora.ranks import DynamicRank, RankSampler

    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model)
    base = load_model(args.model, compute_dtype="float32", quant_storage="float32", device_map={"": "cpu"})
    set_seed(7)
    lora = LoraConfig(r=args.lora_r, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    config = QDyLoraConfig(seed=3, truncation=truncation).resolve(args.lora_r, 3)
    dynamic = DynamicRank(model, truncation=truncation)
    sampler = RankSampler.from_config(config)
    wrapped = model
    if world > 1:
        check_quant_storage(model, Engine("fsdp", world, shards_params=True))
        if engine == "fsdp1":
            policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
            wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
        else:
            for module in model.modules():
                if isinstance(module, LlamaDecoderLayer):
                    fully_shard(module)
            fully_shard(model)
    wrapped.train()  # (in eval mode bitsandbytes repacks 4-bit weights for CPU inference)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
    history, losses = [], []
    per = args.global_batch // world
    for step, batch in enumerate(batches(args, tokenizer)):
        b = sampler.draw(step)
        n_items = int(batch["labels"][:, 1:].ne(-100).sum())  # the global count: the Trainer's loss normalisation
        local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
        with dynamic.scope(b):
            loss = wrapped(**local, num_items_in_batch=n_items).loss * world  # FSDP averages gradients over processes
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach() / world
        dist.all_reduce(total)
        history.append((step + 1, b))
        losses.append((step + 1, total.item(), b))

    gather = FSDP.summon_full_params(wrapped, writeback=False) if world > 1 and engine == "fsdp1" else contextlib.nullcontext()
    with gather:  # PEFT's key names: no FSDP wrapper prefix, no adapter name
        state = {
            n.replace("_fsdp_wrapped_module.", "").replace(".default.", "."): full(p)
            for n, p in model.named_parameters()
            if "lora_" in n
        }
    state = dict(sorted(state.items()))
    log = {"rank_history": history, "losses": losses, "truncation": truncation, "world_size": world}
    (out / f"rank_log_{rank}.json").write_text(json.dumps(log, indent=1))
    save_file(state, str(out / f"adapter_rank{rank}.safetensors"))
    if rank == 0:
        model.save_pretrained(str(out / "adapter"), state_dict=state)
        config.save_pretrained(out / "adapter")
    dist.barrier()


if __name__ == "__main__":
    main()

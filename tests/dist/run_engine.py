"""One small QDyLoRA training run under a distributed engine, launched by tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/dist/run_engine.py --engine zero3 --model M --data D --out O

Engines: single (one process, the reference), ddp, zero2, zero3 (DeepSpeed, the shipped
examples/accelerate/ds_zero*.json) and fsdp (through the Trainer; accelerate refuses it on CPU,
see tests/dist/run_fsdp.py for torch's FSDP itself). For each truncation in --truncations,
every process writes, into --out/<truncation>/:
- rank_log_{rank}.json: the rank drawn at every step and the logged losses;
- adapter_rank{rank}.safetensors: the LoRA weights as this process sees them after
  training (gathered from all processes under ZeRO-3);
and together they save the trainer's adapter (PEFT files + qdylora_config.json) to adapter/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ENGINES = ("single", "ddp", "zero2", "zero3", "fsdp")


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "accelerate"


def deepspeed_config(stage: int, train_batch_size: int | None) -> dict:
    """The shipped example config of that stage ("auto" values come from TrainingArguments)."""
    config = json.loads((EXAMPLES / f"ds_zero{stage}.json").read_text())
    if train_batch_size is not None:
        config["train_batch_size"] = train_batch_size
    return config


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=2, help="per-device batch")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--truncations", default="slice", help="comma-separated; one training run per truncation")
    p.add_argument("--ds-train-batch", type=int, default=None, help="a fixed DeepSpeed train_batch_size")
    p.add_argument("--quant-storage", default=None)
    return p.parse_args()


def lora_state(trainer) -> dict[str, torch.Tensor]:
    """This process's full-shape LoRA tensors (gathered from the other processes under ZeRO-3)."""
    from peft import get_peft_model_state_dict

    from qdylora.ranks import unwrap

    model = unwrap(trainer.model_wrapped)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    gather = contextlib.nullcontext()
    if trainer.engine.shards_params:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        state = get_peft_model_state_dict(model)
        return {k: v.detach().clone().contiguous() for k, v in sorted(state.items())}


def main() -> None:
    args = parse()
    if args.engine in ("zero2", "zero3"):
        import deepspeed

        # before TrainingArguments, so it sees the real world size (else DeepSpeed's batch check fails)
        deepspeed.init_distributed(dist_backend="gloo")
    for truncation in args.truncations.split(","):
        train_once(args, truncation, Path(args.out) / truncation)


def train_once(args: argparse.Namespace, truncation: str, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import TrainingArguments, set_seed

    from qdylora import QDyLoraConfig, QDyLoraTrainer, load_model
    from qdylora.data import DataSpec, collator, load_tokenizer, tokenize

    engine_args: dict = {}
    if args.engine in ("ddp", "fsdp"):
        engine_args["ddp_backend"] = "gloo"
    if args.engine in ("zero2", "zero3"):
        engine_args["deepspeed"] = deepspeed_config(int(args.engine[-1]), args.ds_train_batch)
    if args.engine == "fsdp":
        engine_args["fsdp"] = True
        engine_args["fsdp_config"] = {"version": 2}  # the default; version 1 fails in accelerate on CPU
    targs = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=7,
        disable_tqdm=True,
        use_cpu=True,
        **engine_args,
    )
    tokenizer = load_tokenizer(args.model)
    train = tokenize(DataSpec(args.data, max_length=32), tokenizer)
    base = load_model(args.model, compute_dtype="float32", quant_storage=args.quant_storage)
    set_seed(7)  # the same lora_A initialisation in every process and every run
    lora = LoraConfig(r=args.lora_r, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    trainer = QDyLoraTrainer(
        model=model,
        args=targs,
        train_dataset=train,
        data_collator=collator(tokenizer),
        processing_class=tokenizer,
        qdylora_config=QDyLoraConfig(seed=3, truncation=truncation),
    )
    trainer.train()

    rank = int(os.environ.get("RANK", 0))
    log = {
        "rank_history": trainer.rank_history,
        "losses": [(e["step"], e["loss"], e.get("rank")) for e in trainer.state.log_history if "loss" in e],
        "engine": trainer.engine.describe(),
        "truncation": trainer.dynamic_rank.state.truncation,
        "world_size": targs.world_size,
    }
    (out / f"rank_log_{rank}.json").write_text(json.dumps(log, indent=1))
    save_file(lora_state(trainer), str(out / f"adapter_rank{rank}.safetensors"))
    trainer.save_model(str(out / "adapter"))  # collective under ZeRO-3: every process calls it


if __name__ == "__main__":
    main()

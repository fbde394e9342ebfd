"""Falcon-40B-shaped QDyLoRA training on one GPU: peak memory next to `qdylora plan`'s estimate.

    python benchmarks/gpu_falcon40b_plan.py --out results/      # needs a CUDA GPU with >= 40 GB
    python benchmarks/gpu_falcon40b_plan.py --tiny --device cpu  # the same code path on a small model

The model is Falcon-40B's architecture (examples/falcon-40b/config.json: 60 layers, hidden
8192, 128 query / 8 key-value heads, vocab 65024) with random weights, built on the meta
device and materialised one linear at a time straight into NF4 with double quantization,
so neither host RAM nor the GPU ever holds a 16-bit copy of the model. Then exactly what
`qdylora train` does with the Falcon-40B recipe: prepare_model_for_kbit_training, LoRA
r_max 64 / alpha 16 on every linear, QDyLoraTrainer with paged_adamw_32bit, max_grad_norm
0.3, constant LR, bf16, gradient checkpointing, batch 1 x 512 tokens, a few steps.

Reported (stdout and OUT/gpu_falcon40b_plan.json): the plan's rows, the real allocation of each
(4-bit weights + quant states, other weights, LoRA, optimizer state), torch's peak allocated
and reserved memory during training, the GPU memory in use (incl. CUDA context and paged
optimizer state, which lives outside torch's allocator), and seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GiB = 1024**3


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "examples" / "falcon-40b" / "config.json"))
    p.add_argument("--tiny", action="store_true", help="shrink the model (hidden 256, 2 layers) for a CPU dry run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r-max", type=int, default=64)
    p.add_argument("--out", default=None, help="folder for gpu_falcon40b_plan.json")
    return p.parse_args()


def build_model(config, device: str, compute: torch.dtype):
    """Falcon on the meta device, then each linear straight to NF4 on `device`, the rest materialised."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    from qdylora.plan import quantized_skeleton

    torch.manual_seed(0)
    model = quantized_skeleton(config, compute, None)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = torch.randn(module.out_features, module.in_features, dtype=compute, device=device) * 0.02
            module.weight = bnb.nn.Params4bit(
                w, requires_grad=False, quant_type="nf4", compress_statistics=True, module=module
            ).to(device)
            del w
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta":
            value = torch.ones(param.shape, dtype=compute) if name.endswith(("ln_f.weight", "ln_attn.weight", "ln_mlp.weight", "input_layernorm.weight")) \
                else torch.zeros(param.shape, dtype=compute) if "ln" in name or "layernorm" in name \
                else torch.randn(param.shape, dtype=compute) * 0.02
            set_module_tensor_to_device(model, name, device, value=value)
    model.tie_weights()
    model.to(device)  # buffers (rotary tables)
    model.is_loaded_in_4bit = True  # what transformers sets after a 4-bit load (PEFT reads it)
    del init_empty_weights, AutoModelForCausalLM
    return model


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def quant_tensors(module):
    qs = module.weight.quant_state
    out = [module.weight, qs.absmax, qs.code, qs.offset]
    if qs.state2 is not None:
        out += [qs.state2.absmax, qs.state2.code]
    return out


def main() -> None:
    args = parse()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import TrainingArguments

    from qdylora import QDyLoraConfig, QDyLoraTrainer
    from qdylora.plan import load_config, plan

    cuda = args.device.startswith("cuda")
    compute = torch.bfloat16 if cuda else torch.float32
    config = load_config(args.config)
    if args.tiny:
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_kv_heads = 256, 2, 8, 2
        config.vocab_size = 1024
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}

    t0 = time.perf_counter()
    estimate = plan(args.config if not args.tiny else _tiny_config_file(config), r_max=args.r_max, batch=1,
                    seq=args.seq, gpu_mem="32GiB", compute_dtype=compute)
    report["plan"] = estimate.to_dict()
    report["plan_seconds"] = time.perf_counter() - t0
    print(estimate.table(), flush=True)

    t0 = time.perf_counter()
    model = build_model(config, args.device, compute)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=args.r_max, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    report["build_seconds"] = time.perf_counter() - t0
    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    packed_ids = {id(m.weight) for m in four}
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    lora_ids = {id(p) for p in lora_params}
    measured = {
        "4-bit weights + double-quant state": storage_bytes(t for m in four for t in quant_tensors(m)),
        "other weights": storage_bytes(p for p in model.parameters() if id(p) not in packed_ids | lora_ids),
        "adapter": storage_bytes(lora_params),
    }
    print(f"built in {report['build_seconds']:.1f} s: {len(four)} NF4 linears", flush=True)

    n = 8
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, config.vocab_size, (args.seq,), generator=g) for _ in range(n)]
    train = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]
    targs = TrainingArguments(
        output_dir="/tmp/gpu_falcon40b", per_device_train_batch_size=1, max_steps=args.steps, learning_rate=2e-4,
        lr_scheduler_type="constant", warmup_steps=0.03, max_grad_norm=0.3, optim="paged_adamw_32bit",
        bf16=cuda, gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not cuda, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = QDyLoraTrainer(model=model, args=targs, train_dataset=train, qdylora_config=QDyLoraConfig(seed=0))
    step_times: list[float] = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    trainer.add_callback(_StepTimer(step_times))
    trainer.train()
    report["train_seconds"] = time.perf_counter() - t0
    report["step_seconds"] = step_times
    report["ranks"] = [r for _, r in trainer.rank_history]
    report["losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    measured["optimizer state"] = storage_bytes(t for st in opt.state.values() for t in st.values())
    report["measured"] = measured
    if cuda:
        free, total = torch.cuda.mem_get_info()
        report["cuda"] = {
            "allocated_before_training": base_alloc,
            "max_allocated": torch.cuda.max_memory_allocated(),
            "max_reserved": torch.cuda.max_memory_reserved(),
            "device_used_at_end": total - free,
            "device_total": total,
        }
    _print_comparison(report)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_falcon40b_plan.json").write_text(json.dumps(report, indent=2, default=str))


class _StepTimer:
    """A TrainerCallback timing each optimizer step (duck-typed to avoid importing at module level)."""

    def __new__(cls, times):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - self.t)

        return Timer()


def _tiny_config_file(config) -> str:
    import tempfile

    d = tempfile.mkdtemp()
    config.save_pretrained(d)
    return d


def _print_comparison(report: dict) -> None:
    rows = report["plan"]["rows"]
    m = report["measured"]
    plan_w = rows["4-bit weights (NF4)"] + rows["double-quant state"]
    pairs = [
        ("4-bit weights + quant state", plan_w, m["4-bit weights + double-quant state"]),
        ("other weights", rows["other weights (fp32)"], m["other weights"]),
        ("adapter", next(v for k, v in rows.items() if k.startswith("adapter")), m["adapter"]),
        ("optimizer state", next(v for k, v in rows.items() if k.startswith("optimizer")), m["optimizer state"]),
    ]
    print(f"\n{'':<30}{'plan GiB':>10}{'measured GiB':>14}")
    for name, est, got in pairs:
        print(f"{name:<30}{est / GiB:>10.3f}{got / GiB:>14.3f}")
    if "cuda" in report:
        c, total, paged = report["cuda"], report["plan"]["total"], report["plan"]["paged_bytes"]
        print(f"{'plan total (all rows)':<30}{total / GiB:>10.3f}")
        print(f"{'plan total minus paged state':<30}{(total - paged) / GiB:>10.3f}{c['max_allocated'] / GiB:>14.3f}"
              "  <- torch peak allocated (paged optimizer state is outside torch's allocator)")
        print(f"{'torch peak reserved':<30}{'':>10}{c['max_reserved'] / GiB:>14.3f}")
        print(f"{'GPU memory in use at end':<30}{'':>10}{c['device_used_at_end'] / GiB:>14.3f}  (incl. CUDA context, paged state)")
    print(f"seconds per step: {[round(t, 2) for t in report['step_seconds']]}, ranks {report['ranks']}, losses {report['losses']}")


if __name__ == "__main__":
    main()

"""GPU check: QDyLoRA on a randomly initialised Falcon-40B-shaped model in NF4 (issue 4).

All 60 layers of Falcon-40B's architecture, every FalconLinear replaced by an NF4
double-quantized bitsandbytes Linear4bit built directly on the GPU from random weights
(no checkpoint is read), LoRA r_max 64 / alpha 16 on all linear layers, then a few
QDyLoraTrainer steps at batch 1, sequence 512, gradient checkpointing, paged AdamW
32-bit, bf16 compute. Prints peak GPU memory next to the parts it is made of, as JSON.

    python benchmarks/gpu_falcon40b.py --steps 3 --out falcon40b_gpu.json

Needs a CUDA GPU with more than ~30 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def falcon40b_config():
    from transformers import FalconConfig

    return FalconConfig(
        vocab_size=65024, hidden_size=8192, num_hidden_layers=60, num_attention_heads=128,
        num_kv_heads=8, new_decoder_architecture=True, parallel_attn=True, bias=False,
        alibi=False, max_position_embeddings=2048,
    )


def build(device: str = "cuda", compute_dtype=torch.bfloat16):
    """Falcon-40B shape, random NF4 linears quantized on the GPU, other weights bf16."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    config = falcon40b_config()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            w = torch.empty(module.out_features, module.in_features, dtype=compute_dtype, device=device)
            w.normal_(0, 0.02, generator=gen)
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")._quantize(device)
            del w
            model.set_submodule(name, q)
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            value = torch.empty(p.shape, dtype=compute_dtype, device=device).normal_(0, 0.02, generator=gen)
            if "ln" in name or "norm" in name:
                value = torch.ones_like(value) if name.endswith("weight") else torch.zeros_like(value)
            set_module_tensor_to_device(model, name, device, value=value)
    for name, b in list(model.named_buffers()):
        if b.is_meta:  # rotary inv_freq and friends: recompute on the device
            raise RuntimeError(f"buffer {name} left on meta")
    model.is_loaded_in_4bit = True
    return model


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import TrainingArguments

    import bitsandbytes as bnb

    from qdylora import QDyLoraTrainer

    t0 = time.time()
    torch.cuda.reset_peak_memory_stats()
    model = build()
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    torch.cuda.synchronize()
    weights_4bit = torch.cuda.memory_allocated()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05,
                                             task_type="CAUSAL_LM"))
    adapter = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    after_setup = torch.cuda.memory_allocated()
    print(f"built in {time.time() - t0:.0f}s: {n4} NF4 linears, {weights_4bit / 2**30:.2f} GiB after quantization, "
          f"adapter {adapter / 2**30:.2f} GiB", flush=True)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 65024, (max(a.steps, 1), a.seq), generator=g)
    ds = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir="/tmp/falcon40b-qdylora", per_device_train_batch_size=1, max_steps=a.steps,
        optim="paged_adamw_32bit", learning_rate=2e-4, max_grad_norm=0.3, warmup_steps=0.03,
        lr_scheduler_type="constant", bf16=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, report_to="none",
        save_strategy="no", remove_unused_columns=False,
    )
    trainer = QDyLoraTrainer(model=model, args=args, train_dataset=ds)
    torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    trainer.train()
    train_s = time.time() - t1
    opt_state = tensor_bytes(
        v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.is_cuda
    )
    result = {
        "gpu": torch.cuda.get_device_name(),
        "steps": a.steps, "seq": a.seq, "batch": 1, "r_max": a.r,
        "ranks": [r for _, r in trainer.rank_history],
        "nf4_linears": n4,
        "gib": {
            "after_quantization": weights_4bit / 2**30,
            "adapter_params": adapter / 2**30,
            "after_setup": after_setup / 2**30,
            "optimizer_state_on_gpu": opt_state / 2**30,
            "peak_allocated_training": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_training": torch.cuda.max_memory_reserved() / 2**30,
        },
        "train_seconds": train_s,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

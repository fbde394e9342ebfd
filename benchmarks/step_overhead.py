"""Step time and peak memory of QDyLoraTrainer against plain PEFT QLoRA at the same r_max.

Both arms train the same 4-bit model shape on the same batch with the same optimizer.
Steps are interleaved (plain, qdylora, plain, ...) in one process so machine noise hits
both alike; the ratio of medians is printed. Peak memory is measured per arm: on CUDA
with torch.cuda.max_memory_allocated, on CPU as the peak RSS of a child process that
runs only that arm (RSS is per process, so the arms cannot share one), reset after loading
so that the training steps, not the loading, set the peak.

    python benchmarks/step_overhead.py                      # SmolLM2-135M-shaped random model
    python benchmarks/step_overhead.py --shape llama-1b --batch 8 --seq 512   # Llama-3.2-1B-shaped
    python benchmarks/step_overhead.py --model ~/.cache/qdylora/SmolLM2-135M-Instruct

Targets (issue 2): time ratio <= 1.02, peak-memory ratio <= 1.01.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


# Llama-architecture shapes of real models, filled with random weights (no download)
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # Llama-3.2-1B's shape: 1.24 B parameters
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),  # plumbing checks
}


def shaped(shape: str, out_dir: str) -> str:
    """A random model of one of `SHAPES`, saved in bf16 (built on the GPU when there is one: faster)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    return out_dir


def build(arm: str, model_dir: str, r: int, batch: int, seq: int, out_dir: str):
    """(trainer, model, inputs) for one arm: 'plain' (PEFT QLoRA) or 'qdylora'."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from qdylora import QDyLoraTrainer, load_model

    model = load_model(model_dir)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    args = TrainingArguments(output_dir=out_dir, report_to="none", learning_rate=2e-4, optim="adamw_torch",
                             max_grad_norm=0.3, use_cpu=not torch.cuda.is_available())
    trainer = QDyLoraTrainer(model=model, args=args) if arm == "qdylora" else Trainer(model=model, args=args)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop otherwise
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(model.device)
    return trainer, model, {"input_ids": ids, "labels": ids}


def step(trainer, model, inputs) -> float:
    """One optimizer step (forward, backward, clip, AdamW); returns seconds."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    trainer.training_step(model, inputs)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.global_step += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def reset_peak_rss() -> None:
    """Return freed heap to the OS and reset the kernel's peak-RSS mark (VmHWM) of this process."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak resident memory since the last reset, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_child(arm: str, model_dir: str, r: int, batch: int, seq: int, steps: int) -> int:
    """Run `steps` steps of one arm in a fresh process; return its peak RSS in bytes."""
    cmd = [sys.executable, __file__, "--child", arm, "--model", model_dir, "--r", str(r),
           "--batch", str(batch), "--seq", str(seq), "--steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model folder (default: a random model of --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m",
                   help="architecture of the random model used without --model")
    p.add_argument("--r", type=int, default=64, help="r_max / the QLoRA rank")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="measured steps per arm")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--child", choices=["plain", "qdylora"], help=argparse.SUPPRESS)
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model or shaped(a.shape, os.path.join(tmp, "model"))
        if a.child:  # memory probe: one arm alone in this process
            trainer, model, inputs = build(a.child, model_dir, a.r, a.batch, a.seq, tmp)
            reset_peak_rss()  # loading peaks higher than training: measure the training steps only
            for _ in range(a.steps):
                step(trainer, model, inputs)
            print(peak_rss())
            return

        arms = {arm: build(arm, model_dir, a.r, a.batch, a.seq, os.path.join(tmp, arm)) for arm in ("plain", "qdylora")}
        times: dict[str, list[float]] = {"plain": [], "qdylora": []}
        peaks: dict[str, int] = {}
        for i in range(a.warmup + a.steps):
            for arm, (trainer, model, inputs) in arms.items():
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                dt = step(trainer, model, inputs)
                if torch.cuda.is_available():
                    peaks[arm] = max(peaks.get(arm, 0), torch.cuda.max_memory_allocated())
                if i >= a.warmup:
                    times[arm].append(dt)
            print(f"step {i + 1}/{a.warmup + a.steps}: plain {times['plain'][-1] if times['plain'] else dt:.3f}s"
                  f"  qdylora {dt:.3f}s", file=sys.stderr)
        ranks = [r for _, r in arms["qdylora"][0].rank_history][a.warmup:]
        del arms
        if not torch.cuda.is_available():
            peaks = {arm: peak_memory_child(arm, model_dir, a.r, a.batch, a.seq, 3) for arm in ("plain", "qdylora")}

    med = {arm: statistics.median(t) for arm, t in times.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {device}; model {a.model or a.shape + ' (random weights)'}; r_max {a.r}; batch {a.batch} x {a.seq}; "
          f"{a.steps} interleaved steps per arm")
    print(f"QDyLoRA ranks drawn: mean {statistics.mean(ranks):.1f} ({min(ranks)}..{max(ranks)})")
    print(f"{'arm':<10}{'median step (s)':>18}{'peak memory (MiB)':>20}")
    for arm in ("plain", "qdylora"):
        print(f"{arm:<10}{med[arm]:>18.3f}{peaks[arm] / 2**20:>20.1f}")
    print(f"time ratio qdylora/plain:   {med['qdylora'] / med['plain']:.3f}  (target <= 1.02)")
    print(f"memory ratio qdylora/plain: {peaks['qdylora'] / peaks['plain']:.3f}  (target <= 1.01)")


if __name__ == "__main__":
    main()

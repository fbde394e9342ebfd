"""Benchmark the exporters.

1. How long `export_adapter` takes (rank b cut of an r_max adapter; plain and --vllm).
2. Peak resident memory (VmHWM) of the streaming `export_merged` against PEFT's usual route
   (load the base, PeftModel.from_pretrained, merge_and_unload, save_pretrained) on the
   same multi-shard model, each in its own subprocess.
   Target: qdylora's peak at most 0.5x PEFT's.

The model is a random Llama built from a config (no download), saved in fp16 shards in
a temporary folder (or --work DIR, reused if present). Usage:

    OMP_NUM_THREADS=1 python benchmarks/export.py                 # ~1.7 GB fp16 base, 200 MB shards
    OMP_NUM_THREADS=1 python benchmarks/export.py --hidden 1024 --layers 8   # quicker, smaller
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each child reports its own peak RSS and wall time. The peak is VmHWM from /proc/self/status
# (the high-water mark of this address space, in kB): ru_maxrss would not do, since Linux
# carries the parent's ru_maxrss over fork/exec and the parent here is already large.
_REPORT = """
import json, time
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("RESULT " + json.dumps({"peak_mb": hwm / 1024, "seconds": time.perf_counter() - T0}))
"""

FLOOR_QDYLORA = "import time; T0 = time.perf_counter()\nimport qdylora.exporters.merged\n" + _REPORT
FLOOR_PEFT = (
    "import time; T0 = time.perf_counter()\nimport torch\nfrom transformers import AutoModelForCausalLM\n"
    "from peft import PeftModel\n" + _REPORT
)
QDYLORA = """
import sys, time
T0 = time.perf_counter()
from qdylora.exporters import export_merged
adapter, out, base, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
export_merged(adapter, out, rank, base_model=base, dtype="float16")
""" + _REPORT
PEFT = """
import sys, time
T0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
adapter, out, base, shard = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
""" + _REPORT


def build(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A random fp16 Llama in several shards, and a QDyLoRA adapter (r_max, all linear layers) for it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qdylora import DynamicRank, QDyLoraConfig
    from qdylora.testing import make_tokenizer

    base, adapter = work / "base", work / "adapter"
    if (base / "model.safetensors.index.json").is_file() and (adapter / "qdylora_config.json").is_file():
        return base, adapter
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(base, max_shard_size=args.shard_size)
    make_tokenizer().save_pretrained(base)
    lora = LoraConfig(r=args.r_max, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(adapter)
    QDyLoraConfig().resolve(DynamicRank.of(peft_model).r_max, seed=0).save_pretrained(adapter)
    return base, adapter


def run_child(code: str, *argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def size_mb(folder: Path, pattern: str = "*.safetensors") -> list[float]:
    return [f.stat().st_size / 2**20 for f in sorted(folder.glob(pattern))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-size", default="200MB")
    p.add_argument("--r-max", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="rank merged in the memory comparison")
    p.add_argument("--repeats", type=int, default=5, help="adapter export timings: median of this many")
    p.add_argument("--work", type=Path, default=None, help="keep the model and adapter here (reused if present)")
    args = p.parse_args()

    from qdylora.exporters import export_adapter

    with tempfile.TemporaryDirectory(prefix="qdylora-bench-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        base, adapter = build(work, args)
        shards = size_mb(base)
        print(f"base: {sum(shards):.0f} MB fp16 in {len(shards)} shards (largest {max(shards):.0f} MB); "
              f"adapter r_max={args.r_max}: {size_mb(adapter)[0]:.0f} MB  (ready in {time.perf_counter() - t:.0f} s)")

        print("\n1) adapter export time (median of %d)" % args.repeats)
        print(f"{'rank':>6} {'mode':>6} {'seconds':>9}")
        for rank in (1, args.rank, args.r_max):
            for vllm in (False, True):
                times = []
                for i in range(args.repeats):
                    out = Path(scratch) / f"a{rank}-{vllm}-{i}"
                    t = time.perf_counter()
                    export_adapter(adapter, out, rank, vllm=vllm)
                    times.append(time.perf_counter() - t)
                print(f"{rank:>6} {'vllm' if vllm else 'peft':>6} {statistics.median(times):>9.3f}")

        print(f"\n2) merged export at rank {args.rank}, fp16: peak RSS of each process")
        rank_b = Path(scratch) / "peft-input"
        export_adapter(adapter, rank_b, args.rank)  # PEFT merges the same rank-b adapter
        floor_q = run_child(FLOOR_QDYLORA)
        floor_p = run_child(FLOOR_PEFT)
        ours = run_child(QDYLORA, str(adapter), str(Path(scratch) / "merged-qdylora"), str(base), str(args.rank))
        peft = run_child(PEFT, str(rank_b), str(Path(scratch) / "merged-peft"), str(base), args.shard_size)
        print(f"{'':<34} {'peak MB':>9} {'seconds':>9}")
        print(f"{'imports only (qdylora.exporters)':<34} {floor_q['peak_mb']:>9.0f} {floor_q['seconds']:>9.1f}")
        print(f"{'imports only (transformers+peft)':<34} {floor_p['peak_mb']:>9.0f} {floor_p['seconds']:>9.1f}")
        print(f"{'qdylora export_merged (streamed)':<34} {ours['peak_mb']:>9.0f} {ours['seconds']:>9.1f}")
        print(f"{'PEFT merge_and_unload + save':<34} {peft['peak_mb']:>9.0f} {peft['seconds']:>9.1f}")
        ratio = ours["peak_mb"] / peft["peak_mb"]
        above = (ours["peak_mb"] - floor_q["peak_mb"]) / (peft["peak_mb"] - floor_p["peak_mb"])
        print(f"peak ratio qdylora / PEFT: {ratio:.2f}x  (target <= 0.5x: {'met' if ratio <= 0.5 else 'NOT met'})")
        print(f"above each one's import floor: {above:.2f}x")
        check_same(Path(scratch) / "merged-qdylora", Path(scratch) / "merged-peft")


def check_same(ours: Path, peft: Path) -> None:
    """Both merged models hold the same weights (up to fp16 rounding of the merge order)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        return {k: folder / f for k, f in json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].items()}

    a, b = index(ours), index(peft)
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    worst = 0.0
    for key in a:
        with safe_open(str(a[key]), "pt") as fa, safe_open(str(b[key]), "pt") as fb:
            worst = max(worst, (fa.get_tensor(key).float() - fb.get_tensor(key).float()).abs().max().item())
    print(f"largest weight difference between the two merged models: {worst:.2e}")


if __name__ == "__main__":
    main()

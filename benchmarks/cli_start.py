"""How fast the CLI starts: `qdylora --help`, `qdylora info ADAPTER` and `qdylora export
adapter ...` against a bare `python -c "import click"`, measured side by side in one run.

    python benchmarks/cli_start.py [--repeats 5]

Each command runs `--repeats` times as a fresh process (the median wall time is shown);
the commands take turns, so a busy machine slows them alike. Targets (issue 14):
`--help` < 0.5 s and `info` < 1 s on these machines, about 3x a bare click import or less.
`export adapter` imports torch to write tensors, so it is shown for scale, not held to those.
The adapter is a small qdylora adapter written with numpy (no model needed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def fake_adapter(folder: Path, r: int = 8, hidden: int = 64) -> Path:
    folder.mkdir(parents=True)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = np.random.default_rng(0).standard_normal((r, hidden), np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((hidden, r), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "base", "task_type": "CAUSAL_LM",
    }))
    (folder / "qdylora_config.json").write_text(json.dumps({"qdylora_version": "0.1.0", "config": {"r_max": r}}))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    exe = Path(sys.executable)
    cli = shutil.which("qdylora", path=str(exe.parent)) or shutil.which("qdylora")
    if cli is None:
        sys.exit("the qdylora command is not installed next to this python (pip install -e .)")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = fake_adapter(Path(tmp) / "adapter")
        commands = {
            'python -c "import click"': [str(exe), "-c", "import click"],
            "qdylora --help": [cli, "--help"],
            "qdylora info ADAPTER": [cli, "info", str(adapter)],
            "qdylora export adapter ADAPTER --rank 2": [cli, "export", "adapter", str(adapter), "--rank", "2",
                                                        "--out", str(Path(tmp) / "out"), "--overwrite"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                t0 = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                times[name].append(time.perf_counter() - t0)
                if res.returncode != 0:
                    sys.exit(f"{name} failed: {res.stderr.strip().splitlines()[-1:]}")
    base = statistics.median(times['python -c "import click"'])
    print(f"{'command':<44}{'median s':>10}{'x click':>10}   (of {args.repeats} runs each, {os.cpu_count()} CPUs)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<44}{med:>10.3f}{med / base:>10.1f}")


if __name__ == "__main__":
    main()

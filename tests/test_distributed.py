"""QDyLoRA under DDP, DeepSpeed ZeRO-2/3 and FSDP: 2 CPU processes over gloo, launched with torchrun.

Per engine: both processes draw the same ranks (their per-step logs are equal) and end with
byte-identical adapters; the 2-process adapter equals a 1-process run with the same global
batch; the saved adapter has full shapes (gathered under ZeRO-3), loads, sweeps and exports.
Bad engine set-ups fail before training, on every process, with one clear message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qdylora.ranks import RankSampler

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
R = 8
STEPS = 3
TRUNCATIONS = ("slice", "mask")
# per-device batch x gradient accumulation x 2 processes = 4 = the reference's one-process batch
ENGINES = {
    "ddp": ["--batch", "2", "--accum", "1"],
    "zero2": ["--batch", "1", "--accum", "2"],
    "zero3": ["--batch", "1", "--accum", "2", "--quant-storage", "float32"],
}


def launch(script: str, nproc: int, *args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    """torchrun NPROC processes of tests/dist/SCRIPT; a hang fails the test through the timeout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / "dist" / script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qdylora.testing import make_tiny_model, write_arithmetic_jsonl

    d = tmp_path_factory.mktemp("dist")
    return {"model": str(make_tiny_model(d / "model")), "data": str(write_arithmetic_jsonl(d / "data.jsonl", 32)), "dir": d}


def common(setup, out: Path) -> list[str]:
    return ["--model", setup["model"], "--data", setup["data"], "--out", str(out), "--steps", str(STEPS),
            "--lora-r", str(R), "--truncations", ",".join(TRUNCATIONS)]


@pytest.fixture(scope="module")
def reference(setup):
    """One process, batch 4: what every 2-process run must reproduce."""
    out = setup["dir"] / "single"
    ok(launch("run_engine.py", 1, "--engine", "single", "--batch", "4", *common(setup, out)))
    return out


@pytest.fixture(scope="module", params=list(ENGINES))
def engine_run(request, setup):
    out = setup["dir"] / request.param
    ok(launch("run_engine.py", 2, "--engine", request.param, *ENGINES[request.param], *common(setup, out)))
    return request.param, out


def expected_ranks() -> list[list[int]]:
    sampler = RankSampler(range(1, R + 1), seed=3)
    return [[step + 1, sampler.draw(step)] for step in range(STEPS)]


def assert_processes_agree(out: Path, world: int = 2) -> None:
    """Equal per-step rank logs, the expected rank sequence, byte-identical adapters."""
    logs = [json.loads((out / f"rank_log_{r}.json").read_text()) for r in range(world)]
    assert logs[0] == logs[1]
    assert logs[0]["world_size"] == world
    assert logs[0]["rank_history"] == expected_ranks()
    assert [loss[2] for loss in logs[0]["losses"]] == [b for _, b in expected_ranks()]  # the logged rank
    assert (out / "adapter_rank0.safetensors").read_bytes() == (out / "adapter_rank1.safetensors").read_bytes()


def assert_close_to(out: Path, ref: Path, atol: float = 1e-5) -> None:
    got, want = load_file(out / "adapter_rank0.safetensors"), load_file(ref / "adapter_rank0.safetensors")
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    moved = max(v.abs().max().item() for k, v in want.items() if "lora_B" in k)
    assert moved > 1e-2, "training did not move lora_B (initialised at zero): the comparison would be vacuous"
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=k)


def assert_saved_adapter_full(out: Path) -> None:
    """The trainer's saved adapter has full r_max shapes and holds the gathered values."""
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    gathered = load_file(out / "adapter_rank0.safetensors")
    assert saved.keys() == gathered.keys()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == R
    for k, v in saved.items():
        assert v.shape[0 if "lora_A" in k else 1] == R and v.numel() > R, (k, v.shape)
        torch.testing.assert_close(v, gathered[k], atol=0, rtol=0)
    assert json.loads((out / "adapter" / "qdylora_config.json").read_text())["config"]["r_max"] == R


def assert_sweeps_and_exports(out: Path, setup, tmp_path: Path) -> None:
    from qdylora.data import DataSpec
    from qdylora.exporters import export_adapter
    from qdylora.workflow import sweep_adapter

    adapter = out / "adapter"
    result = sweep_adapter(adapter, DataSpec(setup["data"], max_length=32, limit=8), [1, 4, R], batch_size=8,
                           out_dir=tmp_path / "sweep")
    values = result.values()
    assert sorted(values) == [1, 4, R] and all(np.isfinite(v) for v in values.values())
    assert len(set(values.values())) == 3, "every rank must give its own loss"
    exported = export_adapter(adapter, tmp_path / "rank4", 4)
    cfg = json.loads((exported / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16
    small, full = load_file(exported / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    assert small.keys() == full.keys()
    for k, v in full.items():
        want = v[:4] if "lora_A" in k else v[:, :4]
        torch.testing.assert_close(small[k], want, atol=0, rtol=0)


# -- DDP, ZeRO-2, ZeRO-3 through QDyLoraTrainer ----------------------------------------------------
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_processes_draw_the_same_ranks_and_end_identical(engine_run, truncation):
    _, out = engine_run
    assert_processes_agree(out / truncation)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_two_processes_equal_one_with_the_same_global_batch(engine_run, reference, truncation):
    _, out = engine_run
    assert_close_to(out / truncation, reference / truncation)


def test_slice_and_mask_train_the_same_adapter(reference):
    assert_close_to(reference / "mask", reference / "slice")


def test_engine_really_ran(engine_run):
    name, out = engine_run
    want = {"ddp": "DDP on 2 processes", "zero2": "DeepSpeed ZeRO-2 on 2 processes",
            "zero3": "DeepSpeed ZeRO-3 on 2 processes"}[name]
    assert json.loads((out / "slice" / "rank_log_0.json").read_text())["engine"] == want


def test_saved_adapter_is_full_and_sweeps_and_exports(engine_run, setup, tmp_path):
    _, out = engine_run
    for truncation in TRUNCATIONS:
        assert_saved_adapter_full(out / truncation)
    assert_sweeps_and_exports(out / "slice", setup, tmp_path)


# -- FSDP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_runs(setup):
    """torch FSDP1 and FSDP2 (2 processes) and the unsharded reference (1 process)."""
    args = ["--model", setup["model"], "--data", setup["data"], "--steps", str(STEPS), "--lora-r", str(R)]
    ref, out = setup["dir"] / "fsdp-ref", setup["dir"] / "fsdp"
    ok(launch("run_fsdp.py", 1, *args, "--out", str(ref), "--runs", "ref-slice,ref-mask"))
    ok(launch("run_fsdp.py", 2, *args, "--out", str(out)))
    return ref, out


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_fsdp_processes_agree_and_equal_one_process(fsdp_runs, engine, truncation):
    ref, out = fsdp_runs
    assert_processes_agree(out / f"{engine}-{truncation}")
    assert_close_to(out / f"{engine}-{truncation}", ref / "ref-slice")


def test_fsdp_adapter_sweeps_and_exports(fsdp_runs, setup, tmp_path):
    _, out = fsdp_runs
    assert_sweeps_and_exports(out / "fsdp2-slice", setup, tmp_path)


def test_fsdp_through_accelerate_on_cpu_is_refused_not_silently_ddp(setup):
    proc = launch("run_engine.py", 2, "--engine", "fsdp", *common(setup, setup["dir"] / "fsdp-trainer"), timeout=240)
    assert proc.returncode != 0
    assert "FSDP was configured but accelerate runs these processes as MULTI_CPU" in proc.stderr
    assert "'loss'" not in proc.stdout


# -- bad set-ups fail before training, on every process ----------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--engine", "zero3", "--batch", "1", "--accum", "2"],
         "DeepSpeed ZeRO-3 on 2 processes shards the 4-bit base, whose weights are stored as ['uint8']"),
        (["--engine", "zero2", "--batch", "1", "--accum", "2", "--ds-train-batch", "5"],
         "DeepSpeed train_batch_size 5 is not divisible by the world size 2"),
    ],
    ids=["zero3-without-quant-storage", "batch-not-divisible"],
)
def test_bad_setup_fails_on_every_process_before_training(setup, extra, message):
    out = setup["dir"] / "bad"
    proc = launch("run_engine.py", 2, *extra, *common(setup, out), timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count(message) >= 2, proc.stderr[-3000:]  # both processes raised it
    assert "'loss'" not in proc.stdout and not list(out.rglob("rank_log_*.json"))


def test_recipe_runs_under_accelerate_launch_with_the_ddp_example(setup):
    """`accelerate launch --config_file examples/accelerate/ddp.yaml -m qdylora.cli train` on 2 CPU
    processes; global_batch_size 4 = 2 processes x 1 x 2 accumulation steps. `heal: {holdout: 0.25}`
    alone holds a quarter of the records back on both processes (8 of 32: one step sees 4 of the 24
    left), and `qdylora heal` afterwards, in one process, heals on those."""
    out = setup["dir"] / "recipe-ddp"
    recipe = setup["dir"] / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": setup["model"], "compute_dtype": "float32", "data": {"path": setup["data"], "max_length": 32},
        "lora": {"r": R, "lora_alpha": 16, "lora_dropout": 0.0}, "global_batch_size": 4, "sweep": {"enabled": False},
        "heal": {"holdout": 0.25},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 1, "max_steps": 2, "logging_steps": 1,
                     "use_cpu": True, "disable_tqdm": True},
    }))  # JSON is YAML
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "ddp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
           "-m", "qdylora.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    ok(proc)
    assert "'epoch': '0.1667'" in proc.stdout  # after one step: 4 of the 24 records not held back
    assert proc.stdout.count("written to") == 1  # both processes trained (the epoch above); the main one reports
    assert json.loads((out / "adapter_config.json").read_text())["r"] == R
    assert json.loads((out / "qdylora_config.json").read_text())["heal_data"]["records"] == 8
    assert not (out / "qdylora-healed").exists()
    cmd = [sys.executable, "-m", "qdylora.cli", "heal", str(recipe), "--rank", "2", "--out", str(setup["dir"] / "healed")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    ok(proc)
    assert json.loads((setup["dir"] / "healed" / "qdylora_heal.json").read_text())["held_out_records"] == 8

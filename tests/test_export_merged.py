"""Streaming merged export: a multi-shard base, reloaded with plain transformers, equals rank b."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from qdylora.cli import main
from qdylora.exporters import export_merged, read_export_info
from qdylora.testing import RANKS, logits, export_lora_model as lora_model, save_qdylora, tokens

TOL = 1e-4


@pytest.fixture(scope="session")
def sharded(export_base, tmp_path_factory) -> Path:
    """The tiny base re-saved in many small safetensors shards (with its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(export_base).save_pretrained(out, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(export_base).save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) > 2
    return out


def reload(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def model_logits(model) -> torch.Tensor:
    return model(input_ids=tokens()).logits.float()


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("b", RANKS)
def test_merged_matches_training_model(trained, sharded, tmp_path, b):
    from transformers import AutoTokenizer

    out = export_merged(trained.adapter_dir, tmp_path / "m", b, base_model=sharded, dtype="float32")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in sharded.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = all_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    got = model_logits(reload(out))
    assert (got - logits(trained.model, b)).abs().max().item() < TOL
    assert AutoTokenizer.from_pretrained(out)("7 + 4")["input_ids"]  # tokenizer travels with the model
    info = read_export_info(out)
    assert info["kind"] == "merged" and info["rank"] == b and info["base_weights"] == "original"


def test_merged_fp16_default_from_adapter_base(trained, tmp_path):
    """Default dtype float16 and the adapter's own base_model_name_or_path (a single-file base)."""
    res = CliRunner().invoke(main, ["export", "merged", str(trained.adapter_dir), "--rank", "4", "--out", str(tmp_path / "h")])
    assert res.exit_code == 0, res.output
    full = export_merged(trained.adapter_dir, tmp_path / "f", 4, dtype="float32")
    half, ref = all_tensors(tmp_path / "h"), all_tensors(full)
    assert all(t.dtype == torch.float16 for t in half.values())
    assert all(torch.equal(half[k], ref[k].half()) for k in ref)
    assert json.loads((tmp_path / "h" / "config.json").read_text())["dtype"] == "float16"
    assert reload(tmp_path / "h") is not None


def test_merged_nf4_matches_4bit_training_model(export_base, sharded, tmp_path):
    """--base-weights nf4 reproduces the model trained on the NF4 base; original does not."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    model = lora_model(export_base, load_in_4bit=True, target_modules=["q_proj", "v_proj"])
    src = save_qdylora(model, tmp_path / "src")
    b = 3
    expected = logits(model, b)
    nf4 = export_merged(src, tmp_path / "nf4", b, base_model=sharded, dtype="float32", base_weights="nf4")
    assert (model_logits(reload(nf4)) - expected).abs().max().item() < TOL
    orig = export_merged(src, tmp_path / "orig", b, base_model=sharded, dtype="float32")
    assert (model_logits(reload(orig)) - expected).abs().max().item() > 10 * TOL

    # every layer the 4-bit model holds in NF4 and the adapter does not touch is exactly dequant(NF4(W))
    merged, original = all_tensors(nf4), all_tensors(sharded)
    quantized = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 14
    for name, module in quantized.items():
        if name.endswith(".base_layer"):  # q_proj / v_proj: merged with the adapter, checked by the logits
            continue
        held = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(merged[name + ".weight"], held), name
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(merged[key], original[key])  # not quantized by QLoRA, left as they are


@pytest.mark.parametrize(
    "device, compute",
    [
        ("cpu", "bfloat16"),
        ("cpu", "float16"),
        pytest.param("cuda", "bfloat16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
        pytest.param("cuda", "float32", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
    ],
)
def test_nf4_round_trip_is_what_load_model_holds(export_base, tmp_path, device, compute):
    """W is cast to the training compute dtype before NF4, as transformers does: the codes then match bit for bit."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from qdylora import load_model
    from qdylora.exporters.merged import nf4_round_trip

    model = load_model(export_base, compute_dtype=compute, prepare_for_training=False, device_map={"": device})
    weights = load_file(str(export_base / "model.safetensors"))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for name, m in layers:
        held = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float().cpu()
        assert torch.equal(nf4_round_trip(weights[name + ".weight"], getattr(torch, compute)), held), name
    # and export_merged(..., compute_dtype=...) writes exactly those weights for untargeted layers
    src = save_qdylora(lora_model(export_base, target_modules=["q_proj"]), tmp_path / "src")
    out = export_merged(src, tmp_path / "m", 2, dtype="float32", base_weights="nf4", compute_dtype=compute)
    merged = all_tensors(out)
    k_proj = dict(layers)["model.layers.1.self_attn.k_proj"]
    held = bnbf.dequantize_4bit(k_proj.weight.data, k_proj.weight.quant_state).float().cpu()
    assert torch.equal(merged["model.layers.1.self_attn.k_proj.weight"], held)
    assert read_export_info(out)["nf4_compute_dtype"] == compute


@pytest.mark.parametrize("arch", ["falcon"])
def test_merged_nf4_other_architecture(tmp_path, arch):
    """Falcon's FalconLinear layers (nn.Linear subclasses) are NF4 in training, so nf4 must round them too."""
    from qdylora.testing import make_tiny_model

    base = make_tiny_model(tmp_path / "base", arch)
    model = lora_model(base, load_in_4bit=True, target_modules=["query_key_value"])
    src = save_qdylora(model, tmp_path / "src")
    out = export_merged(src, tmp_path / "m", 5, dtype="float32", base_weights="nf4")
    assert (model_logits(reload(out)) - logits(model, 5)).abs().max().item() < TOL


def test_merged_modules_to_save(export_base, sharded, tmp_path):
    """A fully trained module saved beside the LoRA tensors (modules_to_save) replaces the base's."""
    model = lora_model(export_base, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    src = save_qdylora(model, tmp_path / "src")
    out = export_merged(src, tmp_path / "m", 2, base_model=sharded, dtype="float32")
    assert (model_logits(reload(out)) - logits(model, 2)).abs().max().item() < TOL


def test_streams_one_shard_at_a_time(trained, sharded, tmp_path, monkeypatch):
    """At most one base shard is open at any time and every base tensor is read exactly once."""
    import safetensors

    real, state = safetensors.safe_open, {"open": 0, "peak": 0, "reads": []}

    class Counting:
        def __init__(self, path, *args, **kwargs):
            self.path, self.inner = path, real(path, *args, **kwargs)

        def __enter__(self):
            state["open"] += 1
            state["peak"] = max(state["peak"], state["open"])
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            state["open"] -= 1
            return self.inner.__exit__(*exc)

        def get_tensor(self, key):
            state["reads"].append((Path(self.path).parent, key))
            return self.f.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    export_merged(trained.adapter_dir, tmp_path / "m", 2, base_model=sharded, dtype="float32")
    base_reads = [k for folder, k in state["reads"] if folder == sharded]
    n_keys = sum(len(safe_open(str(f), "pt").keys()) for f in sharded.glob("*.safetensors"))
    assert state["peak"] == 1 and len(base_reads) == len(set(base_reads)) == n_keys


@pytest.fixture(scope="session")
def other_bases(tmp_path_factory) -> dict[str, Path]:
    from qdylora.testing import make_tiny_model

    root = tmp_path_factory.mktemp("other")
    return {
        "shapes": make_tiny_model(root / "wide", "llama", hidden=32),
        "names": make_tiny_model(root / "falcon", "falcon"),
    }


def _truncated_shard(sharded: Path, tmp: Path) -> Path:
    import shutil

    copy = tmp / "broken-base"
    shutil.copytree(sharded, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    return copy


@pytest.mark.parametrize(
    "case, message",
    [
        ("shapes", "trained on another model"),
        ("names", "has no tensor"),
        ("missing", "does not exist"),
        ("broken shard", "missing or unreadable"),
        ("rank 0", "outside the trained range"),
        ("hub id not cached", "neither a local folder nor in the Hugging Face cache"),
    ],
)
def test_merged_bad_input(trained, sharded, other_bases, tmp_path, case, message):
    base = {
        "shapes": other_bases["shapes"],
        "names": other_bases["names"],
        "missing": tmp_path / "no-such-model",
        "broken shard": _truncated_shard(sharded, tmp_path) if case == "broken shard" else sharded,
        "rank 0": sharded,
        "hub id not cached": "qdylora-tests/no-such-model",
    }[case]
    rank = "0" if case == "rank 0" else "2"
    out = tmp_path / "new" / "merged"
    res = CliRunner().invoke(
        main, ["export", "merged", str(trained.adapter_dir), "--rank", rank, "--base", str(base), "--out", str(out)]
    )
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], res.stderr
    assert not (tmp_path / "new").exists()


KILLED = """
import sys, time
from pathlib import Path
import qdylora.exporters.merged as merged
real = merged.merge_shard
def slow(*args, **kwargs):
    n = real(*args, **kwargs)
    Path(sys.argv[3]).touch()  # one shard is on disk
    time.sleep(60)
    return n
merged.merge_shard = slow
merged.export_merged(sys.argv[1], sys.argv[2], 2, base_model=sys.argv[4], dtype="float32")
"""


def test_killed_mid_write_leaves_no_output(trained, sharded, tmp_path):
    out, marker = tmp_path / "m", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(trained.adapter_dir), str(out), str(marker), str(sharded)], env=env
    )
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the export never wrote its first shard"
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".m.qdylora-tmp-")]
        assert len(leftovers) == 1 and any(leftovers[0].glob("*.safetensors"))  # a partial shard set exists
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()  # the target never appears half-written
    export_merged(trained.adapter_dir, out, 2, base_model=sharded, dtype="float32")  # a rerun cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "marker"]

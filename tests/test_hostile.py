"""The hostile suite: every command fed bad input, as a careless or hostile user would.

One row per (command, bad input). Each row must: exit with code 2, print exactly one
`Error:` line and no traceback, write nothing at its output, and leave every input
byte-identical (sha256 of each file under the input folders, before and after). Add a row
for every bug fixed. Tiny models only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qdylora.cli import main

ROOT = Path(__file__).resolve().parents[1]


# -- the world every row starts from ----------------------------------------------------
@dataclass
class World:
    """Copies of a trained adapter, its base and data, fresh for each row (rows may damage them)."""

    tmp: Path
    adapter: Path
    base: Path
    data: Path
    inputs: list[Path] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def yaml(self, name: str = "train.yaml", **changes) -> Path:
        """A valid `qdylora train` YAML, with top-level keys replaced (None deletes a key)."""
        cfg = {
            "model": str(self.base),
            "data": {"path": str(self.data), "max_length": 32},
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "training": {"output_dir": str(self.tmp / "run"), "max_steps": 2, "per_device_train_batch_size": 4,
                         "learning_rate": 0.01, "disable_tqdm": True, "report_to": "none"},
            "sweep": {"ranks": [1, 8]},
        }
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            elif isinstance(value, dict) and isinstance(cfg.get(key), dict) and not value.pop("_replace", False):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        path = self.tmp / name
        path.write_text(yaml.safe_dump(cfg))
        self.inputs.append(path)
        return path


@pytest.fixture
def world(trained, tmp_path) -> World:  # noqa: F811
    adapter = tmp_path / "adapter"
    shutil.copytree(trained.adapter_dir, adapter)
    base = tmp_path / "base"
    shutil.copytree(trained.base_dir, base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i}?", "completion": str(2 * i)}) + "\n" for i in range(8)))
    return World(tmp_path, adapter, base, data, [adapter, base, data])


def digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under `paths` (symlinks recorded as their target)."""
    out = {}
    for top in paths:
        items = [top] if not top.is_dir() or top.is_symlink() else sorted(top.rglob("*"))
        for p in items:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif not p.exists():
                out[str(p)] = "missing"
    return out


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(args: list[str], needle: str, inputs: list[Path], outputs: list[Path] = ()) -> str:
    """Run the CLI; assert the row's contract; return the error line."""
    before = digest(inputs)
    existed = {p: p.exists() or p.is_symlink() for p in outputs}
    res = cli(*args)
    text = res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{args}: crashed with {res.exception!r}\n{text}"
    assert "Traceback" not in text, text
    assert res.exit_code == 2, (res.exit_code, text)
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, text
    assert needle in errors[0], (needle, text)
    # and nothing else on the terminal (click's usage lines aside): no library banner or progress bar
    others = [line for line in text.splitlines() if line.strip() and not line.startswith(("Error", "Usage:", "Try '"))]
    assert not others, text
    assert digest(inputs) == before, f"{args} changed an input"
    for p, was in existed.items():
        assert (p.exists() or p.is_symlink()) == was, f"{args} left {p} behind"
    return errors[0]


# -- rows: (id, build(world) -> (args, needle, extra inputs, outputs)) -------------------
Row = Callable[[World], tuple[list, str, list, list]]
ROWS: dict[str, Row] = {}


def row(name: str):
    def register(fn: Row) -> Row:
        ROWS[name] = fn
        return fn

    return register


def damaged_weights(w: World, how: str) -> None:
    f = w.adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if how == "truncated" else os.urandom(4096))


def qconfig(w: World, **changes) -> None:
    p = w.adapter / "qdylora_config.json"
    data = json.loads(p.read_text())
    for key, value in changes.items():
        if key == "config_r_max":
            data["config"]["r_max"] = value
        else:
            data[key] = value
    p.write_text(json.dumps(data))


# data loss ------------------------------------------------------------------------------
@row("export-adapter/overwrite-input-through-symlink")
def _(w):
    link = w.path("adapter-link")
    link.symlink_to(w.adapter)
    return ["export", "adapter", link, "--rank", "4", "--out", w.adapter, "--overwrite"], "input", [link], []


@row("export-adapter/overwrite-input-through-dotdot")
def _(w):
    return ["export", "adapter", w.adapter, "--rank", "4", "--out", f"{w.adapter}/../adapter", "--overwrite"], "input", [], []


@row("export-adapter/out-inside-input")
def _(w):
    return ["export", "adapter", w.adapter, "--rank", "4", "--out", w.adapter / "r4"], "input", [], [w.adapter / "r4"]


@row("export-adapter/out-holds-input")
def _(w):
    return ["export", "adapter", w.adapter, "--rank", "4", "--out", w.tmp, "--overwrite"], "input", [], []


@row("export-merged/overwrite-base-through-dotdot")
def _(w):
    return ["export", "merged", w.adapter, "--rank", "4", "--base", w.base, "--out", f"{w.base}/../base",
            "--overwrite"], "input", [], []


@row("export-merged/overwrite-base-through-symlink")
def _(w):
    link = w.path("base-link")
    link.symlink_to(w.base)
    return ["export", "merged", w.adapter, "--rank", "4", "--base", link, "--out", w.base, "--overwrite"], "input", [link], []


@row("train/sweep-rank-above-r-max")
def _(w):
    return ["train", w.yaml(sweep={"ranks": [1, 9]})], "sweep.ranks [9] outside", [], [w.path("run")]


@row("train/resume-without-checkpoint")
def _(w):
    return ["train", w.yaml(), "--resume"], "no checkpoint", [], [w.path("run")]


@row("train/learning-rate-not-a-number")
def _(w):
    return ["train", w.yaml(training={"learning_rate": "abc"})], "training.learning_rate must be", [], [w.path("run")]


# bad YAML values ------------------------------------------------------------------------
@row("train/lora-r-not-a-number")
def _(w):
    return ["train", w.yaml(lora={"r": "abc"})], "lora.r must be an integer", [], [w.path("run")]


@row("train/max-steps-not-a-number")
def _(w):
    return ["train", w.yaml(training={"max_steps": "abc"})], "training.max_steps must be an integer", [], [w.path("run")]


@row("train/unknown-optimizer")
def _(w):
    return ["train", w.yaml(training={"optim": "nope"})], "training: nope is not a valid", [], [w.path("run")]


@row("train/qdylora-not-a-mapping")
def _(w):
    return ["train", w.yaml(qdylora="x")], "'qdylora' must be a mapping", [], [w.path("run")]


@row("train/sweep-not-a-mapping")
def _(w):
    return ["train", w.yaml(sweep="x")], "'sweep' must be a mapping", [], [w.path("run")]


@row("train/eval-size-2.0")
def _(w):
    return ["train", w.yaml(eval_size=2.0)], "eval_size must be", [], [w.path("run")]


@row("train/split-seed-not-an-integer")
def _(w):
    return ["train", w.yaml(eval_size=0.25, split_seed="abc")], "split_seed must be an integer", [], [w.path("run")]


@row("train/heal-holdout-not-a-fraction")
def _(w):
    return ["train", w.yaml(heal={"rank": 2, "holdout": 1.5})], "heal: holdout must be a fraction", [], [w.path("run")]


@row("train/r-min-above-lora-r")
def _(w):
    return ["train", w.yaml(qdylora={"r_min": 9})], "r_max must be an integer >= r_min", [], [w.path("run")]


@row("train/export-ranks-above-r-max")
def _(w):
    return ["train", w.yaml(export={"ranks": [2, 9]})], "export.ranks [9] outside", [], [w.path("run")]


@row("train/export-recommended-without-eval-data")
def _(w):
    return ["train", w.yaml(export={"ranks": ["recommended"]})], "give eval_data or eval_size", [], [w.path("run")]


@row("train/export-recommended-svd-not-swept")
def _(w):
    return (["train", w.yaml(eval_size=4, export={"ranks": ["recommended"], "method": "svd"})],
            "add svd to sweep.methods", [], [w.path("run")])


@row("train/export-vllm-with-modules-to-save")
def _(w):
    return (["train", w.yaml(lora={"modules_to_save": ["lm_head"]}, export={"ranks": [2], "vllm": True})],
            "vLLM rejects adapters with modules_to_save", [], [w.path("run")])


@row("train/export-unknown-key")
def _(w):
    return ["train", w.yaml(export={"rank": [2]})], "unknown export key(s) ['rank']", [], [w.path("run")]


@row("train/sample-ranks-above-r-max")
def _(w):
    return ["train", w.yaml(samples={"prompts": ["1 plus 1?"], "ranks": [1, 16]})], "samples.ranks [16]", [], [w.path("run")]


@row("train/model-missing")
def _(w):
    return ["train", w.yaml(model=str(w.path("nope")))], "does not exist", [], [w.path("run")]


@row("train/model-bin-only")
def _(w):
    m = w.path("binmodel")
    m.mkdir()
    shutil.copy(w.base / "config.json", m)
    (m / "pytorch_model.bin").write_bytes(b"not really")
    return ["train", w.yaml(model=str(m))], "no .safetensors weights", [m], [w.path("run")]


@row("train/model-custom-code")
def _(w):
    m = w.path("custom")
    shutil.copytree(w.base, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (m / "config.json").write_text(json.dumps(cfg))
    return ["train", w.yaml(model=str(m))], "trust_remote_code", [m], [w.path("run")]


@row("train/model-without-config")
def _(w):
    m = w.path("noconfig")
    shutil.copytree(w.base, m)
    (m / "config.json").unlink()
    return ["train", w.yaml(model=str(m))], "no config.json", [m], [w.path("run")]


@row("train/output-dir-is-a-file")
def _(w):
    f = w.path("run")
    f.write_text("mine")
    return ["train", w.yaml()], "is a file", [f], []


@row("train/data-missing")
def _(w):
    return ["train", w.yaml(data={"path": str(w.path("missing.jsonl"))})], "does not exist", [], [w.path("run")]


@row("train/data-field-missing")
def _(w):
    return ["train", w.yaml(data={"prompt_field": "question"})], "not in the data", [], [w.path("run")]


@row("train/truncated-checkpoint")
def _(w):
    ckpt = w.path("run") / "checkpoint-2"
    ckpt.mkdir(parents=True)
    src = w.adapter / "adapter_model.safetensors"
    (ckpt / "adapter_model.safetensors").write_bytes(src.read_bytes()[:100])
    return ["train", w.yaml(), "--resume"], "not a readable safetensors file", [w.path("run")], []


@row("train/malicious-pickle-in-checkpoint")
def _(w):
    # a real checkpoint whose optimizer.pt would run code when unpickled without weights_only
    run = w.path("run")
    res = cli("train", w.yaml("ok.yaml", training={"save_strategy": "steps", "save_steps": 1}))
    assert res.exit_code == 0, res.output
    ckpt = sorted(run.glob("checkpoint-*"))[-1]
    (ckpt / "optimizer.pt").write_bytes(b"cos\nsystem\n(S'touch " + str(w.path("pwned")).encode() + b"'\ntR.")
    return ["train", w.yaml(), "--resume"], "optimizer.pt was refused", [run], [w.path("pwned")]


# damaged adapters, for every command that reads one ----------------------------------------
for how in ("truncated", "random"):
    for cmd in ("export", "generate", "sweep", "info"):
        def build(w, how=how, cmd=cmd):
            damaged_weights(w, how)
            args = {
                "export": ["export", "adapter", w.adapter, "--rank", "2", "--out", w.path("o")],
                "generate": ["generate", w.adapter, "--ranks", "1,2", "--prompt", "hi"],
                "sweep": ["sweep", w.adapter, "--data", w.data, "--out", w.path("o")],
                "info": ["info", w.adapter],
            }[cmd]
            return args, "not a readable safetensors file", [], [w.path("o")]

        ROWS[f"{cmd}/{how}-adapter-weights"] = build


@row("generate/config-r-max-disagrees-with-tensors")
def _(w):
    qconfig(w, config_r_max=16)
    return ["generate", w.adapter, "--ranks", "1,4", "--prompt", "hi"], "do not belong together", [], []


@row("info/config-r-max-disagrees-with-tensors")
def _(w):
    qconfig(w, config_r_max=16)
    return ["info", w.adapter], "do not belong together", [], []


@row("info/missing-folder")
def _(w):
    return ["info", w.path("nope")], "does not exist", [], []


@row("export/config-section-not-an-object")
def _(w):
    qconfig(w, config=5)
    return ["export", "adapter", w.adapter, "--rank", "2", "--out", w.path("o")], "'config' must be", [], [w.path("o")]


@row("export/recommended-rank-not-a-number")
def _(w):
    p = w.adapter / "qdylora_config.json"
    data = json.loads(p.read_text())
    data["sweep"]["recommended_rank"] = "x"
    p.write_text(json.dumps(data))
    return ["export", "adapter", w.adapter, "--rank", "recommended", "--out", w.path("o")], "sweep", [], [w.path("o")]


@row("export/adapter-config-is-a-list")
def _(w):
    (w.adapter / "adapter_config.json").write_text("[1, 2]")
    return ["export", "adapter", w.adapter, "--rank", "2", "--out", w.path("o")], "must hold a JSON object", [], [w.path("o")]


@row("export/out-is-a-file")
def _(w):
    f = w.path("o")
    f.write_text("mine")
    return ["export", "adapter", w.adapter, "--rank", "2", "--out", f, "--overwrite"], "not a folder", [f], []


@row("export/out-under-a-file")
def _(w):
    f = w.path("o")
    f.write_text("mine")
    return ["export", "adapter", w.adapter, "--rank", "2", "--out", f / "sub"], "which is a file", [f], []


@row("export/read-only-parent")
def _(w):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (CI runs as root)")
    ro = w.path("ro")
    ro.mkdir()
    ro.chmod(0o555)
    return ["export", "adapter", w.adapter, "--rank", "2", "--out", ro / "o"], "permission denied", [ro], [ro / "o"]


@row("generate/json-onto-existing-file")
def _(w):
    f = w.path("answers.json")
    f.write_text("{}")
    return ["generate", w.adapter, "--ranks", "1", "--prompt", "hi", "--json", f], "--overwrite", [f], []


@row("generate/template-with-unknown-placeholder")
def _(w):
    return ["generate", w.adapter, "--ranks", "1", "--prompt", "hi", "--template", "{x}{prompt}"], "placeholder", [], []


@row("generate/base-without-tokenizer")
def _(w):
    bare = w.path("bare")
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(w.base / f, bare)
    for f in w.adapter.glob("tokenizer*"):
        f.unlink()
    return ["generate", w.adapter, "--ranks", "1", "--prompt", "hi", "--base", bare], "tokenizer", [bare], []


@row("sweep/missing-data")
def _(w):
    return ["sweep", w.adapter, "--data", w.path("missing.jsonl"), "--out", w.path("o")], "does not exist", [], [w.path("o")]


@row("sweep/data-not-json")
def _(w):
    f = w.path("notes.txt")
    f.write_text("just some notes\n")
    return ["sweep", w.adapter, "--data", f, "--out", w.path("o")], ".json or .jsonl", [f], [w.path("o")]


@row("sweep/batch-size-0")
def _(w):
    return ["sweep", w.adapter, "--data", w.data, "--batch-size", "0", "--out", w.path("o")], "batch-size", [], [w.path("o")]


@row("sweep/rank-above-r-max")
def _(w):
    return ["sweep", w.adapter, "--data", w.data, "--ranks", "1,9", "--out", w.path("o")], "outside the trained range", [], [w.path("o")]


@row("export/svd-rank-above-r")
def _(w):
    return ["export", "adapter", w.adapter, "--rank", "9", "--method", "svd", "--out", w.path("o")], "outside", [], [w.path("o")]


@row("export/unknown-method")
def _(w):
    return ["export", "adapter", w.adapter, "--rank", "2", "--method", "best", "--out", w.path("o")], "best", [], [w.path("o")]


@row("sweep/unknown-method")
def _(w):
    return ["sweep", w.adapter, "--data", w.data, "--method", "prefix,best", "--out", w.path("o")], "best", [], [w.path("o")]


@row("plan/r-max-0")
def _(w):
    return ["plan", w.base / "config.json", "--r-max", "0"], "r_max must be", [], []


@row("plan/missing-config")
def _(w):
    return ["plan", w.path("nope.json"), "--r-max", "8"], "", [], []


@row("demo/out-is-a-file")
def _(w):
    f = w.path("demo")
    f.write_text("mine")
    return ["demo", "--out", f, "--overwrite"], "is a file", [f], []


@pytest.mark.parametrize("name", sorted(ROWS))
def test_refused_cleanly(world, name):
    args, needle, extra_inputs, outputs = ROWS[name](world)
    refused(args, needle, world.inputs + extra_inputs, outputs)


# -- leftovers of killed processes ------------------------------------------------------------
def test_stale_moved_aside_output_is_restored_not_deleted(world):
    """A process killed between its two renames leaves the previous output moved aside: it holds
    the user's data, so it is put back (and otherwise kept), never silently deleted."""
    out = world.path("ship")
    assert cli("export", "adapter", world.adapter, "--rank", "2", "--out", out).exit_code == 0
    dead = _dead_pid()
    moved = world.path(f".ship.qdylora-old-{dead}-deadbeef")
    os.replace(out, moved)
    before = digest([moved])
    res = cli("export", "adapter", world.adapter, "--rank", "4", "--out", out)
    assert res.exit_code == 2 and "--overwrite" in res.output  # restored, so it exists again
    assert not moved.exists() and {k.replace(str(moved), str(out)): v for k, v in before.items()} == digest([out])
    # with the output present, a moved-aside copy is reported and kept, even with --overwrite
    shutil.copytree(out, moved)
    res = cli("export", "adapter", world.adapter, "--rank", "4", "--out", out, "--overwrite")
    assert res.exit_code == 0 and "never deletes it" in res.output
    assert moved.is_dir() and digest([moved]) == before


def test_stale_temporary_of_dead_process_is_removed_and_reported(world):
    """Any export into a folder clears what dead exports left there (another name's too)."""
    out = world.path("ship")
    stale = world.path(f".other.qdylora-tmp-{_dead_pid()}-deadbeef")
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    res = cli("export", "adapter", world.adapter, "--rank", "2", "--out", out)
    assert res.exit_code == 0 and not stale.exists() and "unfinished export" in res.output


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


KILL = """
import sys, time
from qdylora.exporters import merged
real = merged.merge_shard
def slow(*args, **kwargs):
    n = real(*args, **kwargs)
    time.sleep(float(sys.argv[4]))
    return n
merged.merge_shard = slow
merged.export_merged(sys.argv[1], sys.argv[2], 2, base_model=sys.argv[3], dtype="float32", overwrite=True)
"""


def test_kill_9_during_merged_export_never_leaves_a_partial_output(world):
    """Kill a merged export at several moments: OUT is absent or whole, the inputs unchanged."""
    from transformers import AutoModelForCausalLM

    sharded = world.path("sharded")
    AutoModelForCausalLM.from_pretrained(world.base).save_pretrained(sharded, max_shard_size="40KB")
    shutil.copy(world.base / "tokenizer.json", sharded)
    inputs = digest([world.adapter, sharded])
    out = world.path("merged")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = None
    for delay in (0.0, 1.5, 3.0, 6.0):
        proc = subprocess.Popen([sys.executable, "-c", KILL, str(world.adapter), str(out), str(sharded), "0.3"], env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            files = digest([out])
            whole = whole or files
            assert files == whole and any(k.endswith("config.json") for k in files)
        assert digest([world.adapter, sharded]) == inputs
    subprocess.run([sys.executable, "-c", KILL, str(world.adapter), str(out), str(sharded), "0"], env=env, check=True)
    assert not [p for p in world.tmp.iterdir() if p.name.startswith(".merged.qdylora-tmp-")]  # the rerun cleaned up


# -- reproducibility and file modes ---------------------------------------------------------
def test_fixed_seed_gives_identical_adapters_in_two_processes(world):
    """The LoRA init draws random numbers: it must follow `seed`, so two fresh processes agree."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs = []
    for i in range(2):
        out = world.path(f"run{i}")
        cfg = world.yaml(f"seed{i}.yaml", training={"output_dir": str(out), "seed": 0})
        subprocess.run([sys.executable, "-m", "qdylora.cli", "train", str(cfg)], env=env, check=True,
                       capture_output=True)
        outs.append((out / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_written_files_get_the_umask_mode(world):
    """safetensors writes 0600 files; ours get what `open()` would give (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    run = world.path("run")
    assert cli("train", world.yaml(eval_data={"path": str(world.data)})).exit_code == 0
    assert cli("export", "adapter", run, "--rank", "2", "--out", world.path("a")).exit_code == 0
    assert cli("export", "merged", run, "--rank", "2", "--out", world.path("m"), "--dtype", "float32").exit_code == 0
    files = [run / "adapter_model.safetensors", run / "rank_sweep.png", world.path("a") / "adapter_model.safetensors",
             *world.path("m").glob("*.safetensors")]
    assert len(files) >= 4
    assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {str(f): oct(want) for f in files}


def test_a_failing_sweep_after_training_keeps_the_adapter(world, monkeypatch):
    """The adapter is saved before the sweep runs, so nothing after training can lose it."""
    from qdylora.recipe import Recipe
    from qdylora.workflow import run
    from qdylora.trainer_ext.trainer import QDyLoraMixin

    def broken(self, *args, **kwargs):
        raise RuntimeError("the sweep broke")

    monkeypatch.setattr(QDyLoraMixin, "evaluate_ranks", broken)
    recipe = Recipe.from_yaml(world.yaml(eval_data={"path": str(world.data)}))
    with pytest.raises(RuntimeError, match="the sweep broke"):
        run(recipe)
    run_dir = world.path("run")
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "qdylora_config.json").is_file()
    assert cli("export", "adapter", run_dir, "--rank", "2", "--out", world.path("a")).exit_code == 0


def test_inside_ok_allows_a_new_subfolder_of_the_input_only(world):
    """The Axolotl plugin writes OUTPUT/exports inside its run: allowed with inside_ok, while the
    input itself (or a folder holding it) stays refused."""
    from qdylora.errors import InputError
    from qdylora.exporters.staging import check_not_input

    check_not_input(world.adapter / "exports", [world.adapter], inside_ok=True)  # allowed
    with pytest.raises(InputError, match="input"):
        check_not_input(world.adapter / "exports", [world.adapter])  # the CLI's rule: refused
    for out in (world.adapter, world.tmp):  # is / contains the input: refused even with inside_ok
        with pytest.raises(InputError, match="input"):
            check_not_input(out, [world.adapter], inside_ok=True)

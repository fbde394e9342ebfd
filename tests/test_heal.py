"""Healing a rank of one run: `lora_model_dir:` in the train YAML (Axolotl's key: train an existing
PEFT LoRA adapter further) and `qdylora heal`, which exports the rank-b cut and trains it that way
(benchmarks/results/planted.md: a healed cut matches a run trained for that rank)."""

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from qdylora.cli import main


def _yaml(tmp_path, name, model_dir, data, out, **extra):
    cfg = {
        "model": str(model_dir),
        "data": {"path": str(data[0]), "max_length": 48},
        "eval_data": {"path": str(data[1]), "max_length": 48},
        "qdylora": {"preset": "plain"},
        "training": {"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 4,
                     "learning_rate": 0.01, "logging_steps": 2, "disable_tqdm": True},
    }
    cfg.update(extra)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _invoke(args):
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def cut(tmp_path_factory, tiny_llama, arithmetic_data):
    """One plain r8 run, its rank-2 svd cut exported after the sweep: (cut folder, recorded sweep)."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = _yaml(tmp, "run.yaml", tiny_llama, arithmetic_data, tmp / "run",
                lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
                sweep={"ranks": [1, 2, 8], "methods": ["svd"]}, export={"ranks": [2], "method": "svd"})
    res = _invoke(["train", str(cfg)])
    assert res.exit_code == 0, res.output
    sweep = json.loads((tmp / "run" / "qdylora_config.json").read_text())["sweep"]
    return tmp / "run" / "qdylora-exports" / "rank-2", sweep, cfg


def test_training_starts_from_the_adapter_in_lora_model_dir(cut, tiny_llama, arithmetic_data, tmp_path):
    """At learning rate 0 the trained adapter IS the cut (a fresh adapter would have lora_B = 0 and
    new random lora_A); with a learning rate it moves, keeps the cut's rank and targets, records
    this run's base, and heals: its rank-2 eval loss ends below the cut's (the run's svd sweep)."""
    folder, sweep, _ = cut
    start = load_file(folder / "adapter_model.safetensors")
    frozen = _yaml(tmp_path, "a.yaml", tiny_llama, arithmetic_data, tmp_path / "frozen", lora_model_dir=str(folder),
                   training={"output_dir": str(tmp_path / "frozen"), "max_steps": 2, "learning_rate": 0.0,
                             "per_device_train_batch_size": 4, "disable_tqdm": True}, sweep={"enabled": False})
    res = _invoke(["train", str(frozen)])
    assert res.exit_code == 0, res.output
    got = load_file(tmp_path / "frozen" / "adapter_model.safetensors")
    assert got.keys() == start.keys() and len(got) > 0
    assert all(torch.equal(got[k], start[k]) for k in start)

    healed = _yaml(tmp_path, "b.yaml", tiny_llama, arithmetic_data, tmp_path / "healed", lora_model_dir=str(folder),
                   sweep={"ranks": [1, 2]})
    res = _invoke(["train", str(healed)])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "healed" / "adapter_config.json").read_text())
    source = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == source["lora_alpha"]
    assert sorted(config["target_modules"]) == sorted(source["target_modules"])
    assert config["base_model_name_or_path"] == str(tiny_llama) and config["inference_mode"] is True
    moved = load_file(tmp_path / "healed" / "adapter_model.safetensors")
    assert not all(torch.equal(moved[k], start[k]) for k in start)
    after = json.loads((tmp_path / "healed" / "qdylora_config.json").read_text())
    assert after["config"]["r_max"] == 2
    metric = sweep["metric"]
    assert after["sweep"]["results"]["2"][metric] < sweep["methods"]["svd"]["2"][metric]


def test_bad_lora_model_dir_is_one_line_before_training(cut, tiny_llama, arithmetic_data, tmp_path):
    from qdylora.testing import lora_model, make_tiny_model

    folder, _, _ = cut

    def fails(cfg, needle):
        res = _invoke(["train", str(cfg)])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
        assert not (tmp_path / "o").exists()  # refused before anything was written
        return lines[0]

    fails(_yaml(tmp_path, "c.yaml", tiny_llama, arithmetic_data, tmp_path / "o", lora_model_dir=str(folder),
                lora={"r": 4}), "not both")
    fails(_yaml(tmp_path, "c.yaml", tiny_llama, arithmetic_data, tmp_path / "o",
                lora_model_dir=str(tmp_path / "nope")), "lora_model_dir: adapter folder")
    line = fails(_yaml(tmp_path, "c.yaml", tiny_llama, arithmetic_data, tmp_path / "o", lora_model_dir=str(folder),
                       sweep={"ranks": [1, 4]}), "sweep.ranks")
    assert "1..2" in line
    # an adapter made for another model size: refused before the base loads, naming the layer's shape
    wider = make_tiny_model(tmp_path / "wider", "llama", hidden=32)
    other = tmp_path / "other"
    lora_model(wider, r=2, load_in_4bit=False, seed=0).save_pretrained(other)
    line = fails(_yaml(tmp_path, "c.yaml", tiny_llama, arithmetic_data, tmp_path / "o", lora_model_dir=str(other)),
                 "of shape")
    assert line.startswith("Error: lora_model_dir:") and "another model size" in line and str(tiny_llama) in line


def test_heal_is_the_cut_trained_with_lora_model_dir(cut, tiny_llama, arithmetic_data, tmp_path):
    """`qdylora heal RUN.yaml --rank 2` = the rank-2 svd cut trained from `lora_model_dir` for a tenth of
    the run's steps (at least one) at 0.3x its learning rate, constant, seed + 100: the same tensors, bit
    for bit, as that YAML written by hand; the run is left as it was; both losses are reported."""
    folder, sweep, cfg = cut
    run_dir = folder.parent.parent
    before = _tree(run_dir)
    res = _invoke(["heal", str(cfg), "--rank", "2", "--out", str(tmp_path / "healed")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "healed" / "qdylora_heal.json").read_text())
    assert (info["rank"], info["method"], info["steps"], info["seed"]) == (2, "svd", 1, 142)
    assert info["learning_rate"] == pytest.approx(0.003) and info["source"] == str(run_dir.resolve())
    metric = sweep["metric"]
    assert info["cut_" + metric] == sweep["methods"]["svd"]["2"][metric]
    assert f"{info['cut_' + metric]:.4f} as cut" in res.output and f"{info['healed_' + metric]:.4f} healed" in res.output
    assert _tree(run_dir) == before

    by_hand = _yaml(tmp_path, "h.yaml", tiny_llama, arithmetic_data, tmp_path / "by-hand", lora_model_dir=str(folder),
                    training={"output_dir": str(tmp_path / "by-hand"), "max_steps": 1, "learning_rate": 0.003,
                              "lr_scheduler_type": "constant", "seed": 142, "per_device_train_batch_size": 4,
                              "logging_steps": 2, "disable_tqdm": True}, sweep={"ranks": [2], "methods": ["svd"]})
    assert _invoke(["train", str(by_hand)]).exit_code == 0
    want = load_file(tmp_path / "by-hand" / "adapter_model.safetensors")
    got = load_file(tmp_path / "healed" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], load_file(folder / "adapter_model.safetensors")[k]) for k in want)
    stored = json.loads((tmp_path / "healed" / "qdylora_config.json").read_text())
    assert stored["config"]["ranks"] == [2] and stored["sweep"]["results"]["2"][metric] == info["healed_" + metric]


def test_healing_measures_on_the_runs_own_eval_records(tiny_llama, arithmetic_data, tmp_path):
    """With eval_size (the eval set split off `data`), the healing keeps the RUN's split although its own
    training seed is the run's + 100: healed at learning rate 0 the adapter IS the cut, so its eval loss
    equals the one the run's sweep recorded for that cut (on other records it would not)."""
    cfg = _yaml(tmp_path, "run.yaml", tiny_llama, arithmetic_data, tmp_path / "run", eval_size=0.25,
                lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}, sweep={"ranks": [2, 8], "methods": ["svd"]})
    raw = yaml.safe_load(cfg.read_text())
    del raw["eval_data"]
    cfg.write_text(yaml.safe_dump(raw))
    assert _invoke(["train", str(cfg)]).exit_code == 0
    res = _invoke(["heal", str(cfg), "--rank", "2", "--lr-factor", "0", "--out", str(tmp_path / "healed")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "healed" / "qdylora_heal.json").read_text())
    metric = info["metric"]
    assert info["healed_" + metric] == pytest.approx(info["cut_" + metric], rel=1e-5)


def test_holdout_heals_on_records_the_run_never_saw(tiny_llama, arithmetic_data, tmp_path):
    """heal.holdout: the run holds back that fraction of its training records (after eval_size's split,
    same seed) and trains on the rest; qdylora_config.json records which; each healing trains on exactly
    those records and measures on the run's eval records: bit for bit a by-hand `lora_model_dir:` run on
    them. Changed data, or holdout asked of a run that held nothing back: one line, nothing written."""
    import datasets

    from qdylora.data import digest, load_tokenizer, split_records, tokenize
    from qdylora.recipe import Recipe
    from qdylora.workflow import build

    data = tmp_path / "train.jsonl"
    shutil.copy(arithmetic_data[0], data)
    run_dir = tmp_path / "run"
    cfg = _yaml(tmp_path, "run.yaml", tiny_llama, (data, None), run_dir, eval_size=0.25,
                lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}, sweep={"ranks": [2, 8], "methods": ["svd"]},
                heal={"rank": 2, "holdout": 0.25})
    raw = yaml.safe_load(cfg.read_text())
    del raw["eval_data"]
    cfg.write_text(yaml.safe_dump(raw))
    records = datasets.load_dataset("json", data_files=str(data), split="train")
    train, evals, held = split_records(records, eval_size=0.25, holdout=0.25, seed=42)  # training.seed: 42
    assert (len(train), len(evals), len(held)) == (36, 16, 12)
    trainer, record = build(Recipe.from_yaml(cfg))  # what the run trains on: the rest only
    assert len(trainer.train_dataset) == 36 and len(trainer.eval_dataset) == 16
    assert record == {"holdout": 0.25, "split_seed": 42, "records": 12, "sha256": digest(held)}
    spec = Recipe.from_yaml(cfg).data
    assert trainer.train_dataset["input_ids"] == tokenize(spec, load_tokenizer(str(tiny_llama)), train)["input_ids"]
    del trainer

    res = _invoke(["train", str(cfg)])
    assert res.exit_code == 0, res.output
    assert json.loads((run_dir / "qdylora_config.json").read_text())["heal_data"] == record
    info = json.loads((run_dir / "qdylora-healed" / "rank-2" / "qdylora_heal.json").read_text())
    assert info["held_out_records"] == 12 and "on the 12 records the run held back" in res.output

    held.to_json(str(tmp_path / "held.jsonl"), lines=True)
    evals.to_json(str(tmp_path / "evals.jsonl"), lines=True)
    cut = tmp_path / "cut"
    assert _invoke(["export", "adapter", str(run_dir), "--rank", "2", "--method", "svd", "--out", str(cut)]).exit_code == 0
    by_hand = _yaml(tmp_path, "h.yaml", tiny_llama, (tmp_path / "held.jsonl", tmp_path / "evals.jsonl"),
                    tmp_path / "by-hand", lora_model_dir=str(cut),
                    training={"output_dir": str(tmp_path / "by-hand"), "max_steps": 1, "learning_rate": 0.003,
                              "lr_scheduler_type": "constant", "seed": 142, "per_device_train_batch_size": 4,
                              "logging_steps": 2, "disable_tqdm": True}, sweep={"ranks": [2], "methods": ["svd"]})
    assert _invoke(["train", str(by_hand)]).exit_code == 0
    want = load_file(tmp_path / "by-hand" / "adapter_model.safetensors")
    got = load_file(run_dir / "qdylora-healed" / "rank-2" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    by_hand_sweep = json.loads((tmp_path / "by-hand" / "qdylora_config.json").read_text())["sweep"]
    assert info["healed_" + info["metric"]] == by_hand_sweep["results"]["2"][info["metric"]]

    before = _tree(run_dir)
    data.write_text("".join(data.read_text().splitlines(keepends=True)[1:]))  # one record fewer
    res = _invoke(["heal", str(cfg), "--rank", "2", "--out", str(tmp_path / "o")])
    lines = [line for line in res.output.splitlines() if line.startswith("Error")]  # (datasets' progress bar too)
    assert res.exit_code == 2 and len(lines) == 1 and "no longer gives them" in lines[0], res.output
    plain = tmp_path / "plain"
    shutil.copytree(run_dir, plain, ignore=shutil.ignore_patterns("qdylora-healed"))
    stored = json.loads((plain / "qdylora_config.json").read_text())
    stored["heal_data"] = None  # as a run trained without heal.holdout
    (plain / "qdylora_config.json").write_text(json.dumps(stored))
    res = _invoke(["heal", str(cfg), "--rank", "2", "--adapter", str(plain), "--out", str(tmp_path / "o")])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "held nothing back" in lines[0], res.output
    assert not (tmp_path / "o").exists() and _tree(run_dir) == before


def test_heal_refuses_bad_input_before_training_and_never_touches_the_run(cut, tmp_path):
    folder, _, cfg = cut
    run_dir = folder.parent.parent
    before = _tree(run_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    no_steps = yaml.safe_load(cfg.read_text())
    del no_steps["training"]["max_steps"]
    (tmp_path / "epochs.yaml").write_text(yaml.safe_dump(no_steps))
    cases = [
        (["--rank", "2", "--out", str(run_dir), "--overwrite"], "run_dir"),
        (["--rank", "2", "--out", str(run_dir / ".." / run_dir.name), "--overwrite"], "run_dir"),
        (["--rank", "2", "--out", str(tmp_path / "taken")], "already exists"),
        (["--rank", "9", "--out", str(tmp_path / "o")], "outside the trained range 1..8"),
        (["--rank", "2", "--out", str(tmp_path / "o"), "--steps", "0"], "steps must be an integer >= 1"),
        (["--rank", "2", "--out", str(tmp_path / "o"), "--method", "pca"], "choose one of prefix, svd"),
        (["--rank", "2", "--out", str(tmp_path / "o"), "--method", "prefix"], "never measured"),
        (["--rank", "2", "--out", str(tmp_path / "o"), "--adapter", str(tmp_path / "none")], "does not exist"),
    ]
    for args, needle in cases:
        res = _invoke(["heal", str(cfg), *args])
        lines = res.output.strip().splitlines()
        if needle == "run_dir":
            needle = "lies inside the input"
        assert res.exit_code == 2 and len(lines) == 1, (args, res.output)
        assert needle in lines[0], (args, lines[0])
    res = _invoke(["heal", str(tmp_path / "epochs.yaml"), "--rank", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no max_steps" in res.output and "--steps" in res.output, res.output
    assert not (tmp_path / "o").exists() and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert _tree(run_dir) == before


def test_heal_section_heals_after_the_run_as_qdylora_heal_does(tiny_llama, arithmetic_data, tmp_path):
    """`heal: {rank: [recommended, 8]}` in the train YAML: after training and the sweep, the sweep's pick
    and rank 8 are each healed into <output_dir>/qdylora-healed/rank-<b>/, tensors equal bit for bit to
    `qdylora heal` of the same run (ranks taken from the YAML's heal section: a list works as --ranks),
    reported after the sweep table."""
    run_dir = tmp_path / "run"
    cfg = _yaml(tmp_path, "run.yaml", tiny_llama, arithmetic_data, run_dir,
                lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
                sweep={"ranks": [1, 2, 8], "methods": ["svd"]}, heal={"rank": ["recommended", 8], "lr_factor": 0.5})
    res = _invoke(["train", str(cfg)])
    assert res.exit_code == 0, res.output
    b = json.loads((run_dir / "qdylora_config.json").read_text())["sweep"]["recommended_rank"]
    assert b < 8  # (the tiny run's sweep picks a low rank: two ranks are healed below)
    for rank in (b, 8):
        healed = run_dir / "qdylora-healed" / f"rank-{rank}"
        info = json.loads((healed / "qdylora_heal.json").read_text())
        assert (info["rank"], info["method"], info["steps"]) == (rank, "svd", 1)
        assert info["learning_rate"] == pytest.approx(0.005)  # the section's lr_factor 0.5, not the default 0.3
        assert f"rank {rank} (svd cut of {run_dir.resolve()}) healed" in res.output
        assert json.loads((healed / "adapter_config.json").read_text())["r"] == rank
    assert sorted(p.name for p in (run_dir / "qdylora-healed").iterdir()) == sorted({f"rank-{b}", "rank-8"})
    assert res.output.index("recommended rank:") < res.output.index("healed for")

    before = _tree(run_dir)
    res = _invoke(["heal", str(cfg), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    for rank in (b, 8):
        want = load_file(run_dir / "qdylora-healed" / f"rank-{rank}" / "adapter_model.safetensors")
        got = load_file(tmp_path / "again" / f"rank-{rank}" / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _tree(run_dir) == before


def test_heal_from_several_cuts_keeps_the_better_one(tiny_llama, arithmetic_data, tmp_path):
    """--method svd,prefix heals rank b from each cut, exactly as --method svd and --method prefix do
    alone (same tensors, bit for bit), and keeps the one with the lower eval loss; qdylora_heal.json
    records both. --rank recommended heals the sweep's rank from the svd cut even if the sweep picked
    prefix. Without eval data to choose on it is one line, before anything is written."""
    cfg = _yaml(tmp_path, "run.yaml", tiny_llama, arithmetic_data, tmp_path / "run",
                lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}, sweep={"ranks": [1, 2, 8]})
    assert _invoke(["train", str(cfg)]).exit_code == 0  # a plain run: its sweep measures svd and prefix
    single = {}
    for m in ("svd", "prefix"):
        res = _invoke(["heal", str(cfg), "--rank", "2", "--method", m, "--out", str(tmp_path / m)])
        assert res.exit_code == 0, res.output
        single[m] = json.loads((tmp_path / m / "qdylora_heal.json").read_text())
    res = _invoke(["heal", str(cfg), "--rank", "2", "--method", "svd,prefix", "--out", str(tmp_path / "both")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "both" / "qdylora_heal.json").read_text())
    metric = info["metric"]
    healed = {m: single[m]["healed_" + metric] for m in single}
    assert healed["svd"] != healed["prefix"]  # the two starts heal to different adapters
    winner = min(healed, key=healed.get)
    assert info["method"] == winner and info["healed_" + metric] == healed[winner]
    assert info["tried"] == {m: {"cut_" + metric: single[m]["cut_" + metric], "healed_" + metric: healed[m]}
                             for m in ("svd", "prefix")}
    got = load_file(tmp_path / "both" / "adapter_model.safetensors")
    want = load_file(tmp_path / winner / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert f"kept {winner}" in res.output
    # 'recommended' is the sweep's rank; the start stays the adapter's own reading (svd for a plain run)
    # even where the sweep picked prefix (which start heals better is not what the sweep measures)
    shutil.copytree(tmp_path / "run", tmp_path / "run-p")
    stored = json.loads((tmp_path / "run-p" / "qdylora_config.json").read_text())
    stored["sweep"].update(recommended_rank=2, recommended_method="prefix")
    (tmp_path / "run-p" / "qdylora_config.json").write_text(json.dumps(stored))
    res = _invoke(["heal", str(cfg), "--rank", "recommended", "--adapter", str(tmp_path / "run-p"),
                   "--out", str(tmp_path / "rec")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "rec" / "qdylora_heal.json").read_text())
    assert (rec["rank"], rec["method"]) == (2, "svd")
    got = load_file(tmp_path / "rec" / "adapter_model.safetensors")
    want = load_file(tmp_path / "svd" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    no_eval = yaml.safe_load(cfg.read_text())
    del no_eval["eval_data"]
    (tmp_path / "no-eval.yaml").write_text(yaml.safe_dump(no_eval))
    res = _invoke(["heal", str(tmp_path / "no-eval.yaml"), "--rank", "2", "--method", "svd,prefix",
                   "--out", str(tmp_path / "o")])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "lists several cuts" in lines[0], res.output
    assert not (tmp_path / "o").exists()


def test_bad_heal_section_is_one_line_before_training(tiny_llama, arithmetic_data, tmp_path):
    def fails(needle, **extra):
        cfg = _yaml(tmp_path, "c.yaml", tiny_llama, arithmetic_data, tmp_path / "o",
                    lora={"r": 8, "lora_alpha": 16}, **extra)
        res = _invoke(["train", str(cfg)])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (extra, res.output)
        assert not (tmp_path / "o").exists()

    fails("give the rank to heal", heal={})
    fails("rank must be an integer >= 1", heal={"rank": 0})
    fails("rank must be an integer >= 1", heal={"rank": [2, 0]})
    fails("heal.rank [9] outside", heal={"rank": [2, 9]})
    fails("heal.rank", heal={"rank": 9})
    fails("rank='best' is not allowed", heal={"rank": "best"})
    fails("heal.rank lists 'recommended'", heal={"rank": "recommended"}, sweep={"enabled": False})
    fails("heal.method is prefix", heal={"rank": 2, "method": "prefix"}, sweep={"methods": ["svd"]})
    fails("heal.method lists several cuts", qdylora={"r_min": 1}, heal={"rank": 2, "method": ["svd", "prefix"]},
          sweep={"enabled": False})
    fails("choose one of prefix, svd", heal={"rank": 2, "method": "svd,pca"})
    fails("heal key", heal={"rank": 2, "stpes": 3})
    fails("no max_steps", heal={"rank": 2},
          training={"output_dir": str(tmp_path / "o"), "num_train_epochs": 1, "disable_tqdm": True})
    from qdylora.recipe import Recipe  # holdout alone heals nothing now: an epoch-based run is fine
    epochs = _yaml(tmp_path, "e.yaml", tiny_llama, arithmetic_data, tmp_path / "o", heal={"holdout": 0.1},
                   training={"output_dir": str(tmp_path / "o"), "num_train_epochs": 1})
    assert Recipe.from_yaml(epochs).heal.holdout == 0.1
    # healing runs in one process: refused under a launcher before anything is trained or written
    from qdylora.recipe import Recipe
    from qdylora.workflow import InputError, run

    cfg = _yaml(tmp_path, "c.yaml", tiny_llama, arithmetic_data, tmp_path / "o", lora={"r": 8}, heal={"rank": 2})
    recipe = Recipe.from_yaml(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLD_SIZE", "2")
        with pytest.raises(InputError, match="one process"):
            run(recipe)
    assert not (tmp_path / "o").exists()
    # qdylora heal needs a rank: --rank, or the CONFIG's heal.rank
    res = _invoke(["heal", str(_yaml(tmp_path, "d.yaml", tiny_llama, arithmetic_data, tmp_path / "o")),
                   "--out", str(tmp_path / "h")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "--rank" in res.output, res.output
    assert not (tmp_path / "h").exists()


def test_heal_ranks_heals_each_rank_as_heal_does_into_one_folder(cut, tmp_path):
    """`--ranks 1,2,recommended`: each rank healed on its own, bit for bit as `--rank b` heals it, into
    OUT/rank-<b>/ ('recommended' once, being one of them); a rank outside the run is refused before
    any healing, leaving no OUT; --rank and --ranks together is one line."""
    folder, sweep, cfg = cut
    run_dir = folder.parent.parent
    before = _tree(run_dir)
    res = _invoke(["heal", str(cfg), "--ranks", "2,1,recommended", "--out", str(tmp_path / "many")])
    assert res.exit_code == 0, res.output
    assert sweep["recommended_rank"] in (1, 2)  # (the tiny run's pick: healed once, as its integer)
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["rank-1", "rank-2"]
    for b in (1, 2):
        res_one = _invoke(["heal", str(cfg), "--rank", str(b), "--out", str(tmp_path / f"one-{b}")])
        assert res_one.exit_code == 0, res_one.output
        want = load_file(tmp_path / f"one-{b}" / "adapter_model.safetensors")
        got = load_file(tmp_path / "many" / f"rank-{b}" / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        info = json.loads((tmp_path / "many" / f"rank-{b}" / "qdylora_heal.json").read_text())
        assert info == json.loads((tmp_path / f"one-{b}" / "qdylora_heal.json").read_text())
        assert f"rank {b} (svd cut of" in res.output
    assert _tree(run_dir) == before
    for args, needle in [(["--ranks", "1,9"], "outside the trained range 1..8"),
                         (["--rank", "2", "--ranks", "1,2"], "not both"),
                         (["--ranks", "1,x"], "--ranks:")]:
        res = _invoke(["heal", str(cfg), *args, "--out", str(tmp_path / "o")])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, res.output)
        assert not (tmp_path / "o").exists()


def test_healing_the_full_rank_continues_the_run_in_its_svd_basis(cut, tmp_path):
    """--rank r_max of a plain run (the compute-neutral pipeline heals it too): the svd "cut" is the whole
    delta rotated into its SVD basis, so at learning rate 0 the healed adapter has other factors but
    the same product B @ A in every layer as the run."""
    folder, _, cfg = cut
    run_dir = folder.parent.parent
    res = _invoke(["heal", str(cfg), "--rank", "8", "--out", str(tmp_path / "full"), "--lr-factor", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["r"] == 8
    run, got = load_file(run_dir / "adapter_model.safetensors"), load_file(tmp_path / "full" / "adapter_model.safetensors")
    pairs = [k for k in run if k.endswith("lora_A.weight")]
    assert pairs and got.keys() == run.keys()
    for a in pairs:
        b = a.replace("lora_A", "lora_B")
        assert not torch.equal(got[a], run[a])  # another basis...
        torch.testing.assert_close(got[b] @ got[a], run[b] @ run[a], rtol=1e-4, atol=1e-6)  # ...the same delta

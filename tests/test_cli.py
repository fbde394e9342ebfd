"""The click CLI: train -> sweep -> info end to end, and bad input exits 2 with one line."""

import json

import pytest
import yaml
from click.testing import CliRunner

from qdylora.cli import main


def _yaml(tmp_path, model_dir, data, out, **extra):
    cfg = {
        "model": str(model_dir),
        "data": {"path": str(data[0]), "max_length": 48},
        "eval_data": {"path": str(data[1]), "max_length": 48},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "qdylora": {"r_min": 1},
        "training": {"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 4,
                     "learning_rate": 0.01, "logging_steps": 2, "warmup_ratio": 0.03, "disable_tqdm": True},
        "sweep": {"ranks": [1, 2, 8]},
    }
    cfg.update(extra)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, arithmetic_data):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "out"
    result = CliRunner().invoke(main, ["train", str(_yaml(tmp, tiny_llama, arithmetic_data, out))])
    assert result.exit_code == 0, result.output
    return out, result


def test_train_writes_adapter_config_and_sweep(trained):
    out, result = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "qdylora_config.json",
                 "rank_sweep.json", "rank_sweep.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "qdylora_config.json").read_text())
    assert data["config"]["r_max"] == 8
    assert set(data["sweep"]["results"]) == {"1", "2", "8"}
    assert "recommended rank" in result.output


def test_sweep_and_info(trained, arithmetic_data, tmp_path):
    out, _ = trained
    res = CliRunner().invoke(main, ["sweep", str(out), "--data", str(arithmetic_data[1]), "--ranks", "1,4",
                                    "--refine", "--out", str(tmp_path / "sw"), "--max-length", "48"])
    assert res.exit_code == 0, res.output
    sweep = json.loads((tmp_path / "sw" / "rank_sweep.json").read_text())
    assert {"1", "4"} <= set(sweep["results"]) and len(sweep["results"]) >= 3  # refined between neighbours
    assert json.loads((out / "qdylora_config.json").read_text())["sweep"]["results"].keys() == sweep["results"].keys()
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "1..8" in info.output and "recommended" in info.output


def test_sweep_both_methods_then_export_recommended(trained, arithmetic_data, tmp_path):
    import shutil

    from qdylora.sweep_result import recommend

    out, _ = trained
    src = tmp_path / "src"
    shutil.copytree(out, src)
    res = CliRunner().invoke(main, ["sweep", str(src), "--data", str(arithmetic_data[1]), "--ranks", "1,2,8",
                                    "--method", "svd,prefix", "--out", str(tmp_path / "sw"), "--max-length", "48"])
    assert res.exit_code == 0, res.output
    sweep = json.loads((tmp_path / "sw" / "rank_sweep.json").read_text())
    assert list(sweep["methods"]) == ["svd", "prefix"] and sweep["method"] == "prefix"
    assert sweep["results"] == sweep["methods"]["prefix"]  # what readers from before methods read
    losses = {m: {int(r): v["eval_loss"] for r, v in res_m.items()} for m, res_m in sweep["methods"].items()}
    assert set(losses) == {"prefix", "svd"} and all(set(v) == {1, 2, 8} for v in losses.values())
    assert abs(losses["prefix"][8] - losses["svd"][8]) < 1e-5  # at r_max both are the adapter itself
    assert abs(losses["prefix"][1] - losses["svd"][1]) > 1e-4  # below it, the method matters
    pick = (sweep["recommended_rank"], sweep["recommended_method"])
    assert pick == recommend(losses, 0.01)
    assert f"recommended rank: {pick[0]} ({pick[1]})" in res.output and "AURAC" in res.output
    assert set(sweep["aurac"]) == {"prefix", "svd"}
    assert json.loads((src / "qdylora_config.json").read_text())["sweep"]["recommended_method"] == pick[1]
    res = CliRunner().invoke(main, ["export", "adapter", str(src), "--rank", "recommended", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "e" / "qdylora_export.json").read_text())
    assert (info["rank"], info["method"]) == pick
    # --ranks takes 'recommended' beside numbers and ranges, as the API and the plugin do
    res = CliRunner().invoke(main, ["export", "adapter", str(src), "--ranks", "1-2,recommended",
                                    "--out", str(tmp_path / "many")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == sorted({"rank-1", "rank-2", f"rank-{pick[0]}"})


def test_train_sweeps_both_methods_and_refuses_a_bad_one_first(tiny_llama, arithmetic_data, tmp_path):
    out = tmp_path / "o"
    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, out, sweep={"ranks": [1, 8], "methods": ["prefix", "pca"]})
    _fails_with(["train", str(cfg)], "sweep: method 'pca' is not allowed")
    assert not out.exists()  # refused before training
    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, out, sweep={"ranks": [1, 8], "methods": ["prefix", "svd"]})
    res = CliRunner().invoke(main, ["train", str(cfg)])
    assert res.exit_code == 0, res.output
    sweep = json.loads((out / "qdylora_config.json").read_text())["sweep"]
    assert set(sweep["methods"]) == {"prefix", "svd"} and set(sweep["methods"]["svd"]) == {"1", "8"}
    assert f"recommended rank: {sweep['recommended_rank']} ({sweep['recommended_method']})" in res.output


def test_prefix_export_of_a_full_rank_run_needs_the_sweep_to_measure_it_first(tiny_llama, arithmetic_data, tmp_path):
    """A plain run's prefix cut was never trained: `export: {method: prefix}` ships only once the run's
    own sweep measured prefix (the rule check_adapter applies after training), so it is refused at
    parse time, before anything is trained, when the sweep will not."""
    from qdylora.recipe import Recipe

    out = tmp_path / "o"
    plain = {"qdylora": {"preset": "plain"}, "export": {"ranks": [2], "method": "prefix"}}
    for sweep in ({"methods": ["svd"]}, {"enabled": False}):
        res = _fails_with(["train", str(_yaml(tmp_path, tiny_llama, arithmetic_data, out, sweep=sweep, **plain))],
                          "export.method is prefix, but this run trains only its full rank")
        assert "use export.method: svd" in res.output and len(res.output.strip().splitlines()) == 1
        assert not out.exists()
    # allowed: the plain run's default sweep measures svd and prefix; a QDyLoRA run trained its prefixes
    Recipe.from_yaml(_yaml(tmp_path, tiny_llama, arithmetic_data, out, **plain))
    Recipe.from_yaml(_yaml(tmp_path, tiny_llama, arithmetic_data, out, sweep={"enabled": False},
                           export={"ranks": [2], "method": "prefix"}))


def _fails_with(args, needle):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [line for line in res.output.strip().splitlines() if line.startswith("Error")]
    assert lines and needle in lines[-1], res.output
    return res


def test_bad_input_exits_2_with_a_readable_message(trained, tiny_llama, arithmetic_data, tmp_path):
    out, _ = trained
    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, tmp_path / "o", learning_rat=0.1)
    _fails_with(["train", str(cfg)], "unknown key(s) ['learning_rat']")
    _fails_with(["train", str(tmp_path / "missing.yaml")], "does not exist")
    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, out)  # existing output folder
    _fails_with(["train", str(cfg)], "--overwrite")
    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, tmp_path / "o", qdylora={"distribution": "normal"})
    _fails_with(["train", str(cfg)], "uniform, log_uniform")
    data = str(arithmetic_data[1])
    _fails_with(["sweep", str(out), "--data", data, "--ranks", "1,9"], "[9] outside the trained range 1..8")
    _fails_with(["sweep", str(out), "--data", data, "--ranks", "1,x"], "not a list of ranks")
    res = _fails_with(["sweep", str(out), "--data", data, "--method", "prefix,pca"], "method 'pca' is not allowed")
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    _fails_with(["sweep", str(out), "--data", str(tmp_path / "nope.jsonl")], "does not exist")
    _fails_with(["sweep", str(tmp_path / "no-adapter"), "--data", data], "does not exist")
    _fails_with(["info", str(tmp_path)], "not a PEFT adapter folder")  # no adapter files at all
    assert not (tmp_path / "o").exists()  # nothing half-written by the failed trainings


def test_training_key_typos_are_caught(tiny_llama, arithmetic_data, tmp_path):
    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, tmp_path / "o")
    raw = yaml.safe_load(cfg.read_text())
    raw["training"]["max_step"] = 3
    cfg.write_text(yaml.safe_dump(raw))
    _fails_with(["train", str(cfg)], "TrainingArguments")


def test_train_logs_sample_answers_per_rank(tiny_llama, arithmetic_data, tmp_path):
    from qdylora.recipe import Recipe
    from qdylora.workflow import run

    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, tmp_path / "o",
                samples={"prompts": ["What is 2 plus 3?"], "ranks": [1, 8], "max_new_tokens": 4})
    raw = yaml.safe_load(cfg.read_text())
    raw["training"].update({"eval_strategy": "steps", "eval_steps": 3})
    cfg.write_text(yaml.safe_dump(raw))
    trainer = run(Recipe.from_yaml(cfg)).trainer
    logged = [h for h in trainer.state.log_history if "eval_samples" in h]
    assert [h["step"] for h in logged] == [3, 6]
    assert {(row["prompt"], row["rank"]) for row in logged[-1]["eval_samples"]} == {
        ("What is 2 plus 3?", 1), ("What is 2 plus 3?", 8)}
    cfg2 = _yaml(tmp_path, tiny_llama, arithmetic_data, tmp_path / "o2", samples={"prompt": ["x"]})
    _fails_with(["train", str(cfg2)], "unknown samples key(s) ['prompt']")
    cfg3 = _yaml(tmp_path, tiny_llama, arithmetic_data, tmp_path / "o3", samples={"prompts": ["x"], "ranks": [9]})
    _fails_with(["train", str(cfg3)], "outside")


def test_yaml_preset_and_bad_preset(tiny_llama, arithmetic_data, tmp_path):
    from qdylora.recipe import Recipe

    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, tmp_path / "o")
    raw = yaml.safe_load(cfg.read_text())
    raw["qdylora"] = {"preset": "balanced", "r_min": 2}
    raw["sweep"] = {"ranks": [2, 8]}  # inside r_min..r_max (checked before training)
    cfg.write_text(yaml.safe_dump(raw))
    recipe = Recipe.from_yaml(cfg)
    assert (recipe.qdylora.scaling, recipe.qdylora.loss_weight, recipe.qdylora.r_min) == ("sqrt", "inverse_scale", 2)
    raw["qdylora"] = {"preset": "fast"}
    cfg.write_text(yaml.safe_dump(raw))
    _fails_with(["train", str(cfg)], "unknown preset 'fast'")


def test_train_exports_after_the_sweep_and_reports_it(tmp_path, tiny_llama, arithmetic_data):
    """`export:` in the YAML: the sweep's pick (under its method) and a fixed rank land in
    output_dir/qdylora-exports/rank-<b>/, each the SVD export of the saved adapter, and the
    report says so; the same steps the Axolotl plugin runs after its training."""
    import torch
    from safetensors.torch import load_file

    from qdylora.ranks import svd_truncate

    out = tmp_path / "out"
    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, out, sweep={"ranks": [1, 2, 8], "methods": ["svd"]},
                export={"ranks": [2, "recommended"], "method": "svd"})
    res = CliRunner().invoke(main, ["train", str(cfg)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "qdylora_config.json").read_text())["sweep"]["recommended_rank"]
    exports = out / "qdylora-exports"
    assert sorted(p.name for p in exports.iterdir()) == sorted({f"rank-{b}" for b in (2, rec)})
    for b in {2, rec}:
        info = json.loads((exports / f"rank-{b}" / "qdylora_export.json").read_text())
        assert (info["rank"], info["method"]) == (b, "svd")
        assert f"rank {b} (svd) of {out}" in res.output
    # the rank-2 export is the top-2 SVD of each layer's delta in the saved r_max adapter
    full = load_file(str(out / "adapter_model.safetensors"))
    low = load_file(str(exports / "rank-2" / "adapter_model.safetensors"))
    key = next(k for k in full if k.endswith("q_proj.lora_A.weight"))
    a, bb = full[key], full[key.replace("lora_A", "lora_B")]
    want_a, want_b = svd_truncate(a, bb, 16 / 8, 2, 16 / 2)
    got = low[key.replace("lora_A", "lora_B")] @ low[key]
    assert torch.allclose(got, want_b @ want_a, rtol=1e-4, atol=1e-6)
    assert "recommended rank:" in res.output and "written to" in res.output


def test_train_preset_plain_sweeps_and_exports_by_svd(tmp_path, tiny_llama, arithmetic_data):
    """`qdylora: {preset: plain}`: plain LoRA at r_max, then every lower rank read by svd (the
    best one-run pipeline measured on the planted task): with no method given the sweep measures
    svd and prefix, the export of [2, recommended] uses the recommended pair's method, an export
    with no method and no sweep pick reads svd, and prefix is accepted once the sweep measured it."""
    out = tmp_path / "out"
    cfg = _yaml(tmp_path, tiny_llama, arithmetic_data, out, qdylora={"preset": "plain"},
                sweep={"ranks": [1, 2, 8]}, export={"ranks": [2, "recommended"]})
    res = CliRunner().invoke(main, ["train", str(cfg)])
    assert res.exit_code == 0, res.output
    stored = json.loads((out / "qdylora_config.json").read_text())
    assert stored["config"]["ranks"] == [8] and list(stored["sweep"]["methods"]) == ["svd", "prefix"]
    exported = {json.loads((f / "qdylora_export.json").read_text())["rank"]:
                json.loads((f / "qdylora_export.json").read_text())["method"] for f in (out / "qdylora-exports").iterdir()}
    rec = (stored["sweep"]["recommended_rank"], stored["sweep"]["recommended_method"])
    # ranks [2, recommended]: one export, every rank under the recommended pair's method
    assert exported == {2: rec[1], rec[0]: rec[1]}
    info = CliRunner().invoke(main, ["info", str(out)])
    assert "read by:       svd (only the full rank was trained" in info.output
    res = CliRunner().invoke(main, ["export", "adapter", str(out), "--rank", "2", "--method", "prefix",
                                    "--out", str(tmp_path / "p")])
    assert res.exit_code == 0 and (tmp_path / "p" / "adapter_model.safetensors").is_file(), res.output
    assert json.loads((tmp_path / "p" / "qdylora_export.json").read_text())["method"] == "prefix"
    res = CliRunner().invoke(main, ["export", "adapter", str(out), "--rank", "2", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0 and json.loads((tmp_path / "s" / "qdylora_export.json").read_text())["method"] == "svd"

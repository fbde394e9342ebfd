"""The Axolotl plugin's pieces that need no Axolotl: lazy import, YAML keys, trainer composition.

The real `axolotl train` runs are in test_axolotl.py (they need Axolotl's own environment).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from qdylora import QDyLoraConfig

pytest.importorskip("pydantic")

from pydantic import BaseModel, ValidationError  # noqa: E402

from qdylora.plugin.args import PLUGIN, QDyLoraArgs  # noqa: E402

HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None


def test_import_without_axolotl_and_install_hint():
    """`import qdylora` / `import qdylora.plugin` load no Axolotl; without it the plugin says how to get it."""
    code = (
        "import sys\n"
        "import qdylora, qdylora.plugin\n"
        "print('IMPORTED AXOLOTL:', 'axolotl' in sys.modules)\n"
        "sys.modules['axolotl'] = None\n"  # as if Axolotl were not installed
        "try:\n"
        "    qdylora.plugin.QDyLoraPlugin\n"
        "except ImportError as exc:\n"
        "    print('HINT:', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "IMPORTED AXOLOTL: False" in res.stdout
    assert "HINT:" in res.stdout and "pip install 'qdylora[axolotl]'" in res.stdout


class _AxolotlLike(BaseModel):
    """The Axolotl fields the plugin's validators read, merged the way Axolotl merges plugin args."""

    plugins: list[str] | None = None
    adapter: str | None = None
    lora_r: int | None = None
    val_set_size: float = 0.0
    test_datasets: list | None = None
    rl: str | None = None
    peft_use_dora: bool | None = None
    lora_mlp_kernel: bool | None = None
    lora_qkv_kernel: bool | None = None
    lora_o_kernel: bool | None = None
    lora_modules_to_save: list[str] | None = None


class Merged(_AxolotlLike, QDyLoraArgs):
    pass


def _cfg(**overrides):
    cfg = {"plugins": [PLUGIN], "adapter": "qlora", "lora_r": 16, "val_set_size": 0.1}
    cfg.update(overrides)
    return cfg


def test_valid_config_maps_to_qdylora_config():
    m = Merged.model_validate(_cfg(qdylora_r_min=2, qdylora_distribution="log_uniform", qdylora_eval_ranks=[16, 2, 8],
                                   qdylora_export_ranks=[4, "recommended"], qdylora_update="frozen",
                                   qdylora_scaling="sqrt", qdylora_anchor_ranks=[16],
                                   qdylora_loss_weight="inverse_scale"))
    config = m.to_qdylora_config(m.lora_r)
    assert (config.r_min, config.r_max, config.distribution, config.update) == (2, 16, "log_uniform", "frozen")
    assert (config.scaling, config.anchor_ranks, config.loss_weight) == ("sqrt", [16], "inverse_scale")
    assert config.eval_ranks == [2, 8, 16]
    m = Merged.model_validate(_cfg(qdylora_heal_rank=[8, "recommended", 1]))  # several ranks: each healed alone
    assert m.to_settings(m.lora_r)[3].rank == [1, 8, "recommended"]


def test_preset_values_stand_unless_a_key_is_set():
    m = Merged.model_validate(_cfg(qdylora_preset="balanced", qdylora_r_min=2))
    config = m.to_qdylora_config(m.lora_r)
    assert config == QDyLoraConfig.preset("balanced", r_min=2, r_max=16)
    assert (config.scaling, config.loss_weight) == ("sqrt", "inverse_scale")
    m = Merged.model_validate(_cfg(qdylora_preset="balanced", qdylora_scaling="linear"))
    assert m.to_qdylora_config(m.lora_r).scaling == "linear"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"adapter": None}, "set `adapter: qlora`"),
        ({"adapter": "ia3"}, "adapter is 'ia3'"),
        ({"lora_r": None}, "needs lora_r"),
        ({"rl": "dpo"}, "supervised fine-tuning only"),
        ({"peft_use_dora": True}, "peft_use_dora: false"),
        ({"lora_mlp_kernel": True, "lora_o_kernel": True}, "set lora_mlp_kernel: false, lora_o_kernel: false"),
        ({"qdylora_export_vllm": True, "lora_modules_to_save": ["embed_tokens"]}, "vLLM rejects adapters with modules_to_save"),
        ({"qdylora_distribution": "normal"}, "distribution='normal' is not allowed"),
        ({"qdylora_update": "half"}, "update='half' is not allowed"),
        ({"qdylora_r_min": 0}, "r_min must be an integer >= 1"),
        ({"qdylora_r_min": 32}, "r_max must be an integer >= r_min (32)"),
        ({"qdylora_ranks": [1, 99]}, "ranks [99] outside the trained range 1..16"),
        ({"qdylora_eval_ranks": [0]}, "eval_ranks [0] outside"),
        ({"qdylora_scaling": "cube"}, "scaling='cube' is not allowed"),
        ({"qdylora_preset": "best"}, "unknown preset 'best'"),
        ({"qdylora_anchor_ranks": [32]}, "anchor_ranks [32] outside the trained range 1..16"),
        ({"qdylora_export_ranks": [4, 17]}, "qdylora_export_ranks [17] outside the trained range 1..16"),
        ({"qdylora_export_ranks": ["recommended"], "val_set_size": 0.0}, "'recommended', which comes from the rank sweep"),
        ({"qdylora_export_ranks": ["recommended"], "qdylora_sweep": False}, "keep qdylora_sweep: true"),
        ({"qdylora_export_ranks": ["best"]}, "qdylora_export_ranks"),
        ({"qdylora_preset": "plain", "qdylora_export_ranks": [4], "qdylora_export_method": "prefix",
          "qdylora_sweep_methods": ["svd"]}, "qdylora_export_method is prefix, but this run trains only its full rank"),
        # healing: the same rules as the train YAML's heal: section (config.check_heal), Axolotl's key names
        ({"qdylora_heal_rank": 17}, "qdylora_heal_rank [17] outside the trained range 1..16"),
        ({"qdylora_heal_rank": [2, 17, "recommended"]}, "qdylora_heal_rank [17] outside the trained range 1..16"),
        ({"qdylora_heal_rank": 0}, "qdylora_heal_rank must be an integer >= 1"),
        ({"qdylora_heal_rank": "best"}, "qdylora_heal_rank"),
        ({"qdylora_heal_rank": "recommended", "val_set_size": 0.0}, "give val_set_size (or test_datasets)"),
        ({"qdylora_heal_rank": 4, "qdylora_heal_method": ["svd", "prefix"], "qdylora_sweep": False},
         "qdylora_heal_method lists several cuts"),
        ({"qdylora_preset": "plain", "qdylora_heal_rank": 4, "qdylora_heal_method": "prefix",
          "qdylora_sweep_methods": ["svd"]}, "qdylora_heal_method is prefix, but this run trains only its full rank"),
        ({"qdylora_heal_steps": 5}, "qdylora_heal_steps set but qdylora_heal_rank is not"),
        ({"qdylora_heal_rank": 4, "qdylora_heal_lr_factor": -1}, "qdylora_heal_lr_factor"),
    ],
)
def test_bad_settings_fail_with_a_message_naming_the_fix(overrides, message):
    with pytest.raises(ValidationError) as info:
        Merged.model_validate(_cfg(**overrides))
    assert message in str(info.value)


def test_healing_config_is_the_runs_yaml_with_the_healing_keys(trained, tmp_path):
    """qdylora_heal_rank: the cut exported beside the run (bit for bit `export_adapter`'s) and the
    run's YAML turned into the healing run (HealSettings' rule), valid for the plugin's checks; the
    run's files untouched. The real `axolotl train` of it is in test_axolotl.py."""
    import hashlib
    import json
    import shutil

    import yaml
    from safetensors.torch import load_file

    from qdylora.config import HealSettings
    from qdylora.exporters import export_adapter
    from qdylora.plugin.heal import prepare_healing

    run_dir = tmp_path / "out"
    shutil.copytree(trained.adapter_dir, run_dir)
    run = {"base_model": "./tiny", "adapter": "qlora", "lora_r": 8, "lora_alpha": 16, "plugins": [PLUGIN],
           "qdylora_r_min": 1, "qdylora_heal_rank": "recommended", "qdylora_export_ranks": [2],
           "datasets": [{"path": "./train.jsonl", "ds_type": "json"}], "val_set_size": 0.25, "output_dir": "./out",
           "learning_rate": 0.002, "warmup_ratio": 0.1, "hub_model_id": "me/run", "resume_from_checkpoint": "x",
           "seed": 7, "micro_batch_size": 4}
    (tmp_path / "run.yml").write_text(yaml.safe_dump(run))
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.iterdir() if p.is_file()}  # noqa: E731
    before = digest()

    lines = prepare_healing(run_dir, tmp_path / "run.yml", HealSettings(rank="recommended"), ranks=[4], run_steps=30,
                            learning_rate=0.002, seed=7)
    healed = run_dir.resolve() / "qdylora-healed"
    cut = healed / "cut-prefix" / "rank-4"
    cfg = yaml.safe_load((healed / "rank-4.yml").read_text())
    assert cfg.pop("learning_rate") == pytest.approx(0.002 * 0.3)
    kept = {k: v for k, v in run.items() if not k.startswith("qdylora_")
            and k not in ("hub_model_id", "warmup_ratio", "resume_from_checkpoint", "learning_rate")}
    assert cfg == {**kept, "lora_model_dir": str(cut), "lora_r": 4, "max_steps": 3, "lr_scheduler": "constant",
                   "warmup_steps": 0, "seed": 7, "output_dir": str(healed / "rank-4"), "qdylora_preset": "plain",
                   "qdylora_eval_ranks": [4], "qdylora_sweep_methods": ["svd"]}
    Merged.model_validate(cfg)  # the plugin's own checks accept it (lora_r = b, preset plain)
    assert any(f"axolotl train {healed / 'rank-4.yml'}" in line for line in lines)
    ref = export_adapter(trained.adapter_dir, tmp_path / "ref", 4)
    got, want = load_file(cut / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    assert digest() == before

    # the run's seed is kept: Axolotl splits val_set_size off with it; with its own eval set, seed + 100
    (tmp_path / "own-eval.yml").write_text(yaml.safe_dump({k: v for k, v in run.items() if k != "val_set_size"}))
    prepare_healing(run_dir, tmp_path / "own-eval.yml", HealSettings(rank=4), ranks=[4], run_steps=30,
                    learning_rate=0.002, seed=7)
    assert yaml.safe_load((healed / "rank-4.yml").read_text())["seed"] == 107
    # several cuts: one cut and one config per method, 5 steps each; run them and keep the lower eval loss
    lines = prepare_healing(run_dir, tmp_path / "run.yml", HealSettings(rank=4, method=["svd", "prefix"], steps=5),
                            ranks=[4], run_steps=30, learning_rate=0.002, seed=7)
    for method in ("svd", "prefix"):
        cfg = yaml.safe_load((healed / f"rank-4-{method}.yml").read_text())
        assert (cfg["lora_model_dir"], cfg["max_steps"]) == (str(healed / f"cut-{method}" / "rank-4"), 5)
        assert cfg["output_dir"] == str(healed / f"rank-4-{method}")
    assert "lower eval loss" in lines[-2]
    # several ranks: one cut and one config each, each the rank's own (lora_r, eval rank, output folder)
    lines = prepare_healing(run_dir, tmp_path / "run.yml", HealSettings(rank=[1, 4]), ranks=[1, 4], run_steps=30,
                            learning_rate=0.002, seed=7)
    for b in (1, 4):
        cfg = yaml.safe_load((healed / f"rank-{b}.yml").read_text())
        assert (cfg["lora_r"], cfg["qdylora_eval_ranks"], cfg["output_dir"]) == (b, [b], str(healed / f"rank-{b}"))
        assert cfg["lora_model_dir"] == str(healed / "cut-prefix" / f"rank-{b}")
        assert json.loads((healed / "cut-prefix" / f"rank-{b}" / "adapter_config.json").read_text())["r"] == b
        assert sum(f"axolotl train {healed / f'rank-{b}.yml'}" in line for line in lines) == 1
    assert "not known" in prepare_healing(run_dir, None, HealSettings(rank=4), ranks=[4], run_steps=30,
                                          learning_rate=0.002, seed=7)[0]


def test_recommended_resolves_by_one_rule_for_heal_and_the_plugin(trained, tmp_path):
    """'recommended' with one named cut is the rank the sweep recommends for THAT cut (as `export adapter
    --rank recommended --method M`), not the sweep's overall pick, for `qdylora heal` (`heal_plan`) and the
    plugin alike; with the adapter's own reading it is the overall pick; a rank listed twice heals once."""
    import json
    import shutil

    import yaml

    from qdylora.config import HealSettings
    from qdylora.exporters.source import SourceAdapter
    from qdylora.plugin.heal import prepare_healing
    from qdylora.workflow import heal_plan

    run_dir = tmp_path / "out"
    shutil.copytree(trained.adapter_dir, run_dir)
    stored = json.loads((run_dir / "qdylora_config.json").read_text())
    loss = lambda **by_rank: {str(r[1:]): {"eval_loss": v} for r, v in by_rank.items()}  # noqa: E731
    stored["sweep"] = {"metric": "eval_loss", "tolerance": 0.01, "method": "prefix",
                       "results": loss(r1=2.0, r2=1.0, r8=1.0), "recommended_rank": 2, "recommended_method": "prefix",
                       "methods": {"prefix": loss(r1=2.0, r2=1.0, r8=1.0), "svd": loss(r1=3.0, r2=2.0, r4=1.005, r8=1.0)}}
    (run_dir / "qdylora_config.json").write_text(json.dumps(stored))
    source = SourceAdapter.open(run_dir)
    assert heal_plan(source, ["recommended"], [None]) == {2: [(2, "prefix")]}
    assert heal_plan(source, ["recommended"], ["svd"]) == {4: [(4, "svd")]}
    assert heal_plan(source, [4, "recommended"], ["svd"]) == {4: [(4, "svd")]}
    assert heal_plan(source, ["recommended"], ["svd", "prefix"]) == {2: [(2, "svd"), (2, "prefix")]}

    (tmp_path / "run.yml").write_text(yaml.safe_dump({"base_model": "./tiny", "lora_r": 8, "output_dir": "./out"}))
    prepare_healing(run_dir, tmp_path / "run.yml", HealSettings(rank="recommended", method="svd"),
                    ranks=["recommended"], run_steps=30, learning_rate=0.002, seed=7)
    healed = run_dir.resolve() / "qdylora-healed"
    assert sorted(p.name for p in healed.iterdir()) == ["cut-svd", "rank-4.yml"]
    assert yaml.safe_load((healed / "rank-4.yml").read_text())["lora_model_dir"] == str(healed / "cut-svd" / "rank-4")


def test_checks_only_apply_when_the_plugin_is_listed():
    """Axolotl keeps earlier configs' plugins registered in-process: a config without ours is left alone."""
    Merged.model_validate({"plugins": ["some.other.Plugin"], "adapter": None, "lora_mlp_kernel": True})


def test_compose_keeps_the_base_trainers_mixins(tiny_llama, arithmetic_data, tmp_path):
    """with_qdylora puts QDyLoraMixin in front of the class Axolotl picked, its mixins still run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from qdylora import QDyLoraConfig, QDyLoraMixin
    from qdylora.data import DataSpec, collator, load_tokenizer, tokenize
    from qdylora.plugin.compose import qdylora_config, with_qdylora
    from qdylora.ranks import RankSampler

    class CountingMixin:  # stands in for Axolotl's PackingMixin, SchedulerMixin, ...
        calls = 0

        def compute_loss(self, *args, **kwargs):
            CountingMixin.calls += 1
            return super().compute_loss(*args, **kwargs)

    class AxolotlLikeTrainer(CountingMixin, Trainer):
        pass

    cfg = {"lora_r": 8, "qdylora_ranks": [2, 5], "qdylora_seed": 11}
    composed = with_qdylora(AxolotlLikeTrainer, qdylora_config(cfg))
    assert composed.__name__ == "QDyLoraAxolotlLikeTrainer"
    assert composed.__mro__[1:4] == (QDyLoraMixin, AxolotlLikeTrainer, CountingMixin)
    assert with_qdylora(composed, QDyLoraConfig()) is composed

    model_dir, data = tiny_llama, arithmetic_data[0]
    tok = load_tokenizer(str(model_dir))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                             report_to="none", save_strategy="no", use_cpu=True, remove_unused_columns=False)
    trainer = composed(model=model, args=args, train_dataset=tokenize(DataSpec(str(data)), tok), data_collator=collator(tok))
    trainer.train()
    assert CountingMixin.calls == 4
    sampler = RankSampler([2, 5], seed=11)
    assert [e["rank"] for e in trainer.state.log_history if "rank" in e] == [sampler.draw(s) for s in range(4)]
    assert trainer.qdylora_config.r_max == 8


@pytest.mark.skipif(HAS_AXOLOTL, reason="Axolotl is installed here")
def test_plugin_class_without_axolotl_raises_install_hint():
    import qdylora.plugin

    with pytest.raises(ImportError, match=r"pip install 'qdylora\[axolotl\]'"):
        qdylora.plugin.QDyLoraPlugin  # noqa: B018


def test_docs_list_every_key_as_derived():
    """docs/axolotl.md's table is the derived one: no key documented by hand, none missing."""
    from qdylora.plugin.args import keys_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "axolotl.md").read_text()
    assert keys_table() in docs, "regenerate the table: python -m qdylora.plugin.args"


def test_keys_are_the_dataclass_fields_with_their_defaults():
    import dataclasses

    from qdylora.config import ExportSettings, HealSettings, SweepSettings

    fields = QDyLoraArgs.model_fields
    for cls, prefix in ((QDyLoraConfig, "qdylora_"), (SweepSettings, "qdylora_sweep_"), (ExportSettings, "qdylora_export_"),
                        (HealSettings, "qdylora_heal_")):
        for f in dataclasses.fields(cls):
            key = f.metadata.get("axolotl", prefix + f.name)
            if key is False:
                assert prefix + f.name not in fields
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert fields[key].default == default and fields[key].description == f.metadata["help"], key
    assert "qdylora_r_max" not in fields  # Axolotl's lora_r
    m = Merged.model_validate(_cfg(qdylora_sweep_methods=["svd", "prefix"], qdylora_export_method="svd",
                                   qdylora_export_ranks=[2], qdylora_heal_rank="recommended",
                                   qdylora_heal_method=["svd", "prefix"], qdylora_heal_steps=7))
    _, sweep, export, heal = m.to_settings(m.lora_r)
    assert sweep.methods == ["svd", "prefix"] and (export.method, export.ranks) == ("svd", [2])
    assert (heal.rank, heal.methods, heal.steps, heal.lr_factor) == ("recommended", ["svd", "prefix"], 7, 0.3)
    with pytest.raises(ValidationError, match="qdylora_sweep_methods"):
        Merged.model_validate(_cfg(qdylora_sweep_methods="pca"))

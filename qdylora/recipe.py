"""A training run described in YAML (`qdylora train CONFIG.yaml`), validated before any work.

    model: ./my-base-model            # local folder or hub id
    load_in_4bit: true                # NF4 + double quant (QLoRA)
    data: {path: train.jsonl, prompt_field: question, answer_field: answer, max_length: 512}
    eval_data: {path: val.jsonl}      # or eval_size: 0.05 to hold out part of `data`
    split_seed: 0                     # optional: the seed of the eval_size and heal.holdout splits (unset: training.seed)
    lora: {r: 64, lora_alpha: 16, target_modules: all-linear, lora_dropout: 0.05}
    # or lora_model_dir: ./run/qdylora-exports/rank-4  # start from this PEFT adapter (Axolotl's key)
    qdylora: {r_min: 1, distribution: uniform}  # or {preset: balanced, ...}: QDyLoraConfig.preset
    training: {output_dir: out, max_steps: 1000, learning_rate: 2e-4, ...}  # TrainingArguments
    global_batch_size: 16             # optional: gradient_accumulation_steps = 16 / (processes x per-device batch)
    sweep: {ranks: null, refine: false, tolerance: 0.01, methods: [prefix, svd]}  # after training
    export: {ranks: [8, recommended], method: svd, vllm: false}  # -> output_dir/qdylora-exports/rank-<b>
    samples: {prompts: [What is 3 plus 4?], ranks: [1, 8, 64], max_new_tokens: 64}  # logged at each eval
    heal: {rank: recommended}         # after the sweep: that rank's cut trained alone briefly -> output_dir/qdylora-healed/rank-<b>

Each section IS a settings dataclass: `qdylora` = `QDyLoraConfig`, `sweep` = `SweepSettings`,
`export` = `ExportSettings`, `samples` = `SampleSettings`, `heal` = `HealSettings` (all in `qdylora.config`), `data` =
`DataSpec`, `lora` = `peft.LoraConfig` (or `lora_model_dir`: train an existing PEFT LoRA adapter
further, with its own r, alpha and targets, e.g. to heal a rank-b cut), `training` = `transformers.TrainingArguments`; the
top-level keys are the fields of `Recipe`. Unknown keys anywhere are errors, so a typo never
silently falls back to a default. The run itself is `qdylora.workflow.run(recipe)`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    ExportSettings, HealSettings, QDyLoraConfig, SampleSettings, SweepSettings, check_heal, check_keys,
    EXPORT_KEYS, describe, export_problem,
)
from .data import DataSpec
from .distributed import accumulation_for, check_training_engine, world_size
from .errors import InputError, first_line, is_int

DEFAULT_LORA = {"task_type": "CAUSAL_LM", "r": 64, "lora_alpha": 16, "target_modules": "all-linear"}
SECTIONS = ("lora", "qdylora", "training", "sweep", "export", "samples", "heal")


@dataclass
class Recipe:
    """Everything `qdylora train` needs, checked on construction."""

    model: str
    data: DataSpec
    lora: dict[str, Any]
    training: dict[str, Any]
    lora_model_dir: str | None = None  # start from this PEFT LoRA adapter instead of a fresh `lora`
    qdylora: QDyLoraConfig = field(default_factory=QDyLoraConfig)
    eval_data: DataSpec | None = None
    eval_size: float | int | None = None
    split_seed: int | None = None  # the seed of the eval_size / heal.holdout splits; unset: training.seed
    load_in_4bit: bool = True
    compute_dtype: str | None = None
    quant_storage: str | None = None
    trust_remote_code: bool = False
    sweep: SweepSettings = field(default_factory=SweepSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    samples: SampleSettings | None = None
    heal: HealSettings | None = None  # after the run: heal its rank(s), each into <output_dir>/qdylora-healed/rank-<b>/
    global_batch_size: int | None = None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InputError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise InputError(f"{path} must hold a mapping of settings")
        return cls.from_dict(raw, base_dir=path.parent)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: str | os.PathLike = ".") -> Recipe:
        """Check every setting that can be checked from the file alone (types, ranges, rank
        lists against the LoRA r), so that nothing fails after training. `run()` adds the
        checks that need this machine or the files (TrainingArguments, data, checkpoint)."""
        check_keys(raw, cls, "key")
        for key in ("model", "data", "training"):
            if key not in raw:
                raise InputError(f"missing required key '{key}'")
        for key in SECTIONS:
            if raw.get(key) is not None and not isinstance(raw[key], dict):
                raise InputError(f"'{key}' must be a mapping of settings, got {raw[key]!r}")
        if not isinstance(raw["model"], str) or not raw["model"]:
            raise InputError(f"'model' must be a model folder or hub id, got {raw['model']!r}")
        for key in ("load_in_4bit", "trust_remote_code"):
            if key in raw and not isinstance(raw[key], bool):
                raise InputError(f"'{key}' must be true or false, got {raw[key]!r}")
        eval_size = raw.get("eval_size")
        if eval_size is not None and not (
            (isinstance(eval_size, float) and 0 < eval_size < 1) or (is_int(eval_size) and eval_size >= 1)
        ):
            raise InputError(f"eval_size must be a fraction in (0, 1) or a number of records >= 1, got {eval_size!r}")
        split_seed = raw.get("split_seed")
        if split_seed is not None and not is_int(split_seed):
            raise InputError(f"split_seed must be an integer (the seed of the eval_size split), got {split_seed!r}")
        batch = raw.get("global_batch_size")
        if batch is not None and (not is_int(batch) or batch < 1):
            raise InputError(f"global_batch_size must be an integer >= 1, got {batch!r}")
        lora_model_dir, start = _start_adapter(raw, base_dir)
        lora = _checked_lora(raw.get("lora") or {}) if start is None else dict(start.peft_config)
        qdylora = _section("qdylora", lambda d: QDyLoraConfig.from_dict(d), raw)
        training = check_training_engine(_checked_training(raw["training"]), base_dir, batch)
        sweep = _section("sweep", lambda d: SweepSettings(**d), raw, SweepSettings)
        export = _section("export", lambda d: ExportSettings(**d), raw, ExportSettings)
        samples = _section("samples", lambda d: SampleSettings(**_prompts(d, base_dir)), raw, SampleSettings) \
            if raw.get("samples") else None
        heal = _section("heal", lambda d: HealSettings(**d), raw, HealSettings) if raw.get("heal") is not None else None
        # the ranks of every section, against the adapter's r (= r_max)
        resolved = qdylora.resolve(int(lora.get("r", DEFAULT_LORA["r"])) if start is None else start.r_max, 0)
        for what, ranks in (("sweep.ranks", sweep.ranks), ("samples.ranks", samples and samples.ranks),
                            ("export.ranks", [r for r in export.ranks or [] if is_int(r)])):
            if ranks:
                resolved.check_ranks(ranks, what=what)
        has_eval = bool(raw.get("eval_data") or eval_size)
        problem = export_problem(export, sweep, has_eval, EXPORT_KEYS, resolved.sweep_methods,
                                 full_rank_only=not resolved.lower_ranks_trained)
        if problem:
            raise InputError(problem)
        if heal is not None:
            _check_heal(heal, resolved, sweep, has_eval, training)
        if export.vllm and export.ranks and lora.get("modules_to_save"):
            where = "lora.modules_to_save" if start is None else f"modules_to_save of {lora_model_dir}"
            raise InputError(f"export.vllm: vLLM rejects adapters with modules_to_save, and {where} is "
                             f"{lora['modules_to_save']}: drop one of the two")
        recipe = cls(
            model=_local(raw["model"], base_dir),
            data=_data_spec(raw["data"], "data", base_dir),
            eval_data=_data_spec(raw["eval_data"], "eval_data", base_dir) if raw.get("eval_data") else None,
            eval_size=eval_size,
            split_seed=split_seed,
            lora=lora if start is None else {},
            lora_model_dir=lora_model_dir,
            qdylora=qdylora,
            training=training,
            load_in_4bit=bool(raw.get("load_in_4bit", True)),
            compute_dtype=raw.get("compute_dtype"),
            quant_storage=raw.get("quant_storage"),
            trust_remote_code=bool(raw.get("trust_remote_code", False)),
            sweep=sweep,
            export=export,
            samples=samples,
            heal=heal,
            global_batch_size=batch,
        )
        return recipe  # TrainingArguments' own checks (optim, bf16 on this machine, ...) run first in run()

    @property
    def data_split_seed(self) -> int:
        """The seed `eval_size` and heal.holdout split `data` with (`data.split_records`): `split_seed`,
        else training.seed (TrainingArguments' default 42). A healing run keeps its run's (its own
        training seed differs), so it trains on the run's training records and measures on its eval records."""
        return self.split_seed if self.split_seed is not None else int(self.training.get("seed", 42))

    @property
    def eval_split_size(self) -> float | int | None:
        """How much of `data` the eval set is split off (`eval_size`); None with `eval_data` (its own file)."""
        return self.eval_size if self.eval_data is None else None

    def lora_config(self):
        from peft import LoraConfig

        try:
            return LoraConfig(**{**DEFAULT_LORA, **self.lora})
        except (TypeError, ValueError) as exc:
            raise InputError(f"lora: {first_line(exc)}") from exc

    def training_args(self, **overrides: Any):
        from transformers import TrainingArguments

        kwargs = {"report_to": "none", "save_strategy": "no", "logging_steps": 10, "remove_unused_columns": False}
        kwargs.update(self.training)
        if self.global_batch_size is not None:
            kwargs["gradient_accumulation_steps"] = accumulation_for(
                self.global_batch_size, world_size(), int(kwargs.get("per_device_train_batch_size", 8))
            )
        kwargs.update(overrides)
        try:
            return TrainingArguments(**kwargs)
        except (TypeError, ValueError) as exc:
            raise InputError(f"training: {first_line(exc)}") from exc


def _local(value: str, base_dir: str | os.PathLike) -> str:
    """Resolve a relative local path against the YAML file's folder; leave hub ids alone."""
    candidate = Path(base_dir) / value
    if value.startswith(".") or (not Path(value).is_absolute() and candidate.exists()):
        return str(candidate)
    return value


def _start_adapter(raw: dict[str, Any], base_dir: str | os.PathLike):
    """`lora_model_dir`: (its path, its checked `AdapterFiles`), or (None, None) without one.

    As in Axolotl, training starts from that adapter's weights and its adapter_config.json
    sets r, lora_alpha and the target modules, so a `lora:` section beside it is refused
    rather than silently ignored. The folder is checked here (complete, LoRA, not DoRA;
    header only, no tensor read); the base's layer shapes are checked before the model loads.
    """
    from .adapter_io import check_adapter

    value = raw.get("lora_model_dir")
    if value is None:
        return None, None
    if not isinstance(value, str) or not value:
        raise InputError(f"'lora_model_dir' must be a PEFT LoRA adapter folder, got {value!r}")
    if raw.get("lora"):
        raise InputError(
            "give either 'lora' (a new adapter) or 'lora_model_dir' (train an existing one), not both: the adapter "
            f"in {value} brings its own r, lora_alpha and target_modules (its adapter_config.json)"
        )
    path = _local(value, base_dir)
    try:
        return path, check_adapter(path)
    except InputError as exc:
        raise InputError(f"lora_model_dir: {exc}") from exc


def _data_spec(raw: Any, key: str, base_dir: str | os.PathLike) -> DataSpec:
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict) or "path" not in raw:
        raise InputError(f"'{key}' must be a file path or a mapping with a 'path' key")
    check_keys(raw, DataSpec, f"{key} key")
    raw = dict(raw)
    if not isinstance(raw["path"], str):
        raise InputError(f"{key}.path must be a file path, got {raw['path']!r}")
    if raw["path"].endswith((".json", ".jsonl")):
        raw["path"] = _local(raw["path"], base_dir)
    return DataSpec(**raw)  # the file itself is read (and checked) by run(), before the model loads


def _check_heal(heal: HealSettings, resolved: QDyLoraConfig, sweep: SweepSettings, has_eval: bool,
                training: dict[str, Any]) -> None:
    """What `heal:` needs from the run, checked before training: `check_heal`'s rules, and steps
    to take a fraction of."""
    check_heal(heal, resolved, sweep, has_eval)
    if heal.ranks and heal.steps is None and int(training.get("max_steps", -1)) <= 0:  # (holdout alone heals nothing)
        raise InputError("heal: training has no max_steps to take heal.steps_fraction of; give heal.steps")


def _section(name: str, build: Any, raw: dict[str, Any], cls: type | None = None) -> Any:
    """Build a section's settings dataclass; its errors say which section they are about."""
    data = raw.get(name) or {}
    try:
        if cls is not None:
            check_keys(data, cls, f"{name} key")
        return build(data)
    except TypeError as exc:  # a required field missing
        raise InputError(f"{name}: {first_line(exc)}") from exc
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from exc


def _prompts(raw: dict[str, Any], base_dir: str | os.PathLike) -> dict[str, Any]:
    """`samples.prompts` may name a prompts file (one per line, or JSONL) instead of listing them."""
    from .generation import read_prompts

    if isinstance(raw.get("prompts"), str):
        return {**raw, "prompts": read_prompts(_local(raw["prompts"], base_dir))}
    return raw


def _checked_lora(raw: dict[str, Any]) -> dict[str, Any]:
    from peft import LoraConfig

    check_keys(raw, LoraConfig, "lora key", hint="they must be peft.LoraConfig fields")
    if "r" in raw and (not is_int(raw["r"]) or raw["r"] < 1):
        raise InputError(f"lora.r must be an integer >= 1 (the maximum rank r_max), got {raw['r']!r}")
    if "lora_alpha" in raw and (isinstance(raw["lora_alpha"], bool) or not isinstance(raw["lora_alpha"], (int, float))):
        raise InputError(f"lora.lora_alpha must be a number, got {raw['lora_alpha']!r}")
    try:
        LoraConfig(**{**DEFAULT_LORA, **raw})
    except (TypeError, ValueError) as exc:
        raise InputError(f"lora: {first_line(exc)}") from exc
    return dict(raw)


def _checked_training(raw: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments fields only; `warmup_ratio` (transformers 4.x) becomes a float warmup_steps."""
    from transformers import TrainingArguments

    if not isinstance(raw, dict) or "output_dir" not in raw:
        raise InputError("'training' must be a mapping of TrainingArguments fields including output_dir")
    raw = dict(raw)
    allowed = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "warmup_ratio" in raw and "warmup_ratio" not in allowed:
        ratio = raw.pop("warmup_ratio")
        if "warmup_steps" in raw:
            raise InputError("give either warmup_ratio or warmup_steps, not both")
        raw["warmup_steps"] = float(ratio)  # transformers 5.x: a float in [0, 1) is a ratio
    check_keys(raw, TrainingArguments, "training key", hint="they must be transformers.TrainingArguments fields")
    if not isinstance(raw["output_dir"], str) or not raw["output_dir"]:
        raise InputError(f"training.output_dir must be a folder path, got {raw['output_dir']!r}")
    hints = typing.get_type_hints(TrainingArguments)
    return {key: _typed(f"training.{key}", value, hints.get(key)) for key, value in raw.items()}


def _typed(what: str, value: Any, hint: Any) -> Any:
    """Check a number/bool setting against its annotation (TrainingArguments only checks some).

    YAML reads `2e-4` (no dot) as a string, so numeric strings become numbers. Settings
    whose type allows a string or anything else are left to the library.
    """
    if hint is None:
        return value
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not set(kinds) <= {bool, int, float, type(None)}:
        return value
    if value is None and type(None) in kinds:
        return value
    if isinstance(value, bool):
        if bool in kinds:
            return value
    elif is_int(value) and (int in kinds or float in kinds):
        return value
    elif isinstance(value, float) and float in kinds:
        return value
    elif isinstance(value, str):
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(value)
                except ValueError:
                    pass
    raise InputError(f"{what} must be {describe(hint)}, got {value!r}")

"""A training run described in YAML (`qdylora train CONFIG.yaml`), validated before any work.

    model: ./my-base-model            # local folder or hub id
    load_in_4bit: true                # NF4 + double quant (QLoRA)
    data: {path: train.jsonl, prompt_field: question, answer_field: answer, max_length: 512}
    eval_data: {path: val.jsonl}      # or eval_size: 0.05 to hold out part of `data`
    lora: {r: 64, lora_alpha: 16, target_modules: all-linear, lora_dropout: 0.05}
    qdylora: {r_min: 1, distribution: uniform}  # or {preset: balanced, ...}: QDyLoraConfig.preset
    training: {output_dir: out, max_steps: 1000, learning_rate: 2e-4, ...}  # TrainingArguments
    global_batch_size: 16             # optional: gradient_accumulation_steps = 16 / (processes x per-device batch)
    sweep: {ranks: null, refine: false, tolerance: 0.01}                     # after training
    samples: {prompts: [What is 3 plus 4?], ranks: [1, 8, 64], max_new_tokens: 64}  # logged at each eval

Unknown keys anywhere are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import QDyLoraConfig
from .data import DataSpec
from .distributed import accumulation_for, check_training_engine, world_size
from .errors import InputError

TOP_LEVEL = {
    "model", "load_in_4bit", "compute_dtype", "quant_storage", "trust_remote_code",
    "data", "eval_data", "eval_size", "lora", "qdylora", "training", "sweep", "samples", "global_batch_size",
}
SWEEP_KEYS = {"ranks", "refine", "tolerance", "enabled"}
SAMPLE_KEYS = {"prompts", "ranks", "max_new_tokens"}


@dataclass
class Recipe:
    """Everything `qdylora train` needs, checked on construction."""

    model: str
    data: DataSpec
    lora: dict[str, Any]
    training: dict[str, Any]
    qdylora: QDyLoraConfig = field(default_factory=QDyLoraConfig)
    eval_data: DataSpec | None = None
    eval_size: float | int | None = None
    load_in_4bit: bool = True
    compute_dtype: str | None = None
    quant_storage: str | None = None
    trust_remote_code: bool = False
    sweep: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
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
        unknown = sorted(set(raw) - TOP_LEVEL)
        if unknown:
            raise InputError(f"unknown key(s) {unknown}; allowed top-level keys: {sorted(TOP_LEVEL)}")
        for key in ("model", "data", "training"):
            if key not in raw:
                raise InputError(f"missing required key '{key}'")
        sweep = dict(raw.get("sweep") or {})
        bad = sorted(set(sweep) - SWEEP_KEYS)
        if bad:
            raise InputError(f"unknown sweep key(s) {bad}; allowed: {sorted(SWEEP_KEYS)}")
        samples = _checked_samples(raw.get("samples") or {}, base_dir)
        return cls(
            model=_local(str(raw["model"]), base_dir),
            data=_data_spec(raw["data"], "data", base_dir),
            eval_data=_data_spec(raw["eval_data"], "eval_data", base_dir) if raw.get("eval_data") else None,
            eval_size=raw.get("eval_size"),
            lora=_checked_lora(raw.get("lora") or {}),
            qdylora=QDyLoraConfig.from_dict(raw.get("qdylora") or {}),
            training=check_training_engine(_checked_training(raw["training"]), base_dir, raw.get("global_batch_size")),
            load_in_4bit=bool(raw.get("load_in_4bit", True)),
            compute_dtype=raw.get("compute_dtype"),
            quant_storage=raw.get("quant_storage"),
            trust_remote_code=bool(raw.get("trust_remote_code", False)),
            sweep=sweep,
            samples=samples,
            global_batch_size=raw.get("global_batch_size"),
        )

    def lora_config(self):
        from peft import LoraConfig

        kwargs = {"task_type": "CAUSAL_LM", "r": 64, "lora_alpha": 16, "target_modules": "all-linear"}
        kwargs.update(self.lora)
        return LoraConfig(**kwargs)

    def training_args(self, **overrides: Any):
        from transformers import TrainingArguments

        kwargs = {"report_to": "none", "save_strategy": "no", "logging_steps": 10, "remove_unused_columns": False}
        kwargs.update(self.training)
        if self.global_batch_size is not None:
            kwargs["gradient_accumulation_steps"] = accumulation_for(
                self.global_batch_size, world_size(), int(kwargs.get("per_device_train_batch_size", 8))
            )
        kwargs.update(overrides)
        return TrainingArguments(**kwargs)


def _local(value: str, base_dir: str | os.PathLike) -> str:
    """Resolve a relative local path against the YAML file's folder; leave hub ids alone."""
    candidate = Path(base_dir) / value
    if value.startswith(".") or (not Path(value).is_absolute() and candidate.exists()):
        return str(candidate)
    return value


def _data_spec(raw: Any, key: str, base_dir: str | os.PathLike) -> DataSpec:
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict) or "path" not in raw:
        raise InputError(f"'{key}' must be a file path or a mapping with a 'path' key")
    allowed = {f.name for f in dataclasses.fields(DataSpec)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise InputError(f"unknown {key} key(s) {unknown}; allowed: {sorted(allowed)}")
    raw = dict(raw)
    if raw["path"].endswith((".json", ".jsonl")):
        raw["path"] = _local(raw["path"], base_dir)
    return DataSpec(**raw)


def _checked_samples(raw: dict[str, Any], base_dir: str | os.PathLike) -> dict[str, Any]:
    """`samples.prompts` is a list of prompts or a prompts file (one per line, or JSONL)."""
    from .generation import read_prompts

    bad = sorted(set(raw) - SAMPLE_KEYS)
    if bad:
        raise InputError(f"unknown samples key(s) {bad}; allowed: {sorted(SAMPLE_KEYS)}")
    if not raw:
        return {}
    prompts = raw.get("prompts")
    if isinstance(prompts, str):
        prompts = read_prompts(_local(prompts, base_dir))
    if not prompts or not isinstance(prompts, list):
        raise InputError("samples.prompts must be a non-empty list of prompts or a prompts file")
    return {**raw, "prompts": [str(p) for p in prompts]}


def _checked_lora(raw: dict[str, Any]) -> dict[str, Any]:
    from peft import LoraConfig

    allowed = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise InputError(f"unknown lora key(s) {unknown}; they must be peft.LoraConfig fields")
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
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise InputError(f"unknown training key(s) {unknown}; they must be transformers.TrainingArguments fields")
    return raw


def run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False):
    """Train, save the adapter (r_max) with qdylora_config.json, and sweep if there is eval data.

    Returns the trainer; its `rank_sweep` holds the sweep when one ran.
    """
    from peft import get_peft_model

    from .data import collator, load_records, load_tokenizer, tokenize
    from .loading import load_model
    from .trainer_ext import QDyLoraTrainer, RankSamplesCallback, save_sweep

    out = Path(recipe.training["output_dir"])
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise InputError(f"output folder {out} exists and is not empty; pass --overwrite or --resume")

    tokenizer = load_tokenizer(recipe.model, recipe.trust_remote_code)
    records = load_records(recipe.data)
    eval_ds = None
    if recipe.eval_data is not None:
        eval_ds = tokenize(recipe.eval_data, tokenizer)
    elif recipe.eval_size:
        split = records.train_test_split(test_size=recipe.eval_size, seed=recipe.training.get("seed", 42))
        records, eval_ds = split["train"], tokenize(recipe.data, tokenizer, split["test"])
    train_ds = tokenize(recipe.data, tokenizer, records)

    args = recipe.training_args()
    model = load_model(
        recipe.model,
        load_in_4bit=recipe.load_in_4bit,
        compute_dtype=recipe.compute_dtype,
        quant_storage=recipe.quant_storage,
        trust_remote_code=recipe.trust_remote_code,
        gradient_checkpointing=bool(args.gradient_checkpointing),
    )
    model = get_peft_model(model, recipe.lora_config())
    trainer = QDyLoraTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator(tokenizer),
        processing_class=tokenizer,
        qdylora_config=recipe.qdylora,
    )
    if recipe.samples:
        trainer.add_callback(RankSamplesCallback(
            trainer, recipe.samples["prompts"], recipe.samples.get("ranks"),
            max_new_tokens=int(recipe.samples.get("max_new_tokens", 64)),
            template=recipe.data.template, chat_template=False,
        ))
    trainer.train(resume_from_checkpoint=True if resume else None)
    if eval_ds is not None and recipe.sweep.get("enabled", True):
        trainer.evaluate_ranks(
            recipe.sweep.get("ranks"),
            refine=bool(recipe.sweep.get("refine", False)),
            tolerance=float(recipe.sweep.get("tolerance", 0.01)),
        )
        if trainer.is_world_process_zero():
            save_sweep(trainer.rank_sweep, out)
    trainer.save_model(str(out))
    return trainer

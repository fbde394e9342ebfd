"""A training run described in YAML (`qdylora train CONFIG.yaml`), validated before any work.

    model: ./my-base-model            # local folder or hub id
    load_in_4bit: true                # NF4 + double quant (QLoRA)
    data: {path: train.jsonl, prompt_field: question, answer_field: answer, max_length: 512}
    eval_data: {path: val.jsonl}      # or eval_size: 0.05 to hold out part of `data`
    lora: {r: 64, lora_alpha: 16, target_modules: all-linear, lora_dropout: 0.05}
    qdylora: {r_min: 1, distribution: uniform}  # or {preset: balanced, ...}: QDyLoraConfig.preset
    training: {output_dir: out, max_steps: 1000, learning_rate: 2e-4, ...}  # TrainingArguments
    global_batch_size: 16             # optional: gradient_accumulation_steps = 16 / (processes x per-device batch)
    sweep: {ranks: null, refine: false, tolerance: 0.01, methods: [prefix]}  # after training
    samples: {prompts: [What is 3 plus 4?], ranks: [1, 8, 64], max_new_tokens: 64}  # logged at each eval

Unknown keys anywhere are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import QDyLoraConfig
from .data import DataSpec
from .distributed import accumulation_for, check_training_engine, world_size
from .errors import InputError, check_creatable, first_line, is_int

TOP_LEVEL = {
    "model", "load_in_4bit", "compute_dtype", "quant_storage", "trust_remote_code",
    "data", "eval_data", "eval_size", "lora", "qdylora", "training", "sweep", "samples", "global_batch_size",
}
SWEEP_KEYS = {"ranks", "refine", "tolerance", "enabled", "methods"}
DEFAULT_LORA = {"task_type": "CAUSAL_LM", "r": 64, "lora_alpha": 16, "target_modules": "all-linear"}
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
        """Check every setting that can be checked from the file alone (types, ranges, rank
        lists against the LoRA r), so that nothing fails after training. `run()` adds the
        checks that need this machine or the files (TrainingArguments, data, checkpoint)."""
        unknown = sorted(set(raw) - TOP_LEVEL)
        if unknown:
            raise InputError(f"unknown key(s) {unknown}; allowed top-level keys: {sorted(TOP_LEVEL)}")
        for key in ("model", "data", "training"):
            if key not in raw:
                raise InputError(f"missing required key '{key}'")
        for key in ("lora", "qdylora", "training", "sweep", "samples"):
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
        batch = raw.get("global_batch_size")
        if batch is not None and (not is_int(batch) or batch < 1):
            raise InputError(f"global_batch_size must be an integer >= 1, got {batch!r}")
        lora = _checked_lora(raw.get("lora") or {})
        qdylora = QDyLoraConfig.from_dict(raw.get("qdylora") or {})
        training = check_training_engine(_checked_training(raw["training"]), base_dir, batch)
        # the ranks of every section, against the adapter's r (= r_max)
        resolved = qdylora.resolve(int(lora.get("r", DEFAULT_LORA["r"])), 0)
        sweep = _checked_sweep(raw.get("sweep") or {}, resolved)
        samples = _checked_samples(raw.get("samples") or {}, base_dir)
        if samples.get("ranks") is not None:
            resolved.check_ranks(_int_list(samples["ranks"], "samples.ranks"), what="samples.ranks")
        recipe = cls(
            model=_local(raw["model"], base_dir),
            data=_data_spec(raw["data"], "data", base_dir),
            eval_data=_data_spec(raw["eval_data"], "eval_data", base_dir) if raw.get("eval_data") else None,
            eval_size=eval_size,
            lora=lora,
            qdylora=qdylora,
            training=training,
            load_in_4bit=bool(raw.get("load_in_4bit", True)),
            compute_dtype=raw.get("compute_dtype"),
            quant_storage=raw.get("quant_storage"),
            trust_remote_code=bool(raw.get("trust_remote_code", False)),
            sweep=sweep,
            samples=samples,
            global_batch_size=batch,
        )
        return recipe  # TrainingArguments' own checks (optim, bf16 on this machine, ...) run first in run()

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
    if not isinstance(raw["path"], str):
        raise InputError(f"{key}.path must be a file path, got {raw['path']!r}")
    if raw["path"].endswith((".json", ".jsonl")):
        raw["path"] = _local(raw["path"], base_dir)
    return DataSpec(**raw)  # the file itself is read (and checked) by run(), before the model loads


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
    if "r" in raw and (not is_int(raw["r"]) or raw["r"] < 1):
        raise InputError(f"lora.r must be an integer >= 1 (the maximum rank r_max), got {raw['r']!r}")
    if "lora_alpha" in raw and (isinstance(raw["lora_alpha"], bool) or not isinstance(raw["lora_alpha"], (int, float))):
        raise InputError(f"lora.lora_alpha must be a number, got {raw['lora_alpha']!r}")
    try:
        LoraConfig(**{**DEFAULT_LORA, **raw})
    except (TypeError, ValueError) as exc:
        raise InputError(f"lora: {first_line(exc)}") from exc
    return dict(raw)


def _checked_sweep(raw: dict[str, Any], config: QDyLoraConfig) -> dict[str, Any]:
    """The `sweep` section: known keys of the right types, ranks inside the trained range."""
    bad = sorted(set(raw) - SWEEP_KEYS)
    if bad:
        raise InputError(f"unknown sweep key(s) {bad}; allowed: {sorted(SWEEP_KEYS)}")
    for key in ("refine", "enabled"):
        if key in raw and not isinstance(raw[key], bool):
            raise InputError(f"sweep.{key} must be true or false, got {raw[key]!r}")
    tol = raw.get("tolerance", 0.01)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise InputError(f"sweep.tolerance must be a number >= 0, got {tol!r}")
    if raw.get("ranks") is not None:
        config.check_ranks(_int_list(raw["ranks"], "sweep.ranks"), what="sweep.ranks")
    raw = dict(raw)
    if "methods" in raw:
        from .trainer_ext.sweep import check_methods

        if not isinstance(raw["methods"], (list, str)):
            raise InputError(f"sweep.methods must be a list such as [prefix, svd], got {raw['methods']!r}")
        try:
            raw["methods"] = check_methods(raw["methods"])
        except InputError as exc:
            raise InputError(f"sweep.methods: {exc}") from exc
    return raw


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(is_int(v) for v in value):
        raise InputError(f"{what} must be a non-empty list of integers, got {value!r}")
    return value



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
    if not isinstance(raw["output_dir"], str) or not raw["output_dir"]:
        raise InputError(f"training.output_dir must be a folder path, got {raw['output_dir']!r}")
    hints = typing.get_type_hints(TrainingArguments)
    return {key: _typed(f"training.{key}", value, hints.get(key)) for key, value in raw.items()}


_NUMBERS = {bool: "true or false", int: "an integer", float: "a number"}


def _typed(what: str, value: Any, hint: Any) -> Any:
    """Check a number/bool setting against its annotation (TrainingArguments only checks some).

    YAML reads `2e-4` (no dot) as a string, so numeric strings become numbers. Settings
    whose type allows a string or anything else are left to the library.
    """
    if hint is None:
        return value
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not set(kinds) <= {*_NUMBERS, type(None)}:
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
    allowed = " or ".join(_NUMBERS[k] for k in kinds if k in _NUMBERS)
    raise InputError(f"{what} must be {allowed}, got {value!r}")


def run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False):
    """Train, save the adapter (r_max) with qdylora_config.json, then sweep if there is eval data.

    Everything that can be checked is checked before the model loads (`Recipe.from_dict`,
    the output folder, the checkpoint to resume, the data fields). The adapter is saved
    BEFORE the sweep, so nothing after training can lose it. A run refused before
    training leaves no output folder behind. Returns the trainer; its `rank_sweep` holds
    the sweep when one ran.
    """
    out = Path(recipe.training["output_dir"])
    recipe.training_args()  # TrainingArguments' own checks (optim name, bf16 on this machine, ...)
    checkpoint = check_output_dir(out, overwrite=overwrite, resume=resume)
    existed = out.exists()
    try:
        return _train(recipe, out, checkpoint)
    except BaseException:
        if not existed:
            _remove_empty_tree(out)  # only what this run created and left empty
        raise


def check_output_dir(out: Path, *, overwrite: bool, resume: bool) -> str | None:
    """Refuse an unusable output_dir; with `resume`, return the checkpoint to resume from (checked)."""
    from .adapter_io import WEIGHTS_NAME, tensor_shapes

    if out.exists() and not out.is_dir():
        raise InputError(f"training.output_dir {out} is a file; choose a folder")
    if not out.exists():
        check_creatable(out, "training.output_dir")
    if not resume:
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise InputError(f"output folder {out} exists and is not empty; pass --overwrite or --resume")
        return None
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        raise InputError(f"--resume: {out} has no checkpoint-N folder to resume from; drop --resume to start afresh")
    weights = Path(last) / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(f"--resume: {last} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    tensor_shapes(weights)  # a truncated checkpoint is refused here, not after loading the model
    return last


def _train(recipe: Recipe, out: Path, checkpoint: str | None):
    from peft import get_peft_model
    from transformers import enable_full_determinism, set_seed

    from .data import collator, load_records, load_tokenizer, resolve_fields, tokenize
    from .loading import check_model_folder, load_model
    from .trainer_ext import QDyLoraTrainer, RankSamplesCallback, save_sweep

    # cheap checks of the inputs first: model folder, data and its fields
    check_model_folder(recipe.model, recipe.trust_remote_code)
    records = load_records(recipe.data)
    if len(records) == 0:
        raise InputError(f"{recipe.data.path} holds no records")
    resolve_fields(recipe.data, records.column_names)
    eval_records = None
    if recipe.eval_data is not None:
        eval_records = load_records(recipe.eval_data)
        resolve_fields(recipe.eval_data, eval_records.column_names)

    tokenizer = load_tokenizer(recipe.model, recipe.trust_remote_code)
    eval_ds = None
    if eval_records is not None:
        eval_ds = tokenize(recipe.eval_data, tokenizer, eval_records)
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
    # seed BEFORE the LoRA layers are created: their initialisation draws random numbers
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
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
    train_from(trainer, checkpoint)
    trainer.save_model(str(out))  # the adapter is safe on disk before anything else runs
    if eval_ds is not None and recipe.sweep.get("enabled", True):
        trainer.evaluate_ranks(
            recipe.sweep.get("ranks"),
            refine=bool(recipe.sweep.get("refine", False)),
            tolerance=float(recipe.sweep.get("tolerance", 0.01)),
            methods=recipe.sweep.get("methods", ["prefix"]),
        )
        if trainer.is_world_process_zero():
            save_sweep(trainer.rank_sweep, out)
            trainer.qdylora_config.save_pretrained(out, sweep=trainer.rank_sweep.to_dict(samples=False))
    return trainer


def train_from(trainer, checkpoint: str | None) -> None:
    """`trainer.train(resume_from_checkpoint=checkpoint)`; a checkpoint file that torch refuses
    to unpickle (anything but plain tensors: `weights_only=True`) becomes one line naming it."""
    import pickle

    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except pickle.UnpicklingError as exc:
        if checkpoint is None:
            raise
        refused = _refused_pickle(Path(checkpoint)) or checkpoint
        raise InputError(
            f"--resume: {refused} was refused: it is not a plain tensor file (torch.load(weights_only=True) "
            f"would have to run code from it); delete that checkpoint or resume from another"
        ) from exc


def _refused_pickle(checkpoint: Path) -> Path | None:
    """The first .pt/.pth file of a checkpoint that torch will not load with weights_only=True."""
    import pickle

    import torch

    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError):
            return path
    return None


def _remove_empty_tree(folder: Path) -> None:
    """Delete `folder` if it holds nothing but empty folders (never a file)."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir() and not sub.is_symlink() and not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()

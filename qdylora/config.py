"""The settings lists: `QDyLoraConfig` (how a run draws and trains ranks), `SweepSettings`
(what is measured after training), `ExportSettings` (which ranks are shipped) and
`HealSettings` (how a shipped rank's cut is trained alone briefly, `qdylora heal`).

Each is a dataclass whose fields carry their help text (`metadata["help"]`) and `Literal`
choices; `check_fields` validates any of them in one loop. Everything else derives from
these fields: the YAML sections of `qdylora train` (`qdylora:`, `sweep:`, `export:`), the
Axolotl plugin's `qdylora_*` keys (`qdylora.plugin.args`), and `qdylora info`. To add a
setting, add a field here.

The config lives beside the standard PEFT adapter as `qdylora_config.json`, so any
adapter folder says how it was trained and, once measured, how good each rank is.
This module imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

from .errors import InputError, is_int

CONFIG_NAME = "qdylora_config.json"

Distribution = Literal["uniform", "log_uniform"]
UpdateMode = Literal["full", "frozen"]
SampleEvery = Literal["optimizer_step", "micro_batch"]
Truncation = Literal["slice", "mask"]
Scaling = Literal["linear", "sqrt"]
LossWeight = Literal["equal", "inverse_scale"]
# How a rank-b adapter is read from the r_max one: the first b rows/columns, or the top-b
# SVD of each layer's delta (`ranks.svd_truncate`).
Method = Literal["prefix", "svd"]
METHODS: tuple[str, ...] = typing.get_args(Method)
RECOMMENDED = "recommended"  # a rank list may name the sweep's pick
# optimizers whose state `qdylora plan` models
PLAN_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")

# Named recipes for QDyLoraConfig.preset(); each non-paper entry won against the paper's
# recipe on validation AND test in benchmarks/results/quality.md.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # alpha/sqrt(b) + loss weighted s(r_max)/s(b): on SmolLM2-135M / GSM8K (2 seeds) 1.6-3.6%
    # lower loss than the paper at ranks 4, 16, 64 on val and test, about 1% higher at rank 1
    "balanced": {"scaling": "sqrt", "loss_weight": "inverse_scale"},
    # plain LoRA training at r_max (every step at full rank), every lower rank read by the SVD
    # of each layer's delta: the best one-run pipeline measured so far (benchmarks/results/
    # planted.md: within 1.18x of a dedicated run at every rank; no QDyLoRA recipe beats it)
    "plain": {"ranks": ["r_max"]},
}


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field that carries its help text (and e.g. `min`, `axolotl` key overrides)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def default_eval_ranks(r_min: int, r_max: int) -> list[int]:
    """A spread for the sweep: r_min, the powers of two in between, and r_max."""
    ranks = {r_min, r_max}
    p = 1
    while p < r_max:
        if p >= r_min:
            ranks.add(p)
        p *= 2
    return sorted(ranks)


def check_method(method: str) -> str:
    """`method` if it is a truncation method (prefix or svd), else `InputError`."""
    if method not in METHODS:
        raise InputError(f"method {method!r} is not allowed; choose one of {', '.join(METHODS)}")
    return method


def check_methods(methods: Any) -> list[str]:
    """A list of distinct truncation methods ("prefix,svd" or ["prefix", "svd"]), each checked."""
    if isinstance(methods, str):
        methods = methods.split(",")
    if not isinstance(methods, (list, tuple)):
        raise InputError(f"methods must be a list such as [prefix, svd], got {methods!r}")
    out = list(dict.fromkeys(check_method(str(m).strip().lower()) for m in methods))
    if not out:
        raise InputError(f"no methods to measure; choose from {', '.join(METHODS)}")
    return out


@dataclass
class QDyLoraConfig:
    """Settings of a QDyLoRA run (one adapter trained so that every rank r_min..r_max works).

    Each field's help is in its metadata (`qdylora info` and the Axolotl keys show it).
    """

    r_min: int = setting(1, "Smallest rank drawn during training and accepted afterwards (>= 1).", min=1)
    r_max: int | None = setting(
        None, "Largest rank, the adapter's stored rank; unset takes the LoRA config's r (Axolotl: lora_r).",
        axolotl=False,
    )
    distribution: Distribution = setting(
        "uniform", "How b is drawn from r_min..r_max: uniform (the paper) or log_uniform (probability "
        "proportional to 1/b, more steps at low ranks).",
    )
    ranks: list[int | Literal["r_max"]] | None = setting(
        None, "Draw only from this set (e.g. [1, 8, 16, 32, 64]) instead of every integer in r_min..r_max; "
        "distribution then weights the set. [r_max] trains the full rank only: plain LoRA, whose lower ranks "
        "are read by svd (preset plain).",
    )
    update: UpdateMode = setting(
        "full", "full: the first b rows/columns all learn (the paper); frozen: rows/columns 0..b-2 are "
        "detached so only row/column b-1 learns (DyLoRA's nested-dropout mode).",
    )
    sample_every: SampleEvery = setting(
        "optimizer_step", "optimizer_step: one b per optimizer step, shared by its gradient-accumulation "
        "micro-batches (the reference); micro_batch: a new b for every micro-batch.",
    )
    eval_ranks: list[int] | None = setting(
        None, "Ranks the sweep measures by default; unset: ranks if given, else r_min, the powers of two in "
        "between, and r_max.",
    )
    seed: int | None = setting(
        None, "Seed of the rank sequence; unset takes TrainingArguments.seed. The rank at a step depends only "
        "on (seed, step), so every process and every resumed run draws the same sequence.", min=0,
    )
    truncation: Truncation = setting(
        "slice", "How the adapter runs at rank b: slice uses A[:b] and B[:, :b] (cost follows b); mask zeroes "
        "the rank dimension past b (full shapes in the graph; a fallback for sharding engines).",
    )
    scaling: Scaling | None = setting(
        None, "The LoRA scale at rank b: linear = alpha / b (the paper; PEFT's default), sqrt = alpha / sqrt(b) "
        "(rsLoRA); unset follows the LoRA config (use_rslora). A rule that differs from the LoRA config "
        "switches the PEFT config to match, so the saved adapter and every export carry it.",
    )
    anchor_ranks: list[int | Literal["r_max"]] | None = setting(
        None, "Ranks trained in EVERY step beside the drawn b (e.g. [r_max]; r_max stands for the adapter's r), "
        "each with its own forward and backward, losses averaged (SortedNet-style sandwich); one more "
        "forward/backward per anchor and step; not with DeepSpeed.",
    )
    loss_weight: LossWeight = setting(
        "equal", "equal (the paper) weights every step alike; inverse_scale weights the loss at rank b by "
        "s(r_max)/s(b), cancelling the rank scale in the LoRA gradients so Adam's moments, shared by all "
        "ranks, see gradients of one size whatever b is drawn.",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.r_max is not None and self.r_max < self.r_min:
            raise InputError(f"r_max must be an integer >= r_min ({self.r_min}), got {self.r_max!r}")
        for name in ("ranks", "eval_ranks", "anchor_ranks"):
            values = getattr(self, name)
            if values is None:
                continue
            if name != "eval_ranks" and self.r_max is not None:  # "r_max" stands for the adapter's r
                values = [self.r_max if v == "r_max" else v for v in values]
            symbolic = [v for v in values if v == "r_max"]
            numbers = [v for v in values if v != "r_max"]
            self.check_ranks(numbers, what=name)
            setattr(self, name, sorted(set(numbers)) + symbolic[:1])

    # -- rank range ---------------------------------------------------------------------
    def check_ranks(self, ranks: list[int], what: str = "rank") -> None:
        """Raise `InputError` unless every rank lies in r_min..r_max."""
        hi = self.r_max if self.r_max is not None else float("inf")
        bad = [r for r in ranks if not is_int(r) or r < self.r_min or r > hi]
        if bad:
            top = self.r_max if self.r_max is not None else "r_max"
            raise InputError(f"{what} {bad} outside the trained range {self.r_min}..{top}")

    def resolve(self, r_max: int, seed: int) -> QDyLoraConfig:
        """A copy with r_max and seed filled in from the LoRA config and TrainingArguments."""
        if self.r_max is not None and self.r_max != r_max:
            raise InputError(
                f"QDyLoraConfig.r_max={self.r_max} but the LoRA adapter has r={r_max}; "
                "leave r_max unset or set the LoRA config's r to the maximum rank"
            )
        return dataclasses.replace(self, r_max=r_max, seed=self.seed if self.seed is not None else seed)

    @property
    def candidate_ranks(self) -> list[int]:
        """Every rank training may draw."""
        if self.r_max is None:
            raise InputError("r_max is not known yet: resolve the config against the LoRA adapter first")
        return list(self.ranks) if self.ranks else list(range(self.r_min, self.r_max + 1))

    @property
    def lower_ranks_trained(self) -> bool:
        """Whether training ran any rank below r_max (drawn or anchored); if not, the adapter is a
        plain LoRA adapter and its prefix cuts were never trained: read them by svd."""
        trained = set(self.candidate_ranks) | {r for r in self.anchor_ranks or [] if r != "r_max"}
        return any(r < self.r_max for r in trained)

    @property
    def default_method(self) -> str:
        """How a rank-b adapter is read from this run when nobody says: prefix (the ranks QDyLoRA
        trained), or svd when only the full rank was trained."""
        return "prefix" if self.lower_ranks_trained else "svd"

    @property
    def sweep_methods(self) -> list[str]:
        """The readings the sweep measures when nobody says: the run's own (prefix) for a QDyLoRA
        run; for a run that trained the full rank only, svd AND prefix, because which of the two
        reads such an adapter better depends on the task (benchmarks/results/real.md: svd on the
        planted and demo tasks, prefix on GSM8K), so the recommendation picks the (rank, method)."""
        return [self.default_method] if self.lower_ranks_trained else ["svd", "prefix"]

    @property
    def sweep_ranks(self) -> list[int]:
        """The ranks the sweep measures when none are given."""
        if self.eval_ranks:
            return list(self.eval_ranks)
        if self.r_max is None:
            raise InputError("r_max is not known yet: resolve the config against the LoRA adapter first")
        if self.ranks and self.lower_ranks_trained:
            return list(self.ranks)
        return default_eval_ranks(self.r_min, self.r_max)

    # -- presets ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QDyLoraConfig:
        """A named recipe (see `PRESETS`), with `overrides` on top.

        `"paper"` is the QDyLoRA paper's recipe (the defaults). The others were measured
        against it in benchmarks/results/quality.md.
        """
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # -- disk ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], what: str = "QDyLoRA setting") -> QDyLoraConfig:
        """The config a dict describes; a `"preset"` key starts from that named recipe."""
        data = dict(data)
        name = data.pop("preset", None)
        check_keys(data, cls, what, extra=("preset",))
        return cls.preset(name, **data) if name is not None else cls(**data)

    def save_pretrained(self, directory: str | os.PathLike, **extra: Any) -> Path:
        """Write qdylora_config.json (this config, the package version and `extra`, e.g. the sweep)."""
        path = Path(directory) / CONFIG_NAME
        payload = read_config_file(path.parent) if path.exists() else {}
        payload.update({"qdylora_version": _version(), "config": self.to_dict()})
        payload.update(extra)
        write_json_atomic(path, payload)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> QDyLoraConfig:
        """Read the config of an adapter folder trained with qdylora."""
        return cls.from_dict(read_config_file(directory)["config"])


@dataclass
class SweepSettings:
    """The rank sweep after training (the YAML's `sweep:` section; Axolotl's qdylora_sweep* keys)."""

    enabled: bool = setting(
        True, "Run the rank sweep after training when there is an eval set.", axolotl="qdylora_sweep"
    )
    ranks: list[int] | None = setting(
        None, "Ranks to measure; unset: the qdylora section's eval_ranks, else r_min, powers of two, r_max.",
        axolotl=False,  # Axolotl: qdylora_eval_ranks
    )
    refine: bool = setting(False, "Then measure every rank between the best coarse rank's neighbours.")
    tolerance: float = setting(0.01, "Recommend the smallest rank within this relative gap of the best.", min=0)
    methods: list[Method] | None = setting(
        None, "Truncation methods each rank is measured under (prefix, svd); the recommendation is then a "
        "(rank, method). Unset: prefix for a QDyLoRA run, svd and prefix for a run that trained the full rank only.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.methods, (str, list, tuple)):
            self.methods = check_methods(self.methods)  # "prefix,svd" or a list; names one line each
        check_fields(self)


@dataclass
class ExportSettings:
    """Ranks shipped after training as standard PEFT adapters (the YAML's `export:` section;
    Axolotl's qdylora_export_* keys), each into `<output_dir>/qdylora-exports/rank-<b>/`."""

    ranks: list[int | Literal["recommended"]] | None = setting(
        None, "Ranks to export after training ('recommended' is the sweep's pick); unset exports none.",
    )
    method: Method | None = setting(
        None, "prefix (the first b rows/columns) or svd (the best rank-b approximation of each layer's delta); "
        "unset: prefix, or the sweep's method for 'recommended'.",
    )
    vllm: bool = setting(
        False, "Check each export for vLLM before writing it (vLLM's rules, shapes against the base) and "
        "print the vllm serve line.",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.ranks is not None:
            self.ranks = rank_list(self.ranks)


def rank_list(ranks: Sequence[int | str]) -> list[int | str]:
    """A list of ranks as the settings keep it: the integers sorted, once each, then 'recommended' if named."""
    return sorted({r for r in ranks if r != RECOMMENDED}) + ([RECOMMENDED] if RECOMMENDED in ranks else [])


@dataclass
class SampleSettings:
    """Prompts answered at a few ranks at every evaluation, logged beside the metrics
    (the YAML's `samples:` section; `RankSamplesCallback`)."""

    prompts: list[str] = field(metadata={"help": "Prompts to answer (in the YAML also a prompts file: one per line, or JSONL)."})
    ranks: list[int] | None = setting(None, "Ranks to answer at; unset: the sweep's ranks.")
    max_new_tokens: int = setting(64, "Length of each answer in tokens.", min=1)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class HealSettings:
    """Healing one rank of a trained adapter (`qdylora heal`, `workflow.heal`; the train YAML's
    `heal:` section, right after the run): its rank-b cut, trained alone for a short while on
    the run's data. The defaults are the rule measured in benchmarks/results/planted.md and
    real.md (a tenth of the steps at 0.3x the learning rate, another data order): at or below
    the dedicated rank-b run on the planted yardstick at every rank, within 2% of it on GSM8K,
    0.90-0.94x at rank 1 on the demo task (validation)."""

    rank: int | Literal["recommended"] | list[int | Literal["recommended"]] | None = setting(
        None, "The rank to heal, or 'recommended' (the sweep's pick), or a list of them (each healed on its own). The "
        "train YAML's heal: section needs it (unless it only sets holdout) and heals into "
        "<output_dir>/qdylora-healed/rank-<b>/; `qdylora heal` "
        "takes --rank or --ranks; with Axolotl the plugin writes each cut and its healing run's config "
        "(<output_dir>/qdylora-healed/rank-<b>.yml).",
    )
    method: Method | list[Method] | None = setting(
        None, "How the rank-b cut is read before healing; unset: the adapter's own reading (svd for a plain "
        "run, prefix for a QDyLoRA run), also for 'recommended' (the sweep's rank). Several (svd,prefix): heal "
        "from each and keep the better on the eval data (which heals better depends on the task: "
        "benchmarks/results/real.md); each costs a healing run.",
    )
    steps: int | None = setting(None, "Healing steps; unset: steps_fraction x the run's steps.", min=1)
    steps_fraction: float = setting(
        0.1, "Healing steps as a fraction of the run's steps (training.max_steps; with Axolotl the steps it took).",
        min=0,
    )
    lr_factor: float = setting(
        0.3, "Healing learning rate as a multiple of the run's training.learning_rate (constant, no warmup).", min=0,
    )
    holdout: float | None = setting(
        None, "A fraction of the training data (0 < holdout < 1) the run holds back for healing: the run trains on "
        "the rest, each healing on those records only, which the adapter never saw (split at random with the "
        "run's split_seed, after eval_size; the run records which, and `qdylora heal` uses them; alone, without "
        "rank, it only holds them back, also under accelerate launch). On GSM8K, at "
        "the same compute, 0.993-0.998x the usual healing's validation loss at ranks 1-64, both seeds; not "
        "confirmed on the demo task (benchmarks/results/real.findings.md). Not with Axolotl (it prepares the data).",
        axolotl=False,
    )
    seed_offset: int = setting(
        100, "The healing run's seed (and data_seed) is the run's plus this, so it sees the data in another order "
        "(its eval_size split stays the run's; with Axolotl and val_set_size the healing config keeps the run's seed: "
        "Axolotl splits the data with it).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.method, (str, list, tuple)):  # "svd,prefix" or a list: one method stays a string
            methods = check_methods(self.method)
            self.method = methods[0] if len(methods) == 1 else methods
        check_fields(self)
        if isinstance(self.rank, (list, tuple)):
            self.rank = rank_list(self.rank)
        for r in self.ranks:
            if is_int(r) and r < 1:
                raise InputError(f"rank must be an integer >= 1 or 'recommended', got {r!r}")
        if self.steps is None and self.steps_fraction <= 0:
            raise InputError(f"steps_fraction must be > 0 (or give steps), got {self.steps_fraction!r}")
        if self.holdout is not None and not 0 < self.holdout < 1:
            raise InputError(f"holdout must be a fraction of the training data in (0, 1), e.g. 0.1, got {self.holdout!r}")

    def steps_for(self, run_steps: int) -> int:
        """The healing steps: `steps`, else steps_fraction x the run's `run_steps`."""
        return self.steps if self.steps is not None else max(1, round(run_steps * self.steps_fraction))

    @property
    def ranks(self) -> list[int | str]:
        """The ranks to heal (one, or the list given), 'recommended' among them as written."""
        return list(self.rank) if isinstance(self.rank, list) else [] if self.rank is None else [self.rank]

    @property
    def methods(self) -> list[str | None]:
        """The cuts to heal from ([None]: the adapter's own reading)."""
        return list(self.method) if isinstance(self.method, list) else [self.method]

    def check_choosable(self, *, sweep_enabled: bool, has_eval: bool, key: dict[str, str] | None = None) -> None:
        """Several cuts need a measured eval metric to keep the better healed one (the YAML's
        `heal:` before training, `workflow.heal` before healing). `key`: `HEAL_KEYS`' names."""
        key = key or HEAL_KEYS
        if len(self.methods) > 1 and not (sweep_enabled and has_eval):
            raise InputError(f"{key['method']} lists several cuts, and the better healed one is kept by the eval "
                             f"metric: give {key['eval']} and keep {key['enabled']}, or name one method")


# the settings `check_heal` and `export_problem` name, as the train YAML spells them
HEAL_KEYS = {"rank": "heal.rank", "method": "heal.method", "enabled": "sweep.enabled: true", "methods": "sweep.methods",
             "eval": "eval_data or eval_size"}
EXPORT_KEYS = {"ranks": "export.ranks", "method": "export.method", "enabled": "sweep.enabled: true",
               "methods": "sweep.methods", "eval": "eval_data or eval_size"}


def check_heal(heal: HealSettings, config: QDyLoraConfig, sweep: SweepSettings, has_eval: bool,
               key: dict[str, str] | None = None) -> None:
    """What healing a rank needs from the run, checked before training (the train YAML's `heal:`,
    the Axolotl plugin's qdylora_heal_* keys; `workflow.heal` would refuse it after): a rank in the
    trained range, or 'recommended' from a sweep that measures its method; a cut the run can be
    read at (`export_problem`, as for the exports); an eval metric to choose between several cuts.
    `config` is resolved (r_max known); `key` names the settings as the user wrote them (`HEAL_KEYS`)."""
    key = key or HEAL_KEYS
    if heal.rank is None and heal.holdout is not None:
        return  # the run only holds records back, for a `qdylora heal` later (e.g. after a multi-process run)
    if heal.rank is None:
        raise InputError(f"give the rank to heal: {key['rank']}: B (an integer) or {key['rank']}: recommended "
                         "(the sweep's pick)")
    config.check_ranks([r for r in heal.ranks if is_int(r)], what=key["rank"])
    heal.check_choosable(sweep_enabled=sweep.enabled, has_eval=has_eval, key=key)
    for method in heal.methods:
        problem = export_problem(ExportSettings(ranks=heal.ranks, method=method), sweep, has_eval,
                                 {**key, "ranks": key["rank"]}, config.sweep_methods,
                                 full_rank_only=not config.lower_ranks_trained)
        if problem:
            raise InputError(problem)


def export_problem(export: ExportSettings, sweep: SweepSettings, has_eval: bool, key: dict[str, str],
                   default_methods: Sequence[str] = ("prefix",), full_rank_only: bool = False) -> str | None:
    """Why the exports cannot follow from this run and its sweep, before any training: 'recommended'
    needs a sweep (enabled, with eval data) that measures the export's method, and the prefix cut
    of a run that trains only its full rank (`full_rank_only`) ships only once the sweep measured it
    (the rule `adapter_io.check_adapter` applies to the saved adapter after training). `key` names
    the settings as the user wrote them: {"ranks", "method", "enabled", "methods", "eval"};
    `default_methods` are the run's (`QDyLoraConfig.sweep_methods`), used where none are set."""
    measured = (sweep.methods or list(default_methods)) if sweep.enabled and has_eval else []
    if export.ranks and export.method == "prefix" and full_rank_only and "prefix" not in measured:
        return (f"{key['method']} is prefix, but this run trains only its full rank and its sweep does not measure "
                f"prefix: use {key['method']}: svd (or leave it unset), or add prefix to {key['methods']}")
    if RECOMMENDED not in (export.ranks or []):
        return None
    if not (sweep.enabled and has_eval):
        return (f"{key['ranks']} lists 'recommended', which comes from the rank sweep: give {key['eval']} and keep "
                f"{key['enabled']}, or list explicit ranks")
    if export.method is not None and export.method not in measured:
        return (f"{key['method']} is {export.method} and {key['ranks']} lists 'recommended', but the sweep measures "
                f"only {', '.join(measured)}: add {export.method} to {key['methods']}")
    return None


# -- one validation loop for every settings dataclass ---------------------------------------------
def check_keys(data: dict[str, Any], cls: type, what: str, extra: tuple[str, ...] = (), hint: str = "") -> None:
    """Refuse keys that are not fields of the dataclass `cls` (a typo never falls back to a default).

    The message lists the allowed keys, or says `hint` instead (for classes with many fields)."""
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown {what}(s) {unknown}; " + (hint or f"allowed: {sorted(known)}"))


def check_fields(obj: Any) -> None:
    """Check every field of a settings dataclass against its annotation (and `metadata["min"]`).

    A field's `Literal` lists its choices; `int`s are not bools; lists are non-empty; YAML's
    numeric strings such as "2e-4" are not numbers here (give them unquoted).
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if not _matches(value, hint):
            choices = _literal_choices(hint)
            if choices and not isinstance(value, (list, tuple)):
                raise InputError(f"{f.name}={value!r} is not allowed; choose one of {', '.join(choices)}")
            raise InputError(f"{f.name} must be {describe(hint)}, got {value!r}")
        low = f.metadata.get("min")
        if low is not None and value is not None and value < low:
            raise InputError(f"{f.name} must be {describe(hint)} >= {low}, got {value!r}")
        if isinstance(value, tuple):
            setattr(obj, f.name, list(value))


def _members(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def _literal_choices(hint: Any) -> list[str]:
    return [c for m in _members(hint) if typing.get_origin(m) is Literal for c in typing.get_args(m)]


def _matches(value: Any, hint: Any) -> bool:
    for member in _members(hint):
        origin = typing.get_origin(member)
        if member is type(None):
            if value is None:
                return True
        elif origin is Literal:
            if value in typing.get_args(member) and isinstance(value, str):
                return True
        elif origin is list:
            (item,) = typing.get_args(member)
            if isinstance(value, (list, tuple)) and value and all(_matches(v, item) for v in value):
                return True
        elif member is bool:
            if isinstance(value, bool):
                return True
        elif member is int:
            if is_int(value):
                return True
        elif member is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif member is str:
            if isinstance(value, str) and value:
                return True
        elif member is Any:
            return True
    return False


def describe(hint: Any) -> str:
    """A field's type in words, for error messages and help: 'an integer', 'uniform or log_uniform', ..."""
    parts = []
    for member in _members(hint):
        origin = typing.get_origin(member)
        if member is type(None):
            continue
        if origin is Literal:
            parts.append(" or ".join(typing.get_args(member)))
        elif origin is list:
            (item,) = typing.get_args(member)
            plural = {"an integer": "integers", "a number": "numbers", "a non-empty text": "texts"}
            parts.append("a non-empty list of " + " or ".join(plural.get(p, p) for p in describe(item).split(" or ")))
        else:
            parts.append({bool: "true or false", int: "an integer", float: "a number", str: "a non-empty text"}
                         .get(member, getattr(member, "__name__", str(member))))
    return " or ".join(parts)


def settings_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type in words, default, help) of each field of a settings dataclass, in order."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f.name, describe(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


def read_config_file(directory: str | os.PathLike) -> dict[str, Any]:
    """The whole qdylora_config.json of a folder (config, version, sweep results), type-checked."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise InputError(f"folder {directory} does not exist" if not Path(directory).exists()
                         else f"{directory} is a file, not an adapter folder")
    if not path.is_file():
        raise InputError(
            f"{directory} has no {CONFIG_NAME}: it was not trained with qdylora "
            "(a plain LoRA adapter's lower ranks are read by svd)"
        )
    data = read_json_file(path, "qdylora config")
    if not isinstance(data, dict) or "config" not in data:
        raise InputError(f"{path} has no 'config' section; is it a qdylora file?")
    if not isinstance(data["config"], dict):
        raise InputError(f"{path}: 'config' must be a JSON object of QDyLoRA settings, got {data['config']!r}")
    sweep = data.get("sweep")
    if sweep is not None:
        results = sweep.get("results") if isinstance(sweep, dict) else None
        rec = sweep.get("recommended_rank", 0) if isinstance(sweep, dict) else None
        if (
            not isinstance(results, dict)
            or not all(str(k).isdigit() and isinstance(v, dict) for k, v in results.items())
            or not is_int(rec)
        ):
            raise InputError(
                f"{path}: the 'sweep' section is damaged (it needs 'results' {{rank: metrics}} and an integer "
                "'recommended_rank'); run `qdylora sweep` again to rewrite it"
            )
    return data


def read_json_file(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """Parse a JSON file given by the user; a missing or malformed file is an `InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist{hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}") from exc


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` next to `path` and rename it into place, so a crash leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON next to `path` and rename it into place, so a crash leaves the old file."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _version() -> str:
    from . import __version__

    return __version__

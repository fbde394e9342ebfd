"""`QDyLoraConfig`: what to draw at each step, how to train it, and what to evaluate.

The config lives beside the standard PEFT adapter as `qdylora_config.json`, so any
adapter folder says how it was trained and, once measured, how good each rank is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, is_int

CONFIG_NAME = "qdylora_config.json"

DISTRIBUTIONS = ("uniform", "log_uniform")
UPDATE_MODES = ("full", "frozen")
SAMPLE_EVERY = ("optimizer_step", "micro_batch")
TRUNCATIONS = ("slice", "mask")
SCALINGS = ("linear", "sqrt")
LOSS_WEIGHTS = ("equal", "inverse_scale")


# Named recipes for QDyLoraConfig.preset(); each non-paper entry won against the paper's
# recipe on validation AND test in benchmarks/results/quality.md.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # alpha/sqrt(b) + loss weighted s(r_max)/s(b): on SmolLM2-135M / GSM8K (2 seeds) 1.6-3.6%
    # lower loss than the paper at ranks 4, 16, 64 on val and test, about 1% higher at rank 1
    "balanced": {"scaling": "sqrt", "loss_weight": "inverse_scale"},
}


def default_eval_ranks(r_min: int, r_max: int) -> list[int]:
    """A spread for the sweep: r_min, the powers of two in between, and r_max."""
    ranks = {r_min, r_max}
    p = 1
    while p < r_max:
        if p >= r_min:
            ranks.add(p)
        p *= 2
    return sorted(ranks)


@dataclass
class QDyLoraConfig:
    """Settings of a QDyLoRA run (one adapter trained so that every rank r_min..r_max works).

    Attributes:
        r_min: Smallest rank drawn during training and accepted afterwards (>= 1).
        r_max: Largest rank, the adapter's stored rank. `None` takes the LoRA config's `r`.
        distribution: How b is drawn from r_min..r_max: `"uniform"` (the paper) or
            `"log_uniform"` (probability proportional to 1/b, more steps at low ranks).
        ranks: Draw only from this set (e.g. `[1, 8, 16, 32, 64]`) instead of every
            integer in r_min..r_max; `distribution` then weights the set.
        update: `"full"` trains all first b rows/columns (the QDyLoRA paper, default);
            `"frozen"` detaches rows/columns 0..b-2 so only row/column b-1 learns
            (DyLoRA's nested-dropout mode).
        sample_every: `"optimizer_step"` draws one b per optimizer step, shared by every
            micro-batch of a gradient-accumulation window (the reference); `"micro_batch"`
            draws a new b for every micro-batch.
        eval_ranks: Ranks the sweep measures by default. `None` means `ranks` if given,
            else r_min, the powers of two in between, and r_max.
        seed: Seed of the rank sequence. `None` takes `TrainingArguments.seed`. The rank
            at a step depends only on (seed, step), so every process and every resumed
            run draws the same sequence.
        truncation: How the adapter runs at rank b: `"slice"` uses A[:b] and B[:, :b]
            (cost follows b); `"mask"` zeroes the rank dimension past b (every parameter
            keeps its full shape in the graph; a fallback for sharding engines).
        scaling: The LoRA scale at rank b. `"linear"`: alpha / b (the paper; PEFT's
            default); `"sqrt"`: alpha / sqrt(b) (rsLoRA). `None` follows the LoRA config
            (`use_rslora`). A rule that differs from the LoRA config switches the PEFT
            config to match, so the saved adapter and every rank-b export carry it.
        anchor_ranks: Ranks trained in EVERY step beside the drawn b (e.g. `["r_max"]`;
            the string "r_max" stands for the adapter's r),
            each with its own forward and backward, losses averaged (SortedNet-style
            "sandwich"). Costs one more forward/backward per anchor and step.
        loss_weight: `"equal"` (the paper) weights every step's loss alike;
            `"inverse_scale"` weights the loss at rank b by s(r_max) / s(b) (b / r_max
            with alpha/b scaling). That cancels the rank scale in the LoRA gradients, so
            the optimizer's moment estimates, shared by all ranks, see gradients of one
            size whatever b is drawn (otherwise the rare small-b steps, scaled up to
            r_max/b times, dominate Adam's second moment of the first rows).
    """

    r_min: int = 1
    r_max: int | None = None
    distribution: str = "uniform"
    ranks: list[int] | None = None
    update: str = "full"
    sample_every: str = "optimizer_step"
    eval_ranks: list[int] | None = None
    seed: int | None = None
    truncation: str = "slice"
    scaling: str | None = None
    anchor_ranks: list[int | str] | None = None
    loss_weight: str = "equal"

    def __post_init__(self) -> None:
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("update", self.update, UPDATE_MODES)
        _check_choice("sample_every", self.sample_every, SAMPLE_EVERY)
        _check_choice("truncation", self.truncation, TRUNCATIONS)
        if self.scaling is not None:
            _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("loss_weight", self.loss_weight, LOSS_WEIGHTS)
        if not is_int(self.r_min) or self.r_min < 1:
            raise InputError(f"r_min must be an integer >= 1, got {self.r_min!r}")
        if self.r_max is not None:
            if not is_int(self.r_max) or self.r_max < self.r_min:
                raise InputError(f"r_max must be an integer >= r_min ({self.r_min}), got {self.r_max!r}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("ranks", "eval_ranks", "anchor_ranks"):
            values = getattr(self, name)
            if values is None:
                continue
            values = list(values)
            if name == "anchor_ranks" and self.r_max is not None:  # "r_max" stands for the adapter's r
                values = [self.r_max if v == "r_max" else v for v in values]
            symbolic = [v for v in values if name == "anchor_ranks" and v == "r_max"]
            numbers = [v for v in values if v not in symbolic]
            if not values or not all(is_int(v) for v in numbers):
                raise InputError(f"{name} must be a non-empty list of integers, got {values!r}"
                                 + (' (or "r_max")' if name == "anchor_ranks" else ""))
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
        resolved = dataclasses.replace(self, r_max=r_max, seed=self.seed if self.seed is not None else seed)
        return resolved

    @property
    def candidate_ranks(self) -> list[int]:
        """Every rank training may draw."""
        if self.r_max is None:
            raise InputError("r_max is not known yet: resolve the config against the LoRA adapter first")
        return list(self.ranks) if self.ranks else list(range(self.r_min, self.r_max + 1))

    @property
    def sweep_ranks(self) -> list[int]:
        """The ranks the sweep measures when none are given."""
        if self.eval_ranks:
            return list(self.eval_ranks)
        if self.ranks:
            return list(self.ranks)
        if self.r_max is None:
            raise InputError("r_max is not known yet: resolve the config against the LoRA adapter first")
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
    def from_dict(cls, data: dict[str, Any]) -> QDyLoraConfig:
        """The config a dict describes; a `"preset"` key starts from that named recipe."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        name = data.pop("preset", None)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown QDyLoRA setting(s) {unknown}; allowed: {sorted(known | {'preset'})}")
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


def read_config_file(directory: str | os.PathLike) -> dict[str, Any]:
    """The whole qdylora_config.json of a folder (config, version, sweep results), type-checked."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise InputError(f"folder {directory} does not exist" if not Path(directory).exists()
                         else f"{directory} is a file, not an adapter folder")
    if not path.is_file():
        raise InputError(
            f"{directory} has no {CONFIG_NAME}: it was not trained with qdylora "
            "(a plain LoRA adapter has no meaningful lower ranks)"
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


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON next to `path` and rename it into place, so a crash leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")



def _version() -> str:
    from . import __version__

    return __version__

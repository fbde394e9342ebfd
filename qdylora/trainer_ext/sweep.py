"""The rank sweep: measure the ranks of one trained adapter and recommend one.

Quality is not monotone in rank (the paper's "semi-sorted" behaviour), so we measure
and recommend the smallest rank whose metric is within a tolerance of the best.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import write_json_atomic
from ..errors import InputError

SWEEP_JSON = "rank_sweep.json"
SWEEP_PLOT = "rank_sweep.png"


@dataclass
class SweepResult:
    """Metrics per rank, and the rank recommended from them."""

    results: dict[int, dict[str, float]]
    metric: str = "eval_loss"
    greater_is_better: bool = False
    tolerance: float = 0.01
    recommended_rank: int = 0
    samples: dict[int, list[str]] = field(default_factory=dict)
    sample_prompts: list[str] = field(default_factory=list)  # samples[rank][i] answers sample_prompts[i]

    def __post_init__(self) -> None:
        if not self.recommended_rank and self.results:
            self.recommended_rank = recommend_rank(self.values(), self.tolerance, self.greater_is_better)

    def values(self) -> dict[int, float]:
        """{rank: value of the sweep's metric}."""
        return {r: m[self.metric] for r, m in sorted(self.results.items()) if self.metric in m}

    @property
    def best_rank(self) -> int:
        vals = self.values()
        pick = max if self.greater_is_better else min
        return pick(vals, key=lambda r: (vals[r], -r) if self.greater_is_better else (vals[r], r))

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        """JSON-ready dict; `samples=False` leaves out the generated answers (for qdylora_config.json)."""
        out = {
            "metric": self.metric,
            "greater_is_better": self.greater_is_better,
            "tolerance": self.tolerance,
            "recommended_rank": self.recommended_rank,
            "best_rank": self.best_rank,
            "results": {str(r): m for r, m in sorted(self.results.items())},
        }
        if samples and self.samples:
            out["samples"] = {str(r): s for r, s in sorted(self.samples.items())}
            out["sample_prompts"] = list(self.sample_prompts)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepResult:
        return cls(
            results={int(r): m for r, m in data["results"].items()},
            metric=data.get("metric", "eval_loss"),
            greater_is_better=data.get("greater_is_better", False),
            tolerance=data.get("tolerance", 0.01),
            recommended_rank=data.get("recommended_rank", 0),
            samples={int(r): s for r, s in data.get("samples", {}).items()},
            sample_prompts=list(data.get("sample_prompts", [])),
        )

    def table(self) -> str:
        """A plain-text table: rank, metric, gap to the best, the recommendation marked."""
        vals = self.values()
        best = vals[self.best_rank]
        lines = [f"{'rank':>6}  {self.metric:>12}  {'vs best':>8}"]
        for r, v in vals.items():
            gap = (v - best) / abs(best) * 100 if best else 0.0
            mark = "  <- recommended" if r == self.recommended_rank else ("  (best)" if r == self.best_rank else "")
            lines.append(f"{r:>6}  {v:>12.4f}  {gap:>+7.2f}%{mark}")
        return "\n".join(lines)


def recommend_rank(values: dict[int, float], tolerance: float = 0.01, greater_is_better: bool = False) -> int:
    """The smallest rank whose value is within `tolerance` (relative) of the best one."""
    if not values:
        raise InputError("no sweep results to recommend a rank from")
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance}")
    if greater_is_better:
        best = max(values.values())
        ok = [r for r, v in values.items() if v >= best - tolerance * abs(best)]
    else:
        best = min(values.values())
        ok = [r for r, v in values.items() if v <= best + tolerance * abs(best)]
    return min(ok)


def refine_ranks(values: dict[int, float], r_min: int, r_max: int, greater_is_better: bool = False) -> list[int]:
    """Ranks strictly between the best coarse rank's neighbours that were not measured yet."""
    ranks = sorted(values)
    pick = max if greater_is_better else min
    best = pick(ranks, key=lambda r: values[r])
    i = ranks.index(best)
    lo = ranks[i - 1] if i > 0 else r_min - 1
    hi = ranks[i + 1] if i + 1 < len(ranks) else r_max + 1
    return [r for r in range(max(lo + 1, r_min), min(hi, r_max + 1)) if r not in values]


def run_sweep(
    trainer: Any,
    ranks: list[int],
    *,
    eval_dataset: Any = None,
    refine: bool = False,
    tolerance: float = 0.01,
    metric: str = "eval_loss",
    greater_is_better: bool = False,
    sample_prompts: list[str] | None = None,
    sample_kwargs: dict[str, Any] | None = None,
) -> SweepResult:
    """Evaluate `trainer` (a QDyLoRA trainer) at each rank, refining around the best if asked.

    With `sample_prompts`, also answer them at every measured rank (`generate_across_ranks`
    with `sample_kwargs`, using the trainer's `processing_class` as tokenizer).
    """
    config = trainer.qdylora_config
    ranks = sorted(set(ranks))
    config.check_ranks(ranks)
    sample_prompts = list(sample_prompts or [])
    if sample_prompts and getattr(trainer, "processing_class", None) is None:
        raise InputError("sample_prompts need a tokenizer: pass processing_class=tokenizer to the trainer")
    results: dict[int, dict[str, float]] = {}

    def measure(todo: list[int], desc: str) -> None:
        bar = tqdm(todo, desc=desc, unit="rank", disable=not trainer.is_world_process_zero())
        for r in bar:
            bar.set_postfix(rank=r)
            metrics = trainer.evaluate(eval_dataset=eval_dataset, rank=r)
            results[r] = {re.sub(rf"^eval_r{r}_", "eval_", k): v for k, v in metrics.items()}
            if metric not in results[r]:
                raise InputError(f"metric {metric!r} not among the evaluation metrics {sorted(results[r])}")

    measure(ranks, "rank sweep")
    if refine:
        values = {r: m[metric] for r, m in results.items()}
        extra = refine_ranks(values, config.r_min, config.r_max, greater_is_better)
        if extra:
            measure(extra, "refining")
    samples = {}
    if sample_prompts:
        from ..generation import generate_across_ranks

        samples = generate_across_ranks(
            trainer.model, trainer.processing_class, sample_prompts, sorted(results),
            progress=trainer.is_world_process_zero(), **(sample_kwargs or {}),
        )
    return SweepResult(
        results, metric=metric, greater_is_better=greater_is_better, tolerance=tolerance,
        samples=samples, sample_prompts=sample_prompts,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def plot_sweep(result: SweepResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot the sweep metric against rank (log2 axis), the recommended rank marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = result.values()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(vals), list(vals.values()), marker="o", label="QDyLoRA")
    rec = result.recommended_rank
    ax.scatter([rec], [vals[rec]], s=160, facecolors="none", edgecolors="red", zorder=3, label=f"recommended: {rec}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(vals))
    ax.set_xticklabels([str(r) for r in vals], fontsize=7)
    ax.set_xlabel("LoRA rank b")
    ax.set_ylabel(result.metric)
    ax.set_title(title or "Metric per rank of one QDyLoRA adapter")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")  # created with the umask's mode, as savefig would
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_sweep(result: SweepResult, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write rank_sweep.json and rank_sweep.png into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / SWEEP_JSON
    write_json_atomic(json_path, result.to_dict())
    return json_path, plot_sweep(result, directory / SWEEP_PLOT)


def sweep_adapter(
    adapter_dir: str | os.PathLike,
    data: Any,
    ranks: list[int] | None = None,
    *,
    base_model: str | None = None,
    load_in_4bit: bool = True,
    refine: bool = False,
    tolerance: float = 0.01,
    batch_size: int = 8,
    out_dir: str | os.PathLike | None = None,
    sample_prompts: list[str] | None = None,
    sample_kwargs: dict[str, Any] | None = None,
) -> SweepResult:
    """Sweep a saved adapter on a prompt/answer dataset (`data`: a `qdylora.data.DataSpec`).

    Writes rank_sweep.json and rank_sweep.png into `out_dir` (default: the adapter folder)
    and records the result in the adapter's qdylora_config.json. `sample_prompts` are
    answered at every rank, written with the data's template and no chat template (as
    the evaluation examples are) unless `sample_kwargs` says otherwise.
    """
    from transformers import TrainingArguments

    from ..adapter_io import check_adapter
    from ..data import collator, load_records, resolve_fields, tokenize
    from ..loading import load_adapter
    from .trainer import QDyLoraTrainer

    # the cheap checks first: adapter files, ranks, data, output folder; then the slow model load
    config = check_adapter(adapter_dir).config
    ranks = ranks if ranks is not None else config.sweep_ranks
    config.check_ranks(ranks)
    if not _is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    records = load_records(data)
    if len(records) == 0:
        raise InputError(f"{data.path} holds no records")
    resolve_fields(data, records.column_names)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out {out_dir} is a file; give a folder")
    model, tokenizer, config = load_adapter(adapter_dir, base_model=base_model, load_in_4bit=load_in_4bit)
    eval_ds = tokenize(data, tokenizer, records)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=batch_size, report_to="none", remove_unused_columns=False
        )
        trainer = QDyLoraTrainer(
            model=model, args=args, eval_dataset=eval_ds, data_collator=collator(tokenizer), qdylora_config=config,
            processing_class=tokenizer,
        )
        sample_kwargs = {"template": data.template, "chat_template": False, **(sample_kwargs or {})}
        trainer.evaluate_ranks(
            ranks, refine=refine, tolerance=tolerance, sample_prompts=sample_prompts, sample_kwargs=sample_kwargs
        )
    result = trainer.rank_sweep
    save_sweep(result, out_dir or adapter_dir)
    config.save_pretrained(adapter_dir, sweep=result.to_dict(samples=False))  # answers stay in rank_sweep.json
    return result

"""The result of a rank sweep: metrics per rank (and truncation method), the recommendation,
AURAC, its table and plot, and the files that hold it (rank_sweep.json / .png).

Quality is not monotone in rank (the paper's "semi-sorted" behaviour), so the sweep
recommends the smallest rank whose metric is within a tolerance of the best. Each rank can
be measured under several truncation methods (`prefix`: the first b rows/columns; `svd`:
the top-b SVD of each layer's delta); the recommendation is then a (rank, method).

A low module (no torch, no transformers; matplotlib only inside `plot_sweep`): the trainer
that measures a sweep, the exporters that read one and `qdylora info` all import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import read_json_file, write_json_atomic
from .errors import InputError

SWEEP_JSON = "rank_sweep.json"
SWEEP_PLOT = "rank_sweep.png"


@dataclass
class SweepResult:
    """Metrics per rank under one or more truncation methods, and the (rank, method) recommended.

    `results` holds the metrics of `method` (prefix when it was measured: "prefix" in files
    written before methods existed), `by_method` those of every method, `results`'s
    included, in the order measured. A result built from `results` alone is a one-method
    (prefix) sweep.
    """

    results: dict[int, dict[str, float]]
    metric: str = "eval_loss"
    greater_is_better: bool = False
    tolerance: float = 0.01
    recommended_rank: int = 0
    samples: dict[int, list[str]] = field(default_factory=dict)
    sample_prompts: list[str] = field(default_factory=list)  # samples[rank][i] answers sample_prompts[i]
    method: str = "prefix"  # the method of `results` (and of `samples`)
    by_method: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    recommended_method: str = ""

    def __post_init__(self) -> None:
        if self.by_method:
            if self.method not in self.by_method:
                self.method = next(iter(self.by_method))
            self.results = self.by_method[self.method]
        else:
            self.by_method = {self.method: self.results}
        if not self.recommended_rank and self.results:
            self.recommended_rank, self.recommended_method = self.recommend()
        elif not self.recommended_method:
            self.recommended_method = self.method

    @property
    def methods(self) -> list[str]:
        """The methods measured, in the order they were."""
        return list(self.by_method)

    def values(self, method: str | None = None) -> dict[int, float]:
        """{rank: value of the sweep's metric} under `method` (default: `self.method`)."""
        results = self.by_method.get(method or self.method, {})
        return {r: m[self.metric] for r, m in sorted(results.items()) if self.metric in m}

    def recommend(self, method: str | None = None) -> tuple[int, str]:
        """(rank, method): the smallest rank within `tolerance` of the best (over all methods, or one)."""
        methods = [method] if method else self.methods
        return recommend(
            {m: self.values(m) for m in methods}, self.tolerance, self.greater_is_better
        )

    @property
    def best(self) -> tuple[int, str]:
        """(rank, method) of the best value over all methods (ties: the smaller rank, the earlier method)."""
        sign = -1 if self.greater_is_better else 1
        cells = [(sign * v, r, i, m) for i, m in enumerate(self.methods) for r, v in self.values(m).items()]
        _, r, _, m = min(cells)
        return r, m

    @property
    def best_rank(self) -> int:
        return self.best[0]

    @property
    def best_method(self) -> str:
        return self.best[1]

    def aurac(self, method: str | None = None) -> float:
        """Area under the metric-vs-log2(rank) curve (trapezoids), divided by the log2 range.

        So it is the metric's mean over log2 rank, in the metric's units (lower is better
        for a loss); one rank measured: that rank's value. Comparable between methods
        measured at the same ranks.
        """
        return aurac(self.values(method))

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        """JSON-ready dict; `samples=False` leaves out the generated answers (for qdylora_config.json).

        `results` (the run's own reading's when measured, see `run_sweep`) and `recommended_rank` keep their old meaning, so
        readers from before methods existed still read the file.
        """
        out = {
            "metric": self.metric,
            "greater_is_better": self.greater_is_better,
            "tolerance": self.tolerance,
            "recommended_rank": self.recommended_rank,
            "recommended_method": self.recommended_method,
            "best_rank": self.best_rank,
            "best_method": self.best_method,
            "method": self.method,
            "results": {str(r): m for r, m in sorted(self.results.items())},
            "methods": {
                name: {str(r): m for r, m in sorted(res.items())} for name, res in self.by_method.items()
            },
            "aurac": {name: self.aurac(name) for name in self.methods if self.values(name)},
        }
        if samples and self.samples:
            out["samples"] = {str(r): s for r, s in sorted(self.samples.items())}
            out["sample_prompts"] = list(self.sample_prompts)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepResult:
        """Read `to_dict`'s output, or a rank_sweep.json / sweep entry from before methods (prefix only)."""
        by_method = {
            name: {int(r): m for r, m in res.items()} for name, res in (data.get("methods") or {}).items()
        }
        return cls(
            results={int(r): m for r, m in data["results"].items()},
            metric=data.get("metric", "eval_loss"),
            greater_is_better=data.get("greater_is_better", False),
            tolerance=data.get("tolerance", 0.01),
            recommended_rank=data.get("recommended_rank", 0),
            samples={int(r): s for r, s in data.get("samples", {}).items()},
            sample_prompts=list(data.get("sample_prompts", [])),
            method=data.get("method", "prefix"),
            by_method=by_method,
            recommended_method=data.get("recommended_method", ""),
        )

    @classmethod
    def read(cls, folder: str | os.PathLike) -> SweepResult:
        """The sweep in a folder's rank_sweep.json (e.g. a plain LoRA adapter's, which has no
        qdylora_config.json to record it in)."""
        path = Path(folder) / SWEEP_JSON
        data = read_json_file(path, "rank sweep")
        try:
            return cls.from_dict(data)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path} is damaged ({type(exc).__name__}: {exc}); run `qdylora sweep` again") from exc

    def table(self) -> str:
        """A plain-text table: rank, metric per method, gap to the best, the recommendation marked."""
        best_rank, best_method = self.best
        best = self.values(best_method)[best_rank]

        def gap(v: float) -> float:
            return (v - best) / abs(best) * 100 if best else 0.0

        if len(self.methods) == 1:
            vals = self.values()
            lines = [f"{'rank':>6}  {self.metric:>12}  {'vs best':>8}"]
            for r, v in vals.items():
                mark = "  <- recommended" if r == self.recommended_rank else ("  (best)" if r == best_rank else "")
                lines.append(f"{r:>6}  {v:>12.4f}  {gap(v):>+7.2f}%{mark}")
            if len(vals) > 1:
                lines.append(f"{'AURAC':>6}  {self.aurac():>12.4f}")
            return "\n".join(lines)
        ranks = sorted({r for m in self.methods for r in self.values(m)})
        head = f"{'rank':>6}" + "".join(f"  {self.metric + ' ' + m:>20}  {'vs best':>8}" for m in self.methods)
        lines = [head]
        for r in ranks:
            row = f"{r:>6}"
            for m in self.methods:
                v = self.values(m).get(r)
                row += f"  {'-':>20}  {'':>8}" if v is None else f"  {v:>20.4f}  {gap(v):>+7.2f}%"
            marks = []
            if r == self.recommended_rank:
                marks.append(f"<- recommended ({self.recommended_method})")
            if r == best_rank:
                marks.append(f"(best: {best_method})")
            lines.append(row + ("  " + " ".join(marks) if marks else ""))
        lines.append(f"{'AURAC':>6}" + "".join(f"  {self.aurac(m):>20.4f}  {'':>8}" for m in self.methods))
        return "\n".join(lines)


def recommend(
    values: dict[str, dict[int, float]], tolerance: float = 0.01, greater_is_better: bool = False
) -> tuple[int, str]:
    """(rank, method): the smallest rank whose value, under some method, is within `tolerance`
    (relative) of the best over all methods; of several methods at that rank, the better value."""
    cells = [(r, m, v) for m, vals in values.items() for r, v in vals.items()]
    if not cells:
        raise InputError("no sweep results to recommend a rank from")
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance}")
    order = list(values)
    sign = -1 if greater_is_better else 1
    best = min(sign * v for _, _, v in cells)
    ok = [(r, sign * v, order.index(m), m) for r, m, v in cells if sign * v <= best + tolerance * abs(best)]
    r, _, _, m = min(ok)
    return r, m


def recommend_rank(values: dict[int, float], tolerance: float = 0.01, greater_is_better: bool = False) -> int:
    """The smallest rank whose value is within `tolerance` (relative) of the best one."""
    return recommend({"": values}, tolerance, greater_is_better)[0]


def aurac(values: dict[int, float]) -> float:
    """Area under value-vs-log2(rank) (trapezoids) divided by log2(max rank / min rank); one rank: its value."""
    import math

    if not values:
        raise InputError("no sweep results to compute an AURAC from")
    ranks = sorted(values)
    if len(ranks) == 1:
        return float(values[ranks[0]])
    xs = [math.log2(r) for r in ranks]
    area = sum((xs[i + 1] - xs[i]) * (values[ranks[i]] + values[ranks[i + 1]]) / 2 for i in range(len(ranks) - 1))
    return area / (xs[-1] - xs[0])


def refine_ranks(values: dict[int, float], r_min: int, r_max: int, greater_is_better: bool = False) -> list[int]:
    """Ranks strictly between the best coarse rank's neighbours that were not measured yet."""
    ranks = sorted(values)
    pick = max if greater_is_better else min
    best = pick(ranks, key=lambda r: values[r])
    i = ranks.index(best)
    lo = ranks[i - 1] if i > 0 else r_min - 1
    hi = ranks[i + 1] if i + 1 < len(ranks) else r_max + 1
    return [r for r in range(max(lo + 1, r_min), min(hi, r_max + 1)) if r not in values]


def plot_sweep(result: SweepResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot the sweep metric against rank (log2 axis), one line per method (with its AURAC), the recommendation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ranks: set[int] = set()
    for method in result.methods:
        vals = result.values(method)
        if not vals:
            continue
        ranks.update(vals)
        ax.plot(list(vals), list(vals.values()), marker="o", label=f"{method} (AURAC {result.aurac(method):.4g})")
    rec, rec_method = result.recommended_rank, result.recommended_method
    ax.scatter(
        [rec], [result.values(rec_method)[rec]], s=160, facecolors="none", edgecolors="red", zorder=3,
        label=f"recommended: {rec} ({rec_method})" if len(result.methods) > 1 else f"recommended: {rec}",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ranks))
    ax.set_xticklabels([str(r) for r in sorted(ranks)], fontsize=7)
    ax.set_xlabel("LoRA rank b")
    ax.set_ylabel(result.metric)
    ax.set_title(title or "Metric per rank of one adapter")
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

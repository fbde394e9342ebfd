"""The rank sweep's measuring loop: evaluate a QDyLoRA trainer at each rank, under each
truncation method, refining around the best if asked (`QDyLoraMixin.evaluate_ranks`).

The result type, its table, plot and files live in `qdylora.sweep_result`; sweeping a
saved adapter folder (`qdylora sweep`) is `qdylora.workflow.sweep_adapter`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ..config import check_methods
from ..errors import InputError
from ..sweep_result import SweepResult, refine_ranks

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
    methods: Sequence[str] | None = None,
) -> SweepResult:
    """Evaluate `trainer` (a QDyLoRA trainer) at each rank under each method, refining if asked.

    `methods` (default: the run's `sweep_methods`: prefix, or svd and prefix when only r_max was trained):
    "prefix" evaluates `trainer.evaluate(rank=b)` (logged `eval_r{b}_*`); "svd"
    the same with every layer's delta SVD-truncated to b (`DynamicRank.svd_scope`, logged
    `eval_svd_r{b}_*`). Refinement measures the ranks around the best (rank, method)
    under every method. The result's `results` (what readers from before methods read)
    are the run's own reading's (`default_method`: svd for a run that trained r_max only)
    when measured, else prefix's, else the first method's. With `sample_prompts`,
    also answer them at every measured rank under that same method (`generate_across_ranks`
    with `sample_kwargs`, using the trainer's `processing_class` as tokenizer).
    """
    config = trainer.qdylora_config
    ranks = sorted(set(ranks))
    config.check_ranks(ranks)
    methods = check_methods(methods or config.sweep_methods)
    primary = next(m for m in (config.default_method, "prefix", methods[0]) if m in methods)
    sample_prompts = list(sample_prompts or [])
    if sample_prompts and getattr(trainer, "processing_class", None) is None:
        raise InputError("sample_prompts need a tokenizer: pass processing_class=tokenizer to the trainer")
    dynamic = trainer.dynamic_rank
    if "svd" in methods:
        for r in ranks:  # every bad rank refused before the first evaluation
            with dynamic.svd_scope(r):
                pass
    by_method: dict[str, dict[int, dict[str, float]]] = {m: {} for m in methods}

    def measure(todo: list[int], desc: str) -> None:
        for method in methods:
            bar = tqdm(todo, desc=f"{desc} ({method})", unit="rank", disable=not trainer.is_world_process_zero())
            for r in bar:
                bar.set_postfix(rank=r)
                if method == "svd":
                    with dynamic.svd_scope(r):
                        metrics = trainer.evaluate(eval_dataset=eval_dataset, rank=r, metric_key_prefix="eval_svd")
                else:
                    metrics = trainer.evaluate(eval_dataset=eval_dataset, rank=r)
                got = {re.sub(rf"^eval(_svd)?_r{r}_", "eval_", k): v for k, v in metrics.items()}
                if metric not in got:
                    raise InputError(f"metric {metric!r} not among the evaluation metrics {sorted(got)}")
                by_method[method][r] = got

    measure(ranks, "rank sweep")
    if refine:
        first = SweepResult({}, metric=metric, greater_is_better=greater_is_better, by_method=by_method)
        best_rank, best_method = first.best
        values = first.values(best_method)
        extra = refine_ranks(values, config.r_min, config.r_max, greater_is_better)
        if extra:
            measure(extra, "refining")
    samples = {}
    if sample_prompts:
        from ..generation import generate_across_ranks

        samples = generate_across_ranks(
            trainer.model, trainer.processing_class, sample_prompts, sorted(by_method[primary]),
            progress=trainer.is_world_process_zero(), method=primary, **(sample_kwargs or {}),
        )
    return SweepResult(
        by_method[primary], metric=metric, greater_is_better=greater_is_better, tolerance=tolerance,
        samples=samples, sample_prompts=sample_prompts, method=primary, by_method=by_method,
    )

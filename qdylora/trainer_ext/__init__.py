"""Trainer integration: the QDyLoRA trainer, its mixin, its callbacks and the sweep loop.

`SweepResult` and friends are re-exported from `qdylora.sweep_result` for convenience.
"""

from ..sweep_result import SweepResult, plot_sweep, recommend_rank, refine_ranks, save_sweep
from .callbacks import RankSamplesCallback
from .trainer import QDyLoraMixin, QDyLoraTrainer

__all__ = [
    "QDyLoraMixin",
    "QDyLoraTrainer",
    "RankSamplesCallback",
    "SweepResult",
    "plot_sweep",
    "recommend_rank",
    "refine_ranks",
    "save_sweep",
]

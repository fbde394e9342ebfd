"""Trainer integration: the QDyLoRA trainer, its mixin and the rank sweep."""

from .callbacks import RankSamplesCallback
from .sweep import SweepResult, plot_sweep, recommend_rank, refine_ranks, save_sweep
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

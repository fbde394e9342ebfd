"""Trainer integration: the QDyLoRA trainer, its mixin and the rank sweep."""

from .sweep import SweepResult, plot_sweep, recommend_rank, refine_ranks, save_sweep
from .trainer import QDyLoraMixin, QDyLoraTrainer

__all__ = [
    "QDyLoraMixin",
    "QDyLoraTrainer",
    "SweepResult",
    "plot_sweep",
    "recommend_rank",
    "refine_ranks",
    "save_sweep",
]

"""Putting QDyLoRA in front of whatever trainer class Axolotl picked (no Axolotl import here)."""

from __future__ import annotations

import inspect
from typing import Any

from ..config import ExportSettings, HealSettings, QDyLoraConfig, SweepSettings
from ..trainer_ext import QDyLoraMixin
from .args import QDyLoraArgs


def settings(cfg: Any) -> tuple[QDyLoraConfig, SweepSettings, ExportSettings, HealSettings]:
    """The settings of a validated Axolotl config (its qdylora_* keys, r_max = lora_r)."""
    keys = {k: cfg.get(k) for k in QDyLoraArgs.model_fields if cfg.get(k) is not None}
    # the keys were validated with the whole config; the dataclasses check the values again
    return QDyLoraArgs.model_construct(**keys).to_settings(cfg.get("lora_r"))


def qdylora_config(cfg: Any) -> QDyLoraConfig:
    """The `QDyLoraConfig` of a validated Axolotl config."""
    return settings(cfg)[0]


def with_qdylora(base: type, config: QDyLoraConfig) -> type:
    """`base` (a Trainer subclass) with `QDyLoraMixin` in front, trained with `config`.

    Every mixin of `base` (Axolotl's packing, scheduler, optimizer, checkpoint ones) stays
    in the MRO after QDyLoraMixin, so QDyLoRA wraps training_step/log/evaluate/_save and
    then hands over to them. The class is named `QDyLora<base name>`.
    """
    if issubclass(base, QDyLoraMixin):
        return base

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("qdylora_config", config)
        super(composed, self).__init__(*args, **kwargs)

    __init__.__signature__ = inspect.signature(base.__init__)  # Axolotl inspects the trainer's parameters
    composed = type(
        f"QDyLora{base.__name__}",
        (QDyLoraMixin, base),
        {"__init__": __init__, "__module__": __name__, "__doc__": f"{base.__name__} with QDyLoRA's random rank per step."},
    )
    return composed

"""qdylora: Quantized Dynamic LoRA for the Hugging Face ecosystem.

Train ONE LoRA adapter on a 4-bit base so that every rank r_min..r_max works afterwards.

The public names load on first use (PEP 562), so `import qdylora` (and the CLI's `--help`)
imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "QDyLoraConfig": ".config",
    "SweepSettings": ".config",
    "ExportSettings": ".config",
    "HealSettings": ".config",
    "InputError": ".errors",
    "SweepResult": ".sweep_result",
    "generate_across_ranks": ".generation",
    "load_model": ".loading",
    "DynamicRank": ".ranks",
    "RankSampler": ".ranks",
    "rank_scope": ".ranks",
    "QDyLoraMixin": ".trainer_ext",
    "QDyLoraTrainer": ".trainer_ext",
    "RankSamplesCallback": ".trainer_ext",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .config import ExportSettings, HealSettings, QDyLoraConfig, SweepSettings
    from .errors import InputError
    from .generation import generate_across_ranks
    from .loading import load_model
    from .ranks import DynamicRank, RankSampler, rank_scope
    from .sweep_result import SweepResult
    from .trainer_ext import QDyLoraMixin, QDyLoraTrainer, RankSamplesCallback


__getattr__ = lazy_getattr(__name__, globals(), _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

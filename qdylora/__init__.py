"""qdylora: Quantized Dynamic LoRA for the Hugging Face ecosystem.

Train ONE LoRA adapter on a 4-bit base so that every rank r_min..r_max works afterwards.
"""

__version__ = "0.1.0"

from .config import QDyLoraConfig
from .errors import InputError
from .generation import generate_across_ranks
from .loading import load_model
from .ranks import DynamicRank, RankSampler, rank_scope
from .trainer_ext import QDyLoraMixin, QDyLoraTrainer, RankSamplesCallback, SweepResult

__all__ = [
    "DynamicRank",
    "InputError",
    "QDyLoraConfig",
    "QDyLoraMixin",
    "QDyLoraTrainer",
    "RankSampler",
    "RankSamplesCallback",
    "SweepResult",
    "generate_across_ranks",
    "load_model",
    "rank_scope",
    "__version__",
]

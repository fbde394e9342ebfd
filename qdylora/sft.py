"""QDyLoRA for TRL: `QDyLoraSFTTrainer = QDyLoraMixin + trl.SFTTrainer`.

TRL's SFTTrainer keeps everything it does (dataset formatting and packing, completion-only
loss, its token-accuracy metrics, wrapping the model with `peft_config`); the mixin adds
the rank drawn per optimizer step, its log entries, `evaluate(rank=b)` / `evaluate_ranks()`
and qdylora_config.json beside every saved adapter.

    from qdylora.sft import QDyLoraSFTTrainer
    trainer = QDyLoraSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                                peft_config=LoraConfig(r=64, lora_alpha=16, target_modules="all-linear"),
                                qdylora_config=QDyLoraConfig(r_min=1))

The same composition works for any other TRL trainer: `class X(QDyLoraMixin, trl.DPOTrainer)`.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("qdylora.sft needs TRL: pip install 'qdylora[trl]'") from exc

from .trainer_ext import QDyLoraMixin


class QDyLoraSFTTrainer(QDyLoraMixin, SFTTrainer):
    """`trl.SFTTrainer` training a random LoRA rank each step; takes `qdylora_config=` too.

    The model must end up as a PEFT LoRA model: pass a PeftModel, or a base model
    (ideally 4-bit from `qdylora.load_model`) with `peft_config=LoraConfig(r=r_max, ...)`.
    """


__all__ = ["QDyLoraSFTTrainer"]

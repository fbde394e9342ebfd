"""Small builders shared by the tests."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from qdylora import load_model


def lora_model(model_dir, r: int = 8, alpha: int = 16, random_init: bool = True, load_in_4bit: bool = True, **lora):
    """A PEFT LoRA model on a tiny base; random_init gives lora_B non-zero values from the start."""
    base = load_model(model_dir, load_in_4bit=load_in_4bit, compute_dtype="float32")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules="all-linear",
        lora_dropout=0.0,
        init_lora_weights=not random_init,
        task_type="CAUSAL_LM",
        **lora,
    )
    return get_peft_model(base, config)

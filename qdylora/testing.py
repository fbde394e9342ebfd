"""Tiny local models, data and builders for tests and examples: nothing is downloaded from a hub.

The one home of test builders (the fixtures that use them are in tests/conftest.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

EOS = "<|endoftext|>"

_CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer: 3 + 4 = 7. #### 7",
    "Question: A box holds 6 pens. How many pens are in 2 boxes?\nAnswer: 6 * 2 = 12. #### 12",
    "The quick brown fox jumps over the lazy dog. 0123456789 +-*/=#",
]


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few sentences (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def tiny_config(arch: str = "llama", vocab_size: int = 320, hidden: int = 64, layers: int = 2):
    """A small config of a real architecture (llama or falcon)."""
    from transformers import FalconConfig, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if arch == "falcon":
        return FalconConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; use llama or falcon")


def make_tiny_model(out_dir: str | os.PathLike, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a randomly initialised tiny causal LM and its tokenizer to `out_dir`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    config.eos_token_id = config.pad_token_id = config.bos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_arithmetic_jsonl(path: str | os.PathLike, n: int = 64, seed: int = 0, fields=("prompt", "completion")) -> Path:
    """A small learnable prompt/answer JSONL file (sums of two numbers)."""
    import random

    rng = random.Random(seed)
    path = Path(path)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({fields[0]: f"What is {a} plus {b}?", fields[1]: f" {a} + {b} = {a + b}. #### {a + b}"}) + "\n")
    return path


# -- LoRA models, a QDyLoRA-trained adapter and logit helpers (the exporter tests' builders) -------
R_MAX = 8
ALPHA = 16
RANKS = (1, 5, R_MAX)  # b = 1, a middle rank, r_max


@dataclass
class Trained:
    """A PEFT model trained with QDyLoraTrainer (kept in memory) and the folder it was saved to."""

    model: torch.nn.Module
    adapter_dir: Path
    base_dir: Path


def lora_model(model_dir, r: int = 8, alpha: int = 16, random_init: bool = True, load_in_4bit: bool = True, *,
               seed: int | None = None, prepare_for_training: bool = True, **lora):
    """A PEFT LoRA model (all linear layers unless `target_modules`) on a tiny base, fp32 compute;
    `random_init` gives lora_B non-zero values from the start; `seed` seeds the LoRA init."""
    from peft import LoraConfig, get_peft_model

    from .loading import load_model

    base = load_model(model_dir, load_in_4bit=load_in_4bit, compute_dtype="float32",
                      prepare_for_training=prepare_for_training)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=lora.pop("target_modules", "all-linear"), lora_dropout=0.0,
        init_lora_weights=not random_init, task_type="CAUSAL_LM", **lora,
    )
    if seed is not None:
        torch.manual_seed(seed)
    return get_peft_model(base, config)


def export_lora_model(base_dir, *, load_in_4bit: bool = False, r: int = R_MAX, alpha: int = ALPHA, **lora):
    """The exporter tests' model: random lora_B, fp32 base unless asked, not prepared for training, seed 1."""
    return lora_model(base_dir, r, alpha, load_in_4bit=load_in_4bit, seed=1, prepare_for_training=False, **lora)


def train_tiny(model, base_dir: Path, out_dir: Path, tmp: Path, steps: int = 3) -> None:
    """A few QDyLoraTrainer steps, a sweep at 1/4/8, then save (adapter + qdylora_config.json)."""
    from transformers import TrainingArguments

    from .config import QDyLoraConfig
    from .data import DataSpec, collator, load_tokenizer, tokenize
    from .trainer_ext import QDyLoraTrainer

    tokenizer = load_tokenizer(str(base_dir))
    train_ds = tokenize(DataSpec(str(write_arithmetic_jsonl(tmp / "train.jsonl", 16, seed=0))), tokenizer)
    eval_ds = tokenize(DataSpec(str(write_arithmetic_jsonl(tmp / "eval.jsonl", 4, seed=1))), tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp / "run"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", save_strategy="no", logging_steps=1, remove_unused_columns=False, use_cpu=True,
    )
    trainer = QDyLoraTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=collator(tokenizer), qdylora_config=QDyLoraConfig(seed=3),
    )
    trainer.train()
    trainer.evaluate_ranks([1, 4, R_MAX])
    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def save_qdylora(model, out_dir: Path) -> Path:
    """Save an (untrained, random) PEFT model as a QDyLoRA adapter folder."""
    from .config import QDyLoraConfig
    from .ranks import DynamicRank

    model.save_pretrained(str(out_dir))
    QDyLoraConfig().resolve(DynamicRank.of(model).r_max, seed=0).save_pretrained(out_dir)
    return out_dir


def tokens() -> torch.Tensor:
    """A fixed batch of token ids (two rows, one padded on the left via the mask)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 300, (2, 12), generator=g)


def exact_4bit(model):
    """Make bitsandbytes' 4-bit layers compute in fp32 on the CPU, as they do in training.

    In eval mode without grad, on CPUs with AVX512-BF16, Linear4bit repacks its weight and
    runs a bf16 kernel (about 1e-3 off fp32); that would hide differences below 1e-3.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def logits(model, rank: int | None = None) -> torch.Tensor:
    """Logits of `model` on `tokens()`, at LoRA rank `rank` (qdylora's rank_scope) if given."""
    from .ranks import rank_scope

    exact_4bit(model).eval()
    ids = tokens()
    if rank is None:
        return model(input_ids=ids).logits.float()
    with rank_scope(model, rank):
        return model(input_ids=ids).logits.float()


def plain_base(base_dir: Path, *, load_in_4bit: bool = False):
    """The base loaded with transformers alone (fp32; NF4 + double quant like QLoRA if asked)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map="cpu", **kwargs)


@torch.no_grad()
def peft_logits(base_dir: Path, adapter_dir: Path, *, load_in_4bit: bool = False) -> torch.Tensor:
    """Logits of base + adapter loaded with plain transformers + PeftModel.from_pretrained."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(plain_base(base_dir, load_in_4bit=load_in_4bit), str(adapter_dir))
    exact_4bit(model).eval()
    return model(input_ids=tokens()).logits.float()

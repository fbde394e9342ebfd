"""Tiny local models and data for tests and examples: nothing is downloaded from a hub."""

from __future__ import annotations

import json
import os
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

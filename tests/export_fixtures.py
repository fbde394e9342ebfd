"""Fixtures of the exporter tests: a tiny base, a QDyLoRA-trained adapter and logit helpers.

Imported by test_export_*.py (`from export_fixtures import ...`), so pytest sees the
fixtures without a shared conftest. Nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

R_MAX = 8
ALPHA = 16
RANKS = (1, 5, R_MAX)  # b = 1, a middle rank, r_max


@dataclass
class Trained:
    """A PEFT model trained with QDyLoraTrainer (kept in memory) and the folder it was saved to."""

    model: torch.nn.Module
    adapter_dir: Path
    base_dir: Path


def lora_model(base_dir, *, load_in_4bit: bool = False, r: int = R_MAX, alpha: int = ALPHA, **lora):
    """A PEFT LoRA model on the tiny base with random lora_B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    from qdylora import load_model

    base = load_model(base_dir, load_in_4bit=load_in_4bit, compute_dtype="float32", prepare_for_training=False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=lora.pop("target_modules", "all-linear"), lora_dropout=0.0,
        init_lora_weights=False, task_type="CAUSAL_LM", **lora,
    )
    torch.manual_seed(1)
    return get_peft_model(base, config)


def train(model, base_dir: Path, out_dir: Path, tmp: Path, steps: int = 3) -> None:
    """A few QDyLoraTrainer steps, a sweep at 1/4/8, then save (adapter + qdylora_config.json)."""
    from transformers import TrainingArguments

    from qdylora import QDyLoraConfig, QDyLoraTrainer
    from qdylora.data import DataSpec, collator, load_tokenizer, tokenize
    from qdylora.testing import write_arithmetic_jsonl

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
    from qdylora import DynamicRank, QDyLoraConfig

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
    from qdylora import rank_scope

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


@pytest.fixture(scope="session")
def export_base(tmp_path_factory) -> Path:
    from qdylora.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("export-base"), "llama")


@pytest.fixture(scope="session")
def trained(export_base, tmp_path_factory) -> Trained:
    """QDyLoraTrainer, fp32 base, r_max 8, alpha 16, all linear layers, 3 steps + sweep."""
    tmp = tmp_path_factory.mktemp("trained")
    model = lora_model(export_base)
    train(model, export_base, tmp / "adapter", tmp)
    model.eval()
    return Trained(model, tmp / "adapter", export_base)

"""Prompt/answer datasets for training and the sweep: loss on the answer tokens only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

# Field pairs recognised when none are given: TRL's prompt-completion, GSM8K, Alpaca.
KNOWN_FIELDS = (("prompt", "completion"), ("question", "answer"), ("instruction", "output"))


@dataclass
class DataSpec:
    """Where the examples come from and how they become token sequences.

    Attributes:
        path: A local .json/.jsonl file, or a `datasets` hub name.
        name: The `datasets` config name (hub datasets only).
        split: Split to read.
        prompt_field / answer_field: Columns holding the prompt and the answer; `None`
            picks the first known pair present (prompt/completion, question/answer,
            instruction/output).
        template: How the prompt is written before the answer; `{prompt}` is replaced.
        max_length: Longest sequence in tokens (longer ones are truncated).
        limit: Use only the first `limit` records.
    """

    path: str
    name: str | None = None
    split: str = "train"
    prompt_field: str | None = None
    answer_field: str | None = None
    template: str = "{prompt}\n"
    max_length: int = 512
    limit: int | None = None

    def __post_init__(self) -> None:
        if "{prompt}" not in self.template:
            raise InputError(f"template must contain '{{prompt}}', got {self.template!r}")
        if self.max_length < 2:
            raise InputError(f"max_length must be >= 2, got {self.max_length}")


def is_local(path: str) -> bool:
    return path.endswith((".json", ".jsonl")) or os.path.sep in path or path.startswith(".")


def load_records(spec: DataSpec):
    """The raw records as a `datasets.Dataset`."""
    import datasets

    if is_local(spec.path):
        if not Path(spec.path).is_file():
            raise InputError(f"data file {spec.path} does not exist")
        try:
            ds = datasets.load_dataset("json", data_files=str(spec.path), split="train")
        except Exception as exc:  # malformed JSON lines
            raise InputError(f"could not read {spec.path} as JSON/JSONL: {exc}") from exc
    else:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    return ds


def resolve_fields(spec: DataSpec, columns: list[str]) -> tuple[str, str]:
    if spec.prompt_field or spec.answer_field:
        pair = (spec.prompt_field or "prompt", spec.answer_field or "completion")
        missing = [f for f in pair if f not in columns]
        if missing:
            raise InputError(f"field(s) {missing} not in the data; its columns are {columns}")
        return pair
    for pair in KNOWN_FIELDS:
        if all(f in columns for f in pair):
            return pair
    raise InputError(
        f"cannot tell the prompt and answer columns among {columns}; set prompt_field and answer_field"
    )


def encode(prompt: str, answer: str, tokenizer: Any, template: str, max_length: int) -> dict[str, list[int]]:
    """Tokens of template(prompt) + answer + EOS, labels -100 on the prompt part."""
    p = tokenizer(template.format(prompt=prompt), add_special_tokens=True)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        a = a + [tokenizer.eos_token_id]
    ids = (p + a)[:max_length]
    labels = ([-100] * len(p) + a)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize(spec: DataSpec, tokenizer: Any, records: Any = None):
    """A tokenized `datasets.Dataset` ready for the Trainer (input_ids, attention_mask, labels)."""
    ds = records if records is not None else load_records(spec)
    if len(ds) == 0:
        raise InputError(f"{spec.path} holds no records")
    prompt_field, answer_field = resolve_fields(spec, ds.column_names)
    return ds.map(
        lambda r: encode(str(r[prompt_field]), str(r[answer_field]), tokenizer, spec.template, spec.max_length),
        remove_columns=ds.column_names,
        desc="tokenizing",
    )


def collator(tokenizer: Any):
    """Pads input_ids/attention_mask with the pad token and labels with -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

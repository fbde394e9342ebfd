"""Prompt/answer datasets for training and the sweep: loss on the answer tokens only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, first_line, is_int

# Field pairs recognised when none are given: TRL's prompt-completion, GSM8K, Alpaca.
KNOWN_FIELDS = (("prompt", "completion"), ("question", "answer"), ("instruction", "output"))
# local data files below this size are read without datasets' progress bar (they take under a second)
QUIET_LOAD_BYTES = 32 * 2**20


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
        check_template(self.template)
        for name in ("prompt_field", "answer_field", "name"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a column name (a string), got {getattr(self, name)!r}")
        if not isinstance(self.path, str) or not self.path:
            raise InputError(f"data path must be a file path or a datasets name, got {self.path!r}")
        if not is_int(self.max_length) or self.max_length < 2:
            raise InputError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if self.limit is not None and (not is_int(self.limit) or self.limit < 1):
            raise InputError(f"limit must be an integer >= 1, got {self.limit!r}")


def check_template(template: Any, what: str = "template") -> None:
    """A prompt template must be a string with `{prompt}` and no other placeholder."""
    if not isinstance(template, str) or "{prompt}" not in template:
        raise InputError(f"{what} must contain '{{prompt}}', got {template!r}")
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"{what} {template!r} has a placeholder other than {{prompt}} ({exc}); write literal braces as {{{{ }}}}"
        ) from None



def is_local(path: str) -> bool:
    """A local file (rather than a `datasets` hub name such as `openai/gsm8k`)."""
    return path.endswith((".json", ".jsonl")) or path.startswith((".", "/", "~")) or os.path.exists(path)


def load_records(spec: DataSpec):
    """The raw records as a `datasets.Dataset`."""
    import datasets

    if is_local(spec.path):
        check_data_file(spec.path)
        # datasets' "Generating train split" bar only where reading takes a while: for a small
        # file it is noise, printed before the field checks' one-line errors
        quiet = Path(spec.path).stat().st_size < QUIET_LOAD_BYTES and not datasets.are_progress_bars_disabled()
        if quiet:
            datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset("json", data_files=str(spec.path), split="train")
        except Exception as exc:  # malformed JSON lines
            first = first_line(exc)
            raise InputError(f"could not read {spec.path} as JSON/JSONL: {first}") from exc
        finally:
            if quiet:
                datasets.enable_progress_bars()
    else:
        try:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
        except Exception as exc:  # offline, unknown name, no such split
            first = first_line(exc)
            raise InputError(
                f"could not load the dataset {spec.path!r} ({first}); give a local .json/.jsonl file"
            ) from exc
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    return ds


def split_off(records: Any, size: float | int, seed: int, what: str) -> tuple[Any, Any]:
    """(rest, part): `size` (a fraction, or a number of records) of `records` drawn at random with
    `seed` (`datasets.Dataset.train_test_split`, as Axolotl's val_set_size). `what` names the setting."""
    try:
        split = records.train_test_split(test_size=size, seed=seed)
    except ValueError as exc:  # e.g. a fraction of a handful of records that rounds to none
        raise InputError(f"{what} {size!r} of {len(records)} records: {first_line(exc)}") from exc
    return split["train"], split["test"]


def split_records(records: Any, *, eval_size: float | int | None, holdout: float | None,
                  seed: int) -> tuple[Any, Any, Any]:
    """(train, eval or None, held or None): `eval_size` of `records` split off first, then `holdout` of
    the rest (the records a run holds back for healing), both at random with `seed`: the one rule by
    which a run splits its data and a later healing finds the same records."""
    eval_part = held = None
    if eval_size:
        records, eval_part = split_off(records, eval_size, seed, "eval_size")
    if holdout:
        records, held = split_off(records, holdout, seed, "heal.holdout")
    return records, eval_part, held


def digest(records: Any) -> str:
    """A sha256 of the records' contents (each as sorted JSON, in order): which records these are."""
    import hashlib
    import json

    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(record, sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()


def check_data_file(path: str | os.PathLike) -> None:
    """Cheap checks of a local data file before anything slow: it exists and looks like JSON or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist" if not path.exists() else f"data {path} is not a file")
    if path.suffix not in (".json", ".jsonl"):
        raise InputError(f"data file {path} must be .json or .jsonl (records with a prompt and an answer field)")
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if not head:
        raise InputError(f"data file {path} is empty")
    if head[:1] not in (b"{", b"["):
        raise InputError(f"data file {path} is not JSON/JSONL: it should start with a JSON record ('{{' or '[')")


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

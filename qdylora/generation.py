"""Generate from one QDyLoRA adapter at several ranks, to read the ranks side by side.

The paper judges the ranks of one adapter partly by reading their answers to the same
question. One loaded model serves every rank: `rank_scope` switches the active rank
between `generate` calls, so nothing is reloaded or copied per rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import InputError
from .ranks import DynamicRank, rank_scope

DEFAULT_MAX_NEW_TOKENS = 128
# Settings that only mean something when sampling; cleared for greedy decoding so a
# model's own generation_config (e.g. temperature 0.6) does not trigger warnings.
_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p")


def render_prompt(tokenizer: Any, prompt: str, *, chat_template: bool = True, template: str = "{prompt}") -> tuple[str, bool]:
    """The text the model sees for `prompt`, and whether the tokenizer should add special tokens.

    `template` is filled first (like `DataSpec.template` in training); then, if
    `chat_template` and the tokenizer has a chat template, the text becomes one user turn
    with the generation prompt appended. A chat template writes its own special tokens.
    """
    text = template.format(prompt=prompt)
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    return text, True


def generate_across_ranks(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    ranks: Sequence[int],
    *,
    chat_template: bool = True,
    template: str = "{prompt}",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    method: str = "prefix",
    **generate_kwargs: Any,
) -> dict[int, list[str]]:
    """Answer every prompt at every rank of one loaded LoRA model: {rank: [answer per prompt]}.

    Args:
        model: A PEFT LoRA model (e.g. from `qdylora.loading.load_adapter` or a trainer).
        tokenizer: Its tokenizer.
        prompts: The prompts, answered in this order.
        ranks: LoRA ranks to answer at (each within 1..r_max of the adapter).
        chat_template: Wrap each prompt in the tokenizer's chat template when it has one.
        template: How a prompt is written before that, `{prompt}` replaced (use the
            training data's template, e.g. "{prompt}\\n", for adapters trained without chat).
        batch_size: Prompts per `generate` call, left-padded; 1 when the tokenizer has no
            pad token (padding would need one). Padding is exact up to rounding, but in
            bf16 compute a near-tie can flip; 1 makes answers independent of the batch.
        seed: Seed of the sampling RNG, set again before each rank, so with
            `do_sample=True` every rank draws from the same random stream. The caller's
            global RNG state is left as it was.
        progress: Show a progress bar over ranks x prompts.
        method: How rank b is cut: "prefix" or "svd" (`qdylora.rank_scope`).
        **generate_kwargs: Passed to `model.generate`; greedy (`do_sample=False`) and
            `max_new_tokens=128` unless given.

    Returns:
        Only the newly generated text (the prompt stripped), special tokens removed.
    """
    prompts, ranks = list(prompts), list(dict.fromkeys(ranks))
    if not prompts:
        raise InputError("no prompts to generate from")
    if not ranks:
        raise InputError("no ranks to generate at")
    if "{prompt}" not in template:
        raise InputError(f"template must contain '{{prompt}}', got {template!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    DynamicRank.of(model).check_ranks(ranks)

    settings = _generation_settings(tokenizer, generate_kwargs)
    if tokenizer.pad_token_id is None:
        batch_size = 1  # prompts of different lengths cannot be padded without a pad token
    batches = [
        _encode(tokenizer, prompts[i : i + batch_size], chat_template, template, _device(model))
        for i in range(0, len(prompts), batch_size)
    ]
    out: dict[int, list[str]] = {}
    was_training = model.training
    model.eval()  # no LoRA dropout while generating
    bar = tqdm(total=len(ranks) * len(prompts), desc="generating", unit="prompt", disable=not progress)
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            for rank in ranks:
                bar.set_postfix(rank=rank)
                torch.manual_seed(seed)
                out[rank] = []
                with rank_scope(model, rank, method=method), torch.no_grad():
                    for enc in batches:
                        ids = model.generate(**enc, **settings)
                        new = ids[:, enc["input_ids"].shape[1] :]
                        out[rank] += tokenizer.batch_decode(new, skip_special_tokens=True)
                        bar.update(len(new))
    finally:
        bar.close()
        model.train(was_training)
    return out


def _generation_settings(tokenizer: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Greedy, 128 new tokens and the tokenizer's pad token unless the caller says otherwise."""
    settings = {"do_sample": False, **kwargs}
    if "max_new_tokens" not in settings and "max_length" not in settings:
        settings["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    if not settings["do_sample"]:
        for key in _SAMPLING_ONLY:
            settings.setdefault(key, None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        settings.setdefault("pad_token_id", pad)
    return settings


def _encode(tokenizer: Any, prompts: list[str], chat_template: bool, template: str, device: torch.device) -> dict:
    rendered = [render_prompt(tokenizer, p, chat_template=chat_template, template=template) for p in prompts]
    texts = [text for text, _ in rendered]
    add_special = rendered[0][1]  # the same for every prompt of one tokenizer
    enc = tokenizer(
        texts,
        add_special_tokens=add_special,
        padding=len(texts) > 1,
        padding_side="left",  # decoder-only: new tokens follow the last real token
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def _device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def _cuda_devices(model: nn.Module) -> list[int]:
    """CUDA devices holding the model, whose RNG fork_rng must save and restore."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


# -- prompts in, answers out -----------------------------------------------------------


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: one per line, or JSONL with a prompt field.

    A .json/.jsonl file, or one whose first line is a JSON object, is read as JSONL; its
    prompt field is the first of `prompt`, `question`, `instruction` that the records have
    (the prompt columns `qdylora.data` knows). Blank lines are skipped.
    """
    from .data import KNOWN_FIELDS

    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(f"prompts file {path} holds no prompts")
    if path.suffix not in (".json", ".jsonl") and not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n} is not a JSON object ({exc.msg}); write one JSON record per line") from None
        field = next((f for f, _ in KNOWN_FIELDS if isinstance(record, dict) and f in record), None)
        if field is None:
            fields = [f for f, _ in KNOWN_FIELDS]
            raise InputError(f"{path}:{n} has none of the prompt fields {fields}")
        prompts.append(str(record[field]))
    return prompts


def samples_by_prompt(prompts: Sequence[str], samples: dict[int, list[str]]) -> list[dict[str, Any]]:
    """[{"prompt": p, "outputs": {"rank": answer, ...}}, ...]: one record per prompt (JSON-ready)."""
    return [{"prompt": p, "outputs": {str(r): answers[i] for r, answers in samples.items()}} for i, p in enumerate(prompts)]


def format_samples(prompts: Sequence[str], samples: dict[int, list[str]]) -> str:
    """Each prompt once, then one block per rank with that rank's answer."""
    blocks = []
    for i, record in enumerate(samples_by_prompt(prompts, samples), 1):
        lines = [f"=== prompt {i}/{len(prompts)} ===", record["prompt"].rstrip()]
        for rank, answer in record["outputs"].items():
            lines += [f"--- rank {rank} ---", answer.strip() or "(empty)"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)

"""vLLM's rules for LoRA adapters, padding to an allowed max_lora_rank, and the serve line.

vLLM (0.33, vllm/lora/peft_helper.py and lora/models.py) reads r, lora_alpha and
target_modules from adapter_config.json, computes ONE scale lora_alpha / r (rsLoRA:
lora_alpha / sqrt(r)) for every module (rank_pattern and alpha_pattern are ignored),
accepts only lora_A / lora_B / lora_embedding_A / lora_embedding_B tensors, and rejects
modules_to_save, DoRA, biases and r > --max-lora-rank, whose allowed values are below.

So a vLLM-ready rank-b adapter has one r and one alpha for all modules: every module is
zero-padded to R (extra rows of A and columns of B are zero, so B A is unchanged), the
shared alpha is set so that alpha'/R == alpha/b (rsLoRA: alpha'/sqrt(R) == alpha/sqrt(b)),
and a module whose own trained scale differs from that shared one gets the ratio folded
into its lora_B.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InputError
from .source import RankPair, SourceAdapter, lora_scale

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds a rank-`rank` adapter."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise InputError(f"rank {rank} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")


def vllm_problems(source: SourceAdapter) -> list[str]:
    """What about this adapter vLLM would refuse or silently get wrong (empty: nothing)."""
    cfg = source.peft_config
    problems = []
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']} (vLLM needs it null; train without it)")
    if cfg.get("use_dora"):
        problems.append("DoRA (vLLM does not support it)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append("trained biases (vLLM needs bias='none' and lora_bias=False)")
    if cfg.get("trainable_token_indices"):
        problems.append("trainable_token_indices (vLLM cannot load trainable-token deltas)")
    extra = source.extra_keys + [m.bias_key for m in source.modules if m.bias_key in source.tensors]
    if extra:
        problems.append(f"tensors other than lora_A/lora_B, e.g. {extra[0]} (vLLM rejects them)")
    return problems


def check_vllm(source: SourceAdapter) -> None:
    """Raise `InputError` naming what vLLM would not accept in `source`."""
    problems = vllm_problems(source)
    if problems:
        raise InputError(f"{source.path} cannot be served by vLLM: " + "; ".join(problems))


def padded(
    source: SourceAdapter, rank: int, pad_to: int, method: str = "prefix"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and adapter_config.json of the rank-`rank` cut (`method`), every module padded to `pad_to`.

    One r and one lora_alpha for all modules, no rank_pattern/alpha_pattern: the form vLLM
    reads correctly. Exact: padded rows/columns are zero and every module keeps the scale
    it was trained at (alpha'/pad_to equals the default module's alpha/b; any other
    module's ratio is folded into its lora_B).
    """
    if pad_to < rank:
        raise InputError(f"cannot pad a rank-{rank} adapter down to {pad_to}; pad_to must be >= the rank")
    base_r = min(rank, int(source.peft_config.get("r", rank)))
    base_alpha = source.peft_config.get("lora_alpha", 8)
    shared = lora_scale(base_alpha, base_r, source.use_rslora)  # the scale of a module with no pattern
    ratio = math.sqrt(pad_to / base_r) if source.use_rslora else pad_to / base_r
    config = dict(source.peft_config)
    config.update(
        r=pad_to, lora_alpha=base_alpha * ratio, rank_pattern={}, alpha_pattern={}, inference_mode=True
    )
    tensors = {k: source.tensors[k] for k in source.extra_keys}
    for pair in source.rank_pairs(rank, method):
        tensors.update(_pad_pair(pair, pad_to, pair.scale / shared))
    return tensors, config


def _pad_pair(pair: RankPair, pad_to: int, fold: float) -> dict[str, torch.Tensor]:
    a = pair.a.new_zeros((pad_to, pair.a.shape[1]))
    a[: pair.rank] = pair.a
    b = pair.b.new_zeros((pair.b.shape[0], pad_to))
    b[:, : pair.rank] = pair.b if fold == 1.0 else (pair.b.float() * fold).to(pair.b.dtype)
    out = {pair.module.a_key: a, pair.module.b_key: b}
    if pair.bias is not None:
        out[pair.module.bias_key] = pair.bias if fold == 1.0 else (pair.bias.float() * fold).to(pair.bias.dtype)
    return out


def serve_command(model: str | None, adapters: Mapping[str, str | os.PathLike], max_lora_rank: int) -> str:
    """The `vllm serve` line that serves `adapters` ({name: folder}) on `model`."""
    modules = " ".join(shlex.quote(f"{name}={os.fspath(path)}") for name, path in adapters.items())
    line = f"vllm serve {shlex.quote(model or 'BASE_MODEL')} --enable-lora --lora-modules {modules} --max-lora-rank {max_lora_rank}"
    if len(adapters) > 1:
        line += f" --max-loras {len(adapters)}"  # let one batch mix all of them
    return line

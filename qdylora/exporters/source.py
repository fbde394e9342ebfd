"""The adapter being exported: a PEFT LoRA adapter at r_max plus its qdylora_config.json.

`SourceAdapter.open` checks the folder once (config, weights, every lora_A/lora_B pair,
the qdylora config) so that each exporter can trust what it gets, and `rank_pairs(b)`
hands out the rank-b cut of every module with the scale the adapter was trained at:

    lora_A[:b_m], lora_B[:, :b_m],  b_m = min(b, r_m),  scale alpha_m / b_m  (rsLoRA: / sqrt(b_m))

where r_m and alpha_m are the module's own stored rank and alpha (rank_pattern /
alpha_pattern resolved as PEFT resolves them). That is what `qdylora.rank_scope(model, b)`
computes, and what PEFT computes for an adapter stored with r = b_m and the same alpha.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import CONFIG_NAME, QDyLoraConfig, read_config_file
from ..errors import InputError
from ..ranks import lora_scale
from ..loading import read_adapter_config

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# (suffix of lora_A, suffix of lora_B) for linear and embedding LoRA layers
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
_BIAS = ".lora_B.bias"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: where its tensors are and the rank/alpha it was stored with."""

    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    key: str  # prefix of its tensors in adapter_model.safetensors
    embedding: bool
    r: int
    alpha: float

    @property
    def a_key(self) -> str:
        return self.key + _PAIRS[self.embedding][0]

    @property
    def b_key(self) -> str:
        return self.key + _PAIRS[self.embedding][1]

    @property
    def bias_key(self) -> str:
        return self.key + _BIAS


@dataclass
class RankPair:
    """The rank-b cut of one module: h += scale * B (A x) (+ scale * bias)."""

    module: LoraModule
    rank: int
    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None
    scale: float




class SourceAdapter:
    """A checked adapter folder, its tensors in memory (adapters are small)."""

    def __init__(
        self,
        path: Path,
        peft_config: dict[str, Any],
        qdylora: dict[str, Any] | None,
        tensors: dict[str, torch.Tensor],
        modules: list[LoraModule],
    ) -> None:
        self.path = path
        self.peft_config = peft_config
        self.qdylora = qdylora  # the whole qdylora_config.json; None for a plain (forced) adapter
        self.tensors = tensors
        self.modules = modules
        self.r_max = max(m.r for m in modules)
        self.r_min = int(qdylora["config"].get("r_min", 1)) if qdylora else 1

    # -- reading ------------------------------------------------------------------------
    @classmethod
    def open(cls, adapter_dir: str | os.PathLike, *, force: bool = False) -> SourceAdapter:
        """Read and check an adapter folder.

        Raises `InputError` for a folder that is not a complete PEFT LoRA adapter, for
        unreadable weights, for DoRA, and (unless `force`) for an adapter with no
        qdylora_config.json: a plain LoRA adapter was only ever trained at its full rank.
        """
        path = Path(adapter_dir)
        peft_config = read_adapter_config(path)
        kind = peft_config.get("peft_type", "LORA")
        if kind != "LORA":
            raise InputError(f"{path} holds a {kind} adapter; only LoRA adapters can be exported at a rank")
        if peft_config.get("use_dora"):
            raise InputError(
                f"{path} is a DoRA adapter: its magnitude vector was fitted to the full-rank update, "
                "so it has no rank-b cut; train without use_dora"
            )
        qdylora = None
        if (path / CONFIG_NAME).is_file() or not force:
            if not (path / CONFIG_NAME).is_file():
                raise InputError(
                    f"{path} has no {CONFIG_NAME}: it was not trained with qdylora, and cutting a plain LoRA "
                    "adapter to a lower rank is not meaningful (only its full rank was ever trained); "
                    "pass --force (force=True) to export it anyway"
                )
            qdylora = read_config_file(path)
            QDyLoraConfig.from_dict(qdylora["config"])  # validates the settings
        tensors = _load_tensors(path / WEIGHTS_NAME)
        if any("lora_magnitude_vector" in k for k in tensors):
            raise InputError(f"{path / WEIGHTS_NAME} holds DoRA magnitude vectors; DoRA adapters have no rank-b cut")
        modules = _find_modules(path, peft_config, tensors)
        source = cls(path, peft_config, qdylora, tensors, modules)
        if qdylora is not None:
            stored = qdylora["config"].get("r_max")
            if stored is not None and int(stored) != source.r_max:
                raise InputError(
                    f"{path / CONFIG_NAME} says r_max={stored} but the adapter's tensors have rank {source.r_max}; "
                    "the two files do not belong together"
                )
        return source

    # -- what it is ---------------------------------------------------------------------
    @property
    def use_rslora(self) -> bool:
        return bool(self.peft_config.get("use_rslora", False))

    @property
    def base_model(self) -> str | None:
        return self.peft_config.get("base_model_name_or_path")

    @property
    def extra_keys(self) -> list[str]:
        """Tensors that are not lora_A/lora_B/lora bias (modules_to_save, trained biases, ...)."""
        known = {k for m in self.modules for k in (m.a_key, m.b_key, m.bias_key)}
        return sorted(k for k in self.tensors if k not in known)

    def sweep(self):
        """The rank sweep recorded in qdylora_config.json, or None."""
        from ..trainer_ext.sweep import SweepResult

        data = (self.qdylora or {}).get("sweep")
        return SweepResult.from_dict(data) if data else None

    def resolve_rank(self, rank: int | str) -> int:
        """Check a requested rank (an integer, or "recommended": the sweep's pick)."""
        if isinstance(rank, str) and rank.strip().lower() == "recommended":
            sweep = self.sweep()
            if sweep is None or not sweep.recommended_rank:
                raise InputError(
                    f"{self.path} has no recorded sweep to recommend a rank; run `qdylora sweep` or pass a number"
                )
            return int(sweep.recommended_rank)
        if isinstance(rank, str) and rank.strip().lstrip("+-").isdigit():
            rank = int(rank)
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise InputError(f"rank must be an integer from {self.r_min} to {self.r_max}, got {rank!r}")
        if not self.r_min <= rank <= self.r_max:
            raise InputError(
                f"rank {rank} is outside the trained range {self.r_min}..{self.r_max} of {self.path}"
            )
        drawn = (self.qdylora or {}).get("config", {}).get("ranks")
        if drawn and rank not in drawn:
            warnings.warn(
                f"rank {rank} was never drawn during training (ranks {drawn}); its rows were trained only "
                "as part of larger ranks",
                stacklevel=2,
            )
        return rank

    # -- the rank-b cut -----------------------------------------------------------------
    def scale(self, module: LoraModule, rank: int) -> float:
        """The scale module `module` runs at when the adapter runs at rank `rank`."""
        return lora_scale(module.alpha, min(rank, module.r), self.use_rslora)

    def rank_pairs(self, rank: int) -> Iterator[RankPair]:
        """lora_A[:b], lora_B[:, :b] (views) and the scale of every module at rank `rank`."""
        for m in self.modules:
            b = min(rank, m.r)
            yield RankPair(
                module=m,
                rank=b,
                a=self.tensors[m.a_key][:b],
                b=self.tensors[m.b_key][:, :b],
                bias=self.tensors.get(m.bias_key),
                scale=self.scale(m, rank),
            )

    def base_weight_shape(self, module: LoraModule) -> tuple[int, int]:
        """The shape the base layer's weight must have for `module`'s lora_A/lora_B.

        (out, in) for nn.Linear; (in, out) for an embedding (lora_embedding_A is r x vocab)
        and for fan_in_fan_out layers (GPT-2's Conv1D).
        """
        out_f, in_f = self.tensors[module.b_key].shape[0], self.tensors[module.a_key].shape[1]
        transposed = module.embedding or bool(self.peft_config.get("fan_in_fan_out"))
        return (in_f, out_f) if transposed else (out_f, in_f)

    def rank_config(self, rank: int) -> dict[str, Any]:
        """adapter_config.json of the rank-b cut: r and rank_pattern capped at b, alphas kept."""
        config = dict(self.peft_config)
        config["r"] = min(rank, int(config.get("r", rank)))
        config["rank_pattern"] = {k: min(rank, int(v)) for k, v in (config.get("rank_pattern") or {}).items()}
        config["inference_mode"] = True
        return config

    def provenance(self, rank: int, **extra: Any) -> dict[str, Any]:
        """Where an export came from: the source folder and file hash, the rank, the sweep's verdict."""
        from .. import __version__

        out: dict[str, Any] = {
            "qdylora_version": __version__,
            "source_adapter": str(self.path.resolve()),
            "source_sha256": _sha256(self.path / WEIGHTS_NAME),
            "base_model": self.base_model,
            "rank": rank,
            "r_min": self.r_min,
            "r_max": self.r_max,
            "lora_alpha": self.peft_config.get("lora_alpha"),
            "use_rslora": self.use_rslora,
            "trained_with_qdylora": self.qdylora is not None,
        }
        sweep = self.sweep()
        if sweep is not None:
            out["sweep"] = {
                "metric": sweep.metric,
                "greater_is_better": sweep.greater_is_better,
                "metrics_at_rank": sweep.results.get(rank),
                "recommended_rank": sweep.recommended_rank,
                "best_rank": sweep.best_rank,
            }
        out.update(extra)
        return out

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files saved beside the adapter (a trainer with a tokenizer writes them)."""
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path} is not a readable safetensors file ({first}); re-save the adapter") from exc
    if not tensors:
        raise InputError(f"{path} holds no tensors; re-save the adapter")
    return tensors


def _find_modules(path: Path, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[LoraModule]:
    """Pair every lora_A with its lora_B and resolve the module's r and alpha as PEFT does."""
    from peft.utils.other import get_pattern_key

    r_default = int(peft_config.get("r", 8))
    alpha_default = peft_config.get("lora_alpha", 8)
    rank_pattern = peft_config.get("rank_pattern") or {}
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    modules = []
    for key in sorted(tensors):
        for embedding, (a_suffix, b_suffix) in enumerate(_PAIRS):
            if not key.endswith(a_suffix):
                continue
            prefix = key[: -len(a_suffix)]
            name = prefix.removeprefix(PEFT_PREFIX)
            a, b = tensors[key], tensors.get(prefix + b_suffix)
            if b is None:
                raise InputError(f"{path / WEIGHTS_NAME} has {key} but no {prefix + b_suffix}; the file is damaged")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise InputError(
                    f"{path / WEIGHTS_NAME}: {key} {tuple(a.shape)} and its lora_B {tuple(b.shape)} "
                    "do not form a LoRA pair"
                )
            r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), r_default)
            if int(r) != a.shape[0]:
                raise InputError(
                    f"{name} has rank {a.shape[0]} in {WEIGHTS_NAME} but {r} in adapter_config.json; "
                    "the two files do not belong together"
                )
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), alpha_default)
            modules.append(LoraModule(name=name, key=prefix, embedding=bool(embedding), r=int(r), alpha=alpha))
    if not modules:
        raise InputError(f"{path / WEIGHTS_NAME} has no lora_A/lora_B tensors; is it a LoRA adapter?")
    for key in tensors:
        if any(key.endswith(b_suffix) for _, b_suffix in _PAIRS):
            if not any(key == m.b_key for m in modules):
                raise InputError(f"{path / WEIGHTS_NAME} has {key} but no matching lora_A; the file is damaged")
    return modules


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

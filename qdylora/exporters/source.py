"""The adapter being exported: a PEFT LoRA adapter at r_max plus its qdylora_config.json.

`SourceAdapter.open` checks the folder once (config, weights, every lora_A/lora_B pair,
the qdylora config) so that each exporter can trust what it gets, and `rank_pairs(b)`
hands out the rank-b cut of every module with the scale the adapter was trained at:

    lora_A[:b_m], lora_B[:, :b_m],  b_m = min(b, r_m),  scale alpha_m / b_m  (rsLoRA: / sqrt(b_m))

where r_m and alpha_m are the module's own stored rank and alpha (rank_pattern /
alpha_pattern resolved as PEFT resolves them). That is what `qdylora.rank_scope(model, b)`
computes, and what PEFT computes for an adapter stored with r = b_m and the same alpha.

`rank_pairs(b, method="svd")` hands out instead the best rank-b_m approximation of each
module's r_m delta (its exact top-b_m SVD, `ranks.svd_truncate`), at the same scale
alpha_m / b_m, so the same adapter_config.json loads it: what
`qdylora.rank_scope(model, b, method="svd")` computes.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter_io import PEFT_PREFIX, WEIGHTS_NAME, AdapterFiles, LoraModule, check_adapter, read_safetensors, recorded_sweep
from ..errors import InputError
from ..ranks import check_method, lora_scale, svd_truncate

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

    def __init__(self, files: AdapterFiles, tensors: dict[str, torch.Tensor]) -> None:
        self.files = files  # the checked folder: configs, header shapes, modules
        self.path = files.path
        self.peft_config = files.peft_config
        self.qdylora = files.qdylora  # the whole qdylora_config.json; None for a plain (forced) adapter
        self.tensors = tensors
        self.modules = files.modules
        self.r_max = files.r_max
        self.r_min = files.r_min

    # -- reading ------------------------------------------------------------------------
    @classmethod
    def open(cls, adapter_dir: str | os.PathLike, *, force: bool = False,
             methods: Sequence[str | None] = ()) -> SourceAdapter:
        """Read and check an adapter folder.

        Raises `InputError` for a folder that is not a complete PEFT LoRA adapter, for
        unreadable weights, for DoRA, and for an unmeasured prefix cut of an adapter trained
        at its full rank only (`check_adapter`: allowed with `force` or after a sweep that
        measured prefix; svd needs neither). `methods` are the cuts the caller will read (None
        in it: the adapter's own reading).
        """
        named = [check_method(m) for m in methods if m is not None]
        files = check_adapter(adapter_dir, force=force, methods=named or None)
        tensors = read_safetensors(files.path / WEIGHTS_NAME)
        return cls(files, tensors)

    # -- what it is ---------------------------------------------------------------------
    @property
    def default_method(self) -> str:
        """prefix for a QDyLoRA run, svd for an adapter trained at its full rank only."""
        return self.files.default_method

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
        """The rank sweep recorded for this adapter (`adapter_io.recorded_sweep`), or None."""
        return recorded_sweep(self.path, self.qdylora)

    def resolve(self, rank: int | str, method: str | None = None) -> tuple[int, str]:
        """Check a requested (rank, method); the method defaults to the adapter's (`default_method`).

        With rank "recommended", a `method` of None takes the sweep's recommended
        (rank, method); an explicit other method takes the rank the sweep recommends for
        that method alone (it must have been measured).
        """
        if method is not None:
            check_method(method)
        if isinstance(rank, str) and rank.strip().lower() == "recommended":
            sweep = self._recorded_sweep()
            if method is None or method == sweep.recommended_method:
                b, method = int(sweep.recommended_rank), sweep.recommended_method
            elif method not in sweep.methods:
                raise InputError(
                    f"the sweep recorded in {self.path} measured {', '.join(sweep.methods)}, not {method}; "
                    f"run `qdylora sweep --method {method}` or pass a number"
                )
            else:
                b = sweep.recommend(method)[0]
        else:
            method = method or self.default_method
            b = self.resolve_rank(rank, method)
        if method == "svd":
            self.check_svd(b)
        return b, method

    def _recorded_sweep(self):
        sweep = self.sweep()
        if sweep is None or not sweep.recommended_rank:
            raise InputError(
                f"{self.path} has no recorded sweep to recommend a rank; run `qdylora sweep` or pass a number"
            )
        return sweep

    def check_svd(self, rank: int) -> None:
        """Raise `InputError` if some module cannot hold a rank-`rank` SVD (b_m > min(in, out))."""
        for m in self.modules:
            b = min(rank, m.r)
            a, bt = self.tensors[m.a_key], self.tensors[m.b_key]
            limit = min(a.shape[1], bt.shape[0])
            if b > limit:
                raise InputError(
                    f"rank {rank} is above min(in, out) = {limit} of {m.name}, whose delta has rank <= {limit}; "
                    f"the SVD needs a rank of at most {limit} there"
                )

    def resolve_rank(self, rank: int | str, method: str = "prefix") -> int:
        """Check a requested rank (an integer, or "recommended": the sweep's pick).

        Warns when a prefix cut's rank was never drawn in training (an SVD truncation
        does not depend on which ranks were drawn).
        """
        if isinstance(rank, str) and rank.strip().lower() == "recommended":
            return int(self._recorded_sweep().recommended_rank)
        if isinstance(rank, str) and rank.strip().lstrip("+-").isdigit():
            rank = int(rank)
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise InputError(f"rank must be an integer from {self.r_min} to {self.r_max}, got {rank!r}")
        if not self.r_min <= rank <= self.r_max:
            raise InputError(
                f"rank {rank} is outside the trained range {self.r_min}..{self.r_max} of {self.path}"
            )
        drawn = (self.qdylora or {}).get("config", {}).get("ranks")
        if method == "prefix" and drawn and rank not in drawn:
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

    def rank_pairs(self, rank: int, method: str = "prefix") -> Iterator[RankPair]:
        """Every module's rank-b pair and its scale at rank `rank`.

        `prefix`: lora_A[:b], lora_B[:, :b] (views). `svd`: the top-b SVD of the module's
        r_m delta, factored so that scale * B' A' is it (`svd_truncate`), and a lora_B bias
        rescaled so that its contribution stays that of the r_m adapter.
        """
        check_method(method)
        for m in self.modules:
            b = min(rank, m.r)
            a, bt, bias = self.tensors[m.a_key], self.tensors[m.b_key], self.tensors.get(m.bias_key)
            scale = self.scale(m, rank)
            if method == "svd":
                full = self.scale(m, m.r)
                a, bt = svd_truncate(a, bt, full, b, scale)
                if bias is not None:
                    bias = (bias.double() * (full / scale)).to(bias.dtype)
            else:
                a, bt = a[:b], bt[:, :b]
            yield RankPair(module=m, rank=b, a=a, b=bt, bias=bias, scale=scale)

    def base_weight_shape(self, module: LoraModule) -> tuple[int, int]:
        """The shape the base layer's weight must have (`AdapterFiles.base_weight_shape`)."""
        return self.files.base_weight_shape(module)

    def rank_config(self, rank: int) -> dict[str, Any]:
        """adapter_config.json of the rank-b cut: r and rank_pattern capped at b, alphas kept."""
        config = dict(self.peft_config)
        config["r"] = min(rank, int(config.get("r", rank)))
        config["rank_pattern"] = {k: min(rank, int(v)) for k, v in (config.get("rank_pattern") or {}).items()}
        config["inference_mode"] = True
        return config

    def provenance(self, rank: int, method: str = "prefix", **extra: Any) -> dict[str, Any]:
        """Where an export came from: the source folder and file hash, the rank and method, the sweep's verdict."""
        from .. import __version__

        out: dict[str, Any] = {
            "qdylora_version": __version__,
            "source_adapter": str(self.path.resolve()),
            "source_sha256": _sha256(self.path / WEIGHTS_NAME),
            "base_model": self.base_model,
            "rank": rank,
            "method": method,
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
                "metrics_at_rank": sweep.by_method.get(method, {}).get(rank),
                "recommended_rank": sweep.recommended_rank,
                "recommended_method": sweep.recommended_method,
                "best_rank": sweep.best_rank,
                "best_method": sweep.best_method,
            }
        out.update(extra)
        return out

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files saved beside the adapter (a trainer with a tokenizer writes them)."""
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_base(name: str | os.PathLike | None) -> Path:
    """A local base folder: the path itself, or a hub id's snapshot in the local HF cache."""
    if not name:
        raise InputError("the adapter does not name its base model; pass --base MODEL_DIR")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or str(name).startswith((".", "~")) or str(name).count("/") > 1:
        raise InputError(f"base model folder {name} does not exist; pass --base MODEL_DIR")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except Exception as exc:
        raise InputError(
            f"base model {name} is neither a local folder nor in the Hugging Face cache; "
            f"download it first (hf download {name}) or pass --base MODEL_DIR"
        ) from exc

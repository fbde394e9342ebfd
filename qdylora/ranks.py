"""The rank mechanics of QDyLoRA, in one place.

- `RankSampler` draws the rank b of a step from (seed, step) alone, so every process of a
  distributed run and every resumed run gets the same sequence without communication.
- `DynamicRank` makes every LoRA layer of a PEFT model compute

      h = W0 x + s(b) * B[:, :b] A[:b, :] x,   s(b) = alpha / b  (alpha / sqrt(b) with rsLoRA)

  at the active rank b (slicing A and B, and setting PEFT's per-layer `scaling` to s(b)
  for the scope). `set_scaling` switches between the two rules by switching PEFT's
  `use_rslora`, so the rule is stored with the adapter. That is exactly what PEFT computes for an adapter stored with
  r = b and the same lora_alpha, which is why a rank-b export needs no qdylora code.
- `rank_scope(model, b)` sets the active rank for the forward passes inside it. Outside
  any scope the adapter runs at its full rank r_max. `rank_scope(model, b, method="svd")`
  instead runs each layer's delta SVD-truncated to b (`svd_truncate`, factors swapped in
  for the scope by `DynamicRank.svd_scope`).

Truncation wraps the `forward` of each `lora_A[adapter]` / `lora_B[adapter]` module,
which every PEFT LoRA layer type (nn.Linear, bitsandbytes Linear4bit / Linear8bitLt)
calls as a module. "slice" uses A[:b] and B[:, :b] (compute follows b); "mask" keeps
the full shapes and multiplies the rank dimension by a 0/1 mask (for engines that
partition parameters). In both, gradients past b are exactly zero.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import METHODS, check_method  # noqa: F401  (re-exported: the rank mechanics' names)
from .errors import InputError, is_int

_ATTR = "_qdylora_dynamic_rank"


class RankSampler:
    """Draws b for a (step, micro-batch) from a fixed seed; no state, no communication."""

    def __init__(self, ranks: Sequence[int], distribution: str = "uniform", seed: int = 0) -> None:
        self.ranks = np.array(sorted(ranks), dtype=np.int64)
        if distribution == "uniform":
            weights = np.ones(len(self.ranks))
        elif distribution == "log_uniform":
            weights = 1.0 / self.ranks
        else:
            raise InputError(f"distribution={distribution!r} is not allowed; choose uniform or log_uniform")
        self.probs = weights / weights.sum()
        self.seed = int(seed)

    @classmethod
    def from_config(cls, config) -> RankSampler:
        return cls(config.candidate_ranks, config.distribution, config.seed)

    def draw(self, step: int, micro_batch: int = 0) -> int:
        """The rank of optimizer step `step` (and micro-batch `micro_batch` within it)."""
        rng = np.random.default_rng([self.seed, int(step), int(micro_batch)])
        return int(rng.choice(self.ranks, p=self.probs))


@dataclass
class _State:
    rank: int | None = None  # None: full rank
    frozen: bool = False  # detach rows/columns 0..b-2 (DyLoRA's "frozen" update)
    truncation: str = "slice"


def lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """The PEFT LoRA layers of `model` that carry `adapter_name` as lora_A/lora_B modules."""
    from peft.tuners.lora import LoraLayer

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})
    ]


def check_lora_model(model: nn.Module) -> tuple[nn.Module, str]:
    """Return (peft_model, adapter_name), or raise naming what was found instead."""
    peft_model = unwrap(model)
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise InputError(
            f"QDyLoRA needs a PEFT model with LoRA adapters, got {type(peft_model).__name__}; "
            "wrap it with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    kind = getattr(config.peft_type, "value", config.peft_type)
    if kind != "LORA":
        raise InputError(f"QDyLoRA needs a LoRA adapter, got a {kind} adapter ({type(config).__name__})")
    if getattr(config, "use_dora", False):
        raise InputError("DoRA adapters are not supported: its magnitude vector has no rank-b truncation")
    layers = lora_layers(peft_model, adapter)
    if not layers:
        raise InputError("the PEFT model has no LoRA layers for its active adapter")
    for name, layer in layers:
        if not isinstance(layer.lora_A[adapter], nn.Linear) or not isinstance(layer.lora_B[adapter], nn.Linear):
            raise InputError(f"{name}: only linear LoRA layers can change rank, got {type(layer).__name__}")
    if any(adapter in getattr(m, "lora_embedding_A", {}) for _, m in peft_model.named_modules()):
        raise InputError("LoRA on embedding layers is not supported by QDyLoRA; target linear layers only")
    return peft_model, adapter


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / FSDP style wrappers (`.module`) down to the model itself."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class DynamicRank:
    """Makes the LoRA layers of one adapter of a PEFT model run at an adjustable rank."""

    def __init__(self, model: nn.Module, truncation: str = "slice") -> None:
        self.model, self.adapter_name = check_lora_model(model)
        config = self.model.peft_config[self.adapter_name]
        self.use_rslora = bool(getattr(config, "use_rslora", False))
        self.state = _State(truncation=truncation)
        self._wrapped: list[nn.Module] = []
        self._layers: list[tuple[nn.Module, int, float]] = []  # (LoRA layer, its r, its scaling at r)
        self.r_max = 0
        for _, layer in lora_layers(self.model, self.adapter_name):
            r = int(layer.r[self.adapter_name])
            self.r_max = max(self.r_max, r)
            a, b = layer.lora_A[self.adapter_name], layer.lora_B[self.adapter_name]
            a.forward = functools.partial(_forward_a, a, r, self.state)
            b.forward = functools.partial(_forward_b, b, r, self.state)
            self._wrapped += [a, b]
            self._layers.append((layer, r, layer.scaling[self.adapter_name]))
        self.model.__dict__[_ATTR] = self

    @classmethod
    def of(cls, model: nn.Module, truncation: str = "slice") -> DynamicRank:
        """The DynamicRank installed on `model`, installing one if there is none."""
        inner = unwrap(model)
        found = inner.__dict__.get(_ATTR)
        if found is None:
            found = cls(inner, truncation=truncation)
        return found

    def set_scaling(self, rule: str | None) -> None:
        """Train with scale alpha/b (`"linear"`) or alpha/sqrt(b) (`"sqrt"`); None: keep PEFT's.

        The rule is stored where PEFT keeps it (the adapter's `use_rslora`, and each
        layer's `scaling` at its own r), so the saved adapter, its rank-b exports and any
        later `rank_scope` all use it without reading qdylora's config.
        """
        if rule is None or (rule == "sqrt") == self.use_rslora:
            return
        if self.state.rank is not None:
            raise RuntimeError("set_scaling inside a rank scope")
        self.use_rslora = rule == "sqrt"
        self.model.peft_config[self.adapter_name].use_rslora = self.use_rslora
        for i, (layer, r, _) in enumerate(self._layers):
            scaling = lora_scale(layer.lora_alpha[self.adapter_name], r, self.use_rslora)
            layer.scaling[self.adapter_name] = scaling
            self._layers[i] = (layer, r, scaling)

    @property
    def rank(self) -> int:
        """The rank forward passes currently run at."""
        return self.r_max if self.state.rank is None else self.state.rank

    def check_ranks(self, ranks: Sequence[int]) -> None:
        """Raise `InputError` unless every rank is an integer in 1..r_max (the one check of the model's range)."""
        bad = [r for r in ranks if not is_int(r) or not 1 <= r <= self.r_max]
        if bad:
            raise InputError(f"rank{'s' if len(bad) > 1 else ''} {bad[0] if len(bad) == 1 else bad!r} "
                             f"outside the adapter's range 1..{self.r_max}")

    @contextlib.contextmanager
    def scope(self, rank: int | None, frozen: bool = False) -> Iterator[None]:
        if rank is not None:
            self.check_ranks([rank])
        saved = (self.state.rank, self.state.frozen)
        saved_scaling = [layer.scaling[self.adapter_name] for layer, _, _ in self._layers]
        self.state.rank, self.state.frozen = rank, frozen
        # PEFT multiplies lora_B's output by layer.scaling: set it to s(b) for the scope
        for layer, r, full in self._layers:
            b = min(rank if rank is not None else r, r)
            layer.scaling[self.adapter_name] = full * rank_scale(b, r, self.use_rslora)
        try:
            yield
        finally:
            self.state.rank, self.state.frozen = saved
            for (layer, _, _), scaling in zip(self._layers, saved_scaling):
                layer.scaling[self.adapter_name] = scaling

    @contextlib.contextmanager
    def svd_scope(self, rank: int) -> Iterator[None]:
        """Run at rank `rank` with every layer's delta replaced by its exact top-b SVD.

        Inside, each LoRA layer's lora_A / lora_B hold (zero-padded to the layer's r) the
        factors `svd_truncate` gives for its r-rank delta at b = min(rank, r), and the
        layer runs at rank b with PEFT's scale at b, so it computes the best rank-b
        approximation of its delta: what `qdylora export adapter --method svd` writes. A
        lora_B bias keeps its full-rank contribution. The factors are restored on exit.
        """
        self.check_ranks([rank])
        if self.state.rank is not None:
            raise RuntimeError("svd_scope inside a rank scope")
        name = self.adapter_name
        plan = []
        for layer, r, full in self._layers:
            a_mod, b_mod = layer.lora_A[name], layer.lora_B[name]
            if a_mod.weight.dim() != 2 or a_mod.weight.shape[0] != r or b_mod.weight.shape[-1] != r:
                raise InputError(
                    "SVD truncation needs each layer's whole lora_A / lora_B on this process; they are "
                    f"partitioned here ({tuple(a_mod.weight.shape)}), e.g. by ZeRO-3: gather them or use prefix"
                )
            b = min(rank, r)
            out_scale = full * rank_scale(b, r, self.use_rslora)
            new_a, new_b = svd_truncate(a_mod.weight, b_mod.weight, full, b, out_scale)
            plan.append((a_mod, b_mod, b, new_a, new_b, full / out_scale))
        saved = []
        with torch.no_grad():
            for a_mod, b_mod, b, new_a, new_b, bias_fold in plan:
                bias = b_mod.bias
                saved.append((a_mod.weight.detach().clone(), b_mod.weight.detach().clone(),
                              None if bias is None else bias.detach().clone()))
                a_mod.weight.zero_()
                a_mod.weight[:b] = new_a
                b_mod.weight.zero_()
                b_mod.weight[:, :b] = new_b
                if bias is not None:
                    bias.mul_(bias_fold)
        try:
            with self.scope(rank):
                yield
        finally:
            with torch.no_grad():
                for (a_mod, b_mod, *_), (a_w, b_w, bias) in zip(plan, saved):
                    a_mod.weight.copy_(a_w)
                    b_mod.weight.copy_(b_w)
                    if bias is not None:
                        b_mod.bias.copy_(bias)

    def remove(self) -> None:
        """Restore PEFT's own forward on every wrapped module."""
        for m in self._wrapped:
            m.__dict__.pop("forward", None)
        self._wrapped.clear()
        self.model.__dict__.pop(_ATTR, None)


def rank_scope(
    model: nn.Module, rank: int | None, method: str = "prefix"
) -> contextlib.AbstractContextManager[None]:
    """Run the forward passes inside the `with` block at LoRA rank `rank` (None: full rank).

    `method="prefix"` uses the first b rows of A and columns of B (what QDyLoRA trains);
    `"svd"` the exact top-b SVD of each layer's delta (`DynamicRank.svd_scope`).
    Works on any PEFT LoRA model (trained by qdylora or loaded with PeftModel.from_pretrained).
    """
    dynamic = DynamicRank.of(model)
    if check_method(method) == "svd" and rank is not None:
        return dynamic.svd_scope(rank)
    return dynamic.scope(rank)


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling of a LoRA layer stored with rank r: alpha / r (rsLoRA: alpha / sqrt(r))."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def rank_scale(b: int, r: int, use_rslora: bool) -> float:
    """s(b) / s(r): the factor that turns PEFT's scaling at rank r into the scaling at rank b."""
    return math.sqrt(r / b) if use_rslora else r / b


def _rank_weight(weight: torch.Tensor, b: int, state: _State, dim: int) -> torch.Tensor:
    """The rank-b part of lora_A (dim 0) or lora_B (dim 1), frozen rows detached."""
    if state.truncation == "slice":
        w = weight.narrow(dim, 0, b)
        if state.frozen and b > 1:
            w = torch.cat([w.narrow(dim, 0, b - 1).detach(), w.narrow(dim, b - 1, 1)], dim=dim)
        return w
    shape = [1, 1]
    shape[dim] = weight.shape[dim]
    idx = torch.arange(weight.shape[dim], device=weight.device).view(shape)
    w = torch.where(idx == b - 1, weight, weight.detach()) if state.frozen else weight
    return w * (idx < b).to(weight.dtype)


def _forward_a(module: nn.Linear, r: int, state: _State, x: torch.Tensor) -> torch.Tensor:
    b = state.rank
    if b is None or (b >= r and not state.frozen):
        return F.linear(x, module.weight, module.bias)
    return F.linear(x, _rank_weight(module.weight, min(b, r), state, 0), None)


def _forward_b(module: nn.Linear, r: int, state: _State, h: torch.Tensor) -> torch.Tensor:
    b = state.rank
    if b is None or (b >= r and not state.frozen):
        return F.linear(h, module.weight, module.bias)
    return F.linear(h, _rank_weight(module.weight, min(b, r), state, 1), module.bias)


def svd_truncate(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, rank: int, out_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` LoRA pair for the delta `scale * lora_b @ lora_a` (Eckart-Young).

    Returns (A', B') with A' of shape (rank, in) and B' of shape (out, rank) such that
    `out_scale * B' @ A'` is the exact top-`rank` SVD of the delta: pass PEFT's scaling of
    the adapter you will write (`lora_scale(alpha, rank, use_rslora)`) as `out_scale`, so the
    scale is folded in the way PEFT applies it. Works from the factors alone (no base
    weights, so also for LoRA layers on 4-bit bases, where PEFT's `convert_to_lora` refuses):
    two thin QRs and an r x r SVD instead of an SVD of the out x in delta, in float64.

    The singular values are split evenly between the factors: A' = sqrt(S/|out_scale|) V^T,
    B' = sign(out_scale) U sqrt(S/|out_scale|), so both factors have the same row/column
    norms (balanced, as LoRA factors are in training). PEFT's own conversion
    (`peft.tuners.lora.conversion`, 0.21) does NOT do this: it writes A = V^T, B = U S
    with lora_alpha = r (scale 1). The product, and so every output, is the same; only
    the split differs. Either split is nested: the first b' < rank rows/columns of (A', B')
    are the top-b' SVD again.

    Raises `InputError` for a rank outside 1..min(r, in, out) or a zero `out_scale`.
    """
    r, in_f, out_f = lora_a.shape[0], lora_a.shape[1], lora_b.shape[0]
    limit = min(r, in_f, out_f)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
        raise InputError(
            f"SVD rank {rank!r} outside 1..{limit} (a LoRA pair of rank {r} on a {in_f} -> {out_f} layer)"
        )
    if not math.isfinite(out_scale) or out_scale == 0:
        raise InputError(f"out_scale must be a finite non-zero number, got {out_scale!r}")
    a = lora_a.detach().double()
    b = lora_b.detach().double()
    q_b, r_b = torch.linalg.qr(b)  # (out, k), (k, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, k'), (k', r)
    u, s, vh = torch.linalg.svd(scale * (r_b @ r_a.T))
    root = (s[:rank] / abs(out_scale)).sqrt()
    new_b = (q_b @ u[:, :rank]) * root * math.copysign(1.0, out_scale)
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    return new_a.to(lora_a.dtype).contiguous(), new_b.to(lora_b.dtype).contiguous()

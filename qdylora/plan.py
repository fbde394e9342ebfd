"""`qdylora plan`: GPU memory per device of a QDyLoRA run, from the model's config alone.

No weights are read or downloaded: the model is built on the meta device (accelerate's
`init_empty_weights`), its linears are swapped for bitsandbytes 4-bit ones exactly as
`qdylora.load_model` does, and LoRA is attached with PEFT. Every row below is counted
from those skeletons:

- 4-bit weights: NF4 packs two weights per byte: (n + 1) // 2 bytes per linear of n weights.
- Double quantization: per block of 64 weights one uint8 absmax; per 256 absmax blocks one
  fp32 absmax; per layer a 16-entry NF4 code, a 256-entry absmax code (fp32) and an offset.
- Other weights (embeddings, lm_head, norms, biases): fp32, as `prepare_model_for_kbit_training`
  (run by `load_model`) leaves them; tied embeddings count once.
- Adapter: the LoRA matrices at r_max (fp32, PEFT's default); gradients: the same again.
- Optimizer: AdamW keeps two states per trainable weight: fp32 (adamw_torch,
  paged_adamw_32bit) or, for tensors of >= 4096 weights, uint8 plus one fp32 absmax per 256
  (adamw_8bit, paged_adamw_8bit). Paged states live in CUDA unified memory: they count as
  GPU memory, but under pressure they move to CPU RAM instead of failing.
- Activations (what autograd keeps for backward), measured, not guessed: one and two decoder
  layers are run on the meta device at (batch, seq) under `saved_tensors_hooks`, which gives
  the bytes one layer saves (A_layer) and the bytes of everything else (A_rest: embeddings,
  final norm, lm_head, loss). Then

      without gradient checkpointing: A = L * A_layer + A_rest
      with gradient checkpointing:    A = L * b * s * h * e_res + max(A_layer, A_rest)

  (L layers, hidden size h, e_res = 4 bytes per residual-stream value, fp32 after the fp32
  embeddings: forward keeps only each layer's input plus A_rest; backward frees A_rest
  before it recomputes one layer at a time).
- Temporaries: bitsandbytes dequantizes a whole weight for each matmul (the largest one, in
  the compute dtype) and the loss's logits gradient (b * s * vocab fp32) exist for a moment.
- ZeRO: stage >= 1 shards optimizer states, >= 2 gradients, 3 every parameter (4-bit
  weights included) over the GPUs; FSDP full-shard is counted as ZeRO-3.

The CUDA context and allocator slack are not allocated by PyTorch: `reserve` (1 GiB by
default) is set aside for them before deciding whether the run fits.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PLAN_OPTIMIZERS as OPTIMIZERS
from .loading import quantized_skeleton, skeleton  # noqa: F401  (skeleton: re-exported)
from .errors import InputError, first_line

GiB = 1024**3
BNB_BLOCK = 64  # NF4 block size (bitsandbytes' default, used by transformers)
NESTED_BLOCK = 256  # double-quant block size over the absmax values
OPT8_BLOCK = 256  # 8-bit optimizer block size
OPT8_MIN_SIZE = 4096  # bitsandbytes keeps smaller tensors' states in 32 bits
PAGED_MIN_SIZE = 100_000  # bitsandbytes pages only tensors of at least this many elements


@dataclass
class Row:
    name: str
    nbytes: int  # per device
    note: str = ""


@dataclass
class MemoryPlan:
    """Bytes per device, row by row, and the verdict against a card size."""

    model: str
    rows: list[Row]
    settings: dict[str, Any]
    gpu_mem: int | None = None
    reserve: int = GiB
    paged_bytes: int = 0  # optimizer state bitsandbytes may move to CPU RAM under pressure
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(r.nbytes for r in self.rows)

    def row(self, name: str) -> int:
        return next(r.nbytes for r in self.rows if r.name == name)

    @property
    def verdict(self) -> str:
        """fits / fits with paging / does not fit (or 'no card size given')."""
        if self.gpu_mem is None:
            return "no --gpu-mem given"
        budget = self.gpu_mem - self.reserve
        if self.total <= budget:
            return "fits"
        if self.total - self.paged_bytes <= budget:
            return "fits with paging"
        return "does not fit"

    @property
    def fits(self) -> bool:
        return self.verdict in ("fits", "fits with paging")

    def table(self) -> str:
        s = self.settings
        head = (f"{self.model}: {self.details['params'] / 1e9:.2f}B parameters, {self.details['layers']} layers; "
                f"r_max {s['r_max']}, batch {s['batch']} x seq {s['seq']}, {s['optim']}, gradient checkpointing "
                f"{'on' if s['gradient_checkpointing'] else 'off'}, {s['gpus']} GPU(s)"
                + (f", ZeRO-{s['zero']}" if s["zero"] else ""))
        w = max(len(r.name) for r in self.rows) + 2
        lines = [head, "", f"{'per device':<{w}}{'GiB':>7}  how"]
        for r in self.rows:
            lines.append(f"{r.name:<{w}}{r.nbytes / GiB:>7.2f}  {r.note}")
        lines.append(f"{'total':<{w}}{self.total / GiB:>7.2f}")
        if self.gpu_mem is not None:
            budget = self.gpu_mem - self.reserve
            lines.append(f"{'card':<{w}}{self.gpu_mem / GiB:>7.2f}  minus {self.reserve / GiB:.2f} GiB reserve "
                         f"(CUDA context, allocator slack) = {budget / GiB:.2f} GiB usable")
            verdict = self.verdict
            if verdict == "fits":
                lines.append(f"verdict: FITS, {(budget - self.total) / GiB:.2f} GiB to spare")
            elif verdict == "fits with paging":
                lines.append(f"verdict: FITS WITH PAGING: {(self.total - budget) / GiB:.2f} GiB over, covered by "
                             f"{self.paged_bytes / GiB:.2f} GiB of paged optimizer state that can move to CPU RAM")
            else:
                lines.append(f"verdict: DOES NOT FIT, {(self.total - budget) / GiB:.2f} GiB over "
                             "(try gradient checkpointing, a smaller batch/seq, 8-bit optimizer, or more GPUs with ZeRO-3)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "settings": self.settings, "rows": {r.name: r.nbytes for r in self.rows},
            "total": self.total, "gpu_mem": self.gpu_mem, "reserve": self.reserve, "paged_bytes": self.paged_bytes,
            "verdict": self.verdict, "details": self.details,
        }


# -- inputs -------------------------------------------------------------------------------------------
def parse_size(value: str | int | None) -> int | None:
    """'32GiB', '32GB', '80G', '512MiB' or a byte count -> bytes (GB = 1e9, GiB and bare G = 2**30)."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise InputError(f"cannot read {value!r} as a memory size; write e.g. 32GiB, 80GB or 24G")
    number, prefix, unit = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    power = "KMGT".index(prefix) + 1 if prefix else 0
    base = 1000 if unit == "b" and prefix else 1024
    return int(number * base**power)


def load_config(model_or_config: str | os.PathLike, trust_remote_code: bool = False):
    """A transformers config from a config.json, a model folder, or a hub id (config only)."""
    from transformers import AutoConfig

    path = Path(model_or_config)
    local = path.exists() or str(model_or_config).startswith((".", "/", "~")) or str(model_or_config).endswith(".json")
    if local and not path.exists():
        raise InputError(f"{model_or_config} does not exist; give a config.json, a model folder or a hub id")
    if path.is_dir() and not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json")
    try:
        return AutoConfig.from_pretrained(str(path if local else model_or_config), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise InputError(f"cannot read a model config from {model_or_config}: {first}") from exc


# -- skeletons on the meta device: `qdylora.loading.skeleton` / `quantized_skeleton` (one builder) ---------


def with_lora(model: nn.Module, r: int, target_modules: Any) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=16, target_modules=target_modules, lora_dropout=0.0, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        raise InputError(f"LoRA target modules {target_modules!r} do not fit this model: {str(exc).splitlines()[0]}") from exc


# -- byte counts (each equals a real allocation; see tests/test_plan.py) -----------------------------------
def packed_4bit_bytes(n: int, quant_storage: torch.dtype = torch.uint8) -> int:
    """Bytes of bitsandbytes' packed NF4 weight for n weights, stored as `quant_storage`."""
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    return (n + 1) // (2 * itemsize) * itemsize


def quant_state_bytes(n: int) -> int:
    """Double-quant state of one 4-bit weight of n values: absmax (uint8 / 64), nested absmax
    (fp32 / 256 blocks), the NF4 code (16 x fp32), the absmax code (256 x fp32), the offset (fp32)."""
    blocks = -(-n // BNB_BLOCK)
    return blocks + 4 * -(-blocks // NESTED_BLOCK) + 16 * 4 + 256 * 4 + 4


def optimizer_bytes(numels: list[int], optim: str, on_gpu: bool = True) -> tuple[int, int]:
    """(state bytes, of which paged) for AdamW-family `optim` over trainable tensors of `numels` weights."""
    if optim not in OPTIMIZERS:
        raise InputError(f"optimizer {optim!r} is not modelled; choose one of {', '.join(OPTIMIZERS)}")
    paged = optim.startswith("paged_") and on_gpu
    total = paged_total = 0
    eight_bit = False
    for n in numels:
        if optim.endswith("8bit") and n >= OPT8_MIN_SIZE:
            state = 2 * n + 2 * 4 * -(-n // OPT8_BLOCK)
            eight_bit = True
            paged_part = 2 * n if paged and n >= PAGED_MIN_SIZE else 0
        else:
            state = 2 * 4 * n
            paged_part = state if paged and n >= PAGED_MIN_SIZE else 0
        if optim.startswith("adamw_torch"):
            state += 4  # the step count, a float32 scalar tensor per parameter
        total += state
        paged_total += paged_part
    if eight_bit:
        total += 2 * 256 * 4  # the signed and unsigned dynamic quantization maps, shared
    return total, paged_total


# -- activations: what autograd saves, measured --------------------------------------------------------------
class SavedTensorMeter:
    """Bytes of the tensors autograd keeps for backward, now and at the peak.

    Counts each storage once (views share it), leaves parameters and their views out, and
    follows tensors until autograd frees them, so `peak` covers forward and backward. Works
    on real tensors and on the meta device (where tensors are told apart by their base).
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = {id(p) for p in model.parameters()}
        self._live: dict[Any, list[int]] = {}
        self.current = 0
        self.peak = 0

    @contextlib.contextmanager
    def track(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    def _key(self, t: torch.Tensor) -> tuple[Any, int]:
        base = t if t._base is None else t._base
        if id(base) in self._params or isinstance(base, nn.Parameter):
            return None, 0
        storage = t.untyped_storage()
        key = ("meta", id(base)) if t.device.type == "meta" else storage.data_ptr()
        return key, storage.nbytes()

    def _pack(self, t: torch.Tensor) -> Any:
        key, nbytes = self._key(t)
        if key is None:
            return t
        entry = self._live.setdefault(key, [nbytes, 0])
        if entry[1] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        holder = _Saved(t)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: Any) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _FlashAttentionMemory(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on the meta device with the memory of a fused
    (flash / memory-efficient) kernel, which GPUs and PyTorch's CPU backend use: it saves q, k,
    v, the output and a float32 log-sum-exp per query, never the s x s attention matrix (the
    meta device would otherwise fall back to the unfused math path and save that matrix)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, s, _ = q.shape  # fused kernels write the output as (b, s, h, d): the caller's reshape is free
        out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)
        lse = q.new_empty(b, h, s, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # pragma: no cover - the meta trace never runs backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _FlashAttentionMemory.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def measured_activation_bytes(model_dir: str | os.PathLike, r: int, batch: int, seq: int, gradient_checkpointing: bool) -> int:
    """The activation row's real counterpart: peak saved-for-backward bytes of one forward + backward
    of a 4-bit `load_model` model with LoRA r on every linear (fp32, on CPU).

    Checkpointing is the reentrant variant: the non-reentrant one keeps the recomputed layer's
    tensors out of sight of saved_tensors_hooks (same memory, not observable).
    """
    from .loading import load_model

    base = load_model(model_dir, compute_dtype="float32", device_map={"": "cpu"}, gradient_checkpointing=gradient_checkpointing)
    model = with_lora(base, r, "all-linear")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(0, int(base.config.vocab_size), (batch, seq), generator=torch.Generator().manual_seed(0))
    meter = SavedTensorMeter(model)
    with meter.track():
        model(input_ids=ids, labels=ids).loss.backward()
    return meter.peak


def traced_activation_bytes(config, layers: int, batch: int, seq: int, r: int, target_modules: Any,
                            dtype: torch.dtype, gradient_checkpointing: bool, fused_attention: bool = True,
                            trust_remote_code: bool = False) -> int:
    """Bytes a `layers`-layer copy of the model saves for backward in one training forward (meta device)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = layers
    for key in ("layer_types", "mlp_layer_types"):  # per-layer lists some configs carry
        if isinstance(getattr(small, key, None), list):
            setattr(small, key, getattr(small, key)[:layers])
    model = with_lora(skeleton(small, dtype, trust_remote_code), r, target_modules)
    model.train()
    if gradient_checkpointing:  # as prepare_model_for_kbit_training then does: the embeddings' output requires grad
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    meter = SavedTensorMeter(model)
    with meter.track(), (_fused_attention() if fused_attention else contextlib.nullcontext()):
        model(input_ids=ids, labels=ids)
    return meter.current


# -- the plan --------------------------------------------------------------------------------------------------
def plan(
    model: str | os.PathLike,
    *,
    r_max: int = 64,
    batch: int = 1,
    seq: int = 512,
    gpus: int = 1,
    zero: int = 0,
    optim: str = "paged_adamw_32bit",
    gradient_checkpointing: bool = True,
    gpu_mem: str | int | None = None,
    reserve: str | int = "1GiB",
    target_modules: Any = "all-linear",
    compute_dtype: str | torch.dtype = "bfloat16",
    quant_storage: str | torch.dtype | None = None,
    attention: str = "fused",
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """Estimate GPU memory per device of QDyLoRA training (see the module docstring for every row).

    `attention="fused"` (GPUs: flash / memory-efficient kernels) never keeps the s x s attention
    matrix; `"math"` (PyTorch's unfused kernel, which e.g. Falcon's masked SDPA call gets on
    CPU) keeps it. The CLI plans for GPUs, i.e. fused.
    """
    if attention not in ("fused", "math"):
        raise InputError(f"attention must be 'fused' or 'math', got {attention!r}")
    from .loading import _dtype

    for name, value, lo in (("r_max", r_max, 1), ("batch", batch, 1), ("seq", seq, 1), ("gpus", gpus, 1)):
        if not isinstance(value, int) or value < lo:
            raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")
    if zero not in (0, 1, 2, 3):
        raise InputError(f"zero must be 0, 1, 2 or 3 (ZeRO stage; 3 also stands for FSDP full-shard), got {zero!r}")
    if zero and gpus == 1:
        raise InputError("ZeRO shards over several GPUs: give --gpus N (N > 1) with --zero")
    compute = _dtype(compute_dtype)
    storage = _dtype(quant_storage) or torch.uint8
    config = load_config(model, trust_remote_code)
    qmodel = with_lora(quantized_skeleton(config, compute, quant_storage and storage, trust_remote_code), r_max, target_modules)

    import bitsandbytes as bnb

    four_bit = [m for m in qmodel.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not four_bit:
        raise InputError(f"{model}: no linear layer would be quantized to 4 bits")
    counts = [m.in_features * m.out_features for m in four_bit]
    packed = {id(m.weight) for m in four_bit}
    weights = sum(packed_4bit_bytes(n, storage) for n in counts)
    qstate = sum(quant_state_bytes(n) for n in counts)
    lora = [p for n, p in qmodel.named_parameters() if "lora_" in n]
    other = [p for p in qmodel.parameters() if id(p) not in packed and not any(p is q for q in lora)]
    other_bytes = sum(p.numel() * 4 for p in other)  # fp32 after prepare_model_for_kbit_training
    adapter = sum(p.numel() * 4 for p in lora)
    opt, paged = optimizer_bytes([p.numel() for p in lora], optim)
    n_params = sum(counts) + sum(p.numel() for p in other)

    layers = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    e_act = torch.empty((), dtype=compute).element_size()
    trace = (batch, seq, r_max, target_modules, compute, gradient_checkpointing, attention == "fused", trust_remote_code)
    one = traced_activation_bytes(config, 1, *trace)
    two = traced_activation_bytes(config, 2, *trace) if layers > 1 else 2 * one
    per_layer, rest = two - one, 2 * one - two
    if gradient_checkpointing:
        e_res = 4  # the residual stream follows the fp32 embeddings
        activations = layers * batch * seq * hidden * e_res + max(per_layer, rest)
        act_note = (f"L x b*s*h*4 (layer inputs) + max(1 layer recomputed {per_layer / 2**20:.0f} MiB, "
                    f"head {rest / 2**20:.0f} MiB)")
    else:
        activations = layers * per_layer + rest
        act_note = f"L x {per_layer / 2**20:.0f} MiB per layer + rest ({rest / 2**20:.0f} MiB)"
    vocab = int(config.vocab_size)
    transient = max(counts) * e_act + batch * seq * vocab * 4

    shard = float(gpus)
    rows = [
        Row("4-bit weights (NF4)", _per(weights, shard if zero == 3 else 1), f"{sum(counts) / 1e9:.2f}B weights x 0.5 byte"),
        Row("double-quant state", _per(qstate, shard if zero == 3 else 1), "uint8 absmax / 64 + fp32 / 256 blocks + codes"),
        Row("other weights (fp32)", _per(other_bytes, shard if zero == 3 else 1), "embeddings, lm_head, norms, biases"),
        Row(f"adapter (r={r_max}, fp32)", _per(adapter, shard if zero == 3 else 1), f"{sum(p.numel() for p in lora) / 1e6:.1f}M LoRA weights"),
        Row("gradients (fp32)", _per(adapter, shard if zero >= 2 else 1), "one per adapter weight"),
        Row(f"optimizer ({optim})", _per(opt, shard if zero >= 1 else 1), "2 AdamW states per adapter weight" + (", paged" if paged else "")),
        Row("activations", activations, act_note),
        Row("temporaries", transient, "largest dequantized weight + logits gradient"),
    ]
    return MemoryPlan(
        model=str(model),
        rows=rows,
        settings={"r_max": r_max, "batch": batch, "seq": seq, "gpus": gpus, "zero": zero, "optim": optim,
                  "gradient_checkpointing": gradient_checkpointing, "target_modules": target_modules,
                  "compute_dtype": str(compute).replace("torch.", ""), "quant_storage": str(storage).replace("torch.", "")},
        gpu_mem=parse_size(gpu_mem),
        reserve=parse_size(reserve),
        paged_bytes=_per(paged, shard if zero >= 1 else 1),
        details={"params": n_params, "layers": layers, "quantized_linears": len(counts),
                 "trainable": sum(p.numel() for p in lora), "activation_per_layer": per_layer,
                 "activation_rest": rest},
    )


def _per(nbytes: int, shards: float) -> int:
    return int(math.ceil(nbytes / shards))

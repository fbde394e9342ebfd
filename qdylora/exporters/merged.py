"""Merge one rank of a QDyLoRA adapter into its base, one safetensors shard at a time.

The base is never loaded as a model. For each shard of the base checkpoint we read its
tensors, add scale * B[:, :b] A[:b] to the weights the adapter targets, cast to the
output dtype, write the shard and drop it; so peak memory is about one shard plus the
adapter, whatever the size of the model (Falcon-40B ships in ~10 GB shards).

`base_weights="nf4"` first replaces every weight that QLoRA loading quantizes with
dequant(NF4(W)) (blocksize 64, double quantization: what bitsandbytes' Linear4bit holds),
so the merged model computes what the adapter was trained and evaluated against.
`"original"` merges into W itself (see docs/exporters.md for the trade-off).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_io import save_tensors
from ..errors import InputError, first_line
from ..loading import _dtype, default_compute_dtype
from .adapter import EXPORT_INFO
from .source import PEFT_PREFIX, TOKENIZER_FILES, RankPair, SourceAdapter, resolve_base
from .staging import staged_output

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = ("float16", "bfloat16", "float32")
BASE_WEIGHTS = ("original", "nf4")
NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, what load_in_4bit uses
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_NOT_COPIED = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json", "README.md", ".gitattributes"}


@dataclass
class BaseCheckpoint:
    """A base model folder's safetensors shards: which tensors live where, their shapes."""

    folder: Path
    shards: dict[str, list[str]]  # file name -> tensor names, in file order
    shapes: dict[str, tuple[int, ...]]
    config: dict

    @classmethod
    def read(cls, folder: Path) -> BaseCheckpoint:
        from safetensors import safe_open

        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"base model folder {folder} has no config.json")
        config = json.loads(cfg_path.read_text())
        if config.get("quantization_config"):
            raise InputError(
                f"the base in {folder} is already quantized ({config['quantization_config'].get('quant_method')}); "
                "merge into the original full-precision checkpoint (use --base-weights nf4 to get NF4's rounding)"
            )
        if (folder / INDEX_NAME).is_file():
            weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise InputError(
                f"base model folder {folder} has no safetensors weights (qdylora never unpickles .bin files; "
                "convert the base to safetensors first)"
            )
        shards: dict[str, list[str]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            try:
                with safe_open(str(folder / name), "pt") as f:
                    keys = list(f.keys())
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in keys})
            except Exception as exc:
                first = first_line(exc)
                raise InputError(f"base shard {folder / name} is missing or unreadable ({first})") from exc
            shards[name] = keys
        return cls(folder, shards, shapes, config)


def export_merged(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    rank: int | str,
    *,
    base_model: str | os.PathLike | None = None,
    dtype: str = "float16",
    base_weights: str = "original",
    compute_dtype: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    method: str | None = None,
) -> Path:
    """Write a standalone transformers model: the base with rank `rank` of the adapter merged in.

    Args:
        adapter_dir: A QDyLoRA adapter folder (adapter at r_max + qdylora_config.json).
        out_dir: The model folder to create (written to a temporary folder, then renamed).
        rank: The rank b (r_min..r_max), or "recommended" (the recorded sweep's pick).
        base_model: A local base model folder, or a hub id already in the local Hugging
            Face cache. Default: the adapter's base_model_name_or_path.
        dtype: Dtype of the written weights: float16, bfloat16 or float32.
        base_weights: "original" merges into the checkpoint's W; "nf4" into dequant(NF4(W)),
            the weights the adapter was trained against on a QLoRA base.
        compute_dtype: For "nf4": the dtype the base was loaded in for training
            (`load_model`'s compute_dtype; W is cast to it before NF4, as transformers
            does). Default: what `load_model` picks on this machine (bf16 on a bf16 GPU,
            else fp32). Pass the dtype you trained with.
        overwrite: Replace an existing `out_dir`.
        force: Prefix-cut an adapter without qdylora_config.json (not needed with `svd`).
        method: "prefix" (B[:, :b] A[:b]) or "svd" (the top-b SVD of each module's delta).
            None: the adapter's default (prefix; svd for one trained at full rank only), or
            with rank "recommended" the method the sweep recommended.

    Returns:
        `out_dir`, which `AutoModelForCausalLM.from_pretrained` loads.
    """
    from tqdm.auto import tqdm

    source = SourceAdapter.open(adapter_dir, force=force, methods=[method])
    b, method = source.resolve(rank, method)
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    if base_weights not in BASE_WEIGHTS:
        raise InputError(f"base_weights={base_weights!r} is not allowed; choose original or nf4")
    out_dtype = _dtype(dtype)
    nf4_dtype = (_dtype(compute_dtype) or default_compute_dtype()) if base_weights == "nf4" else None
    base_dir = resolve_base(base_model or source.base_model)
    base = BaseCheckpoint.read(base_dir)
    edits = plan_edits(source, b, base, method)
    source.tensors.clear()  # the edits hold their own rank-b copies: free the r_max tensors
    quantized = nf4_weight_names(base) if base_weights == "nf4" else set()

    with staged_output(out_dir, overwrite=overwrite, protect=[adapter_dir, base_dir]) as tmp:
        total = 0
        for name in tqdm(base.shards, desc="merging shards", unit="shard", disable=len(base.shards) < 2):
            total += merge_shard(base_dir / name, tmp / name, edits, quantized, out_dtype, nf4_dtype)
        weight_map = {k: name for name, keys in base.shards.items() for k in keys}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = dict(base.config)
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(base_dir, source, tmp)
        info = source.provenance(b, method, kind="merged", base_model=str(base_model or source.base_model),
                                 base_folder=str(base_dir.resolve()), base_weights=base_weights, dtype=dtype,
                                 nf4_compute_dtype=str(nf4_dtype).removeprefix("torch.") if nf4_dtype else None)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return Path(out_dir)


Edit = Callable[[torch.Tensor], torch.Tensor]


def plan_edits(source: SourceAdapter, rank: int, base: BaseCheckpoint, method: str = "prefix") -> dict[str, Edit]:
    """{base tensor name: function giving its merged fp32 value}, every name and shape checked."""
    fan_in_fan_out = bool(source.peft_config.get("fan_in_fan_out"))
    edits: dict[str, Edit] = {}

    def require(key: str, shape: tuple[int, ...], why: str) -> None:
        if key not in base.shapes:
            raise InputError(
                f"the base in {base.folder} has no tensor {key} for {why}; the adapter was trained on another "
                "model (pass the right --base)"
            )
        if tuple(base.shapes[key]) != tuple(shape):
            raise InputError(
                f"{key} is {tuple(base.shapes[key])} in the base {base.folder} but the adapter needs {tuple(shape)}; "
                "the adapter was trained on another model (pass the right --base)"
            )

    for pair in source.rank_pairs(rank, method):
        m = pair.module
        require(m.name + ".weight", source.base_weight_shape(m), f"the LoRA layer {m.name}")
        edits[m.name + ".weight"] = _add_delta(pair, transpose=m.embedding or fan_in_fan_out)
        if pair.bias is not None:
            require(m.name + ".bias", tuple(pair.bias.shape), f"the LoRA bias of {m.name}")
            edits[m.name + ".bias"] = _add_bias(pair)
    for key in source.extra_keys:
        if "trainable_tokens" in key or "token_adapter" in key:
            raise InputError(f"{key}: trainable-token adapters cannot be merged by qdylora; export the adapter instead")
        target = key.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default", "")
        tensor = source.tensors[key]
        require(target, tuple(tensor.shape), f"the saved module tensor {key}")
        edits[target] = _replace(tensor)
    return edits


def _add_delta(pair: RankPair, transpose: bool) -> Edit:
    a, b, scale = pair.a.clone(), pair.b.clone(), pair.scale  # rank-b copies, not views of the r_max tensors

    def edit(w: torch.Tensor) -> torch.Tensor:
        w = w.to(torch.float32, copy=True)  # one fp32 copy, updated in place: W + scale * B A
        if transpose:
            return w.addmm_(a.T.float(), b.T.float(), alpha=scale)
        return w.addmm_(b.float(), a.float(), alpha=scale)

    return edit


def _add_bias(pair: RankPair) -> Edit:
    bias, scale = pair.bias.clone(), pair.scale
    return lambda w: w.float() + bias.float() * scale


def _replace(tensor: torch.Tensor) -> Edit:
    return lambda _w: tensor.float()


def nf4_round_trip(weight: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequant(NF4(W)) as fp32: exactly what bitsandbytes' Linear4bit (NF4, double quant) holds.

    transformers casts W to the model's dtype (load_model's compute_dtype) before
    quantizing, so the same cast comes first here; the choice changes the NF4 codes of an
    fp32 or fp16 checkpoint. Quantized on the GPU when there is one (where training ran).
    """
    import bitsandbytes.functional as bnbf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, state = bnbf.quantize_4bit(
        weight.to(device=device, dtype=compute_dtype),
        blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4",
    )
    return bnbf.dequantize_4bit(packed, state).float().cpu()


def nf4_weight_names(base: BaseCheckpoint) -> set[str]:
    """Names of the checkpoint tensors that QLoRA loading (`qdylora.load_model`) quantizes to NF4.

    Built on the meta device (no memory) with transformers' own choice of modules to leave
    unquantized (lm_head, tied and fp32 modules) and load_model's widening to nn.Linear
    subclasses.
    """
    import bitsandbytes as bnb
    from transformers import AutoConfig

    from ..loading import quantized_skeleton

    model = quantized_skeleton(AutoConfig.from_pretrained(base.folder), torch.float32)
    names = {n + ".weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    missing = sorted(names - set(base.shapes))
    if missing:
        raise InputError(
            f"the checkpoint in {base.folder} names its weights differently from the model (e.g. {missing[0]}); "
            "--base-weights nf4 cannot tell which tensors are quantized, use --base-weights original"
        )
    return names


def merge_shard(
    src: Path,
    dst: Path,
    edits: dict[str, Edit],
    quantized: set[str],
    dtype: torch.dtype,
    nf4_dtype: torch.dtype | None = None,
) -> int:
    """Read one base shard, apply the edits (after NF4 rounding where asked), write it; return its bytes."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        metadata, keys = f.metadata() or {}, list(f.keys())
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        # reopened per tensor: the memory map (whose touched pages count as resident) then
        # never holds more than the tensor being read, so the peak is about one output shard
        with safe_open(str(src), "pt") as f:
            t = f.get_tensor(key)
        if key in quantized:
            t = nf4_round_trip(t, nf4_dtype or torch.float32)
        if key in edits:
            t = edits[key](t)
        out[key] = t.to(dtype) if t.is_floating_point() else t
    save_tensors(out, dst, metadata)
    size = sum(t.numel() * t.element_size() for t in out.values())
    del out
    _return_freed_memory()
    return size


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS after a shard.

    glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so
    without this the resident size creeps up shard after shard; no-op off glibc.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def copy_side_files(base_dir: Path, source: SourceAdapter, out: Path) -> None:
    """Copy the base's small files (tokenizer, generation config, licence), then the adapter's tokenizer."""
    for f in base_dir.iterdir():
        if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
    adapter_tok = source.tokenizer_files()
    if adapter_tok:  # the adapter's tokenizer (chat template, added tokens) wins over the base's
        for name in TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
        for f in adapter_tok:
            shutil.copy2(f, out / f.name)

"""Export one rank of a LoRA adapter as a standard PEFT LoRA adapter (no base model needed).

Two methods: `prefix` (lora_A[:b], lora_B[:, :b]: the rank QDyLoRA trained) and `svd`
(the exact top-b SVD of each module's delta: the best rank-b approximation of any LoRA
adapter, qdylora-trained or not).

The result is an ordinary `adapter_config.json` + `adapter_model.safetensors` that
`PeftModel.from_pretrained` and vLLM load with no qdylora code (`vllm=True` checks it first),
plus `qdylora_export.json` saying where it came from. PEFT and vLLM never read that
file, so the config they load is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter_io import save_tensors
from ..config import write_json_atomic
from ..errors import InputError
from .source import WEIGHTS_NAME, SourceAdapter
from .staging import staged_output
from .vllm import VLLM_RANKS, check_vllm, padded, serve_command

EXPORT_INFO = "qdylora_export.json"


@dataclass
class ExportedAdapter:
    """What was written for one rank: where, at which stored r and alpha."""

    path: Path
    rank: int
    r: int
    lora_alpha: float
    padded_to: int | None


def export_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    rank: int | str,
    *,
    pad_to: int | None = None,
    vllm: bool = False,
    overwrite: bool = False,
    force: bool = False,
    method: str | None = None,
) -> Path:
    """Write rank `rank` of the adapter in `adapter_dir` as a PEFT adapter in `out_dir`.

    `prefix`: lora_A[:b] and lora_B[:, :b] with the same lora_alpha and r = b: PEFT's
    scale alpha/b is the scale the adapter was trained at for rank b (rsLoRA:
    alpha/sqrt(b)). `svd`: the same config, with factors whose product at that scale is
    the exact top-b SVD of each module's r_max delta (`ranks.svd_truncate`).

    Args:
        adapter_dir: A QDyLoRA adapter folder (adapter + qdylora_config.json), or, with
            `method="svd"`, any PEFT LoRA adapter folder.
        out_dir: The folder to create (written to a temporary folder, then renamed).
        rank: The rank b, from r_min to r_max, or "recommended" (the recorded sweep's pick).
        pad_to: Zero-pad every module to this rank, with alpha rescaled so the output is
            unchanged (and per-module scales folded into lora_B). Never needed by vLLM,
            which loads any r up to its --max-lora-rank; with `vllm`, it must be an allowed
            --max-lora-rank.
        vllm: Before writing, check the export against vLLM's rules (vLLM's own PEFTHelper
            when installed) and its shapes against the base's config.json (when the base
            is on this machine), since vLLM loads an adapter for another model size
            silently; record the check and the --max-lora-rank to serve with.
        overwrite: Replace an existing `out_dir`.
        force: Prefix-cut an adapter without qdylora_config.json (a plain LoRA adapter; its
            lower ranks were never trained, so its prefixes are unlikely to be any good).
            Not needed with `method="svd"`.
        method: "prefix" or "svd". None: the adapter's default (prefix for a QDyLoRA run,
            svd for one trained at full rank only), or with rank "recommended" the method
            the sweep recommended.

    Returns:
        `out_dir`.
    """
    source = SourceAdapter.open(adapter_dir, force=force, methods=[method])
    b, method = source.resolve(rank, method)
    target = _pad_target(b, pad_to, vllm)
    served = check_vllm(source, [exported_config(source, b, target)]) if vllm else None
    with staged_output(out_dir, overwrite=overwrite, protect=[adapter_dir]) as tmp:
        write_rank(source, b, tmp, pad_to=target, vllm=served, method=method)
    return Path(out_dir)


def export_adapters(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    ranks: Sequence[int | str],
    *,
    pad_to: int | None = None,
    vllm: bool = False,
    overwrite: bool = False,
    force: bool = False,
    method: str | None = None,
    inside_adapter: bool = False,
) -> dict[int, Path]:
    """Export several ranks of one adapter into `out_dir/rank-<b>/` (multi-LoRA serving).

    Every rank uses the same `method` (None: the adapter's default reading, or the sweep's
    recommended method when "recommended" is among `ranks`). The whole `out_dir` appears at once, with every
    rank in it, or not at all. `out_dir` may not be, contain or lie inside `adapter_dir`
    unless `inside_adapter` (a subfolder of the run, as the Axolotl plugin writes).
    Returns {rank: folder}.
    """
    source = SourceAdapter.open(adapter_dir, force=force, methods=[method])
    if method is None and any(isinstance(r, str) and r.strip().lower() == "recommended" for r in ranks):
        method = source.resolve("recommended")[1]
    method = method or source.default_method
    wanted = sorted({source.resolve(r, method)[0] for r in ranks})
    if not wanted:
        raise InputError("no ranks to export")
    targets = {b: _pad_target(b, pad_to, vllm) for b in wanted}
    served = check_vllm(source, [exported_config(source, b, targets[b]) for b in wanted]) if vllm else None
    out = Path(out_dir)
    with staged_output(out_dir, overwrite=overwrite, protect=[adapter_dir], inside_ok=inside_adapter) as tmp:
        for b in wanted:
            (tmp / rank_folder(b)).mkdir()
            write_rank(source, b, tmp / rank_folder(b), pad_to=targets[b], vllm=served, method=method)
    return {b: out / rank_folder(b) for b in wanted}


def rank_folder(rank: int) -> str:
    """Name of the subfolder holding rank `rank` in a multi-rank export."""
    return f"rank-{rank}"


def write_rank(
    source: SourceAdapter,
    rank: int,
    folder: Path,
    *,
    pad_to: int | None = None,
    vllm: dict | None = None,
    method: str = "prefix",
) -> ExportedAdapter:
    """Write the rank-`rank` cut (`method`: prefix or svd) of `source` into the existing folder `folder`
    (`vllm`: check_vllm's record, stored in qdylora_export.json)."""
    if pad_to is None:
        tensors = {k: source.tensors[k] for k in source.extra_keys}
        for pair in source.rank_pairs(rank, method):
            tensors[pair.module.a_key], tensors[pair.module.b_key] = pair.a, pair.b
            if pair.bias is not None:
                tensors[pair.module.bias_key] = pair.bias
        config = source.rank_config(rank)
    else:
        tensors, config = padded(source, rank, pad_to, method)
    tensors = {k: t.contiguous().clone() for k, t in tensors.items()}  # no shared storage with the source
    save_tensors(tensors, folder / WEIGHTS_NAME)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in source.tokenizer_files():
        shutil.copy2(f, folder / f.name)
    write_json_atomic(
        folder / EXPORT_INFO,
        source.provenance(rank, method, kind="adapter", padded_to=pad_to, vllm=vllm, r=config["r"], exported_lora_alpha=config["lora_alpha"]),
    )
    return ExportedAdapter(folder, rank, int(config["r"]), float(config["lora_alpha"]), pad_to)


def exported_config(source: SourceAdapter, rank: int, pad_to: int | None) -> dict[str, Any]:
    """The adapter_config.json `write_rank` writes for the rank-`rank` cut (padded to `pad_to` if given)."""
    return source.rank_config(rank) if pad_to is None else padded(source, rank, pad_to)[1]


def _pad_target(rank: int, pad_to: int | None, vllm: bool) -> int | None:
    if pad_to is not None:
        if not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < rank:
            raise InputError(f"pad_to must be an integer >= the rank {rank}, got {pad_to!r}")
        if vllm and pad_to not in VLLM_RANKS:
            raise InputError(
                f"vLLM's max_lora_rank must be one of {list(VLLM_RANKS)}, so pad_to={pad_to} is not usable "
                "(vLLM needs no padding: drop --pad-to)"
            )
        return pad_to
    return None


def read_export_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The qdylora_export.json of an exported folder."""
    path = Path(folder) / EXPORT_INFO
    if not path.is_file():
        raise InputError(f"{folder} has no {EXPORT_INFO}: it was not written by qdylora export")
    return json.loads(path.read_text())



def export_report(adapter_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], *, vllm: bool = False,
                  name: str | None = None) -> list[str]:
    """The lines that say what was exported (one per folder) and, with `vllm`, how it was
    checked and the `vllm serve` line (adapters named NAME, or NAME-r<b> for several)."""
    infos = {Path(p): read_export_info(p) for p in paths}
    lines = [
        f"rank {info['rank']} ({info['method']}) of {adapter_dir} (r_max {info['r_max']}) -> {path}  "
        f"(r={info['r']}, lora_alpha={info['exported_lora_alpha']:g})"
        for path, info in infos.items()
    ]
    if vllm and infos:
        stem = name or Path(adapter_dir).resolve().name
        served = {
            f"{stem}-r{info['rank']}" if len(infos) > 1 else stem: path.resolve() for path, info in infos.items()
        }
        first = next(iter(infos.values()))
        check, shapes = first["vllm"], first["vllm"]["base_config_checked"]
        lines.append(f"checked by {check['rules']}; shapes "
                     + (f"match {shapes}" if shapes else
                        f"NOT checked against the base: {check['base_config_not_checked_because']}"))
        lines.append("serve with:")
        lines.append(serve_command(first["base_model"], served, max(info["r"] for info in infos.values())))
    return lines

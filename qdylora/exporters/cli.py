"""`qdylora export adapter|merged`: ship one rank (or several) of a trained adapter."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError


@click.group("export")
def export() -> None:
    """Ship a rank of a QDyLoRA adapter as a PEFT/vLLM adapter or a merged model."""


def _ranks(rank: str | None, ranks: str | None) -> list[int | str] | None:
    """--rank B (one folder) or --ranks LIST (one subfolder per rank); None means --rank."""
    from ..cli import parse_ranks

    if (rank is None) == (ranks is None):
        raise InputError("give exactly one of --rank B or --ranks LIST (e.g. --ranks 2,8,16)")
    if ranks is None:
        return None
    try:
        return parse_ranks(None, None, ranks)
    except click.BadParameter as exc:
        raise InputError(f"--ranks: {exc.message}") from exc


@export.command("adapter")
@click.argument("adapter_dir", type=click.Path())
@click.option("--rank", default=None, help="Rank b to export (r_min..r_max), or 'recommended' (the sweep's pick).")
@click.option("--ranks", default=None, help="Several ranks, e.g. 2,8,16: one subfolder OUT/rank-<b> per rank.")
@click.option("--out", required=True, type=click.Path(), help="Folder to create.")
@click.option("--vllm", is_flag=True, help="Check vLLM's rules, pad to an allowed max_lora_rank, print the serve line.")
@click.option("--pad-to", type=int, default=None, help="Zero-pad to this rank (alpha rescaled; output unchanged).")
@click.option("--name", default=None, help="Name of the adapter in the vllm serve line (default: ADAPTER_DIR's name).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--force", is_flag=True, help="Export an adapter without qdylora_config.json (not trained with qdylora).")
def adapter(adapter_dir: str, rank, ranks, out: str, vllm: bool, pad_to, name, overwrite: bool, force: bool) -> None:
    """Write rank b of ADAPTER_DIR as a standard PEFT LoRA adapter (r = b, same lora_alpha)."""
    from . import export_adapter, export_adapters, read_export_info, serve_command

    many = _ranks(rank, ranks)
    if many is None:
        written = {0: export_adapter(adapter_dir, out, rank, pad_to=pad_to, vllm=vllm, overwrite=overwrite, force=force)}
    else:
        written = export_adapters(adapter_dir, out, many, pad_to=pad_to, vllm=vllm, overwrite=overwrite, force=force)
    infos = {path: read_export_info(path) for path in written.values()}
    for path, info in infos.items():
        click.echo(
            f"rank {info['rank']} of {adapter_dir} (r_max {info['r_max']}) -> {path}  "
            f"(r={info['r']}, lora_alpha={info['exported_lora_alpha']:g})"
        )
    if vllm:
        stem = name or Path(adapter_dir).resolve().name
        served = {
            f"{stem}-r{info['rank']}" if len(infos) > 1 else stem: Path(path).resolve() for path, info in infos.items()
        }
        base = next(iter(infos.values()))["base_model"]
        click.echo("serve with:")
        click.echo(serve_command(base, served, max(info["r"] for info in infos.values())))

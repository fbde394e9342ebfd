"""`qdylora export adapter|merged`: ship one rank (or several) of a trained adapter."""

from __future__ import annotations

import click

from ..errors import InputError
from .params import METHOD_HELP, RankList, check_method_option


@click.group("export")
def export() -> None:
    """Ship a rank of a QDyLoRA adapter as a PEFT/vLLM adapter or a merged model."""


def _ranks(rank: str | None, ranks: list | None) -> list[int | str] | None:
    """--rank B (one folder) or --ranks LIST (one subfolder per rank); None means --rank."""
    if (rank is None) == (ranks is None):
        raise InputError("give exactly one of --rank B or --ranks LIST (e.g. --ranks 2,8,16)")
    return ranks


@export.command("adapter")
@click.argument("adapter_dir", type=click.Path())
@click.option("--rank", default=None, help="Rank b to export (r_min..r_max), or 'recommended' (the sweep's pick).")
@click.option("--ranks", default=None, type=RankList(recommended=True),
              help="Several ranks, e.g. 2,8,16, 1-4 or recommended: one subfolder OUT/rank-<b> per rank.")
@click.option("--out", required=True, type=click.Path(), help="Folder to create.")
@click.option("--vllm", is_flag=True, help="Check vLLM's rules and the shapes against the base first; print the serve line.")
@click.option("--pad-to", type=int, default=None, help="Zero-pad to this rank (alpha rescaled; output unchanged; vLLM does not need it).")
@click.option("--name", default=None, help="Name of the adapter in the vllm serve line (default: ADAPTER_DIR's name).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--force", is_flag=True, help="Prefix-cut an adapter without qdylora_config.json (not trained with qdylora).")
@click.option("--method", default=None, callback=check_method_option, help=METHOD_HELP)
def adapter(adapter_dir: str, rank, ranks, out: str, vllm: bool, pad_to, name, overwrite: bool, force: bool, method) -> None:
    """Write rank b of ADAPTER_DIR as a standard PEFT LoRA adapter (r = b, same lora_alpha)."""
    from ..exporters import export_adapter, export_adapters, export_report

    many = _ranks(rank, ranks)
    options = dict(pad_to=pad_to, vllm=vllm, overwrite=overwrite, force=force, method=method)
    if many is None:
        paths = [export_adapter(adapter_dir, out, rank, **options)]
    else:
        paths = list(export_adapters(adapter_dir, out, many, **options).values())
    click.echo("\n".join(export_report(adapter_dir, paths, vllm=vllm, name=name)))


@export.command("merged")
@click.argument("adapter_dir", type=click.Path())
@click.option("--rank", required=True, help="Rank b to merge (r_min..r_max), or 'recommended' (the sweep's pick).")
@click.option("--out", required=True, type=click.Path(), help="Model folder to create.")
@click.option("--base", default=None, help="Base model folder (default: the adapter's base_model_name_or_path).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True)
@click.option(
    "--base-weights", type=click.Choice(["original", "nf4"]), default="original", show_default=True,
    help="Merge into the checkpoint's W, or into dequant(NF4(W)), the weights QLoRA training saw.",
)
@click.option(
    "--compute-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
    help="With --base-weights nf4: the dtype the base was loaded in for training (default: bf16 on a bf16 GPU, else fp32).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--force", is_flag=True, help="Prefix-cut an adapter without qdylora_config.json (not trained with qdylora).")
@click.option("--method", default=None, callback=check_method_option, help=METHOD_HELP)
def merged(
    adapter_dir: str, rank: str, out: str, base, dtype: str, base_weights: str, compute_dtype, overwrite: bool,
    force: bool, method,
) -> None:
    """Merge rank b of ADAPTER_DIR into its base: a standalone transformers model folder (streamed shard by shard)."""
    from ..exporters import export_merged, read_export_info

    path = export_merged(
        adapter_dir, out, rank, base_model=base, dtype=dtype, base_weights=base_weights,
        compute_dtype=compute_dtype, overwrite=overwrite, force=force, method=method,
    )
    info = read_export_info(path)
    click.echo(
        f"rank {info['rank']} ({info['method']}) of {adapter_dir} merged into {info['base_folder']} ({base_weights} weights, {dtype}) -> {path}"
    )

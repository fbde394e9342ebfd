"""`qdylora sweep ADAPTER --data FILE`: measure every rank of a trained adapter, recommend one."""

from __future__ import annotations

import click

from .params import RankList, data_options


@click.command()
@click.argument("adapter_dir", type=click.Path())
@data_options
@click.option("--ranks", type=RankList(), help="Ranks to measure, e.g. 1,2,4,8 or 1-4,16 (default: the config's).")
@click.option("--base", default=None, help="Base model (default: the adapter's base_model_name_or_path).")
@click.option("--refine", is_flag=True, help="Then measure every rank between the best coarse neighbours.")
@click.option("--tolerance", default=0.01, show_default=True, help="Recommend the smallest rank within this relative gap of the best.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--no-4bit", is_flag=True, help="Load the base unquantized.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Where to write rank_sweep.json/png (default: ADAPTER_DIR).")
@click.option("--sample-prompts", default=None, type=click.Path(dir_okay=False), help="Also answer these prompts at every rank (one per line, or JSONL); stored in rank_sweep.json.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1), help="Length of the sample answers.")
@click.option(
    "--method", "methods", default=None,
    help="Truncation methods to measure each rank under, e.g. prefix,svd (svd: the top-b SVD of each layer's delta); "
    "the recommendation is then a (rank, method). Default: prefix for a QDyLoRA run, svd,prefix for a plain LoRA adapter.",
)
def sweep(adapter_dir: str, data_path: str, prompt_field, answer_field, template, max_length, limit, ranks, base,
          refine, tolerance, batch_size, no_4bit, out, sample_prompts, max_new_tokens, methods) -> None:
    """Measure every rank of a trained adapter and recommend one."""
    from ..config import check_methods
    from ..data import DataSpec
    from ..generation import format_samples, read_prompts
    from ..workflow import sweep_adapter

    methods = check_methods(methods) if methods is not None else None
    spec = DataSpec(
        path=data_path, prompt_field=prompt_field, answer_field=answer_field,
        template=template, max_length=max_length, limit=limit,
    )
    prompts = read_prompts(sample_prompts) if sample_prompts else None
    result = sweep_adapter(
        adapter_dir, spec, ranks, base_model=base, load_in_4bit=not no_4bit,
        refine=refine, tolerance=tolerance, batch_size=batch_size, out_dir=out,
        sample_prompts=prompts, sample_kwargs={"max_new_tokens": max_new_tokens}, methods=methods,
    )
    if result.samples:
        click.echo(format_samples(result.sample_prompts, result.samples) + "\n")
    click.echo(result.table())
    where = out or adapter_dir
    pick = f"{result.recommended_rank}" + (f" ({result.recommended_method})" if len(result.methods) > 1 else "")
    click.echo(f"recommended rank: {pick}  (rank_sweep.json and rank_sweep.png in {where})")

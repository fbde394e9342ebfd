"""`qdylora heal CONFIG.yaml --rank B --out DIR`: train one rank's cut of a finished run alone, briefly."""

from __future__ import annotations

import click

from ..config import HealSettings
from .params import UserError, settings_options


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--rank", default=None,
              help="Rank b to heal (1..r_max), or 'recommended' (the run's sweep's pick); default: CONFIG's heal.rank.")
@click.option("--out", required=True, type=click.Path(), help="Folder to create: the healed rank-b PEFT adapter.")
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(),
              help="The run's adapter folder (default: the CONFIG's training.output_dir).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@settings_options(HealSettings, skip=("rank",))
def heal(config: str, rank: str | None, out: str, adapter_dir, overwrite: bool, **settings) -> None:
    """Heal rank b of the run CONFIG trained: its cut, trained alone on the same data for a tenth of
    the run's steps at 0.3x its learning rate (what matched a run trained for rank b in benchmarks/).
    CONFIG's heal: section, if any, gives the defaults; the options override it."""
    import dataclasses

    from ..recipe import Recipe
    from ..workflow import heal as heal_rank

    recipe = Recipe.from_yaml(config)
    chosen = dataclasses.replace(recipe.heal or HealSettings(), **{k: v for k, v in settings.items() if v is not None})
    rank = rank if rank is not None else chosen.rank
    if rank is None:
        raise UserError("--rank: give the rank to heal (an integer, or recommended), or set heal.rank in CONFIG")
    result = heal_rank(recipe, rank, out, chosen, adapter_dir=adapter_dir, overwrite=overwrite)
    click.echo("\n".join(result.report()))

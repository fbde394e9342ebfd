"""`qdylora heal CONFIG.yaml --rank B --out DIR` (or `--ranks 1,4,recommended`): train one rank's cut
of a finished run alone, briefly (each rank's, on its own)."""

from __future__ import annotations

import click

from ..config import HealSettings
from .params import RankList, UserError, settings_options


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--rank", default=None,
              help="Rank b to heal (1..r_max), or 'recommended' (the run's sweep's pick); default: CONFIG's heal.rank.")
@click.option("--ranks", default=None, type=RankList(recommended=True),
              help="Several ranks, e.g. 1,4,16 or 1-4,recommended: each healed on its own into OUT/rank-<b>/.")
@click.option("--out", required=True, type=click.Path(),
              help="Folder to create: the healed rank-b PEFT adapter (with --ranks: one subfolder per rank).")
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(),
              help="The run's adapter folder (default: the CONFIG's training.output_dir).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@settings_options(HealSettings, skip=("rank", "holdout"))  # holdout: the run's record decides (workflow.heal)
def heal(config: str, rank: str | None, ranks: list | None, out: str, adapter_dir, overwrite: bool,
         **settings) -> None:
    """Heal rank b of the run CONFIG trained: its cut, trained alone on the same data (on the records the
    run held back for healing, if heal.holdout made it hold some) for a tenth of the run's steps at 0.3x
    its learning rate (what matched a run trained for rank b in benchmarks/).
    CONFIG's heal: section, if any, gives the defaults (a list in heal.rank works as --ranks); the
    options override it."""
    import dataclasses

    from ..recipe import Recipe
    from ..workflow import heal as heal_rank
    from ..workflow import heal_ranks

    if rank is not None and ranks is not None:
        raise UserError("give one of --rank B or --ranks LIST (e.g. --ranks 1,4,16), not both")
    recipe = Recipe.from_yaml(config)
    chosen = dataclasses.replace(recipe.heal or HealSettings(), **{k: v for k, v in settings.items() if v is not None})
    if rank is None and ranks is None:
        if chosen.rank is None:
            raise UserError("--rank: give the rank to heal (an integer, or recommended; --ranks for several), or set "
                            "heal.rank in CONFIG")
        rank, ranks = (None, chosen.ranks) if isinstance(chosen.rank, list) else (chosen.rank, None)
    if ranks is None:
        results = [heal_rank(recipe, rank, out, chosen, adapter_dir=adapter_dir, overwrite=overwrite)]
    else:
        results = list(heal_ranks(recipe, ranks, out, chosen, adapter_dir=adapter_dir, overwrite=overwrite).values())
    click.echo("\n".join(line for result in results for line in result.report()))

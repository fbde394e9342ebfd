"""`qdylora train CONFIG.yaml`: one run (train, save, sweep, export) from a YAML recipe."""

from __future__ import annotations

import click


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Train into an existing, non-empty output_dir.")
@click.option("--resume", is_flag=True, help="Resume from the last checkpoint in output_dir.")
def train(config: str, overwrite: bool, resume: bool) -> None:
    """Train from a YAML CONFIG (model, data, lora, qdylora, training, sweep, export, samples)."""
    from ..recipe import Recipe
    from ..workflow import run

    result = run(Recipe.from_yaml(config), overwrite=overwrite, resume=resume)
    if result.trainer.is_world_process_zero():
        click.echo("\n".join(result.report()))

"""`qdylora info ADAPTER`: how an adapter was trained and, if measured, its ranks (reads JSON only)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click


@click.command()
@click.argument("adapter_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print qdylora_config.json as it is.")
def info(adapter_dir: str, as_json: bool) -> None:
    """Show how an adapter was trained and, if measured, its ranks."""
    from ..adapter_io import check_adapter

    files = check_adapter(adapter_dir, force=True)  # the same consistency checks as every other command
    data = files.qdylora
    if as_json:  # qdylora_config.json as it is (null for a plain LoRA adapter)
        click.echo(json.dumps(data, indent=2))
        return
    peft_cfg = files.peft_config
    config = files.config
    trained = ("not trained with qdylora (a plain LoRA adapter: lower ranks are read by svd)" if data is None
               else data.get("qdylora_version"))
    click.echo(f"{'adapter:':<15}{Path(adapter_dir).resolve()}")
    click.echo(f"{'base model:':<15}{peft_cfg.get('base_model_name_or_path')}")
    click.echo(f"{'qdylora:':<15}{trained}")
    click.echo(f"{'lora_alpha:':<15}{peft_cfg.get('lora_alpha')}  rsLoRA: {bool(peft_cfg.get('use_rslora'))}")
    click.echo(f"{'targets:':<15}{peft_cfg.get('target_modules')}")
    click.echo(f"{'ranks:':<15}{config.r_min}..{config.r_max}" + (f" (only {config.ranks})" if config.ranks else ""))
    click.echo(f"{'read by:':<15}{config.default_method}" + ("" if config.lower_ranks_trained else
               " (only the full rank was trained: lower ranks are its SVD truncations)"))
    if data is not None:  # every other QDyLoRA setting, as the config defines them
        for f in dataclasses.fields(config):
            if f.name not in ("r_min", "r_max", "ranks"):
                click.echo(f"{f.name + ':':<15}{getattr(config, f.name)}")
    sweep = files.sweep()
    if sweep is not None:
        click.echo("sweep:")
        click.echo(sweep.table())
    else:
        click.echo(f"{'sweep:':<15}not measured yet (qdylora sweep ADAPTER_DIR --data FILE)")

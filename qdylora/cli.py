"""`qdylora` command line: a thin click layer over the Python API.

Bad input (unknown keys, missing files, ranks out of range) prints one line and exits 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from .errors import InputError


class UserError(click.ClickException):
    """An `InputError` on its way out: one line on stderr, exit code 2."""

    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as exc:
            raise UserError(str(exc)) from exc


def parse_ranks(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> list[int] | None:
    """'1,2,8' or '1-4,8' -> [1, 2, 8] / [1, 2, 3, 4, 8]; anything else is a usage error."""
    if value is None:
        return None
    ranks: set[int] = set()
    try:
        for part in value.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                ranks.update(range(lo, hi + 1))
            else:
                ranks.add(int(part))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of ranks such as 1,2,8 or 1-4,16") from None
    if min(ranks) < 1:
        raise click.BadParameter(f"ranks must be >= 1, got {value!r}")
    return sorted(ranks)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qdylora")
def main() -> None:
    """QDyLoRA: train one 4-bit LoRA adapter, then use any rank from r_min to r_max."""
    _show_qdylora_messages()


class _EchoHandler(logging.Handler):
    """The `qdylora` logger's warnings on the terminal's stderr, as plain lines."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _show_qdylora_messages() -> None:
    log = logging.getLogger("qdylora")
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        log.addHandler(_EchoHandler(logging.INFO))
    log.setLevel(logging.INFO)
    log.propagate = False


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Train into an existing, non-empty output_dir.")
@click.option("--resume", is_flag=True, help="Resume from the last checkpoint in output_dir.")
def train(config: str, overwrite: bool, resume: bool) -> None:
    """Train from a YAML CONFIG (model, data, lora, qdylora, training, sweep)."""
    from .recipe import Recipe, run

    recipe = Recipe.from_yaml(config)
    trainer = run(recipe, overwrite=overwrite, resume=resume)
    out = recipe.training["output_dir"]
    if trainer.rank_sweep is not None:
        click.echo(trainer.rank_sweep.table())
        sweep = trainer.rank_sweep
        click.echo(
            f"recommended rank: {sweep.recommended_rank}"
            + (f" ({sweep.recommended_method})" if len(sweep.methods) > 1 else "")
        )
    click.echo(f"adapter (r_max={trainer.qdylora_config.r_max}) and qdylora_config.json written to {out}")


def data_options(fn):
    """Options that say how a prompt/answer file becomes evaluation examples."""
    for opt in reversed(
        [
            click.option("--data", "data_path", required=True, help="JSON/JSONL file (or datasets name) to evaluate on."),
            click.option("--prompt-field", default=None, help="Prompt column (default: auto-detected)."),
            click.option("--answer-field", default=None, help="Answer column (default: auto-detected)."),
            click.option("--template", default="{prompt}\n", show_default=True, help="Prompt template."),
            click.option("--max-length", default=512, show_default=True, type=int),
            click.option("--limit", default=None, type=int, help="Use only the first N records."),
        ]
    ):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("adapter_dir", type=click.Path())
@data_options
@click.option("--ranks", callback=parse_ranks, help="Ranks to measure, e.g. 1,2,4,8 (default: the config's).")
@click.option("--base", default=None, help="Base model (default: the adapter's base_model_name_or_path).")
@click.option("--refine", is_flag=True, help="Then measure every rank between the best coarse neighbours.")
@click.option("--tolerance", default=0.01, show_default=True, help="Recommend the smallest rank within this relative gap of the best.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--no-4bit", is_flag=True, help="Load the base unquantized.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Where to write rank_sweep.json/png (default: ADAPTER_DIR).")
@click.option("--sample-prompts", default=None, type=click.Path(dir_okay=False), help="Also answer these prompts at every rank (one per line, or JSONL); stored in rank_sweep.json.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1), help="Length of the sample answers.")
@click.option(
    "--method", "methods", default="prefix", show_default=True,
    help="Truncation methods to measure each rank under, e.g. prefix,svd (svd: the top-b SVD of each layer's delta); "
    "the recommendation is then a (rank, method).",
)
def sweep(adapter_dir: str, data_path: str, prompt_field, answer_field, template, max_length, limit, ranks, base, refine, tolerance, batch_size, no_4bit, out, sample_prompts, max_new_tokens, methods) -> None:
    """Measure every rank of a trained adapter and recommend one."""
    from .data import DataSpec
    from .generation import format_samples, read_prompts
    from .trainer_ext.sweep import check_methods, sweep_adapter

    methods = check_methods(methods)

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


@main.command()
@click.argument("adapter_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print qdylora_config.json as it is.")
def info(adapter_dir: str, as_json: bool) -> None:
    """Show how an adapter was trained and, if measured, its ranks."""
    from .adapter_io import check_adapter
    from .trainer_ext.sweep import SweepResult

    files = check_adapter(adapter_dir)  # the same consistency checks as every other command
    data = files.qdylora
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    peft_cfg = files.peft_config
    cfg = files.config.to_dict()
    click.echo(f"adapter:       {Path(adapter_dir).resolve()}")
    click.echo(f"base model:    {peft_cfg.get('base_model_name_or_path')}")
    click.echo(f"qdylora:       {data.get('qdylora_version')}")
    click.echo(f"ranks:         {cfg['r_min']}..{cfg['r_max']}" + (f" (only {cfg['ranks']})" if cfg.get("ranks") else ""))
    click.echo(f"lora_alpha:    {peft_cfg.get('lora_alpha')}  rsLoRA: {bool(peft_cfg.get('use_rslora'))}")
    click.echo(f"targets:       {peft_cfg.get('target_modules')}")
    for key in ("distribution", "update", "sample_every", "seed", "eval_ranks", "truncation", "scaling",
                "anchor_ranks", "loss_weight"):
        click.echo(f"{key + ':':<15}{cfg.get(key)}")
    if data.get("sweep"):
        result = SweepResult.from_dict(data["sweep"])
        click.echo("sweep:")
        click.echo(result.table())
    else:
        click.echo("sweep:         not measured yet (qdylora sweep ADAPTER_DIR --data FILE)")


from .exporters.cli import export  # noqa: E402
main.add_command(export)
from .generate_cli import generate  # noqa: E402
main.add_command(generate)
from .demo.cli import demo  # noqa: E402
main.add_command(demo)
from .plan import plan_command  # noqa: E402
main.add_command(plan_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

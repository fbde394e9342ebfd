"""`qdylora generate`: answer the same prompts at several ranks of one adapter, side by side."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError, check_output_file
from .params import RankList, check_method_option


@click.command()
@click.argument("adapter_dir", type=click.Path())
@click.option("--ranks", required=True, type=RankList(), help="Ranks to answer at, e.g. 1,8,16,64 or 1-4,16.")
@click.option("--prompt", "prompt_texts", multiple=True, help="A prompt (repeat for several; they come before those of --prompts).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help="File: one prompt per line, or JSONL with a prompt field.")
@click.option("--base", default=None, help="Base model (default: the adapter's base_model_name_or_path).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--raw", is_flag=True, help="Do not wrap prompts in the tokenizer's chat template.")
@click.option("--template", default="{prompt}", show_default=True, help="How a prompt is written, {prompt} replaced. Adapters from `qdylora train` saw '{prompt}' and a newline (bash: $'{prompt}\\n').")
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding (seeded: every rank draws the same stream).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None, help="Sampling temperature (with --do-sample).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Nucleus sampling mass (with --do-sample).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Sampling seed, set before each rank.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Prompts per generate call (left-padded).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write prompts and answers to this JSON file.")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it exists.")
@click.option("--no-4bit", is_flag=True, help="Load the base unquantized (default: NF4, as trained).")
@click.option("--method", default=None, callback=check_method_option,
              help="How rank b is cut: prefix (the first b rows/columns) or svd (each layer's delta SVD-truncated, "
              "what `export --method svd` writes). Default: prefix for a QDyLoRA run, svd for a plain LoRA adapter.")
def generate(
    adapter_dir: str,
    ranks: list[int],
    prompt_texts: tuple[str, ...],
    prompts_file: str | None,
    base: str | None,
    max_new_tokens: int,
    raw: bool,
    template: str,
    do_sample: bool,
    temperature: float | None,
    top_p: float | None,
    seed: int,
    batch_size: int,
    json_out: str | None,
    overwrite: bool,
    no_4bit: bool,
    method: str | None,
) -> None:
    """Answer prompts at several ranks of one adapter (the base is loaded once)."""
    from .. import loading
    from ..adapter_io import check_adapter
    from ..config import write_json_atomic
    from ..data import check_template
    from ..generation import format_samples, generate_across_ranks, read_prompts, samples_by_prompt

    # everything that can be wrong is checked before the (slow) model load
    prompts = list(prompt_texts) + (read_prompts(prompts_file) if prompts_file else [])
    if not prompts:
        raise InputError("give at least one --prompt TEXT or --prompts FILE")
    if not do_sample and (temperature is not None or top_p is not None):
        raise InputError("--temperature and --top-p only apply with --do-sample")
    check_template(template, "--template")
    if json_out:
        check_output_file(json_out, overwrite, "--json")
    files = check_adapter(adapter_dir, methods=[method] if method else None)
    method = method or files.default_method
    files.config.check_ranks(ranks, what="--ranks")

    model, tokenizer, _ = loading.load_adapter(adapter_dir, base_model=base, load_in_4bit=not no_4bit, files=files)
    settings: dict = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        settings.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
    samples = generate_across_ranks(
        model, tokenizer, prompts, ranks, chat_template=not raw, template=template,
        batch_size=batch_size, seed=seed, progress=True, method=method, **settings,
    )
    click.echo(format_samples(prompts, samples))
    if json_out:
        chat = bool(getattr(tokenizer, "chat_template", None)) and not raw
        payload = {
            "adapter": str(Path(adapter_dir).resolve()),
            "base": base or model.peft_config[model.active_adapter].base_model_name_or_path,
            "load_in_4bit": not no_4bit,
            "ranks": ranks,
            "method": method,
            "generation": {**settings, "seed": seed, "chat_template": chat, "template": template},
            "prompts": samples_by_prompt(prompts, samples),
        }
        write_json_atomic(json_out, payload)
        click.echo(f"written to {json_out}", err=True)

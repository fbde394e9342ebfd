"""Where a run happens, top to bottom: check -> build -> train -> save -> sweep -> export -> report.

`run(recipe)` is `qdylora train CONFIG.yaml` and `qdylora demo` (the demo is a `Recipe`).
The Axolotl plugin trains with Axolotl's own loop and calls the same steps after it:
`sweep`, `record` and `export`, then logs `report`. `sweep_adapter` measures a saved
adapter folder (`qdylora sweep`). `heal(recipe, rank, out)` (`qdylora heal`, or the YAML's
`heal:` section right after the run) trains one rank's cut of a finished run alone for a short
while: the same `run`, started from the cut.

Everything that can be checked is checked before the model loads, the adapter is saved
BEFORE the sweep (nothing after training can lose it), and a run refused before training
leaves no output folder behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ExportSettings, HealSettings, QDyLoraConfig, SweepSettings, check_methods
from .errors import InputError, check_creatable, is_int
from .recipe import Recipe
from .sweep_result import SweepResult, save_sweep

EXPORTS_DIR = "qdylora-exports"  # <output_dir>/qdylora-exports/rank-<b>/
HEALED_DIR = "qdylora-healed"  # <output_dir>/qdylora-healed/rank-<b>/ (the YAML's heal: section)


@dataclass
class RunResult:
    """What a run wrote: the adapter (r_max), its sweep, its exports ({rank: folder})."""

    adapter_dir: Path
    trainer: Any
    sweep: SweepResult | None = None
    exports: dict[int, Path] = field(default_factory=dict)
    vllm: bool = False
    healed: list[HealResult] = field(default_factory=list)  # the heal: section's ranks, in order

    def report(self) -> list[str]:
        """The lines a user reads at the end: the sweep table, the pick, where things are."""
        lines = report(self.adapter_dir, self.trainer.qdylora_config.r_max, self.sweep, self.exports, vllm=self.vllm)
        return lines + [line for h in self.healed for line in h.report()]


def run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Train, save the adapter (r_max) with qdylora_config.json, sweep, export, as the recipe says;
    with `recipe.heal`, then heal each of its ranks into <output_dir>/qdylora-healed/rank-<b>/ (`heal`;
    the run's model is released first: two would not fit where one barely does)."""
    from .distributed import world_size

    out = Path(recipe.training["output_dir"])
    recipe.training_args()  # TrainingArguments' own checks (optim name, bf16 on this machine, ...)
    if recipe.heal is not None and recipe.heal.ranks and world_size() > 1:
        raise InputError("heal: healing runs in one process; drop heal.rank under accelerate launch (heal.holdout alone "
                         "still holds records back) and heal afterwards (qdylora heal, or lora_model_dir: in a train YAML)")
    checkpoint = check_output_dir(out, overwrite=overwrite, resume=resume)
    existed = out.exists()
    try:
        trainer, held = build(recipe)
        train_from(trainer, checkpoint)
    except BaseException:
        if not existed:
            _remove_empty_tree(out)  # only what this run created and left empty
        raise
    trainer.save_model(str(out))  # the adapter is safe on disk before anything else runs
    result = sweep(trainer, recipe.sweep, out)
    record(trainer, out, held)
    exports = export(out, recipe.export) if trainer.is_world_process_zero() else {}
    healed: dict[int, HealResult] = {}
    if recipe.heal is not None and recipe.heal.ranks:  # each rank into qdylora-healed/rank-<b>/, as heal_ranks
        _release(trainer)
        healed = _heal(recipe, recipe.heal.ranks, out / HEALED_DIR, recipe.heal, adapter_dir=None, overwrite=True,
                       inside_run=True, subfolders=True)
    return RunResult(out, trainer, result, exports, vllm=recipe.export.vllm, healed=list(healed.values()))


def _release(trainer: Any) -> None:
    """Free the trainer's model and optimizer (a second model is about to load); the trainer
    keeps its arguments and qdylora config for the report."""
    import gc

    import torch

    trainer.model = trainer.model_wrapped = None
    trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


HEAL_INFO = "qdylora_heal.json"  # beside a healed adapter: where it came from and how it was healed
HELD_OUT = "heal_data"  # qdylora_config.json's record of the records a run held back for healing (heal.holdout)


@dataclass
class HealResult:
    """A healed rank: the folder, the cut it started from, and both measurements when known."""

    adapter_dir: Path
    info: dict[str, Any]

    def report(self) -> list[str]:
        i = self.info
        before, after, metric = i.get("cut_" + i["metric"]), i.get("healed_" + i["metric"]), i["metric"]
        held = f" on the {i['held_out_records']} records the run held back" if i.get("held_out_records") else ""
        lines = [f"rank {i['rank']} ({i['method']} cut of {i['source']}) healed for {i['steps']} steps at learning "
                 f"rate {i['learning_rate']:g}{held} -> {self.adapter_dir}"]
        if after is not None:
            was = f"{before:.4f} as cut (the run's sweep) -> " if before is not None else ""
            lines.append(f"{metric} at rank {i['rank']}: {was}{after:.4f} healed")
        if "tried" in i:
            each = ", ".join(f"{m} {t['healed_' + metric]:.4f}" for m, t in i["tried"].items())
            lines.append(f"healed from each cut: {each}; kept {i['method']}")
        return lines


def heal(recipe: Recipe, rank: int | str, out: str | os.PathLike, settings: HealSettings | None = None, *,
         adapter_dir: str | os.PathLike | None = None, overwrite: bool = False, inside_run: bool = False) -> HealResult:
    """Train rank `rank` of the run `recipe` describes alone, briefly, on the same data: the
    run's rank-b cut (`settings.method`) exported, then `run` on a copy of the recipe that
    starts from it (`lora_model_dir`), trains every step at rank b (preset plain) for
    `settings.steps` (or steps_fraction x max_steps) at lr_factor x its learning rate,
    constant, with seed + seed_offset, and measures rank b on the recipe's eval data.

    `adapter_dir` is the run's adapter (default: the recipe's training.output_dir); `rank` an
    integer or "recommended" (the run's sweep's pick; healed from `settings.method`'s cut, by
    default the adapter's own reading, svd for a plain run, not the sweep's method). `out` receives a
    standard PEFT LoRA adapter of rank b (+ qdylora_config.json, qdylora_heal.json); it is
    written to a temporary folder and renamed into place, refused if it exists (unless
    `overwrite`) or is the run or the base being read (`inside_run`: a new subfolder of the
    run is allowed, as the YAML's heal: section writes; the run's own files are only read).
    With several `settings.method`s, rank b (for "recommended": the sweep's pick) is healed
    from each cut in turn, the same way, and the better on the eval data is kept
    (qdylora_heal.json's "tried" has every cut's numbers): which start heals better depends
    on the task (benchmarks/results/real.md: prefix on GSM8K, svd on the demo and planted tasks).
    `heal_ranks` heals several ranks into one folder.

    Why: on every task we measured, the cut of one plain r_max run, healed this way, is as
    good as a run trained for that rank (benchmarks/results/planted.md, real.md) at a tenth of
    a run; an unhealed cut trails the dedicated run at low ranks.
    """
    return next(iter(_heal(recipe, [rank], out, settings, adapter_dir=adapter_dir, overwrite=overwrite,
                           inside_run=inside_run, subfolders=False).values()))


def heal_ranks(recipe: Recipe, ranks: Sequence[int | str], out: str | os.PathLike,
               settings: HealSettings | None = None, *, adapter_dir: str | os.PathLike | None = None,
               overwrite: bool = False) -> dict[int, HealResult]:
    """`heal` for several ranks (`qdylora heal --ranks 1,4,recommended`): each healed on its own, as
    `heal` heals it, into `out`/rank-<b>/; every rank is checked before the first healing, and `out`
    is written as one folder (a temporary one renamed into place). 'recommended' resolves to the
    sweep's rank and is healed once if listed too. Returns {b: HealResult}."""
    return _heal(recipe, ranks, out, settings, adapter_dir=adapter_dir, overwrite=overwrite, subfolders=True)


def _heal(recipe: Recipe, ranks: Sequence[int | str], out: str | os.PathLike, settings: HealSettings | None, *,
          adapter_dir: str | os.PathLike | None, overwrite: bool, inside_run: bool = False,
          subfolders: bool) -> dict[int, HealResult]:
    """Check every rank, then heal each into `out` (`subfolders`: into `out`/rank-<b>/)."""
    from .distributed import world_size
    from .exporters.source import SourceAdapter
    from .exporters.staging import staged_output

    settings = settings or HealSettings()
    if world_size() > 1:
        raise InputError("qdylora heal runs in one process; to heal on several, export the cut and train it with "
                         "`lora_model_dir:` in a train YAML under accelerate launch")
    methods = settings.methods
    settings.check_choosable(sweep_enabled=recipe.sweep.enabled, has_eval=bool(recipe.eval_data or recipe.eval_size))
    source_dir = Path(adapter_dir if adapter_dir is not None else recipe.training["output_dir"])
    source = SourceAdapter.open(source_dir, methods=methods)  # the prefix rule of each cut, before any work
    plan = heal_plan(source, ranks, methods)
    training = dict(recipe.training)
    run_steps = int(training.get("max_steps", -1))
    if settings.steps is None and run_steps <= 0:
        raise InputError("the recipe's training has no max_steps to take a fraction of; give the healing steps "
                         "(--steps N)")
    steps = settings.steps_for(run_steps)
    learning_rate = float(training.get("learning_rate", 5e-5)) * settings.lr_factor  # 5e-5: TrainingArguments'
    seed = int(training.get("seed", 42)) + settings.seed_offset
    for key in ("warmup_ratio", "warmup_steps", "num_train_epochs", "resume_from_checkpoint"):
        training.pop(key, None)
    training.update(max_steps=steps, learning_rate=learning_rate, lr_scheduler_type="constant", seed=seed,
                    save_strategy="no")
    if "data_seed" in training:
        training["data_seed"] = int(training["data_seed"]) + settings.seed_offset
    held = (source.qdylora or {}).get(HELD_OUT)  # the records the run held back for healing, if any
    if settings.holdout is not None and not held:
        raise InputError(f"heal.holdout is set, but the run in {source_dir} held nothing back for healing (it was "
                         "trained without heal.holdout): drop holdout to heal on the run's data, or train again with it")
    recorded = source.sweep()  # the run's: each cut's number, before healing
    how = {"source": str(source_dir.resolve()), "steps": steps, "learning_rate": learning_rate,
           "lr_scheduler_type": "constant", "seed": seed, "held_out_records": held["records"] if held else None,
           "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "rank"}}
    results: dict[int, HealResult] = {}
    with tempfile.TemporaryDirectory(prefix="qdylora-heal-data-") as data_dir:
        base = _held_out_recipe(recipe, held, source_dir, Path(data_dir)) if held else recipe
        with staged_output(out, overwrite=overwrite, protect=[source_dir, recipe.model], inside_ok=inside_run) as tmp:
            for b, picks in sorted(plan.items()):
                target = tmp / f"rank-{b}" if subfolders else tmp
                info = _heal_one(base, source_dir, picks, target, training, recorded, how)
                results[b] = HealResult(Path(out) / f"rank-{b}" if subfolders else Path(out), info)
    return results


def heal_plan(source: Any, ranks: Sequence[int | str], methods: Sequence[str | None]) -> dict[int, list[tuple[int, str]]]:
    """{b: the (b, method) cuts rank b is healed from} for `ranks` (integers or "recommended") and
    `methods` (None: the adapter's own reading) of a `SourceAdapter`: the one rule `qdylora heal`,
    the YAML's heal: section and the Axolotl plugin follow. A rank listed twice ("recommended" being
    one already listed) is healed once. Raises InputError for a rank or method the adapter refuses."""
    plan: dict[int, list[tuple[int, str]]] = {}
    for rank in ranks:
        if methods[0] is not None and len(methods) == 1:  # as `export adapter --rank R --method M`
            picks = [source.resolve(rank, methods[0])]
        else:
            # the adapter's own reading (None), or several cuts: one rank for all, "recommended" being
            # the sweep's pick whatever the method it was picked under. The sweep ranks UNHEALED cuts,
            # and that order does not tell which start heals better (benchmarks/results/real.md: on the
            # demo task the prefix cut is the better cut and the worse start), so the default start
            # stays the adapter's own reading (svd for a plain run), as every healing measured there.
            b = source.resolve_rank(rank, "svd")  # (the prefix cut's warning, if any, comes from resolve)
            picks = [source.resolve(b, m) for m in methods]
        plan.setdefault(picks[0][0], picks)
    return plan


def _heal_one(recipe: Recipe, source_dir: Path, picks: list[tuple[int, str]], target: Path,
              training: dict[str, Any], recorded: SweepResult | None, how: dict[str, Any]) -> dict[str, Any]:
    """Heal rank b from each of `picks`' cuts (`training`: the healing's arguments), keep the better
    in `target` with its qdylora_heal.json; returns that record."""
    from .exporters import export_adapter

    b = picks[0][0]
    sweep_settings = SweepSettings(enabled=recipe.sweep.enabled, ranks=[b], methods=["svd"])  # rank b = its r_max
    with tempfile.TemporaryDirectory(prefix="qdylora-cut-") as scratch:
        tried: dict[str, dict[str, Any]] = {}
        for b, method in picks:
            cut = export_adapter(source_dir, Path(scratch) / f"cut-{method}", b, method=method)
            healed_dir = target if len(picks) == 1 else Path(scratch) / f"healed-{method}"
            healing = dataclasses.replace(
                recipe, lora={}, lora_model_dir=str(cut), qdylora=QDyLoraConfig.preset("plain"),
                training={**training, "output_dir": str(healed_dir)}, split_seed=recipe.data_split_seed,
                sweep=sweep_settings, export=ExportSettings(),
                samples=dataclasses.replace(recipe.samples, ranks=[b]) if recipe.samples else None, heal=None,
            )
            healing.training_args()  # TrainingArguments' own checks, before the model loads
            result = run(healing, overwrite=True)
            measured = result.sweep or recorded
            metric = measured.metric if measured else "eval_loss"
            tried[method] = {
                "dir": healed_dir, "metric": metric, "greater": bool(measured and measured.greater_is_better),
                "cut": recorded.by_method.get(method, {}).get(b, {}).get(metric) if recorded else None,
                "healed": result.sweep.results.get(b, {}).get(metric) if result.sweep else None}
        # several cuts: keep the better healed one (every healing measured rank b on the same eval data)
        method = min(tried, key=lambda m: -tried[m]["healed"] if tried[m]["greater"] else tried[m]["healed"]) \
            if len(tried) > 1 else next(iter(tried))
        kept = tried[method]
        if kept["dir"] != target:
            shutil.copytree(kept["dir"], target, dirs_exist_ok=True)
        metric = kept["metric"]
        info = {"source": how["source"], "rank": b, "method": method, **{k: how[k] for k in (
                    "steps", "learning_rate", "lr_scheduler_type", "seed", "held_out_records")},
                "metric": metric, "settings": how["settings"],
                "cut_" + metric: kept["cut"], "healed_" + metric: kept["healed"]}
        if len(tried) > 1:
            info["tried"] = {m: {"cut_" + metric: t["cut"], "healed_" + metric: t["healed"]} for m, t in tried.items()}
        (target / HEAL_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def check_output_dir(out: Path, *, overwrite: bool, resume: bool) -> str | None:
    """Refuse an unusable output_dir; with `resume`, return the checkpoint to resume from (checked)."""
    from .adapter_io import WEIGHTS_NAME, tensor_shapes

    if out.exists() and not out.is_dir():
        raise InputError(f"training.output_dir {out} is a file; choose a folder")
    if not out.exists():
        check_creatable(out, "training.output_dir")
    if not resume:
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise InputError(f"output folder {out} exists and is not empty; pass --overwrite or --resume")
        return None
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        raise InputError(f"--resume: {out} has no checkpoint-N folder to resume from; drop --resume to start afresh")
    weights = Path(last) / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(f"--resume: {last} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    tensor_shapes(weights)  # a truncated checkpoint is refused here, not after loading the model
    refused = _refused_pickle(Path(last))  # and an optimizer/scheduler/rng file torch will not unpickle
    if refused is not None:
        raise InputError(_refused_pickle_message(refused))
    return last


def build(recipe: Recipe) -> tuple[Any, dict[str, Any] | None]:
    """The trainer a recipe describes (data read, split and tokenized, model loaded (4-bit), LoRA on,
    seeded), and the record of the records it holds back for healing (heal.holdout; None: none)."""
    from peft import PeftModel, get_peft_model
    from transformers import enable_full_determinism, set_seed

    from .data import collator, digest, load_records, load_tokenizer, resolve_fields, split_records, tokenize
    from .loading import check_model_folder, load_model
    from .trainer_ext import QDyLoraTrainer, RankSamplesCallback

    # cheap checks of the inputs first: model folder, data and its fields
    check_model_folder(recipe.model, recipe.trust_remote_code)
    if recipe.lora_model_dir is not None:
        check_start_adapter(recipe)
    records = load_records(recipe.data)
    if len(records) == 0:
        raise InputError(f"{recipe.data.path} holds no records")
    resolve_fields(recipe.data, records.column_names)
    eval_records = None
    if recipe.eval_data is not None:
        eval_records = load_records(recipe.eval_data)
        resolve_fields(recipe.eval_data, eval_records.column_names)

    # eval_size's part (without eval_data), then heal.holdout's of the rest: the records the healings train on
    records, split_eval, held = split_records(
        records, eval_size=recipe.eval_split_size, holdout=recipe.heal.holdout if recipe.heal is not None else None,
        seed=recipe.data_split_seed)
    held_record = None if held is None else {
        "holdout": recipe.heal.holdout, "split_seed": recipe.data_split_seed, "records": len(held),
        "sha256": digest(held)}

    tokenizer = load_tokenizer(recipe.model, recipe.trust_remote_code)
    eval_ds = None
    if eval_records is not None:
        eval_ds = tokenize(recipe.eval_data, tokenizer, eval_records)
    elif split_eval is not None:
        eval_ds = tokenize(recipe.data, tokenizer, split_eval)
    train_ds = tokenize(recipe.data, tokenizer, records)

    args = recipe.training_args()
    model = load_model(
        recipe.model,
        load_in_4bit=recipe.load_in_4bit,
        compute_dtype=recipe.compute_dtype,
        quant_storage=recipe.quant_storage,
        trust_remote_code=recipe.trust_remote_code,
        gradient_checkpointing=bool(args.gradient_checkpointing),
    )
    # seed BEFORE the LoRA layers are created: their initialisation draws random numbers
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    if recipe.lora_model_dir is None:
        model = get_peft_model(model, recipe.lora_config())
    else:  # Axolotl's lora_model_dir: train that adapter further (its r, alpha, targets, weights)
        model = PeftModel.from_pretrained(model, recipe.lora_model_dir, is_trainable=True)
        model.peft_config["default"].base_model_name_or_path = recipe.model  # as get_peft_model records it
    trainer = QDyLoraTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator(tokenizer),
        processing_class=tokenizer,
        qdylora_config=recipe.qdylora,
    )
    if recipe.samples is not None:
        trainer.add_callback(RankSamplesCallback(
            trainer, recipe.samples.prompts, recipe.samples.ranks, max_new_tokens=recipe.samples.max_new_tokens,
            template=recipe.data.template, chat_template=False,
        ))
    return trainer, held_record


def _held_out_recipe(recipe: Recipe, held: dict[str, Any], source_dir: Path, folder: Path) -> Recipe:
    """`recipe` with its data the records the run in `source_dir` held back for healing (`held`: its
    record), written to `folder` as JSONL, and its eval set the run's own (written there too when
    eval_size split it off `data`); refused if `data` no longer holds exactly those records."""
    from .data import digest, load_records, split_records

    _, eval_part, part = split_records(load_records(recipe.data), eval_size=recipe.eval_split_size,
                                       holdout=held["holdout"], seed=held["split_seed"])
    if len(part) != held["records"] or digest(part) != held["sha256"]:
        raise InputError(f"the run in {source_dir} held back {held['records']} records of {recipe.data.path} for "
                         f"healing (heal.holdout {held['holdout']}, split seed {held['split_seed']}), and that data "
                         "no longer gives them: heal with the data the run trained on")
    part.to_json(str(folder / "heal.jsonl"), lines=True)
    data = dataclasses.replace(recipe.data, path=str(folder / "heal.jsonl"), limit=None)
    eval_data = recipe.eval_data
    if eval_part is not None:
        eval_part.to_json(str(folder / "eval.jsonl"), lines=True)
        eval_data = dataclasses.replace(recipe.data, path=str(folder / "eval.jsonl"), limit=None)
    return dataclasses.replace(recipe, data=data, eval_data=eval_data, eval_size=None)


def check_start_adapter(recipe: Recipe) -> None:
    """Refuse a `lora_model_dir` adapter made for another model before the model loads (PEFT
    would fail on the first mismatched tensor with a traceback, after loading the base): every
    layer it adapts must exist in `recipe.model` with the shape its lora_A/lora_B need. Reads
    the adapter's header and the base's config only: no tensor of either is loaded."""
    import torch
    from transformers import AutoConfig

    from .adapter_io import check_adapter
    from .loading import skeleton

    files = check_adapter(recipe.lora_model_dir)
    config = AutoConfig.from_pretrained(recipe.model, trust_remote_code=recipe.trust_remote_code)
    problem = files.layer_shape_problem(skeleton(config, torch.float32, recipe.trust_remote_code), recipe.model)
    if problem:
        raise InputError(f"lora_model_dir: {problem}; point it at an adapter trained on {recipe.model}")


def train_from(trainer: Any, checkpoint: str | None) -> None:
    """`trainer.train(resume_from_checkpoint=checkpoint)`; a checkpoint file that torch refuses
    to unpickle (anything but plain tensors: `weights_only=True`) becomes one line naming it."""
    import pickle

    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except pickle.UnpicklingError as exc:
        if checkpoint is None:
            raise
        raise InputError(_refused_pickle_message(_refused_pickle(Path(checkpoint)) or checkpoint)) from exc


def sweep(trainer: Any, settings: SweepSettings, out_dir: str | os.PathLike) -> SweepResult | None:
    """The rank sweep on the trainer's eval set (every process measures; the main one writes
    rank_sweep.json/png into `out_dir`). None when disabled or without an eval set."""
    if not settings.enabled or trainer.eval_dataset is None:
        return None
    trainer.evaluate_ranks(  # methods None: the run's default (prefix; svd for preset plain)
        settings.ranks, refine=settings.refine, tolerance=settings.tolerance, methods=settings.methods
    )
    if trainer.is_world_process_zero():
        save_sweep(trainer.rank_sweep, out_dir)
    return trainer.rank_sweep


def record(trainer: Any, adapter_dir: str | os.PathLike, held: dict[str, Any] | None = None) -> None:
    """qdylora_config.json beside the saved adapter, with this run's sweep and the records it held
    back for healing (`build`'s; none of either: what an earlier run left there is replaced)."""
    if trainer.is_world_process_zero():
        sweep = trainer.rank_sweep.to_dict(samples=False) if trainer.rank_sweep is not None else None
        trainer.qdylora_config.save_pretrained(adapter_dir, sweep=sweep, **{HELD_OUT: held})


def export(adapter_dir: str | os.PathLike, settings: ExportSettings) -> dict[int, Path]:
    """Each rank of `settings` into adapter_dir/qdylora-exports/rank-<b>/ (replaced as a whole:
    it is the run's own subfolder; the adapter files are only read). {rank: folder}."""
    if not settings.ranks:
        return {}
    from .exporters import export_adapters

    adapter_dir = Path(adapter_dir)
    return export_adapters(
        adapter_dir, adapter_dir / EXPORTS_DIR, settings.ranks, vllm=settings.vllm, method=settings.method,
        overwrite=True, inside_adapter=True,
    )


def report(adapter_dir: Path, r_max: int | None, sweep: SweepResult | None, exports: dict[int, Path],
           *, vllm: bool = False) -> list[str]:
    """The closing lines of a run (printed by the CLI, logged by the Axolotl plugin)."""
    lines = []
    if sweep is not None:
        lines.append(sweep.table())
        pick = f"{sweep.recommended_rank}" + (f" ({sweep.recommended_method})" if len(sweep.methods) > 1 else "")
        lines.append(f"recommended rank: {pick} (the smallest within {sweep.tolerance:.0%} of the best {sweep.metric})")
    lines.append(f"adapter (r_max={r_max}) and qdylora_config.json written to {adapter_dir}")
    if exports:
        from .exporters import export_report

        lines.extend(export_report(adapter_dir, list(exports.values()), vllm=vllm))
    return lines


def sweep_adapter(
    adapter_dir: str | os.PathLike,
    data: Any,
    ranks: Sequence[int] | None = None,
    *,
    base_model: str | None = None,
    load_in_4bit: bool = True,
    refine: bool = False,
    tolerance: float = 0.01,
    batch_size: int = 8,
    out_dir: str | os.PathLike | None = None,
    sample_prompts: list[str] | None = None,
    sample_kwargs: dict[str, Any] | None = None,
    methods: Sequence[str] | None = None,
) -> SweepResult:
    """Sweep a saved adapter on a prompt/answer dataset (`data`: a `qdylora.data.DataSpec`).

    `methods`: measure every rank under each truncation method ("prefix", "svd"); default:
    the adapter's `sweep_methods` (prefix for a QDyLoRA run; svd and prefix for a plain LoRA
    adapter, whose better reading depends on the task).

    Writes rank_sweep.json and rank_sweep.png into `out_dir` (default: the adapter folder)
    and records the result in the adapter's qdylora_config.json. A plain LoRA adapter (not
    trained with qdylora) is swept with svd and prefix unless told otherwise (exports then accept
    its prefix cut, and `--rank recommended` takes the better reading); its record is the
    rank_sweep.json (it is given no qdylora_config.json, which would claim how it was trained). `sample_prompts` are
    answered at every rank, written with the data's template and no chat template (as
    the evaluation examples are) unless `sample_kwargs` says otherwise.
    """
    from transformers import TrainingArguments

    from .adapter_io import check_adapter
    from .data import collator, load_records, resolve_fields, tokenize
    from .loading import load_adapter
    from .trainer_ext import QDyLoraTrainer

    # the cheap checks first: adapter files, ranks, data, output folder; then the slow model load
    files = check_adapter(adapter_dir, methods=methods, measuring=True)  # measured here: prefix allowed
    methods = check_methods(methods or files.config.sweep_methods)
    ranks = list(ranks) if ranks is not None else files.config.sweep_ranks
    files.config.check_ranks(ranks)
    if not is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    records = load_records(data)
    if len(records) == 0:
        raise InputError(f"{data.path} holds no records")
    resolve_fields(data, records.column_names)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out {out_dir} is a file; give a folder")
    model, tokenizer, config = load_adapter(adapter_dir, base_model=base_model, load_in_4bit=load_in_4bit, files=files)
    eval_ds = tokenize(data, tokenizer, records)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=batch_size, report_to="none", remove_unused_columns=False
        )
        trainer = QDyLoraTrainer(
            model=model, args=args, eval_dataset=eval_ds, data_collator=collator(tokenizer), qdylora_config=config,
            processing_class=tokenizer,
        )
        sample_kwargs = {"template": data.template, "chat_template": False, **(sample_kwargs or {})}
        trainer.evaluate_ranks(
            ranks, refine=refine, tolerance=tolerance, sample_prompts=sample_prompts, sample_kwargs=sample_kwargs,
            methods=methods,
        )
    result = trainer.rank_sweep
    save_sweep(result, out_dir or adapter_dir)
    if files.qdylora is not None:  # a plain adapter's record is its rank_sweep.json: it gets no qdylora_config.json
        config.save_pretrained(adapter_dir, sweep=result.to_dict(samples=False))  # answers stay in rank_sweep.json
    return result


def _refused_pickle(checkpoint: Path) -> Path | None:
    """The first .pt/.pth file of a checkpoint that torch will not load with weights_only=True."""
    import pickle

    import torch

    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:  # mmap: the pickle is checked, the tensors' bytes are not read (cheap for a large optimizer.pt)
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # else a legacy (non-zip) file: check it the slow way
                return path
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError):
                return path
        except (pickle.UnpicklingError, EOFError):
            return path
    return None


def _refused_pickle_message(path: Path | str) -> str:
    return (f"--resume: {path} was refused: it is not a plain tensor file (torch.load(weights_only=True) "
            f"would have to run code from it); delete that checkpoint or resume from another")


def _remove_empty_tree(folder: Path) -> None:
    """Delete `folder` if it holds nothing but empty folders (never a file)."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir() and not sub.is_symlink() and not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()

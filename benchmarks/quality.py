"""Issue 8: which QDyLoRA recipe closes the gap to a dedicated QLoRA run at every rank?

Same setting as `paper_table.py` (SmolLM2-135M-Instruct, NF4 + double quant, LoRA on all
linear layers, alpha 16, 100 steps of batch 4 on the first 400 GSM8K train problems,
constant LR 5e-4, warmup 0.03, max grad norm 0.3). Each *variant* changes ONE thing
against the paper recipe (`paper`), through a `QDyLoraConfig` option or a training
argument; data order, LoRA init and rank draws follow the seed, so two variants at the
same seed differ only by that one thing.

Every run is measured (eval loss per answer token, at ranks 1, 4, 16, 64) on
- val:  train.jsonl problems 400..463, never trained on: what recipes are chosen on;
- test: the first 64 problems of test.jsonl (as in paper_table): reported at the end only.

    OMP_NUM_THREADS=1 python benchmarks/quality.py run paper qlora-r64 --seeds 0,1
    OMP_NUM_THREADS=1 python benchmarks/quality.py report        # -> benchmarks/results/quality.md
    python benchmarks/quality.py list                              # the variants

One run (100 steps) takes about 8 min of one CPU core; two processes side by side on two
cores take about as long. Results land in benchmarks/results/quality/runs/<variant>-s<seed>.json
(one file per run, written atomically; existing ones are skipped unless --force).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from paper_table import GSM8K_DIR, TEMPLATE, answer_loss, missing_data  # noqa: E402

from qdylora import QDyLoraConfig, QDyLoraTrainer, load_model, rank_scope  # noqa: E402
from qdylora.config import write_json_atomic  # noqa: E402
from qdylora.data import DataSpec, collator, encode, load_records, load_tokenizer  # noqa: E402

RANKS = [1, 4, 16, 64]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "quality" / "runs"

# name -> (one-line description, overrides). Overrides: "qlora": r (a dedicated plain QLoRA
# run); "qdylora": QDyLoraConfig fields; "lr"/"steps": training arguments.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qlora-r1": ("dedicated QLoRA, r 1", {"qlora": 1}),
    "qlora-r4": ("dedicated QLoRA, r 4", {"qlora": 4}),
    "qlora-r16": ("dedicated QLoRA, r 16", {"qlora": 16}),
    "qlora-r64": ("dedicated QLoRA, r 64 (also measured truncated to b, scale alpha/b)", {"qlora": 64}),
    "paper": ("QDyLoRA, the paper's recipe: uniform b in 1..64, full update, scale alpha/b", {}),
    "scale-sqrt": ("scaling alpha/sqrt(b)", {"qdylora": {"scaling": "sqrt"}}),
    "log-uniform": ("b log-uniform in 1..64", {"qdylora": {"distribution": "log_uniform"}}),
    "discrete": ("b uniform in {1, 4, 16, 64} (ranks in between never trained)", {"qdylora": {"ranks": [1, 4, 16, 64]}}),
    "frozen": ("frozen update (only row b-1 trained)", {"qdylora": {"update": "frozen"}}),
    "lr-2.5e-4": ("LR 2.5e-4", {"lr": 2.5e-4}),
    "lr-1e-3": ("LR 1e-3", {"lr": 1e-3}),
    "anchor-max": ("also train r_max in every step (two ranks per step)", {"qdylora": {"anchor_ranks": [64]}}),
    "loss-weight": ("loss at rank b weighted b/r_max (cancels the scale in the gradients)",
                    {"qdylora": {"loss_weight": "inverse_scale"}}),
    "sqrt-lw": ("combined: scaling alpha/sqrt(b) + loss weight s(r_max)/s(b)",
                {"qdylora": {"scaling": "sqrt", "loss_weight": "inverse_scale"}}),
    "lw-anchor": ("combined: loss weight s(r_max)/s(b) + anchor r_max (two ranks per step)",
                  {"qdylora": {"loss_weight": "inverse_scale", "anchor_ranks": ["r_max"]}}),
    "paper-2x": ("paper recipe, 200 steps", {"steps": 200}),
    "qlora-r4-2x": ("dedicated QLoRA, r 4, 200 steps", {"qlora": 4, "steps": 200}),
    "qlora-r64-2x": ("dedicated QLoRA, r 64, 200 steps", {"qlora": 64, "steps": 200}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and measure variants")
    run.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    run.add_argument("--seeds", default="0")
    run.add_argument("--force", action="store_true", help="run again even if the result file exists")
    run.add_argument("--data-dir", default=str(GSM8K_DIR), help="folder with GSM8K's train.jsonl and test.jsonl")
    run.add_argument("--model", default=None, help="local model folder (default: SmolLM2-135M-Instruct)")
    run.add_argument("--work", default=str(Path.home() / ".cache" / "qdylora" / "quality"),
                     help="where trained adapters are kept")
    rep = sub.add_parser("report", help="write benchmarks/results/quality.md from the run files")
    rep.add_argument("--out", default=str(RESULTS / "quality.md"))
    rep.add_argument("--chosen", default="", help="recipes (chosen on val) whose test numbers are shown")
    rep.add_argument("--findings", default=str(RESULTS / "quality" / "findings.md"),
                     help="hand-written conclusions inserted into the report (if the file exists)")
    sub.add_parser("list", help="print the variants")
    args = p.parse_args(argv)
    for name in ("train.jsonl", "test.jsonl") if args.command == "run" else ():
        if not (Path(args.data_dir) / name).is_file():
            p.error(missing_data(Path(args.data_dir) / name))
    return args


# -- data ----------------------------------------------------------------------------------
TRAIN_LIMIT, VAL_START, EVAL_SIZE, MAX_LENGTH = 400, 400, 64, 192


def split(path: Path, start: int, size: int, tokenizer: Any):
    spec = DataSpec(path=str(path), prompt_field="question", answer_field="answer", template=TEMPLATE,
                    max_length=MAX_LENGTH, limit=start + size)
    records = load_records(spec).select(range(start, start + size))
    return records.map(lambda r: encode(r["question"], " " + r["answer"], tokenizer, TEMPLATE, MAX_LENGTH),
                       remove_columns=records.column_names, desc="tokenizing")


# -- one run -------------------------------------------------------------------------------
def run_one(name: str, seed: int, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    import tempfile

    _, spec = VARIANTS[name]
    steps, lr = spec.get("steps", 100), spec.get("lr", 5e-4)
    r = spec.get("qlora", 64)
    model = load_model(ctx["model"])
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=16, lora_dropout=0.0,
                                             target_modules="all-linear", use_rslora=spec.get("rslora", False)))
    with tempfile.TemporaryDirectory() as scratch:
        targs = TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
            lr_scheduler_type="constant_with_warmup", warmup_steps=0.03, max_grad_norm=0.3, weight_decay=0.0,
            optim="adamw_torch", seed=seed, data_seed=seed, logging_steps=max(1, steps // 10),
            save_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True,
        )
        kwargs = dict(model=model, args=targs, train_dataset=ctx["train"], data_collator=ctx["collate"])
        if "qlora" in spec:
            trainer = Trainer(**kwargs)
        else:
            trainer = QDyLoraTrainer(**kwargs, qdylora_config=QDyLoraConfig(seed=seed, **spec.get("qdylora", {})))
        t0, c0 = time.perf_counter(), time.process_time()
        train_loss = trainer.train().training_loss
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        if "qlora" not in spec:
            trainer.save_model(str(Path(args.work) / f"{name}-s{seed}"))
    print(f"[{name} s{seed}] trained in {train_s:.0f}s ({train_cpu:.0f}s CPU), loss {train_loss:.4f}", flush=True)
    ranks = [b for b in RANKS if b <= r] if "qlora" not in spec or r == 64 else [r]
    out: dict[str, Any] = {"variant": name, "seed": seed, "spec": spec, "steps": steps, "lr": lr,
                           "train_loss": train_loss, "train_seconds": train_s, "train_cpu_seconds": train_cpu}
    for split_name in ("val", "test"):
        out[split_name] = {}
        for b in ranks:
            with rank_scope(model, b):
                out[split_name][str(b)] = answer_loss(model, ctx[split_name], ctx["collate"], 8)
        print(f"[{name} s{seed}] {split_name}: " + "  ".join(f"r{b} {v:.4f}" for b, v in out[split_name].items()),
              flush=True)
    del model, trainer
    gc.collect()
    return out


def zero_shot(ctx: dict[str, Any]) -> dict[str, float]:
    model = load_model(ctx["model"], prepare_for_training=False)
    return {s: answer_loss(model, ctx[s], ctx["collate"], 8) for s in ("val", "test")}


def main_run(args: argparse.Namespace) -> None:
    if args.model is None:
        from qdylora.demo.smollm2 import smollm2_path

        args.model = str(smollm2_path())
    tokenizer = load_tokenizer(args.model)
    data = Path(args.data_dir)
    ctx = {"model": args.model, "collate": collator(tokenizer),
           "train": split(data / "train.jsonl", 0, TRAIN_LIMIT, tokenizer),
           "val": split(data / "train.jsonl", VAL_START, EVAL_SIZE, tokenizer),
           "test": split(data / "test.jsonl", 0, EVAL_SIZE, tokenizer)}
    RUNS.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    zs = RUNS / "zero-shot.json"
    if not zs.is_file():
        write_json_atomic(zs, {**zero_shot(ctx), "machine": machine})
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.variants:
            path = RUNS / f"{name}-s{seed}.json"
            if path.is_file() and not args.force:
                print(f"[{name} s{seed}] already measured: {path}", flush=True)
                continue
            res = run_one(name, seed, args, ctx)
            res["command"] = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} "
                              f"python benchmarks/quality.py run {name} --seeds {seed}")
            res["machine"], res["finished"] = machine, time.strftime("%Y-%m-%d %H:%M")
            write_json_atomic(path, res)


# -- report --------------------------------------------------------------------------------
def load_runs() -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for f in sorted(RUNS.glob("*-s[0-9]*.json")):
        r = json.loads(f.read_text())
        runs.setdefault(r["variant"], {})[int(r["seed"])] = r
    return runs


def mean_loss(runs: dict[str, dict[int, dict[str, Any]]], name: str, split_name: str, b: int,
              seeds: list[int] | None = None) -> float | None:
    vals = [r[split_name][str(b)] for s, r in runs.get(name, {}).items()
            if str(b) in r[split_name] and (seeds is None or s in seeds)]
    return sum(vals) / len(vals) if vals else None


def main_report(args: argparse.Namespace) -> None:
    from quality_report import write_report  # noqa: PLC0415

    findings = Path(args.findings)
    extra = findings.read_text().splitlines() + [""] if findings.is_file() else None
    chosen = [c for c in args.chosen.split(",") if c]
    write_report(load_runs(), Path(args.out), VARIANTS, RUNS, chosen=chosen, extra=extra)
    print(Path(args.out).read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "list":
        for name, (desc, spec) in VARIANTS.items():
            print(f"{name:14s} {desc}  {json.dumps(spec)}")
    elif args.command == "run":
        main_run(args)
    else:
        main_report(args)


if __name__ == "__main__":
    main()

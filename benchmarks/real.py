"""Issue 12 section 3: which one-run pipeline gives the best rank-b adapter, on real data?

Two tasks, both SmolLM2-135M-Instruct on an NF4 + double-quant base, LoRA on all linears, alpha 16:

- demo:  the demo's own setting (qdylora/demo, `DemoSettings`): generated arithmetic word
         problems, 400 train problems, 50 steps of batch 8, LR 1e-3, max length 96, r_max 16,
         ranks 1, 2, 4, 8, 16. The data is generated ONCE from data seed 0 (the demo's default)
         for every training seed, so all arms and seeds see the same problems; 96 held-out
         problems: val = the first 48 (exactly the demo's own held-out set), test = the next 48.
- gsm8k: benchmarks/quality.py's setting (100 steps of batch 4 on the first 400 train
         problems, LR 5e-4, max length 192, r_max 64, ranks 1, 4, 16, 64); val = train problems
         400..463, test = the first 64 test problems, transfer = the demo's 96 held-out generated
         problems (a math task the GSM8K adapters never saw, same `#### N` answer format).

Training runs (one JSON per run and seed; all readouts of one run come from that one run):
- `lora-rB`: a dedicated plain QLoRA run at r = B (the limit; the r_max one is `plain`);
- `plain`: ONE plain QLoRA run at r_max, read out as
  `lora_rmax_prefix` (A[:b], B[:, :b], scale alpha/b, what qdylora's rank_scope does),
  `lora_rmax_svd` (each layer's delta top-b SVD: `rank_scope(model, b, method="svd")`),
  `lora_rmax_asvd` (activation-aware SVD: each layer's rank-b delta minimises the error on
  the covariance of its inputs, measured on the first 128 TRAINING examples, non-pad tokens;
  planted.py's `whitened_truncate` itself, with the whitening computed once per layer),
  `lora_rmax_fsvd` (Fisher-aware SVD: the output side weighted too, by the covariance of each
  layer's output gradients under answer tokens SAMPLED from the model, on the same 128 examples:
  planted.py's `output_fishers`, K-FAC's factors),
  `lora_rmax_svd+heal` (each rank's svd cut as a fresh rank-b adapter trained ALONE for a tenth of
  the run's steps at 0.3x its LR, constant, data order seed + 100: planted.py's +heal; `HEAL`),
  `lora_rmax_svd+heal@t` (readout `wheal`, t in `WISE`: that healed adapter's factors moved back
  toward the cut's, (1 - t) x cut + t x healed, WiSE-FT's interpolation at rank b: does any t keep
  the healing's in-distribution gain and the cut's transfer?);
- `plain-short`: the same plain run SHORTENED by the healing steps (45 + 5 demo steps, 90 + 10 on
  GSM8K), read out only as `lora_short_svd+heal`: EVERY rank, r_max included, healed as above, so
  one shipped rank costs one plain run's steps (planted.py's own idea 6); also read as
  `lora_short_prefix+heal` (readout `pheal`: the healing starts from the prefix cut, the run's own
  factors A[:b], B[:, :b], what `qdylora heal --method prefix` does) and `lora_short_bprefix+heal`
  (`bpheal`: that prefix delta refactored into balanced SVD factors first): planted.py's own idea 7;
- `plain-short-ho`: plain-short whose healings train on problems the run never saw (`HELD_OUT`:
  the run trains on all but the last heal_steps x batch training problems, each healing on those),
  read as `lora_shortho_svd+heal` / `lora_shortho_prefix+heal`: the transfer question;
- `plain-short2`: the plain run shortened by TWO healings (40 + 2 x 5 demo steps, 80 + 2 x 10 on
  GSM8K), read out as `heal` and `pheal`: `lora_short2_best+heal` keeps, per rank, the healed
  adapter better on val, so `qdylora heal --method svd,prefix` after it costs one plain run's steps;
- `paper`: QDyLoRA paper recipe (QDyLoraConfig preset "paper"), read as `paper` (prefix,
  today's default), `paper+svd`, `paper+asvd`;
- `lw_anchor`: quality.py's lw-anchor (loss weight inverse_scale + anchor r_max), read as
  `lw_anchor`, `lw_anchor+svd`, `lw_anchor+asvd`.
Same seed => same LoRA init, data order and (for QDyLoRA) rank draws in every arm.
Metric: mean NLL per answer token (token-weighted), `paper_table.answer_loss`.

    OMP_NUM_THREADS=1 python benchmarks/real.py run demo plain paper lw_anchor lora-r1 --seeds 0,1
    OMP_NUM_THREADS=1 python benchmarks/real.py run gsm8k plain paper lora-r1 --seeds 0   # + transfer split
    OMP_NUM_THREADS=1 python benchmarks/real.py readout demo plain --methods fsvd --seeds 0,1  # add readouts
    OMP_NUM_THREADS=1 python benchmarks/real.py readout gsm8k plain --methods wheal --seeds 0,1 --ranks 1,4,16 --retrain
                                                                       # (--retrain: the adapter is not cached here)
    python benchmarks/real.py report          # -> results/real_{demo,gsm8k}.json, real.md, real.png

Cost on the project's 2 shared CPU cores, one thread, `nice -n 5` (measured 2026-12-01 with another
engineer's jobs on the other core; each run's own numbers are in real.md): a demo run trains in
355-385 s CPU (370-440 s wall), lw_anchor 706 s (2.0x: two ranks per step); one evaluation pass
over 48 problems costs about 20-25 s, so the plain r16 run's readouts (prefix + svd + asvd, 5 ranks,
val + test, plus the calibration pass) take about 15 min, paper's (prefix + svd) about 6 min, a
dedicated run's about 1 min. A GSM8K run trains in 460-530 s CPU alone (quality.py's runs) and
1080-1290 s CPU beside another GSM8K run; its readouts cost about 4 min per rank (val + test +
transfer), so plain r64 with prefix + svd + asvd is about 45 min of readouts beside another job.
Results: benchmarks/results/real/<task>/
<run>-s<seed>.json (written atomically, existing ones skipped unless --force); adapters in
~/.cache/qdylora/real/<task>/<run>-s<seed>/ (not committed) so readouts can be recomputed.
Existing dedicated GSM8K runs of quality.py (qlora-r1/r4/r16, same settings) are reused
by `report` when their spec/steps/lr match and no run of ours exists.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from paper_table import GSM8K_DIR, TEMPLATE, answer_loss  # noqa: E402
from planted import batch_covariances, cut_factors, output_fishers, prefix_factors, svd_at_rank, whitening  # noqa: E402  (one activation-aware SVD for both yardsticks)

import qdylora  # noqa: E402
from qdylora import QDyLoraConfig, QDyLoraTrainer, load_model, rank_scope  # noqa: E402
from qdylora.config import PRESETS, write_json_atomic  # noqa: E402
from qdylora.data import collator, encode, load_tokenizer  # noqa: E402
from qdylora.sweep_result import aurac  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "real"
WORK = Path.home() / ".cache" / "qdylora" / "real"
ALPHA = 16
CALIBRATION = 128  # training examples whose layer inputs give the activation-aware SVD its covariance

TASKS: dict[str, dict[str, Any]] = {
    "demo": {"r_max": 16, "ranks": [1, 2, 4, 8, 16], "steps": 50, "batch": 8, "lr": 1e-3, "max_length": 96,
             "optim": None, "eval_batch": 16, "splits": ["val", "test"]},
    "gsm8k": {"r_max": 64, "ranks": [1, 4, 16, 64], "steps": 100, "batch": 4, "lr": 5e-4, "max_length": 192,
              "optim": "adamw_torch", "eval_batch": 8, "splits": ["val", "test", "transfer"]},
}
SPLIT_KEY = {"val": "ranks"}  # the results file keeps val under "ranks" (planted.json's key); other splits by name


RECIPES: dict[str, dict[str, Any]] = {
    "paper": dict(PRESETS["paper"]),
    "lw_anchor": {"loss_weight": "inverse_scale", "anchor_ranks": ["r_max"]},  # = quality.py's lw-anchor
}
# readouts measured per r_max run (each costs ~20 s per rank and split on the demo): the arms the
# issue asks for; paper+asvd / lw_anchor / lw_anchor+asvd are left out to fit the time budget
READOUTS: dict[str, list[str]] = {"plain": ["prefix", "svd", "asvd", "fsvd"], "paper": ["prefix", "svd"], "lw_anchor": ["svd"],
                                   "plain-short": ["pheal", "heal"], "plain-short2": ["pheal", "heal"],
                                   "plain-short-ho": ["pheal", "heal"]}
METHODS = ("prefix", "svd", "asvd", "fsvd", "heal", "pheal", "bpheal", "wheal")
# "wheal" (the transfer question: healing fits the training task more and transfers worse than the cut
# it starts from): the svd-start healing again, also read with its factors moved back toward the cut's,
# (1 - t) x cut + t x healed (WiSE-FT's weight interpolation, kept at rank b: shippable as it is),
# recorded as readouts "heal@<t>"; t = 1 is "heal" itself (checked against the recorded one)
WISE = (0.25, 0.5, 0.75)
# healing readouts -> where the healing starts (planted.py's SHORT_STARTS): the svd cut, the prefix
# cut in the run's own factors, the prefix cut refactored into balanced SVD factors
HEAL_STARTS = {"heal": "svd", "pheal": "prefix", "bpheal": "bprefix", "wheal": "svd"}
# "heal" (planted.py's lora_rmax_svd+heal, 30 of 300 steps at 3e-4 = 0.3x its LR): each rank's svd cut
# as a fresh rank-b adapter, trained alone for a tenth of the run's steps at 0.3x its LR, constant
HEAL = {"steps_fraction": 0.1, "lr_factor": 0.3, "data_seed_offset": 100}


def heal_steps(task: str) -> int:
    """Steps of one healing run: a tenth of the task's training budget (what plain-short gives up)."""
    return max(1, round(TASKS[task]["steps"] * HEAL["steps_fraction"]))


# shortened plain runs -> how many healings of `heal_steps` they give up, so that the run plus that
# many healings of the shipped rank cost one plain run's steps: plain-short heals from one cut,
# plain-short2 from both (svd and prefix, the better on val kept: `qdylora heal --method svd,prefix`)
SHORTENED = {"plain-short": 1, "plain-short2": 2, "plain-short-ho": 1}
# shortened runs whose healings train on problems the run never saw: the run trains on the training
# set less its last heal_steps x batch problems (one pass: demo 45 x 8 = 360, GSM8K 90 x 4 = 360), each
# healing on exactly those (one pass). plain-short heals on a reshuffle of ALL the problems, mostly
# ones the run trained on: does healing on seen data explain why healed adapters transfer worse?
HELD_OUT = {"plain-short-ho"}


def split_training(task: str, run: str, ctx: dict[str, Any]) -> tuple[Any, Any]:
    """(the run's training data, the healings' training data) of `run`."""
    train = ctx["data"]["train"]
    if run not in HELD_OUT:
        return train, train
    held = heal_steps(task) * TASKS[task]["batch"]
    return train.select(range(len(train) - held)), train.select(range(len(train) - held, len(train)))


def train_steps(task: str, run: str) -> int:
    """Training steps of a run: the task's budget, less the healings a shortened run leaves for later."""
    return TASKS[task]["steps"] - SHORTENED.get(run, 0) * heal_steps(task)


# arm name -> (training run, readout method); a tuple of healing readouts: per rank and seed, the one
# with the lower VAL loss (its test and transfer reported), what `qdylora heal --method svd,prefix` ships
ARMS: dict[str, tuple[str, str | tuple[str, ...]]] = {
    "dedicated": ("lora-r*", "prefix"),
    "lora_rmax_prefix": ("plain", "prefix"),
    "lora_rmax_svd": ("plain", "svd"),
    "lora_rmax_asvd": ("plain", "asvd"),
    "lora_rmax_fsvd": ("plain", "fsvd"),
    "lora_rmax_svd+heal": ("plain", "heal"),
    "lora_short_svd+heal": ("plain-short", "heal"),
    "lora_short_prefix+heal": ("plain-short", "pheal"),
    "lora_short_bprefix+heal": ("plain-short", "bpheal"),
    # two healings per rank after a run shortened by one (1.1x per shipped rank) ...
    "lora_short_best+heal": ("plain-short", ("heal", "pheal")),
    # ... or after a run shortened by both (1.0x per shipped rank: 80 + 2 x 10 GSM8K steps, 40 + 2 x 5 demo)
    "lora_short2_svd+heal": ("plain-short2", "heal"),
    "lora_short2_prefix+heal": ("plain-short2", "pheal"),
    "lora_short2_best+heal": ("plain-short2", ("heal", "pheal")),
    "lora_shortho_svd+heal": ("plain-short-ho", "heal"),
    "lora_shortho_prefix+heal": ("plain-short-ho", "pheal"),
    "lora_rmax_prefix+heal": ("plain", "pheal"),
    **{f"lora_rmax_svd+heal@{t:g}": ("plain", f"heal@{t:g}") for t in WISE},
    "paper": ("paper", "prefix"),
    "paper+svd": ("paper", "svd"),
    "paper+asvd": ("paper", "asvd"),
    "paper+fsvd": ("paper", "fsvd"),
    "lw_anchor": ("lw_anchor", "prefix"),
    "lw_anchor+svd": ("lw_anchor", "svd"),
    "lw_anchor+asvd": ("lw_anchor", "asvd"),
    "lw_anchor+fsvd": ("lw_anchor", "fsvd"),
}


# -- data ----------------------------------------------------------------------------------------
def demo_problems() -> dict[str, list[dict[str, str]]]:
    from qdylora.demo.data import make_splits

    train, held = make_splits(400, 96, seed=0)
    return {"train": train, "val": held[:48], "test": held[48:]}


def load_task(task: str, tokenizer: Any) -> dict[str, Any]:
    cfg = TASKS[task]
    if task == "demo":
        probs = demo_problems()
    else:
        def read(name: str, start: int, size: int) -> list[dict[str, str]]:
            with open(GSM8K_DIR / name) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            return [{"question": r["question"], "answer": r["answer"]} for r in rows[start:start + size]]
        demo = demo_problems()
        probs = {"train": read("train.jsonl", 0, 400), "val": read("train.jsonl", 400, 64),
                 "test": read("test.jsonl", 0, 64),
                 # transfer: a math task the GSM8K adapters never saw, in the same "#### N" answer format
                 "transfer": demo["val"] + demo["test"]}
    import datasets

    def as_ds(ps):
        enc = [encode(p["question"], " " + p["answer"], tokenizer, TEMPLATE, cfg["max_length"]) for p in ps]
        return datasets.Dataset.from_list(enc)
    return {k: as_ds(v) for k, v in probs.items()}


# -- activation-aware SVD (planted.py's, fed with padded real batches) ---------------------------
def masked_input_covariances(model: Any, dataset: Any, collate: Any, batch: int) -> dict[str, torch.Tensor]:
    """E[x x^T] of each LoRA layer's input over the non-pad tokens of `dataset`, model at full rank."""
    batches = (collate([dataset[j] for j in range(i, min(i + batch, len(dataset)))]) for i in range(0, len(dataset), batch))
    return batch_covariances(model, batches)


def calibration(model: Any, methods: list[str], ctx: dict[str, Any], task: str):
    """(input roots, output roots) per layer for the methods that need them (asvd: inputs; fsvd:
    both), from the first CALIBRATION training examples, the model at full rank."""
    if not {"asvd", "fsvd"} & set(methods):
        return None, None
    calib = ctx["data"]["train"].select(range(CALIBRATION))
    batch = TASKS[task]["eval_batch"]
    covs = masked_input_covariances(model, calib, ctx["collate"], batch)
    roots = {n: whitening(c) for n, c in covs.items()}
    out_roots = None
    if "fsvd" in methods:
        batches = (ctx["collate"]([calib[j] for j in range(i, min(i + batch, len(calib)))])
                   for i in range(0, len(calib), batch))
        out_roots = {n: whitening(g) for n, g in output_fishers(model, batches).items()}
    return roots, out_roots


def rank_b_student(base: Any, cut: dict[str, tuple[torch.Tensor, torch.Tensor]], b: int) -> Any:
    """A fresh rank-b PEFT LoRA adapter on `base` (alpha ALPHA, all linears, as every run here) holding
    the factors `cut` ({layer name: (A, B)}, e.g. `cut_factors` or `prefix_factors`)."""
    from peft import LoraConfig, get_peft_model

    from qdylora.ranks import DynamicRank, lora_layers

    student = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=b, lora_alpha=ALPHA, lora_dropout=0.0,
                                              target_modules="all-linear"))
    ds = DynamicRank.of(student)
    with torch.no_grad():
        for n, layer in lora_layers(ds.model, ds.adapter_name):
            layer.lora_A[ds.adapter_name].weight.copy_(cut[n][0])
            layer.lora_B[ds.adapter_name].weight.copy_(cut[n][1])
    return student


def healed(model: Any, task: str, b: int, seed: int, ctx: dict[str, Any], start: str = "svd",
           mixes: tuple[float, ...] = ()) -> tuple[dict[str, float], float, dict[float, dict[str, float]]]:
    """The `start` cut (svd, prefix or bprefix: `HEAL_STARTS`) of the r_max `model` at rank b, loaded into a fresh rank-b PEFT
    adapter and trained alone (`HEAL`): its answer loss per split, the CPU seconds of the healing
    training, and for each t in `mixes` the answer losses of the rank-b adapter whose factors are
    (1 - t) x the cut's + t x the healed ones (`WISE`). The product's `qdylora heal --method svd|prefix`
    does the healing."""
    from transformers import Trainer, TrainingArguments

    cfg = TASKS[task]
    # planted.py's svd cut (PEFT's rank-b scaling folded in), or the prefix slice
    cut = cut_factors(model, b) if start == "svd" else prefix_factors(model, b, balanced=start == "bprefix")
    student = rank_b_student(load_model(ctx["model"]), cut, b)  # copies `cut`: it stays the start for `mixes`
    extra = {"optim": cfg["optim"]} if cfg["optim"] else {}
    data_seed = seed + HEAL["data_seed_offset"]
    with tempfile.TemporaryDirectory() as scratch:
        targs = TrainingArguments(
            output_dir=scratch, max_steps=heal_steps(task),
            per_device_train_batch_size=cfg["batch"], learning_rate=cfg["lr"] * HEAL["lr_factor"],
            lr_scheduler_type="constant", max_grad_norm=0.3, weight_decay=0.0, seed=data_seed, data_seed=data_seed,
            logging_steps=1000, save_strategy="no", report_to="none", remove_unused_columns=False,
            disable_tqdm=True, **extra)
        c0 = time.process_time()
        Trainer(model=student, args=targs, train_dataset=ctx.get("heal_data", ctx["data"]["train"]),
                data_collator=ctx["collate"]).train()
        cpu = time.process_time() - c0
    student.eval()
    losses = {split: answer_loss(student, ctx["data"][split], ctx["collate"], cfg["eval_batch"]) for split in cfg["splits"]}
    mixed: dict[float, dict[str, float]] = {}
    if mixes:
        from qdylora.ranks import DynamicRank, lora_layers

        ds = DynamicRank.of(student)
        layers = dict(lora_layers(ds.model, ds.adapter_name))
        end = {n: (layer.lora_A[ds.adapter_name].weight.detach().clone(),
                   layer.lora_B[ds.adapter_name].weight.detach().clone()) for n, layer in layers.items()}
        for t in mixes:
            with torch.no_grad():
                for n, layer in layers.items():
                    for weight, w0, w1 in ((layer.lora_A[ds.adapter_name].weight, cut[n][0], end[n][0]),
                                           (layer.lora_B[ds.adapter_name].weight, cut[n][1], end[n][1])):
                        weight.copy_(w0.to(weight.dtype) * (1 - t) + w1 * t)
            mixed[t] = {split: answer_loss(student, ctx["data"][split], ctx["collate"], cfg["eval_batch"])
                        for split in cfg["splits"]}
    del student
    gc.collect()
    return losses, cpu, mixed


def read_out(model: Any, task: str, r: int, methods: list[str], ctx: dict[str, Any],
             done: dict[str, Any], tag: str, seed: int = 0) -> dict[str, Any]:
    """{method: {split: {rank: answer loss}}} of one r_max adapter at every rank of the task
    (a dedicated adapter: its own rank, prefix only). `done`: readouts already measured (their
    r_max numbers are reused: at b = r_max every cut keeps the whole delta)."""
    cfg = TASKS[task]
    ranks = (ctx.get("ranks") or cfg["ranks"]) if r == cfg["r_max"] else [r]
    roots, out_roots = calibration(model, methods, ctx, task)
    out: dict[str, Any] = {}
    for method in methods:
        res: dict[str, dict[str, float]] = {split: {} for split in cfg["splits"]}
        prefix = out.get("prefix") or done.get("prefix")
        for b in ranks:
            if b == r and method in ("svd", "asvd", "fsvd") and prefix is not None:
                # at b = r_max svd/asvd/fsvd keep the whole delta (the same adapter up to float
                # rounding, 1e-6 relative): reuse the prefix numbers instead of more evaluation passes
                for split in cfg["splits"]:
                    res[split][str(b)] = prefix[split][str(b)]
                continue
            if method in HEAL_STARTS:
                losses, cpu, mixed = healed(model, task, b, seed, ctx, start=HEAL_STARTS[method],
                                            mixes=WISE if method == "wheal" else ())
                if method == "wheal":  # the svd-start healing again (checked against "heal"), read at each mix
                    recorded = (done.get("heal") or {}).get("val", {}).get(str(b))
                    if recorded is not None and abs(losses["val"] - recorded) > 1e-4 * abs(recorded):
                        sys.exit(f"{tag} rank {b}: the healing gives val {losses['val']:.6f}, the recorded heal "
                                 f"{recorded:.6f}: not the same healing")
                    for t, at in mixed.items():
                        for split in cfg["splits"]:
                            out.setdefault(f"heal@{t:g}", {s: {} for s in cfg["splits"]})[split][str(b)] = at[split]
                    print(f"{tag} r{b} heal@t: " + "  ".join(
                        f"t={t:g} " + " ".join(f"{s} {v:.4f}" for s, v in at.items())
                        for t, at in {**mixed, 1: losses}.items()), flush=True)
                for split in cfg["splits"]:
                    res[split][str(b)] = losses[split]
                res.setdefault("heal_cpu_seconds", {})[str(b)] = cpu
                continue
            if method in ("asvd", "fsvd"):
                scope = svd_at_rank(model, b, roots=roots, out_roots=out_roots if method == "fsvd" else None)
            elif method == "svd":
                scope = rank_scope(model, b, method="svd")
            else:
                scope = rank_scope(model, b)
            with scope:
                for split in cfg["splits"]:
                    res[split][str(b)] = answer_loss(model, ctx["data"][split], ctx["collate"], cfg["eval_batch"])
        out[method] = res
        print(f"{tag} {method} val: " + "  ".join(f"r{b} {v:.4f}" for b, v in res["val"].items()), flush=True)
    return out


# -- one run -------------------------------------------------------------------------------------
def train_run(task: str, run: str, seed: int, ctx: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Train one run (its adapter saved to WORK/<task>/<run>-s<seed>/): the model and its record."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    cfg = TASKS[task]
    r = int(run[len("lora-r"):]) if run.startswith("lora-r") else cfg["r_max"]
    model = load_model(ctx["model"])
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear"))
    extra = {"optim": cfg["optim"]} if cfg["optim"] else {}
    steps = train_steps(task, run)
    with tempfile.TemporaryDirectory() as scratch:
        targs = TrainingArguments(
            output_dir=scratch, max_steps=steps,
            per_device_train_batch_size=cfg["batch"],
            learning_rate=cfg["lr"], lr_scheduler_type="constant_with_warmup", warmup_steps=0.03, max_grad_norm=0.3,
            weight_decay=0.0, seed=seed, data_seed=seed, logging_steps=max(1, cfg["steps"] // 5),
            save_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True, **extra,
        )
        kwargs = dict(model=model, args=targs, train_dataset=split_training(task, run, ctx)[0],
                      data_collator=ctx["collate"])
        if run in RECIPES:
            trainer = QDyLoraTrainer(**kwargs, qdylora_config=QDyLoraConfig(seed=seed, **RECIPES[run]))
        else:
            trainer = Trainer(**kwargs)
        t0, c0 = time.perf_counter(), time.process_time()
        train_loss = trainer.train().training_loss
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    adapter = WORK / task / f"{run}-s{seed}"
    model.save_pretrained(str(adapter))
    print(f"[{task} {run} s{seed}] trained in {train_s:.0f}s wall ({train_cpu:.0f}s CPU), loss {train_loss:.4f}",
          flush=True)
    out: dict[str, Any] = {"task": task, "run": run, "seed": seed, "r": r, "settings": cfg,
                           "recipe": RECIPES.get(run), "train_steps": steps, "train_loss": train_loss, "train_seconds": train_s,
                           "train_cpu_seconds": train_cpu, "adapter": str(adapter), "readouts": {}}
    return model, out


def run_one(task: str, run: str, seed: int, ctx: dict[str, Any]) -> dict[str, Any]:
    cfg = TASKS[task]
    model, out = train_run(task, run, seed, ctx)
    r = out["r"]
    t0, c0 = time.perf_counter(), time.process_time()
    methods = READOUTS[run] if r == cfg["r_max"] else ["prefix"]
    ctx = ctx | {"heal_data": split_training(task, run, ctx)[1]}
    out["readouts"] = read_out(model, task, r, methods, ctx, {}, f"[{task} {run} s{seed}]", seed)
    out["readout_seconds"], out["readout_cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    del model
    gc.collect()
    return out


def context(args: argparse.Namespace) -> dict[str, Any]:
    from qdylora.demo.smollm2 import smollm2_path

    print(f"qdylora imported from {qdylora.__file__}", flush=True)
    model = args.model or str(smollm2_path())
    tokenizer = load_tokenizer(model)
    return {"model": model, "collate": collator(tokenizer), "data": load_task(args.task, tokenizer)}


def main_readout(args: argparse.Namespace) -> None:
    """Add readouts to measured runs from their cached adapters (no training). The cached adapter
    must reproduce the run's recorded full-rank val loss (1e-4 relative) before anything is added."""
    from peft import PeftModel

    cfg = TASKS[args.task]
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        sys.exit(f"unknown readout method(s) {bad}; choose from {list(METHODS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    for seed in seeds:  # before loading anything
        path = RUNS / args.task / f"{args.run}-s{seed}.json"
        if not path.is_file():
            sys.exit(f"{path} does not exist: measure the run first (real.py run {args.task} {args.run} --seeds {seed})")
    ranks = [int(b) for b in args.ranks.split(",")] if args.ranks else None
    if ranks and not set(ranks) <= set(cfg["ranks"]):
        sys.exit(f"--ranks {args.ranks}: choose from {cfg['ranks']}")
    ctx = context(args) | {"ranks": ranks}
    for seed in seeds:
        path = RUNS / args.task / f"{args.run}-s{seed}.json"
        rec = json.loads(path.read_text())
        want_ranks = [str(b) for b in (ranks or cfg["ranks"])]
        todo = [m for m in methods if args.force or not set(want_ranks) <= set(rec["readouts"].get(m, {}).get("val", {}))]
        if not todo:
            print(f"[{args.task} {args.run} s{seed}] {methods} already measured", flush=True)
            continue
        if not Path(rec["adapter"], "adapter_config.json").is_file():
            if not args.retrain:
                sys.exit(f"{rec['adapter']} is not cached here: give --retrain to train the run again (checked below)")
            print(f"[{args.task} {args.run} s{seed}] retraining the run's adapter into {rec['adapter']}", flush=True)
            trained, again = train_run(args.task, args.run, seed, ctx)
            if again["adapter"] != rec["adapter"]:
                sys.exit(f"retrained into {again['adapter']}, the record names {rec['adapter']}")
            del trained
            gc.collect()
        model = PeftModel.from_pretrained(load_model(ctx["model"]), rec["adapter"], is_trainable=False)
        model.eval()
        r = rec["r"]
        if "prefix" in rec["readouts"]:
            want = rec["readouts"]["prefix"]["val"][str(r)]
            got = answer_loss(model, ctx["data"]["val"], ctx["collate"], cfg["eval_batch"])
            if abs(got - want) > 1e-4 * abs(want):
                sys.exit(f"{rec['adapter']} gives val {got:.6f} at r{r}, the run recorded {want:.6f}: not its adapter")
            print(f"[{args.task} {args.run} s{seed}] cached adapter reproduces val r{r} {got:.6f}", flush=True)
        else:  # plain-short(2) records only healed readouts: nothing of the adapter itself to compare with
            print(f"[{args.task} {args.run} s{seed}] no readout of the adapter itself recorded: reading "
                  f"{rec['adapter']} unchecked", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        heal_ctx = ctx | {"heal_data": split_training(args.task, args.run, ctx)[1]}
        added = read_out(model, args.task, r, todo, heal_ctx, rec["readouts"], f"[{args.task} {args.run} s{seed}]", seed)
        for method, splits in added.items():  # merged rank by rank: --ranks adds ranks to a method measured before
            for split, by_rank in splits.items():
                rec["readouts"].setdefault(method, {}).setdefault(split, {}).update(by_rank)
        rec.setdefault("added_readouts", []).append({
            "methods": todo, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "command": (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python benchmarks/real.py "
                        f"readout {args.task} {args.run} --methods {','.join(todo)} --seeds {seed}"
                        + (f" --ranks {args.ranks}" if args.ranks else "")),
            "finished": time.strftime("%Y-%m-%d %H:%M")})
        write_json_atomic(path, rec)
        del model
        gc.collect()


def main_run(args: argparse.Namespace) -> None:
    ranks = [int(b) for b in args.ranks.split(",")] if args.ranks else None
    if ranks and not set(ranks) <= set(TASKS[args.task]["ranks"]):
        sys.exit(f"--ranks {args.ranks}: choose from {TASKS[args.task]['ranks']}")
    ctx = context(args) | {"ranks": ranks}
    model = ctx["model"]
    out_dir = RUNS / args.task
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs (shared), "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    zs = out_dir / "zero-shot.json"
    if not zs.is_file():
        m = load_model(model, prepare_for_training=False)
        write_json_atomic(zs, {s: answer_loss(m, ctx["data"][s], ctx["collate"], TASKS[args.task]["eval_batch"])
                               for s in TASKS[args.task]["splits"]} | {"machine": machine})
        del m
    for seed in [int(s) for s in args.seeds.split(",")]:
        for run in args.runs:
            path = out_dir / f"{run}-s{seed}.json"
            if path.is_file() and not args.force:
                print(f"[{args.task} {run} s{seed}] already measured: {path}", flush=True)
                continue
            res = run_one(args.task, run, seed, ctx)
            res["command"] = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} "
                              f"python benchmarks/real.py run {args.task} {run} --seeds {seed}"
                              + (f" --ranks {args.ranks}" if args.ranks else ""))
            res["machine"], res["finished"] = machine, time.strftime("%Y-%m-%d %H:%M")
            write_json_atomic(path, res)


# -- report --------------------------------------------------------------------------------------
def load_runs(task: str) -> dict[str, dict[int, dict[str, Any]]]:
    """run name -> seed -> {"val": {rank: loss}, ...} per readout method, plus reused quality.py runs."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for f in sorted((RUNS / task).glob("*-s[0-9]*.json")):
        r = json.loads(f.read_text())
        runs.setdefault(r["run"], {})[int(r["seed"])] = r
    if task == "gsm8k":  # reuse quality.py's dedicated runs (same settings, same seed) when ours are missing
        for b in (1, 4, 16):
            for f in sorted((RESULTS / "quality" / "runs").glob(f"qlora-r{b}-s[0-9]*.json")):
                q = json.loads(f.read_text())
                if q["spec"] != {"qlora": b} or q["steps"] != 100 or q["lr"] != 5e-4:
                    continue
                seed = int(q["seed"])
                if seed not in runs.get(f"lora-r{b}", {}):
                    runs.setdefault(f"lora-r{b}", {})[seed] = {
                        "run": f"lora-r{b}", "seed": seed, "r": b, "reused": str(f.relative_to(ROOT)),
                        "train_seconds": q["train_seconds"], "train_cpu_seconds": q["train_cpu_seconds"],
                        "readouts": {"prefix": {"val": q["val"], "test": q["test"]}}}
    return runs


def arm_values(task: str, runs: dict[str, dict[int, dict[str, Any]]], arm: str, split: str) -> dict[int, dict[str, float]]:
    """seed -> {rank: loss} for one arm (only seeds/ranks that were measured)."""
    run, method = ARMS[arm]
    cfg = TASKS[task]
    out: dict[int, dict[str, float]] = {}
    if run == "lora-r*":
        for b in cfg["ranks"]:
            name = "plain" if b == cfg["r_max"] else f"lora-r{b}"
            for seed, r in runs.get(name, {}).items():
                v = r["readouts"]["prefix"].get(split, {}).get(str(b))
                if v is not None:
                    out.setdefault(seed, {})[str(b)] = v
        return out
    if isinstance(method, tuple):  # chosen on val, rank by rank
        choices = method
        for seed, r in runs.get(run, {}).items():
            got = r["readouts"]
            if not all(m in got and split in got[m] for m in choices):
                continue
            for b in got[choices[0]]["val"]:
                if all(b in got[m]["val"] and b in got[m][split] for m in choices):
                    pick = min(choices, key=lambda m: got[m]["val"][b])
                    out.setdefault(seed, {})[b] = got[pick][split][b]
        return out
    for seed, r in runs.get(run, {}).items():
        if split in r["readouts"].get(method, {}):
            out[seed] = dict(r["readouts"][method][split])
    return out


def summarise(task: str) -> dict[str, Any]:
    runs = load_runs(task)
    cfg = TASKS[task]
    arms: dict[str, Any] = {}
    for arm in ARMS:
        per = {s: arm_values(task, runs, arm, s) for s in cfg["splits"]}
        if not per["val"]:
            continue
        entry: dict[str, Any] = {"one_run": arm != "dedicated" and not arm.endswith("+heal"),  # heal: a run per rank
                                 "seeds": sorted(per["val"])}
        for split in cfg["splits"]:
            key = SPLIT_KEY.get(split, split)
            entry[key] = {}
            entry[key + "_half_spread"] = {}
            for b in cfg["ranks"]:
                vals = [v[str(b)] for v in per[split].values() if str(b) in v]
                if vals:
                    entry[key][str(b)] = sum(vals) / len(vals)
                    entry[key + "_half_spread"][str(b)] = (max(vals) - min(vals)) / 2
            entry[key + "_seeds_per_rank"] = {str(b): sorted(s for s, v in per[split].items() if str(b) in v)
                                              for b in cfg["ranks"]}
        entry["per_seed"] = {split: {str(s): v for s, v in per[split].items()} for split in cfg["splits"]}
        if len(entry["ranks"]) == len(cfg["ranks"]):
            entry["aurac_val"] = aurac({int(b): v for b, v in entry["ranks"].items()})
        arms[arm] = entry
    # best one-run arm: lowest val AURAC among one-run arms measured on the most seeds at every rank
    full = {a: e for a, e in arms.items() if e["one_run"] and "aurac_val" in e}
    best = None
    if full:
        most = max(len(e["seeds"]) for e in full.values())
        pool = {a: e for a, e in full.items() if len(e["seeds"]) == most}
        best = min(pool, key=lambda a: pool[a]["aurac_val"])
    zs_path = RUNS / task / "zero-shot.json"
    zero = json.loads(zs_path.read_text()) if zs_path.is_file() else None
    timing = {f"{run}-s{seed}": {k: round(r[k], 1) for k in ("train_seconds", "train_cpu_seconds", "readout_seconds",
                                                              "readout_cpu_seconds") if k in r}
              | ({"reused": r["reused"]} if "reused" in r else {})
              for run, by in runs.items() for seed, r in sorted(by.items())}
    return {"task": task, "settings": cfg, "ranks": cfg["ranks"], "metric": "mean NLL per answer token, val under 'ranks' (test and transfer under their names)",
            "zero_shot": zero, "arms": arms, "best_one_run": best, "best_one_run_rule":
            "lowest val AURAC (mean loss over log2 ranks) among one-run arms measured at every rank on the most seeds",
            "runs": timing}


def fmt(entry: dict[str, Any], key: str, b: int) -> str:
    v = entry[key].get(str(b))
    if v is None:
        return "not run"
    n = len(entry[key + "_seeds_per_rank"][str(b)])
    return f"{v:.4f} ± {entry[key + '_half_spread'][str(b)]:.4f}" if n > 1 else f"{v:.4f} (s{entry[key + '_seeds_per_rank'][str(b)][0]})"


def table(data: dict[str, Any], key: str, arms: list[str] | None = None) -> list[str]:
    ranks = data["ranks"]
    arms = arms or list(data["arms"])
    lines = ["| arm | seeds | " + " | ".join(f"r{b}" for b in ranks) + " | AURAC |",
             "|---" * (len(ranks) + 3) + "|"]
    for a in arms:
        e = data["arms"].get(a)
        if e is None:
            lines.append(f"| {a} | | " + " | ".join("not run" for _ in ranks) + " | |")
            continue
        au = aurac({int(b): v for b, v in e[key].items()}) if len(e[key]) == len(ranks) else None
        lines.append(f"| {a} | {','.join(map(str, e['seeds']))} | " + " | ".join(fmt(e, key, b) for b in ranks)
                     + f" | {au:.4f} |" if au is not None else
                     f"| {a} | {','.join(map(str, e['seeds']))} | " + " | ".join(fmt(e, key, b) for b in ranks) + " | |")
    return lines


def ratio_table(data: dict[str, Any], ref: str, split: str = "val") -> list[str]:
    """Each arm / ref at each rank, per seed (only seeds both measured), shown as min-max over seeds."""
    ranks = data["ranks"]
    if ref not in data["arms"]:
        return [f"({ref} not run)"]
    refv = data["arms"][ref]["per_seed"].get(split, {})
    lines = ["| arm | " + " | ".join(f"r{b}" for b in ranks) + " |", "|---" * (len(ranks) + 1) + "|"]
    for a, e in data["arms"].items():
        cells = []
        for b in ranks:
            rs = [v[str(b)] / refv[s][str(b)] for s, v in e["per_seed"].get(split, {}).items()
                  if s in refv and str(b) in v and str(b) in refv[s]]
            cells.append("" if not rs else (f"{rs[0]:.3f}" if len(rs) == 1 else f"{min(rs):.3f}-{max(rs):.3f}"))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def plot(datas: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datas), figsize=(6.5 * len(datas), 4.8), squeeze=False)
    for ax, data in zip(axes[0], datas):
        for a, e in data["arms"].items():
            pts = sorted((int(b), v) for b, v in e["ranks"].items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if a == "dedicated" else "-",
                    marker="o", ms=3, lw=2.2 if a in ("dedicated", "lora_rmax_svd") else 1.2,
                    color="black" if a == "dedicated" else None, label=f"{a} (s{','.join(map(str, e['seeds']))})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # zero-shot (far above every arm) is in the title, not drawn
        ax.set_xticks(data["ranks"], [str(b) for b in data["ranks"]])
        ax.set_xlabel("rank b")
        ax.set_ylabel("val loss (NLL per answer token)")
        ax.set_title(f"{data['task']}: r_max {data['settings']['r_max']}, {data['settings']['steps']} steps "
                     f"x {data['settings']['batch']}" + (f" (zero-shot {data['zero_shot']['val']:.3f})" if data.get("zero_shot") else ""),
                     fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main_report(args: argparse.Namespace) -> None:
    md = ["# Issue 12 section 3: the one-run pipelines on real data", "",
          "Generated by `python benchmarks/real.py report` from benchmarks/results/real/<task>/*.json "
          "(the findings paragraph is hand-written in benchmarks/results/real.findings.md).", ""]
    findings = RESULTS / "real.findings.md"
    if findings.is_file():
        md += findings.read_text().splitlines() + [""]
    datas = []
    for task in TASKS:
        if not (RUNS / task).is_dir():
            continue
        data = summarise(task)
        write_json_atomic(RESULTS / f"real_{task}.json", data)
        datas.append(data)
        s = data["settings"]
        md += [f"## {task}: r_max {s['r_max']}, {s['steps']} steps x batch {s['batch']}, LR {s['lr']}", "",
               f"Validation loss (mean NLL per answer token; mean ± half the spread over seeds; '(sN)': one seed only). "
               f"Zero-shot val {data['zero_shot']['val']:.4f}." if data["zero_shot"] else "", "",
               "Commands: " + "; ".join(sorted({f"`OMP_NUM_THREADS=1 python benchmarks/real.py run {task} {run.rsplit('-s', 1)[0]} --seeds ...`"
                                                 for run in data["runs"] if "reused" not in data["runs"][run]})), ""]
        md += table(data, "ranks") + [""]
        md += ["Ratio to `lora_rmax_svd`, per seed (min-max over the seeds both measured):", ""]
        md += ratio_table(data, "lora_rmax_svd") + [""]
        md += ["Ratio to `dedicated`, per seed:", ""] + ratio_table(data, "dedicated") + [""]
        if "transfer" in s["splits"]:
            md += ["### Transfer: the same adapters on a math task they never saw", "",
                   "The demo's 96 held-out generated arithmetic problems (same `#### N` answer format), "
                   f"answer loss. Zero-shot {data['zero_shot'].get('transfer', float('nan')):.4f}."
                   if data["zero_shot"] else "", ""]
            md += table(data, "transfer") + ["", "Transfer ratio to `lora_rmax_svd`, per seed:", ""]
            md += ratio_table(data, "lora_rmax_svd", "transfer") + ["", "Transfer ratio to `dedicated`, per seed:", ""]
            md += ratio_table(data, "dedicated", "transfer") + [""]
        md += [f"Best one-run arm by val AURAC: **{data['best_one_run']}** ({data['best_one_run_rule']}).", ""]
        md += ["Per-run time (wall / CPU seconds of the one process, one torch thread, on 2 shared CPU cores; "
               "what ran beside each run is said in the findings):", "", "| run | train wall | train CPU | readouts wall | readouts CPU |",
               "|---|---|---|---|---|"]
        for run, t in data["runs"].items():
            md.append(f"| {run} | {t.get('train_seconds', '')} | {t.get('train_cpu_seconds', '')} | "
                      f"{t.get('readout_seconds', '')} | {t.get('readout_cpu_seconds', '')} |"
                      + (f" reused {t['reused']}" if "reused" in t else ""))
        md.append("")
    chosen = [c for c in args.chosen.split(",") if c]
    if chosen:
        md += ["## Test (shown last; the arms were chosen on validation)", ""]
        for data in datas:
            md += [f"### {data['task']}", ""] + table(data, "test", [a for a in chosen if a in data["arms"]]) + [""]
    png = RESULTS / "real.png"
    if datas:
        plot(datas, png)
        md += [f"![loss vs rank]({png.name})", ""]
    (RESULTS / "real.md").write_text("\n".join(md))
    print("\n".join(md))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and measure runs")
    run.add_argument("task", choices=sorted(TASKS))
    run.add_argument("runs", nargs="+", help="plain, plain-short, plain-short2, paper, lw_anchor, lora-rB")
    run.add_argument("--seeds", default="0")
    run.add_argument("--force", action="store_true")
    run.add_argument("--ranks", default=None, help="read out an r_max run at these of the task's ranks only "
                     "(comma-separated; default: all)")
    run.add_argument("--model", default=None)
    ro = sub.add_parser("readout", help="add readouts to measured runs from their cached adapters")
    ro.add_argument("task", choices=sorted(TASKS))
    ro.add_argument("run", help="plain, paper, lw_anchor (an r_max run)")
    ro.add_argument("--methods", required=True, help=f"comma-separated, from {','.join(METHODS)}")
    ro.add_argument("--seeds", default="0")
    ro.add_argument("--force", action="store_true", help="measure methods already recorded again")
    ro.add_argument("--retrain", action="store_true", help="train the run's adapter again where it is not cached "
                    "(a new machine); it must reproduce the run's recorded full-rank val loss")
    ro.add_argument("--ranks", default=None, help="comma-separated subset of the task's ranks (default: all)")
    ro.add_argument("--model", default=None)
    rep = sub.add_parser("report")
    rep.add_argument("--chosen", default="dedicated,lora_rmax_prefix,lora_rmax_svd,lora_rmax_asvd,lora_rmax_fsvd,lora_rmax_svd+heal,"
                                         "lora_short_svd+heal,lora_short_prefix+heal,lora_short_best+heal,lora_short2_best+heal,paper")
    args = p.parse_args(argv)
    if args.command == "run":
        for r in args.runs:
            ok = r in ("plain", *SHORTENED, *RECIPES) or (r.startswith("lora-r") and r[6:].isdigit()
                                              and int(r[6:]) in TASKS[args.task]["ranks"][:-1])
            if not ok:
                p.error(f"unknown run {r!r} for {args.task}")
        main_run(args)
    elif args.command == "readout":
        main_readout(args)
    else:
        main_report(args)


if __name__ == "__main__":
    main()

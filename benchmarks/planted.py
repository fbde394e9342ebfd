"""Issue 12 section 1: a yardstick where rank matters, with each rank's limit known.

The task (planted-rank distillation):
- A tiny Llama (transformers, random init, head_dim 32) is written to a temp folder as
  safetensors and loaded through `qdylora.load_model` in NF4 + double quant: the STUDENT
  base. Every linear layer LoRA targets (PEFT's "all-linear": all but lm_head) has the
  base weight W0 = dequant(NF4(W)).
- The TEACHER is the same model in fp32 with every targeted linear set to W0 + Delta,
  Delta = U diag(s) V^T with U, V random orthonormal, rank `--plant-rank` (32) and
  s_k = size * sigma_1(W0) * (k+1)^-decay (`--plant-size`, `--plant-decay` 1). Because
  the delta sits on dequant(NF4(W)), a student whose LoRA delta equals Delta reproduces
  the teacher exactly: the limit of every rank is known, zero at rank >= the planted rank,
  and the Eckart-Young tail of the spectrum below it.
- Loss: KL(teacher || student) of the next-token distributions, mean per position, on
  fixed random token sequences (uniform over the vocabulary). Why KL and not
  cross-entropy on sampled teacher text: the full distribution at every position is a
  dense, noise-free target (no sampling noise), and KL is exactly the excess of the
  student's cross-entropy over the teacher's, so "excess loss over the teacher" is the
  KL itself and is zero for the exact delta. Why random tokens: the base is randomly
  initialised, so no natural text distribution belongs to it; uniform tokens reach every
  embedding, so the delta is probed in every input direction the model has, and the
  train/held-out split is a plain split of independent draws.
- Metric per rank b: the KL on a fixed held-out set of sequences (never trained on).
  AURAC (MatryoshkaLoRA's area under the rank-accuracy curve, here of a LOSS, so lower
  is better): the trapezoid area under excess(b) over log2(b) divided by the log2 range,
  i.e. the mean excess over log2 ranks, one number per arm (`aurac()`).

Every arm trains LoRA r_max 64 on all linears, alpha 16, through the real code path:
`QDyLoraTrainer` for the QDyLoRA recipes, plain `transformers.Trainer` for the plain
LoRA runs (both with the same KL `compute_loss`), same steps, LR, data order and seed.

Arms (keys of results/planted.json):
- dedicated: a plain LoRA run at r = b for each b (the limit; r = r_max is the plain r_max run);
- lora_rmax_prefix / lora_rmax_svd: ONE plain r_max run, cut to b by slicing (scale alpha/b)
  or by each layer's top-b SVD of its delta (`qdylora.ranks.svd_truncate`, swapped into
  the first b rows/columns and run at rank b: exactly a rank-b PEFT adapter);
- paper, balanced, lw_anchor: the recipes of benchmarks/quality.py / QDyLoraConfig.preset;
- matryoshka: MatryoshkaLoRA's nested objective ("diag" mask of their adapters/matryoshka.py):
  one forward at r_max with row i of the adapter scaled by P[i] = sum of s(r) over the
  training ranks r > i, ranks {1, 2, 4, ..., r_max}, s(r) = alpha/sqrt(r); rank b is
  then the prefix with its own scale s(b). Implemented in this file (forward hooks on
  lora_A under a plain Trainer), not in the product yet;
- own ideas: const_scale (the paper's recipe, but the scale alpha/r_max at every b instead
  of alpha/b), lw_anchor_both (lw_anchor with anchors at 1 AND r_max);
- X+svd: every training recipe X cut by SVD of its r_max delta instead of slicing;
- X+asvd, lora_rmax_asvd (own idea): activation-aware SVD, each layer's rank-b delta minimises
  the error on its inputs (covariance from 128 training sequences), `whitened_truncate`;
- X+fsvd, lora_rmax_fsvd (own idea): Fisher-aware SVD, the same with the output side weighted
  too: the rank-b delta minimises E||G^(1/2) (D - D_b) x||^2, G the covariance of the layer's
  output gradients under labels sampled from the model itself (`output_fishers`, the same 128
  sequences): K-FAC's Kronecker-factored Fisher, i.e. a second-order model of the loss increase;
- lora_rmax_svd+heal, lora_rmax_fsvd+heal (own idea): the plain run's svd / fsvd cut at each rank
  b < r_max, then trained ALONE at rank b for `--heal-steps` (30, a tenth of the run) at constant
  `--heal-lr` (3e-4, chosen on seed 0 among 1e-3 and 3e-4), data order seed + 100: every healed
  rank costs a short extra run, so the cost column counts them;
- lora_short_svd+heal (own idea 6, the compute bar): the same healing at EVERY rank, r_max included,
  from a plain r_max run SHORTENED by the healing steps (`--steps` - `--heal-steps`: 270 + 30), so
  one shipped rank costs one plain run; `cost_one_rank` records that, `cost` all ranks healed;
- lora_short_prefix+heal, lora_short_bprefix+heal (own idea 7): the same shortened run and
  healing, started from each rank's PREFIX cut instead, in the run's own factors (A[:b], B[:, :b])
  or refactored into balanced SVD factors (`prefix_factors`): which of the cut and the factors
  matters (on GSM8K the prefix start healed better, on the demo task the svd start);
- dedicated_cooldown (a stronger limit for own idea 6): each rank's dedicated run shortened the
  same way, then continued from its own factors for `--heal-steps` at `--heal-lr`, data order
  seed + 100: the healing's LR drop without the r_max start, so a gain from the cooldown alone
  is not credited to the one-run pipeline;
- the oracle row (not an arm): the top-b SVD of the planted delta itself, no training.

    OMP_NUM_THREADS=1 python benchmarks/planted.py run --seeds 0,1,2      # all arms
    OMP_NUM_THREADS=1 python benchmarks/planted.py run --arms dedicated,paper --seeds 0
    python benchmarks/planted.py report                                   # .md + .png from the .json

Results: benchmarks/results/planted.json (per seed and aggregated), planted.md, planted.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qdylora import QDyLoraConfig, load_model, rank_scope  # noqa: E402
from qdylora.config import write_json_atomic  # noqa: E402
from qdylora.loading import dequantized_weight  # noqa: E402
from qdylora.ranks import DynamicRank, lora_layers, lora_scale, svd_truncate  # noqa: E402
from qdylora.sweep_result import aurac  # noqa: E402,F401  (the sweep's AURAC, one definition)
from qdylora.trainer_ext.trainer import QDyLoraMixin  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
EXTRAS = ["planted.fp32.json", "planted.asvd.json", "planted.fsvd.json", "planted.heal.json", "planted.budget.json",
          "planted.starts.json", "planted.600steps.json"]  # the report's sections after the main one, in this order
ALPHA = 16

# The training recipes. paper and balanced are QDyLoraConfig presets; lw_anchor is issue 8's
# variant in benchmarks/quality.py (imported, not re-defined). "hook" names an in-benchmark
# change of the scale rule (see RowScale).
def _quality_variant(name: str) -> dict[str, Any]:
    from quality import VARIANTS  # noqa: PLC0415

    return dict(VARIANTS[name][1]["qdylora"])


def recipes() -> dict[str, dict[str, Any]]:
    from qdylora.config import PRESETS  # noqa: PLC0415

    lw_anchor = _quality_variant("lw-anchor")
    return {
        "paper": {"qdylora": dict(PRESETS["paper"]), "desc": "QDyLoRA paper: b uniform 1..r_max, alpha/b"},
        "balanced": {"qdylora": dict(PRESETS["balanced"]), "desc": "preset balanced: alpha/sqrt(b) + loss weight"},
        "lw_anchor": {"qdylora": lw_anchor, "desc": "quality.py lw-anchor: loss weight + anchor r_max"},
        "matryoshka": {"matryoshka": True, "desc": "MatryoshkaLoRA diag P, ranks 1,2,4..r_max, alpha/sqrt(r)"},
        "const_scale": {"qdylora": dict(PRESETS["paper"]), "hook": "const",
                        "desc": "own: paper recipe with scale alpha/r_max at every b"},
        "lw_anchor_both": {"qdylora": {**lw_anchor, "anchor_ranks": [1, "r_max"]},
                           "desc": "own: lw_anchor with anchors at 1 and r_max"},
    }


# own idea 7: where the short run's healing starts at rank b: its svd cut (own idea 6), its prefix
# cut in the run's own factors (A[:b], B[:, :b]: what `qdylora heal --method prefix` does), or that
# same prefix delta refactored into balanced SVD factors (the function of prefix, the factors of svd)
SHORT_STARTS = ("svd", "prefix", "bprefix")
TRAINED = ["paper", "balanced", "lw_anchor", "matryoshka", "const_scale", "lw_anchor_both"]
ARM_ORDER = ["dedicated", "lora_rmax_prefix", "lora_rmax_svd", "lora_rmax_asvd", "lora_rmax_fsvd"] + \
    [f"{n}{cut}" for n in TRAINED for cut in ("", "+svd", "+asvd", "+fsvd")] + \
    ["lora_rmax_svd+heal", "lora_rmax_fsvd+heal"] + [f"lora_short_{c}+heal" for c in SHORT_STARTS] + \
    ["dedicated_cooldown"]


# -- the metric ------------------------------------------------------------------------------
# AURAC (MatryoshkaLoRA's AURAC_v2, metrics.py, applied to a loss: lower is better) is the
# product's own `qdylora.sweep_result.aurac`, imported above: the trapezoid area of the
# metric over log2 rank divided by the log2 range, so a flat curve at e has AURAC e.


# -- the task --------------------------------------------------------------------------------
def write_base(out_dir: Path, *, vocab: int, hidden: int, layers: int, init_range: float, seed: int) -> Path:
    """A random tiny Llama (head_dim 32) saved as safetensors: the common base."""
    from transformers import AutoModelForCausalLM

    from qdylora.testing import tiny_config

    torch.manual_seed(seed)
    config = tiny_config("llama", vocab_size=vocab, hidden=hidden, layers=layers)
    config.initializer_range = init_range
    config.head_dim = hidden // config.num_attention_heads
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def target_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linears PEFT's all-linear targets (every Linear/Linear4bit but the output layer)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def planted_delta(out_f: int, in_f: int, rank: int, top: float, decay: float, gen: torch.Generator):
    """U diag(s) V^T with random orthonormal U, V and s_k = top * (k+1)^-decay."""
    u, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=gen, dtype=torch.float64))
    s = top * (torch.arange(1, rank + 1, dtype=torch.float64) ** -decay)
    return (u * s) @ v.T, s


def build_teacher(base_dir: Path, *, rank: int, size: float, decay: float, seed: int, fp32_base: bool = False):
    """(teacher fp32 model, {layer: delta}, {layer: spectrum}); teacher W = dequant(NF4(W)) + delta.

    With `fp32_base` the student base is the fp32 model itself and the teacher W = W + delta.
    """
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, use_safetensors=True)
    if fp32_base:
        w0 = {n: m.weight.detach().clone() for n, m in target_linears(teacher).items()}
    else:
        student = load_model(str(base_dir), prepare_for_training=False)
        w0 = {n: dequantized_weight(m).float().clone() for n, m in target_linears(student).items()}
        del student
    gen = torch.Generator().manual_seed(10_000 + seed)
    deltas, spectra = {}, {}
    linears = target_linears(teacher)
    if sorted(linears) != sorted(w0):
        raise RuntimeError(f"teacher and student linears differ: {sorted(set(linears) ^ set(w0))}")
    for name in sorted(linears):
        w = w0[name]
        top = size * float(torch.linalg.matrix_norm(w.double(), ord=2))
        d, s = planted_delta(w.shape[0], w.shape[1], min(rank, *w.shape), top, decay, gen)
        deltas[name], spectra[name] = d.float(), s
        with torch.no_grad():
            linears[name].weight.copy_(w + d.float())
    teacher.eval()
    return teacher, deltas, spectra


@torch.no_grad()
def teacher_logprobs(teacher: torch.nn.Module, ids: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([F.log_softmax(teacher(input_ids=ids[i:i + batch]).logits.float(), -1)
                      for i in range(0, len(ids), batch)])


def make_task(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Base on disk, teacher log-probs for the training and held-out sequences."""
    base = write_base(work / "base", vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                      init_range=args.init_range, seed=args.task_seed)
    teacher, deltas, spectra = build_teacher(base, rank=args.plant_rank, size=args.plant_size,
                                             decay=args.plant_decay, seed=args.task_seed, fp32_base=args.fp32_base)
    gen = torch.Generator().manual_seed(20_000 + args.task_seed)
    train_ids = torch.randint(0, args.vocab, (args.train_seqs, args.seq_len), generator=gen)
    eval_ids = torch.randint(0, args.vocab, (args.eval_seqs, args.seq_len), generator=gen)
    task = {"base": base, "load_in_4bit": not args.fp32_base, "deltas": deltas, "spectra": spectra,
            "train_ids": train_ids, "train_logp": teacher_logprobs(teacher, train_ids),
            "eval_ids": eval_ids, "eval_logp": teacher_logprobs(teacher, eval_ids)}
    del teacher
    gc.collect()
    return task


class KLData(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, logp: torch.Tensor) -> None:
        self.ids, self.logp = ids, logp

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "teacher_logp": self.logp[i]}


def kl_loss(model: torch.nn.Module, input_ids: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), mean over positions."""
    logits = model(input_ids=input_ids).logits.float()
    s = F.log_softmax(logits, -1)
    return F.kl_div(s.flatten(0, 1), teacher_logp.flatten(0, 1), log_target=True, reduction="batchmean")


class KLLoss:
    """compute_loss = KL to the cached teacher log-probs (mixed into Trainer / QDyLoraTrainer)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = kl_loss(model, inputs["input_ids"], inputs["teacher_logp"])
        return (loss, None) if return_outputs else loss


def _trainer_classes():
    from transformers import Trainer

    class KLTrainer(KLLoss, Trainer):
        pass

    class KLQDyLoraTrainer(QDyLoraMixin, KLLoss, Trainer):  # the mixin wraps KLLoss.compute_loss
        pass

    return KLTrainer, KLQDyLoraTrainer


@torch.no_grad()
def excess(model: torch.nn.Module, task: dict[str, Any], batch: int = 64) -> float:
    """Mean KL(teacher || student) per position on the held-out sequences."""
    model.eval()
    ids, logp = task["eval_ids"], task["eval_logp"]
    total = 0.0
    for i in range(0, len(ids), batch):
        total += float(kl_loss(model, ids[i:i + batch], logp[i:i + batch])) * len(ids[i:i + batch])
    return total / len(ids)


# -- scale rules that are not QDyLoraConfig options (in-benchmark) ----------------------------
class RowScale:
    """Multiplies lora_A's output (the rank dimension) by a per-row factor, on every LoRA layer.

    `fn(rank) -> tensor of length >= rank` gives the factor at the active rank; None: off.
    Used for matryoshka's diagonal P and for const_scale (b / r_max at rank b).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.fn = None
        self.dr = DynamicRank.of(model)
        self.handles = []
        for _, layer in lora_layers(self.dr.model, self.dr.adapter_name):
            self.handles.append(layer.lora_A[self.dr.adapter_name].register_forward_hook(self._hook))

    def _hook(self, module, inputs, out):
        if self.fn is None:
            return out
        f = self.fn(self.dr.rank).to(out.dtype)
        return out * f[: out.shape[-1]]


def matryoshka_p(r_max: int, train_ranks: list[int], alpha: float) -> torch.Tensor:
    """P[i] = sum of s(r) = alpha/sqrt(r) over the training ranks r > i (their Algorithm 1)."""
    return torch.tensor([sum(alpha / math.sqrt(r) for r in train_ranks if r > i) for i in range(r_max)])


# -- the oracle: the planted delta itself, truncated ---------------------------------------------
def set_planted_delta(model: torch.nn.Module, task: dict[str, Any], keep: int) -> None:
    """Set each LoRA layer's delta to the top-`keep` SVD of the planted delta (keep 0: no delta)."""
    dr = DynamicRank.of(model)
    name = dr.adapter_name
    for mod_name, layer in lora_layers(dr.model, name):
        u, s, vh = torch.linalg.svd(task["deltas"][mod_name.split("base_model.model.", 1)[1]].double())
        root = (s[:keep] / layer.scaling[name]).sqrt()
        with torch.no_grad():
            layer.lora_A[name].weight.zero_()
            layer.lora_B[name].weight.zero_()
            layer.lora_A[name].weight[:keep] = (root[:, None] * vh[:keep]).float()
            layer.lora_B[name].weight[:, :keep] = (u[:, :keep] * root).float()


def oracle(task: dict[str, Any], ranks: list[int], r_max: int) -> dict[str, float]:
    """Excess of a student whose rank-b delta is the top-b SVD of the planted delta (no training).

    The weight-space optimum per rank (Eckart-Young), a reference beside `dedicated`: a trained
    rank-b adapter can do better in KL, since KL weighs directions unevenly.
    """
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(str(task["base"]), load_in_4bit=task["load_in_4bit"]),
                           LoraConfig(r=r_max, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                                      task_type="CAUSAL_LM"))
    out = {}
    for b in ranks:
        set_planted_delta(model, task, b)
        out[str(b)] = excess(model, task)
    return out


# -- SVD truncation, swapped in ---------------------------------------------------------------
def whitening(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^(1/2), C^(-1/2)): symmetric roots of cov + 1e-6 * its mean eigenvalue (so it inverts), float64."""
    c = cov.double()
    evals, q = torch.linalg.eigh(c + 1e-6 * float(c.diagonal().mean()) * torch.eye(len(c), dtype=c.dtype))
    evals = evals.clamp_min(1e-300)
    return (q * evals.sqrt()) @ q.T, (q * evals.rsqrt()) @ q.T


def whitened_truncate(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, rank: int, out_scale: float,
                      cov: torch.Tensor | None = None, *,
                      roots: tuple[torch.Tensor, torch.Tensor] | None = None,
                      out_roots: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware rank-`rank` pair: minimises E||(D - D_b) x||^2 for inputs x with E[x x^T] = cov.

    With C^(1/2) the symmetric root of cov (`whitening`), the optimum is
    D_b = top-b SVD(D C^(1/2)) C^(-1/2): `svd_truncate` of (A C^(1/2), B), then
    A' = A'' C^(-1/2). cov = identity gives exactly `svd_truncate`. `roots`: `whitening(cov)`
    computed once, for callers that truncate one layer at several ranks.

    `out_roots` (`whitening(G)` of the layer's output-gradient covariance G, `output_fishers`)
    weights the output side too: D_b minimises E||G^(1/2) (D - D_b) x||^2, the Kronecker-factored
    (K-FAC) Fisher approximation of the loss increase, so D_b = G^(-1/2) top-b SVD(G^(1/2) D C^(1/2))
    C^(-1/2). G = identity gives the activation-aware pair above.
    """
    root, inv_root = roots if roots is not None else whitening(cov)
    lora_b_w = lora_b.detach().double()
    if out_roots is not None:
        lora_b_w = out_roots[0] @ lora_b_w
    new_a, new_b = svd_truncate(lora_a.detach().double() @ root, lora_b_w, scale, rank, out_scale)
    new_b = new_b.double()
    if out_roots is not None:
        new_b = out_roots[1] @ new_b
    return (new_a.double() @ inv_root).to(lora_a.dtype).contiguous(), new_b.to(lora_b.dtype).contiguous()


@torch.no_grad()
def input_covariances(model: torch.nn.Module, ids: torch.Tensor, batch: int = 64) -> dict[str, torch.Tensor]:
    """E[x x^T] of each LoRA layer's input, the model at full rank, on calibration sequences `ids`."""
    return batch_covariances(model, ({"input_ids": ids[i:i + batch]} for i in range(0, len(ids), batch)))


@torch.no_grad()
def batch_covariances(model: torch.nn.Module, batches: Any) -> dict[str, torch.Tensor]:
    """E[x x^T] of each LoRA layer's input over `batches` (dicts of input_ids and, for padded
    batches, attention_mask: then only the non-pad tokens count), the model at full rank."""
    dr = DynamicRank.of(model)
    moments = _Moments()
    handles = [layer.register_forward_pre_hook(lambda m, inputs, name=name: moments.add(name, inputs[0]))
               for name, layer in lora_layers(dr.model, dr.adapter_name)]
    try:
        model.eval()
        for b in batches:
            moments.set_mask(b.get("attention_mask"))
            model(**{k: b[k] for k in ("input_ids", "attention_mask") if k in b})
    finally:
        for h in handles:
            h.remove()
    return moments.means()


class _Moments:
    """Running E[v v^T] per layer over the rows of v (tokens), only the non-pad ones once a mask is set."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.mask: torch.Tensor | None = None

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        self.mask = attention_mask.bool() if attention_mask is not None else None

    def add(self, name: str, v: torch.Tensor) -> None:
        v = v.detach()
        v = v[self.mask].double() if self.mask is not None and v.dim() == 3 else v.flatten(0, -2).double()
        self.sums[name] = self.sums.get(name, 0) + v.T @ v
        self.counts[name] = self.counts.get(name, 0) + len(v)

    def means(self) -> dict[str, torch.Tensor]:
        return {n: self.sums[n] / self.counts[n] for n in self.sums}


def output_fishers(model: torch.nn.Module, batches: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """E[g g^T] of each LoRA layer's OUTPUT gradient, g = d(-log p(y)) / d(output) with y SAMPLED from
    the model's own next-token distribution (the true Fisher, not the empirical one: at a good fit the
    training loss's own gradients are mostly noise), the model as it is (full rank).

    `batches`: dicts of input_ids and optionally attention_mask (pad tokens' gradients are not counted)
    and labels (then y is sampled only at the positions whose next-token label is not -100: the
    tokens the metric scores). One sample per scored position, torch.Generator(seed): reproducible.
    With `input_covariances` these are K-FAC's two Kronecker factors of each layer's Fisher.
    """
    dr = DynamicRank.of(model)
    moments = _Moments()
    handles = []
    for name, layer in lora_layers(dr.model, dr.adapter_name):
        def fwd(m, inputs, out, name=name):
            if out.requires_grad:
                out.register_hook(lambda g, name=name: moments.add(name, g))
        handles.append(layer.register_forward_hook(fwd))
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    frozen = [w for _, layer in lora_layers(dr.model, dr.adapter_name)
              for w in (layer.lora_A[dr.adapter_name].weight,) if not w.requires_grad]
    for w in frozen:  # a loaded (inference) adapter: the outputs need a graph to have gradients
        w.requires_grad_(True)
    try:
        model.eval()
        for b in batches:
            mask = b.get("attention_mask")
            moments.set_mask(mask)
            logits = model(**{k: b[k] for k in ("input_ids", "attention_mask") if k in b}).logits.float()
            scored = torch.ones(logits.shape[:2], dtype=torch.bool)
            if b.get("labels") is not None:  # position t predicts label t+1
                scored = torch.zeros_like(scored)
                scored[:, :-1] = b["labels"][:, 1:] != -100
            elif mask is not None:
                scored = mask.bool()
            logits = logits[scored]
            with torch.no_grad():
                y = torch.multinomial(F.softmax(logits, -1), 1, generator=gen).squeeze(-1)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(logits, y, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        for w in frozen:
            w.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return moments.means()


def cut_factors(model: torch.nn.Module, b: int, *, roots: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                out_roots: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A', B')}: each layer's r_max delta `scaling * B @ A` cut to rank b, the top-b SVD
    (`svd_truncate`), or with `roots` (layer name -> `whitening` of its input covariance) the
    activation-aware `whitened_truncate`, with `out_roots` too (of its `output_fishers`) the
    Fisher-aware one. PEFT's scaling at rank b (`lora_scale(alpha, b)`) is folded in, so (A', B')
    ARE a rank-b PEFT adapter's factors."""
    dr = DynamicRank.of(model)
    out = {}
    for name, layer in lora_layers(dr.model, dr.adapter_name):
        a, bb = layer.lora_A[dr.adapter_name].weight, layer.lora_B[dr.adapter_name].weight
        assert a.shape[0] >= b
        scale = layer.scaling[dr.adapter_name]
        out_scale = lora_scale(layer.lora_alpha[dr.adapter_name], b, dr.use_rslora)
        if roots is not None:
            out[name] = whitened_truncate(a, bb, scale, b, out_scale, roots=roots[name],
                                          out_roots=out_roots[name] if out_roots is not None else None)
        else:
            out[name] = svd_truncate(a, bb, scale, b, out_scale)
    return out


@contextlib.contextmanager
def svd_at_rank(model: torch.nn.Module, b: int, covs: dict[str, torch.Tensor] | None = None, *,
                roots: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                out_roots: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Run at rank b with each layer's delta replaced by its `cut_factors` (exactly a rank-b PEFT adapter).

    The r_max delta is `scaling * B @ A` with PEFT's scaling at r_max; the cut's A', B' go into
    the first b rows/columns and rank_scope(b) applies lora_scale(alpha, b) to them.
    `covs` (layer name -> input covariance) is the uncomputed form of `roots`.
    """
    dr = DynamicRank.of(model)
    if covs is not None and roots is None:
        roots = {n: whitening(c) for n, c in covs.items()}
    factors = cut_factors(model, b, roots=roots, out_roots=out_roots)
    saved = []
    for name, layer in lora_layers(dr.model, dr.adapter_name):
        a, bb = layer.lora_A[dr.adapter_name].weight, layer.lora_B[dr.adapter_name].weight
        new_a, new_b = factors[name]
        saved.append((a, bb, a.detach().clone(), bb.detach().clone()))
        with torch.no_grad():
            a[:b].copy_(new_a)
            bb[:, :b].copy_(new_b)
    try:
        with rank_scope(model, b):
            yield
    finally:
        with torch.no_grad():
            for a, bb, a0, b0 in saved:
                a.copy_(a0)
                bb.copy_(b0)


# -- one training run -------------------------------------------------------------------------
def train(task: dict[str, Any], args: argparse.Namespace, seed: int, *, r: int, recipe: dict[str, Any] | None,
          init: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, steps: int | None = None,
          lr: float | None = None):
    """Train one adapter; returns (model, cpu seconds, wall seconds, RowScale or None, train loss).

    `init` ({layer name: (A, B)}, e.g. `cut_factors`): start from these factors instead of PEFT's
    init, at a constant LR (healing a cut); `steps` / `lr`: instead of args.steps / args.lr."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    KLTrainer, KLQDyLoraTrainer = _trainer_classes()
    recipe = recipe or {}
    model = load_model(str(task["base"]), load_in_4bit=task["load_in_4bit"])
    torch.manual_seed(seed)
    use_rslora = bool(recipe.get("matryoshka"))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", use_rslora=use_rslora))
    if init is not None:
        dr = DynamicRank.of(model)
        with torch.no_grad():
            for name, layer in lora_layers(dr.model, dr.adapter_name):
                layer.lora_A[dr.adapter_name].weight.copy_(init[name][0])
                layer.lora_B[dr.adapter_name].weight.copy_(init[name][1])
    steps, lr = steps or args.steps, lr or args.lr
    data = KLData(task["train_ids"], task["train_logp"])
    hooks = None
    with tempfile.TemporaryDirectory() as scratch:
        targs = TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=lr,
            lr_scheduler_type="constant" if init is not None else "constant_with_warmup", warmup_steps=0.03,
            max_grad_norm=0.3, weight_decay=0.0, optim="adamw_torch", seed=seed, data_seed=seed,
            logging_steps=max(1, steps // 4),
            save_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True,
            dataloader_num_workers=0, use_cpu=True,
        )
        kwargs = dict(model=model, args=targs, train_dataset=data)
        if "qdylora" in recipe:
            trainer = KLQDyLoraTrainer(**kwargs, qdylora_config=QDyLoraConfig(seed=seed, **recipe["qdylora"]))
        else:
            trainer = KLTrainer(**kwargs)
        if recipe.get("matryoshka"):
            hooks = RowScale(model)
            layer0 = lora_layers(hooks.dr.model, hooks.dr.adapter_name)[0][1]
            p = matryoshka_p(r, [2 ** k for k in range(int(math.log2(r)) + 1)], ALPHA)
            factor = p / layer0.scaling[hooks.dr.adapter_name]  # PEFT already applies alpha/sqrt(r_max)
            hooks.fn = lambda rank: factor
        elif recipe.get("hook") == "const":
            hooks = RowScale(model)
            hooks.fn = lambda rank: torch.full((r,), rank / r)  # alpha/b * b/r_max = alpha/r_max
        c0, t0 = time.process_time(), time.perf_counter()
        loss = trainer.train().training_loss
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    if hooks is not None and recipe.get("matryoshka"):
        hooks.fn = None  # inference: prefix b with its own scale alpha/sqrt(b)
    model.eval()
    return model, cpu, wall, hooks, loss


CALIBRATION_SEQS = 128  # the first training sequences: activation-aware SVD never sees the held-out set


CUTS = ("svd", "asvd", "fsvd")  # the truncations of an r_max delta; "" (slicing) is the prefix


def calibration_roots(model: torch.nn.Module, task: dict[str, Any], cut: str):
    """(input roots, output roots) of each layer for `cut` on the first CALIBRATION_SEQS training
    sequences: asvd needs the input covariances, fsvd also the output Fishers; svd neither."""
    if cut not in ("asvd", "fsvd"):
        return None, None
    calib = task["train_ids"][:CALIBRATION_SEQS]
    roots = {n: whitening(c) for n, c in input_covariances(model, calib).items()}
    if cut == "asvd":
        return roots, None
    fishers = output_fishers(model, ({"input_ids": calib[i:i + 64]} for i in range(0, len(calib), 64)))
    return roots, {n: whitening(g) for n, g in fishers.items()}


def measure(model, task, ranks: list[int], *, hooks: RowScale | None, cut: str = "") -> dict[str, float]:
    """{rank: excess}: the prefix (cut ""), or the r_max delta cut to each rank by `cut` in CUTS
    (svd, activation-aware svd, Fisher-aware svd; the calibration is measured at full rank)."""
    out = {}
    if not cut:
        for b in ranks:
            with rank_scope(model, b):
                out[str(b)] = excess(model, task)
        return out
    saved = hooks.fn if hooks is not None else None
    if hooks is not None:
        hooks.fn = None  # the r_max delta is scaling(r_max) * B A for every recipe here
    try:
        roots, out_roots = calibration_roots(model, task, cut)
        for b in ranks:
            with svd_at_rank(model, b, roots=roots, out_roots=out_roots):
                out[str(b)] = excess(model, task)
    finally:
        if hooks is not None:
            hooks.fn = saved
    return out


# -- the benchmark ----------------------------------------------------------------------------
def run_seed(task: dict[str, Any], args: argparse.Namespace, seed: int, arms: list[str]) -> dict[str, Any]:
    ranks, r_max = args.ranks, args.r_max
    res: dict[str, Any] = {}
    tag = f"[s{seed}]"

    # the plain r_max run: dedicated at r_max, prefix and svd truncations; its CPU time is the unit
    model, cpu_plain, wall, _, loss = train(task, args, seed, r=r_max, recipe=None)
    print(f"{tag} plain r{r_max}: {cpu_plain:.1f}s CPU ({wall:.1f}s wall), train KL {loss:.5f}", flush=True)
    res["lora_rmax_prefix"] = {"ranks": measure(model, task, ranks, hooks=None), "cpu": cpu_plain}
    for cut in CUTS:
        if cut == "svd" or f"lora_rmax_{cut}" in arms:  # svd always: it is the bar
            res[f"lora_rmax_{cut}"] = {"ranks": measure(model, task, ranks, hooks=None, cut=cut),
                                       "cpu": cpu_plain + _svd_cpu(model, ranks, task, cut=cut)}
    for cut in ("svd", "fsvd"):
        if f"lora_rmax_{cut}+heal" in arms:
            res[f"lora_rmax_{cut}+heal"] = healed(model, task, args, seed, cut, res["lora_rmax_prefix"]["ranks"])
            res[f"lora_rmax_{cut}+heal"]["cpu"] += cpu_plain
            print(f"{tag} lora_rmax_{cut}+heal: " + "  ".join(
                f"r{b} {v:.5f}" for b, v in res[f"lora_rmax_{cut}+heal"]["ranks"].items()), flush=True)
    del model
    gc.collect()
    starts = [c for c in SHORT_STARTS if f"lora_short_{c}+heal" in arms]
    if starts:
        res.update(short_healed(task, args, seed, tag, starts))
    if "dedicated_cooldown" in arms:
        res["dedicated_cooldown"] = cooled(task, args, seed, tag)

    if "dedicated" in arms:
        ded, cpu_total = {}, 0.0
        for b in ranks:
            if b == r_max:
                ded[str(b)] = res["lora_rmax_prefix"]["ranks"][str(b)]
                cpu_total += cpu_plain
                continue
            model, cpu, wall, _, loss = train(task, args, seed, r=b, recipe=None)
            ded[str(b)] = excess(model, task)
            cpu_total += cpu
            print(f"{tag} dedicated r{b}: {cpu:.1f}s CPU, excess {ded[str(b)]:.5f}", flush=True)
            del model
            gc.collect()
        res["dedicated"] = {"ranks": ded, "cpu": cpu_total}

    for name, recipe in recipes().items():
        if not ({name} | {f"{name}+{cut}" for cut in CUTS}) & set(arms):
            continue
        model, cpu, wall, hooks, loss = train(task, args, seed, r=r_max, recipe=recipe)
        print(f"{tag} {name}: {cpu:.1f}s CPU ({wall:.1f}s wall), train KL {loss:.5f}", flush=True)
        res[name] = {"ranks": measure(model, task, ranks, hooks=hooks), "cpu": cpu}
        for cut in CUTS:
            if cut == "svd" or f"{name}+{cut}" in arms:
                res[f"{name}+{cut}"] = {"ranks": measure(model, task, ranks, hooks=hooks, cut=cut),
                                        "cpu": cpu + _svd_cpu(model, ranks, task, hooks, cut=cut)}
        del model
        gc.collect()
    for name, r in res.items():
        r["cost"] = r.pop("cpu") / cpu_plain
        if "cpu_one_rank" in r:
            r["cost_one_rank"] = r.pop("cpu_one_rank") / cpu_plain
        print(f"{tag} {name:20s} " + "  ".join(f"r{b} {v:.5f}" for b, v in r["ranks"].items())
              + f"  cost {r['cost']:.2f}", flush=True)
    return {"plain_cpu_seconds": cpu_plain, "arms": res}


def _continue(task: dict[str, Any], args: argparse.Namespace, seed: int, init, b: int):
    """(excess, cpu) of a rank-b adapter started from `init` and trained args.heal_steps steps at
    args.heal_lr (constant), data order seed + 100: one healing run (own ideas 5 and 6)."""
    student, cpu, *_ = train(task, args, seed + 100, r=b, recipe=None, init=init,
                             steps=args.heal_steps, lr=args.heal_lr)
    value = excess(student, task)
    del student
    gc.collect()
    return value, cpu


def healed(model, task: dict[str, Any], args: argparse.Namespace, seed: int, cut: str,
           full: dict[str, float]) -> dict[str, Any]:
    """Own idea 5: each rank b < r_max of the plain r_max run, cut by `cut` (svd or fsvd), then
    trained on its own for args.heal_steps steps at args.heal_lr (constant), data order seed + 100,
    from the cut's factors: a rank-b PEFT adapter, "healed". r_max is the run itself (`full`).
    cpu = the calibration + every healing run (the caller adds the plain run's)."""
    c0 = time.process_time()
    roots, out_roots = calibration_roots(model, task, cut)
    cpu = time.process_time() - c0
    out = {}
    for b in args.ranks:
        if b == args.r_max:
            out[str(b)] = full[str(b)]
            continue
        c0 = time.process_time()
        init = cut_factors(model, b, roots=roots, out_roots=out_roots)
        cpu += time.process_time() - c0
        out[str(b)], heal_cpu = _continue(task, args, seed, init, b)
        cpu += heal_cpu
    return {"ranks": out, "cpu": cpu}


def prefix_factors(model, b: int, *, balanced: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A', B')}: each layer's prefix cut at rank b as a rank-b PEFT adapter's factors:
    the run's own (A[:b], B[:, :b]) (the same alpha gives the rank-b adapter scale alpha/b, what
    rank_scope(b) applies), or with `balanced` the same rank-b delta refactored by `svd_truncate`
    (exact: a rank-b delta kept at rank b) into balanced factors, as the svd cut's are."""
    dr = DynamicRank.of(model)
    out = {}
    for name, layer in lora_layers(dr.model, dr.adapter_name):
        a = layer.lora_A[dr.adapter_name].weight.detach()[:b].clone()
        bb = layer.lora_B[dr.adapter_name].weight.detach()[:, :b].clone()
        if balanced:
            scale = lora_scale(layer.lora_alpha[dr.adapter_name], b, dr.use_rslora)
            a, bb = svd_truncate(a, bb, scale, b, scale)
            a, bb = a.to(layer.lora_A[dr.adapter_name].weight.dtype), bb.to(layer.lora_B[dr.adapter_name].weight.dtype)
        out[name] = (a, bb)
    return out


def short_healed(task: dict[str, Any], args: argparse.Namespace, seed: int, tag: str,
                 starts: list[str]) -> dict[str, dict[str, Any]]:
    """Own ideas 6 and 7: a plain r_max run of args.steps - args.heal_steps steps, then EVERY rank b
    (r_max included: its svd cut is the run itself in its SVD basis) cut by each of `starts`
    (SHORT_STARTS) and healed for args.heal_steps: one shipped rank costs one plain run.
    {arm: {"ranks", "cpu": the short run + every healing, "cpu_one_rank": the short run + the
    dearest single healing}}."""
    model, cpu_short, *_ = train(task, args, seed, r=args.r_max, recipe=None, steps=args.steps - args.heal_steps)
    res = {}
    for start in starts:
        out, heal_cpus = {}, []
        for b in args.ranks:
            c0 = time.process_time()
            init = cut_factors(model, b) if start == "svd" else prefix_factors(model, b, balanced=start == "bprefix")
            cut_cpu = time.process_time() - c0
            out[str(b)], cpu = _continue(task, args, seed, init, b)
            heal_cpus.append(cut_cpu + cpu)
        print(f"{tag} lora_short_{start}+heal: " + "  ".join(f"r{b} {v:.5f}" for b, v in out.items()), flush=True)
        res[f"lora_short_{start}+heal"] = {"ranks": out, "cpu": cpu_short + sum(heal_cpus),
                                          "cpu_one_rank": cpu_short + max(heal_cpus)}
    del model
    gc.collect()
    return res


def cooled(task: dict[str, Any], args: argparse.Namespace, seed: int, tag: str) -> dict[str, Any]:
    """The limit for own idea 6: each rank's dedicated run, shortened by args.heal_steps, then
    continued from its own factors exactly as a healing run (`_continue`)."""
    out, cpu_total = {}, 0.0
    for b in args.ranks:
        model, cpu, *_ = train(task, args, seed, r=b, recipe=None, steps=args.steps - args.heal_steps)
        dr = DynamicRank.of(model)
        init = {name: (layer.lora_A[dr.adapter_name].weight.detach().clone(),
                       layer.lora_B[dr.adapter_name].weight.detach().clone())
                for name, layer in lora_layers(dr.model, dr.adapter_name)}
        del model
        gc.collect()
        out[str(b)], heal_cpu = _continue(task, args, seed, init, b)
        cpu_total += cpu + heal_cpu
    print(f"{tag} dedicated_cooldown: " + "  ".join(f"r{b} {v:.5f}" for b, v in out.items()), flush=True)
    return {"ranks": out, "cpu": cpu_total}


def _svd_cpu(model, ranks: list[int], task: dict[str, Any], hooks: RowScale | None = None, cut: str = "svd") -> float:
    """CPU seconds of computing the `cut` truncations (all ranks, all layers), the calibration
    passes of asvd / fsvd included (measured again here, not taken from `measure`'s timing,
    which includes the evaluations)."""
    dr = DynamicRank.of(model)
    c0 = time.process_time()
    saved = hooks.fn if hooks is not None else None
    if hooks is not None:
        hooks.fn = None
    try:
        roots, out_roots = calibration_roots(model, task, cut)
    finally:
        if hooks is not None:
            hooks.fn = saved
    for name, layer in lora_layers(dr.model, dr.adapter_name):
        a, bb = layer.lora_A[dr.adapter_name].weight, layer.lora_B[dr.adapter_name].weight
        for b in ranks:
            if roots is None:
                svd_truncate(a, bb, layer.scaling[dr.adapter_name], b, 1.0)
            else:
                whitened_truncate(a, bb, layer.scaling[dr.adapter_name], b, 1.0, roots=roots[name],
                                  out_roots=out_roots[name] if out_roots is not None else None)
    return time.process_time() - c0


def summarise(per_seed: dict[str, Any], ranks: list[int]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    seeds = sorted(per_seed, key=int)
    names = [n for n in ARM_ORDER if all(n in per_seed[s]["arms"] for s in seeds)]
    for name in names:
        vals = {str(b): [per_seed[s]["arms"][name]["ranks"][str(b)] for s in seeds] for b in ranks}
        a_seed = [aurac({b: per_seed[s]["arms"][name]["ranks"][str(b)] for b in ranks}) for s in seeds]
        arms[name] = {
            "ranks": {b: sum(v) / len(v) for b, v in vals.items()},
            "half_spread": {b: (max(v) - min(v)) / 2 for b, v in vals.items()},
            "per_seed": {b: v for b, v in vals.items()},
            "one_run": not name.startswith("dedicated") and not name.endswith("+heal"),  # healing trains a run per rank
            "cost": sum(per_seed[s]["arms"][name]["cost"] for s in seeds) / len(seeds),
            **({"cost_one_rank": sum(per_seed[s]["arms"][name]["cost_one_rank"] for s in seeds) / len(seeds)}
               if all("cost_one_rank" in per_seed[s]["arms"][name] for s in seeds) else {}),
            "aurac": sum(a_seed) / len(a_seed),
            "aurac_per_seed": a_seed,
        }
    one_run = [n for n in arms if arms[n]["one_run"]]
    best = None
    if one_run:  # lowest AURAC; among arms within 1% of it, the cheapest
        low = min(arms[n]["aurac"] for n in one_run)
        best = min((n for n in one_run if arms[n]["aurac"] <= 1.01 * low), key=lambda n: (arms[n]["cost"], arms[n]["aurac"]))
    best_at = {str(b): min(one_run, key=lambda n: arms[n]["ranks"][str(b)]) for b in ranks} if one_run else {}
    return {"ranks": ranks, "seeds": [int(s) for s in seeds], "arms": arms, "best_one_run": best,
            "best_one_run_at_rank": best_at}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and measure arms", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--arms", default=",".join(ARM_ORDER), help="comma-separated arm names")
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("--ranks", default="1,4,16,64")
    run.add_argument("--r-max", type=int, default=64)
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--batch", type=int, default=16)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--vocab", type=int, default=256)
    run.add_argument("--hidden", type=int, default=128, help="4 heads: head_dim = hidden / 4")
    run.add_argument("--layers", type=int, default=2)
    run.add_argument("--init-range", type=float, default=0.02, help="std of the base's random init")
    run.add_argument("--seq-len", type=int, default=32)
    run.add_argument("--train-seqs", type=int, default=1024)
    run.add_argument("--eval-seqs", type=int, default=128)
    run.add_argument("--plant-rank", type=int, default=32)
    run.add_argument("--plant-size", type=float, default=1.0, help="top planted singular value / sigma_1(W0)")
    run.add_argument("--plant-decay", type=float, default=1.0, help="s_k proportional to (k+1)^-decay")
    run.add_argument("--heal-steps", type=int, default=30, help="X+heal arms: steps per healed rank (10%% of 300)")
    run.add_argument("--heal-lr", type=float, default=3e-4, help="X+heal arms: constant LR of the healing steps")
    run.add_argument("--fp32-base", action="store_true",
                     help="student base in fp32 instead of NF4 (the issue's first measurement)")
    run.add_argument("--task-seed", type=int, default=0, help="base, planted delta and sequences")
    run.add_argument("--out", default=str(RESULTS / "planted.json"))
    run.add_argument("--title", default="Main experiment: the default setting")
    orc = sub.add_parser("oracle", help="add the oracle row to an existing results file (its own settings)")
    orc.add_argument("json")
    rep = sub.add_parser("report", help="write planted.md and planted.png from planted.json")
    rep.add_argument("--json", nargs="+", default=None,
                     help="results files, main first (default: results/planted.json, then results/planted.*.json)")
    rep.add_argument("--md", default=str(RESULTS / "planted.md"))
    rep.add_argument("--findings", default=str(RESULTS / "planted.findings.md"),
                     help="hand-written conclusions put at the top of the report (if the file exists)")
    args = p.parse_args(argv)
    if args.command == "run":
        args.ranks = [int(x) for x in args.ranks.split(",")]
        args.arms = [a for a in args.arms.split(",") if a]
        unknown = sorted(set(args.arms) - set(ARM_ORDER))
        if unknown:
            p.error(f"unknown arm(s) {unknown}; choose from {ARM_ORDER}")
    return args


def main_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as work:
        c0 = time.process_time()
        task = make_task(args, Path(work))
        print(f"task built in {time.process_time() - c0:.1f}s CPU", flush=True)
        zero = _zero_shot(task)
        print(f"zero-shot excess {zero:.5f}", flush=True)
        orc = oracle(task, args.ranks, args.r_max)
        print("oracle (planted delta, top-b SVD): " + "  ".join(f"r{b} {v:.5f}" for b, v in orc.items()), flush=True)
        per_seed = {}
        for seed in seeds:
            per_seed[str(seed)] = run_seed(task, args, seed, args.arms)
            out = summarise(per_seed, args.ranks)
            out.update(_meta(args, zero))
            out["oracle"] = orc
            out["per_seed"] = per_seed
            write_json_atomic(args.out, out)
            if "dedicated" in out["arms"]:
                d = out["arms"]["dedicated"]["ranks"]
                lo, hi = str(args.ranks[0]), str(args.ranks[-1])
                print(f"rank matters: dedicated r{lo} / r{hi} excess = {d[lo] / d[hi]:.1f}x "
                      f"(mean over seeds so far)", flush=True)
    print(f"wrote {args.out}", flush=True)


def main_oracle(path: Path) -> None:
    """Rebuild the task of a results file from its settings and add the oracle row to it."""
    data = json.loads(path.read_text())
    s = data["settings"]
    ns = argparse.Namespace(**{**{"fp32_base": False}, **s})
    with tempfile.TemporaryDirectory() as work:
        task = make_task(ns, Path(work))
        zero = _zero_shot(task)
        if abs(zero - data["zero_shot_excess"]) > 1e-9:
            raise RuntimeError(f"rebuilt task differs: zero-shot {zero} vs {data['zero_shot_excess']}")
        data["oracle"] = oracle(task, s["ranks"], s["r_max"])
    data["oracle_command"] = f"python benchmarks/planted.py oracle {path.name}"
    write_json_atomic(path, data)
    print(data["oracle"])


def _zero_shot(task: dict[str, Any]) -> float:
    model = load_model(str(task["base"]), load_in_4bit=task["load_in_4bit"], prepare_for_training=False)
    return excess(model, task)


def _meta(args: argparse.Namespace, zero: float) -> dict[str, Any]:
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "out", "title")}
    return {
        "title": args.title,
        "zero_shot_excess": zero,
        "settings": settings,
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)") + " python benchmarks/planted.py "
                   + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "finished": time.strftime("%Y-%m-%d %H:%M"),
    }


# -- report -----------------------------------------------------------------------------------
def section(data: dict[str, Any], title: str) -> list[str]:
    """The markdown of one experiment (one results file)."""
    ranks = [str(b) for b in data["ranks"]]
    arms = data["arms"]
    lines = [f"## {title}", "", f"Command: `{data['command']}` (finished {data['finished']})", "",
             f"Machine: {data['machine']}. Seeds {data['seeds']}: each cell is mean ± half the spread "
             f"(max-min)/2 over seeds of the held-out excess KL over the teacher (lower is better). "
             f"Zero-shot (no adapter) excess: {data['zero_shot_excess']:.5f}. Cost: CPU seconds relative to "
             "one plain r_max run (process time, cores shared with other jobs).", ""]
    s = data["settings"]
    lines += [f"Task: {'fp32' if s.get('fp32_base') else 'NF4'} student base, vocab {s['vocab']}, hidden {s['hidden']}, "
              f"{s['layers']} layers, planted rank {s['plant_rank']}, "
              f"size {s['plant_size']}, decay {s['plant_decay']}; {s['steps']} steps x batch {s['batch']} x "
              f"{s['seq_len']} tokens, LR {s['lr']}, r_max {s['r_max']}, alpha {ALPHA}.", ""]
    if "dedicated" in arms:
        ded = arms["dedicated"]["ranks"]
        lines += [f"Rank matters: dedicated rank {ranks[0]} / rank {ranks[-1]} excess = "
                  f"**{ded[ranks[0]] / ded[ranks[-1]]:.1f}x** (per seed: "
                  + ", ".join(f"{a / b:.1f}x" for a, b in zip(arms['dedicated']['per_seed'][ranks[0]],
                                                                arms['dedicated']['per_seed'][ranks[-1]])) + ").", ""]
    lines += ["| arm | one run | " + " | ".join(f"r{b}" for b in ranks) + " | AURAC | cost |",
              "|---|---|" + "---|" * len(ranks) + "---|---|"]
    for name, a in arms.items():
        cells = [f"{a['ranks'][b]:.5f} ± {a['half_spread'][b]:.5f}" for b in ranks]
        lines.append(f"| {name} | {'yes' if a['one_run'] else 'no'} | " + " | ".join(cells)
                     + f" | {a['aurac']:.6f} | {a['cost']:.2f} |")
    lines.append("")
    one_rank = {n: a["cost_one_rank"] for n, a in arms.items() if "cost_one_rank" in a}
    if one_rank:
        lines += ["Cost of ONE shipped rank (the shortened run + that rank's healing; `cost` heals every rank): "
                  + ", ".join(f"{n} {c:.2f}" for n, c in one_rank.items()) + ".", ""]
    if data.get("oracle"):
        lines += ["Oracle (no training: the student's delta is the top-b SVD of the planted delta, the "
                  "weight-space optimum at each rank): " + ", ".join(f"r{b} {max(data['oracle'][b], 0.0):.5f}" for b in ranks)
                  + (f" (added by `{data['oracle_command']}`)" if data.get("oracle_command") else "") + ".", ""]
    if "dedicated" in arms:
        lines += ["Ratio to dedicated (mean excess / dedicated mean excess):", "",
                  "| arm | " + " | ".join(f"r{b}" for b in ranks) + " |", "|---|" + "---|" * len(ranks)]
        for name, a in arms.items():
            lines.append(f"| {name} | " + " | ".join(f"{a['ranks'][b] / ded[b]:.2f}" for b in ranks) + " |")
        lines.append("")
    if data.get("best_one_run"):
        one = [n for n, a in arms.items() if a["one_run"]]
        near = {b: [n for n in one if arms[n]["ranks"][b] <= 1.01 * min(arms[m]["ranks"][b] for m in one)]
                for b in ranks}
        lines += [f"Best one-run arm by AURAC (the cheapest within 1% of the lowest): **{data['best_one_run']}** "
                  "(one-run arms within 1% of the lowest: "
                  + ", ".join(n for n in one if arms[n]["aurac"] <= 1.01 * min(arms[m]["aurac"] for m in one))
                  + "). Best one-run arm per rank (then any within 1% of it): "
                  + "; ".join(f"r{b}: {', '.join(sorted(near[b], key=lambda n: arms[n]['ranks'][b]))}" for b in ranks)
                  + ".", ""]
    if "lora_rmax_svd" in arms:
        svd = arms["lora_rmax_svd"]["ranks"]
        def at_or_below(n: str) -> bool:  # equal (0.1%: float rounding of the swapped factors) counts
            return all(arms[n]["ranks"][b] <= svd[b] * (1 + 1e-3) for b in ranks) and \
                any(arms[n]["ranks"][b] < svd[b] * (1 - 1e-3) for b in ranks)

        strict = [n for n in arms if n not in ("dedicated", "lora_rmax_svd") and arms[n]["one_run"]
                  and all(arms[n]["ranks"][b] < svd[b] * (1 - 1e-3) for b in ranks)]
        weak = [n for n in arms if n not in ("dedicated", "lora_rmax_svd") and arms[n]["one_run"]
                and at_or_below(n) and n not in strict]
        lines += ["One-run arms below lora_rmax_svd at every rank (means): " + (", ".join(strict) or "none")
                  + "; at or below it at every rank and below it at some: " + (", ".join(weak) or "none") + ".", ""]
    return lines


def write_report(files: list[Path], md_path: Path, png_path: Path, findings: Path | None = None) -> None:
    """planted.md: one section per results file (the first is the main experiment, plotted)."""
    lines = ["# Planted-rank yardstick (issue 12, section 1)", "",
             "Written by `python benchmarks/planted.py report` from the results files named in each section; "
             "the task, the arms and AURAC are defined in the docstring of benchmarks/planted.py.", ""]
    if findings is not None and findings.is_file():
        lines += findings.read_text().splitlines() + [""]
    datas = [json.loads(f.read_text()) for f in files]
    for f, data in zip(files, datas):
        title = data.get("title") or ("Main experiment: the default setting" if f.name == "planted.json" else f.name)
        lines += section(data, title + f" (`{f.name}`)")
    md_path.write_text("\n".join(lines) + "\n")
    plot(datas[0], png_path)


def plot(data: dict[str, Any], png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = data["ranks"]
    fig, ax = plt.subplots(figsize=(9, 6))
    families = ["lora_rmax"] + TRAINED
    colors = plt.get_cmap("tab10")
    for name, a in data["arms"].items():
        ys = [a["ranks"][str(b)] for b in ranks]
        if name.startswith("dedicated"):
            style = dict(color="black", linestyle="--", linewidth=2.5 if name == "dedicated" else 1.2)
        else:  # one colour per training run; slicing solid, +svd dotted, +asvd dash-dot, +fsvd dashed
            family = "lora_rmax" if name.startswith("lora_") else name.split("+")[0]
            cut = name.split("+")[-1] if "+" in name else name[len("lora_rmax_"):] if name.startswith("lora_rmax_") else ""
            cut = "" if cut == "prefix" else cut
            style = dict(color=colors(families.index(family) % 10), marker="oxs^*"[["", "svd", "asvd", "fsvd", "heal"].index(cut)],
                         markersize=4, linestyle={"": "-", "svd": ":", "asvd": "-.", "fsvd": (0, (5, 2)), "heal": "-"}[cut])
            if cut == "heal":  # healed cuts: the family's colour would hide them among the plain run's lines
                color = ("crimson" if "fsvd" in name else "teal" if "bprefix" in name else
                         "purple" if "prefix" in name else "darkorange")
                style.update(color=color, linewidth=2, markersize=7)
        ax.plot(ranks, ys, label=name, **style)
    ax.axhline(data["zero_shot_excess"], color="grey", linewidth=0.8, label="zero-shot")
    if data.get("oracle"):  # zero (to rounding) at ranks >= the planted rank: not drawn on a log axis
        pts = [(b, data["oracle"][str(b)]) for b in ranks if data["oracle"][str(b)] > 1e-8]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="grey", linestyle="--", linewidth=1,
                label="oracle: planted delta, top-b SVD (0 at r64)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank b")
    ax.set_ylabel("held-out excess KL over the teacher")
    ax.set_title(f"Planted-rank yardstick (mean of seeds {data['seeds']}); dashed: dedicated (the limit)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "run":
        main_run(args)
        out = Path(args.out)
        write_report([out], out.with_suffix(".md"), out.with_suffix(".png"))
    elif args.command == "oracle":
        main_oracle(Path(args.json))
    else:
        files = [Path(f) for f in args.json] if args.json else \
            [RESULTS / "planted.json"] + sorted(RESULTS.glob("planted.*.json"), key=lambda f: (EXTRAS.index(f.name) if f.name in EXTRAS else len(EXTRAS), f.name))
        md = Path(args.md)
        write_report(files, md, md.with_suffix(".png"), Path(args.findings))
        print(md.read_text())


if __name__ == "__main__":
    main()

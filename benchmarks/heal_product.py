"""Does `qdylora heal` (the product) give what benchmarks/real.py's heal readout measured?

real.py measured healing with its own loop (the svd cut copied into a fresh rank-b PEFT adapter,
a plain `transformers.Trainer`). This heals the same cached runs through the product path,
`qdylora.workflow.heal` (= `qdylora heal CONFIG.yaml --rank B`: export the svd cut, train it from
`lora_model_dir` with preset plain), from a `Recipe` that describes real.py's demo run (same data,
template, max_length, batch, LR, schedule, clipping, seeds), then measures the answer loss on
val and test exactly as real.py does and prints both side by side.

    OMP_NUM_THREADS=1 python benchmarks/real.py run demo plain --seeds 0,1      # the runs (cached)
    OMP_NUM_THREADS=1 python benchmarks/heal_product.py --ranks 1 --seeds 0,1   # -> results/heal_product.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_table import TEMPLATE, answer_loss  # noqa: E402
from real import RUNS, TASKS, WORK, demo_problems  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def recipe_for(model: str, seed: int, folder: Path):
    """real.py's demo run (`train`) as a qdylora Recipe: the YAML `qdylora heal` would be given."""
    from qdylora.recipe import Recipe

    cfg = TASKS["demo"]
    probs = demo_problems()
    for split in ("train", "val"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for p in probs[split]:  # real.py encodes " " + answer after the template
                f.write(json.dumps({"question": p["question"], "answer": " " + p["answer"]}) + "\n")
    spec = {"template": TEMPLATE, "max_length": cfg["max_length"], "prompt_field": "question", "answer_field": "answer"}
    return Recipe.from_dict({
        "model": model,
        "data": {"path": str(folder / "train.jsonl"), **spec},
        "eval_data": {"path": str(folder / "val.jsonl"), **spec},
        "qdylora": {"preset": "plain"},
        "training": {"output_dir": str(folder / "unused"), "max_steps": cfg["steps"],
                     "per_device_train_batch_size": cfg["batch"], "learning_rate": cfg["lr"],
                     "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 0.03, "max_grad_norm": 0.3,
                     "weight_decay": 0.0, "seed": seed, "data_seed": seed, "disable_tqdm": True,
                     "logging_steps": 1000},
        "sweep": {"enabled": False},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    for seed in seeds:  # before loading anything
        for need in (RUNS / "demo" / f"plain-s{seed}.json", WORK / "demo" / f"plain-s{seed}"):
            if not need.exists():
                sys.exit(f"{need} does not exist: run `real.py run demo plain --seeds {seed}` first")

    import torch
    from peft import PeftModel

    from qdylora import load_model
    from qdylora.data import collator, encode, load_tokenizer
    from qdylora.demo.smollm2 import smollm2_path
    from qdylora.workflow import heal

    model = str(smollm2_path())
    tokenizer = load_tokenizer(model)
    cfg = TASKS["demo"]
    import datasets

    probs = demo_problems()
    data = {s: datasets.Dataset.from_list([encode(p["question"], " " + p["answer"], tokenizer, TEMPLATE, cfg["max_length"])
                                           for p in probs[s]]) for s in cfg["splits"]}
    out = {"command": "OMP_NUM_THREADS=1 python benchmarks/heal_product.py " + " ".join(sys.argv[1:]),
           "ranks": ranks, "seeds": {}}
    for seed in seeds:
        rec = json.loads((RUNS / "demo" / f"plain-s{seed}.json").read_text())
        bench = rec["readouts"]["heal"]
        row = out["seeds"][str(seed)] = {}
        with tempfile.TemporaryDirectory() as scratch:
            recipe = recipe_for(model, seed, Path(scratch))
            for b in ranks:
                c0 = time.process_time()
                healed = heal(recipe, b, Path(scratch) / f"healed-{b}", adapter_dir=WORK / "demo" / f"plain-s{seed}")
                cpu = time.process_time() - c0
                student = PeftModel.from_pretrained(load_model(model), str(healed.adapter_dir))
                with torch.no_grad():
                    got = {s: answer_loss(student, data[s], collator(tokenizer), cfg["eval_batch"]) for s in cfg["splits"]}
                row[str(b)] = {"product": got, "real_py": {s: bench[s][str(b)] for s in cfg["splits"]},
                               "steps": healed.info["steps"], "learning_rate": healed.info["learning_rate"],
                               "heal_cpu_seconds": cpu}
                print(f"seed {seed} rank {b}: " + ", ".join(
                    f"{s} qdylora heal {got[s]:.5f} vs real.py {bench[s][str(b)]:.5f} "
                    f"({got[s] / bench[s][str(b)]:.4f}x)" for s in cfg["splits"]), flush=True)
                del student
    (RESULTS / "heal_product.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Healing the rank you ship, the Axolotl way: a second, short `axolotl train` of the cut.

With `qdylora_heal_rank: B` (or `recommended`, or a list), after the run the plugin exports rank B's cut
into `<output_dir>/qdylora-healed/cut-<method>/rank-<b>/` and writes the healing run's config
`<output_dir>/qdylora-healed/rank-<b>.yml`: the run's own YAML file with the keys `heal_config`
changes, so that `axolotl train <that file>` (from where the run started: its relative paths)
trains the cut alone by `HealSettings`' rule, as `qdylora heal` does for a qdylora YAML, into
`<output_dir>/qdylora-healed/rank-<b>/`, and measures rank b on the same eval set
(its rank_sweep.json; with `val_set_size` the config keeps the run's `seed`, which Axolotl
shuffles and splits the data with, so the healing trains and measures on the run's split). With
several `qdylora_heal_method`s, one cut and one config per method (`rank-<b>-<method>.yml`): run
each and keep the lower eval loss.

Why a config and not the training itself: in `post_train` the run's model, optimizer state and
process group are still alive (two models would not fit where one barely does, and a second
training inside DeepSpeed/FSDP hooks is not something Axolotl supports); a config is also what an
Axolotl user reads, edits and launches the way they launched the run.

No Axolotl import here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import HealSettings, write_text_atomic

# keys of the run's config that must not carry over to the healing run: resuming the run, pushing over
# its hub repo, its warmup; every qdylora_* key (the healing run is preset plain at lora_r = b)
NOT_CARRIED = ("resume_from_checkpoint", "auto_resume_from_checkpoints", "hub_model_id", "warmup_ratio",
               "lora_model_dir")


def heal_config(run: dict[str, Any], *, rank: int, cut_dir: str | os.PathLike, out_dir: str | os.PathLike,
                steps: int, learning_rate: float, seed: int) -> dict[str, Any]:
    """The run's Axolotl config (the YAML as written) turned into the healing run of rank `rank`:
    start from the cut (`lora_model_dir`, `lora_r` = b), `steps` steps at `learning_rate`, constant,
    no warmup, `seed`, into `out_dir`; every step at rank b (`qdylora_preset: plain`) and the sweep
    measuring rank b only, so its rank_sweep.json compares with the run's."""
    cfg = {k: v for k, v in run.items() if not k.startswith("qdylora_") and k not in NOT_CARRIED}
    cfg.update(lora_model_dir=str(cut_dir), lora_r=rank, max_steps=steps, learning_rate=learning_rate,
               lr_scheduler="constant", warmup_steps=0, seed=seed, output_dir=str(out_dir),
               qdylora_preset="plain", qdylora_eval_ranks=[rank], qdylora_sweep_methods=["svd"])
    if run.get("qdylora_sweep") is False:
        cfg["qdylora_sweep"] = False
    return cfg


def write_config(path: Path, cfg: dict[str, Any], header: str) -> None:
    """`cfg` as YAML at `path` (atomically: a temporary file renamed into place), `header` as comments."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(f"# {line}\n" for line in header.splitlines())
                      + yaml.safe_dump(cfg, sort_keys=False))


def prepare_healing(output_dir: str | os.PathLike, config_path: str | os.PathLike | None, settings: HealSettings,
                    *, ranks: Sequence[int | str], run_steps: int, learning_rate: float, seed: int) -> list[str]:
    """Export each of `ranks`' cut(s) of the adapter in `output_dir` and write the healing config(s) next
    to them (`heal_config`), from the run's YAML at `config_path`. `ranks` are integers or
    "recommended" (the sweep recorded there), resolved as `qdylora heal` resolves them
    (`workflow.heal_plan`). Returns the lines to log."""
    import yaml

    from ..exporters import export_adapters
    from ..exporters.source import SourceAdapter
    from ..workflow import HEALED_DIR, heal_plan

    out = Path(output_dir).resolve()
    if config_path is None or not Path(config_path).is_file():
        return [f"qdylora_heal_rank: the run's config file is not known ({config_path!r}), so no healing config was "
                f"written; heal by hand: README, 'Which pipeline'"]
    run = yaml.safe_load(Path(config_path).read_text())
    healed = out / HEALED_DIR
    source = SourceAdapter.open(out, methods=settings.methods)  # the prefix rule of each cut
    cuts_of: dict[str, list[int]] = {}  # method -> the ranks healed from its cut
    for b, picks in sorted(heal_plan(source, list(ranks), settings.methods).items()):
        for _, method in picks:
            cuts_of.setdefault(method, []).append(b)
    methods = list(cuts_of)
    steps = settings.steps_for(run_steps)
    # Axolotl shuffles the data and splits val_set_size off it with `seed` (it has no data_seed): a healing
    # run with another seed would measure on other records and train on the run's eval records, so with
    # val_set_size it keeps the run's seed (and so its split); without, seed + seed_offset, another data order
    same_split = bool(run.get("val_set_size"))
    lr, heal_seed = learning_rate * settings.lr_factor, seed if same_split else seed + settings.seed_offset
    lines = []
    for method, method_ranks in cuts_of.items():  # one export per cut: it writes cut-<method>/ as one folder
        cuts = export_adapters(out, healed / f"cut-{method}", method_ranks, method=method, overwrite=True,
                               inside_adapter=True)
        for rank in method_ranks:
            name = f"rank-{rank}" if len(methods) == 1 else f"rank-{rank}-{method}"
            cut = cuts[rank]
            cfg = heal_config(run, rank=rank, cut_dir=cut, out_dir=healed / name, steps=steps, learning_rate=lr,
                              seed=heal_seed)
            yml = healed / f"{name}.yml"
            write_config(yml, cfg, f"Healing rank {rank} of {out} (its {method} cut), written by {__package__}: "
                                   f"{config_path} with lora_model_dir, lora_r,\nmax_steps, learning_rate, lr_scheduler, "
                                   f"warmup_steps, seed, output_dir and the qdylora_* keys changed.\n"
                                   f"Run: axolotl train {yml}")
            lines.append(f"rank {rank}: {method} cut in {cut}; heal it ({steps} steps at learning rate {lr:g}, seed "
                         f"{heal_seed}{', the run seed: its val_set_size split' if same_split else ''}) with: "
                         f"axolotl train {yml}")
    if len(methods) > 1:
        lines.append("for each rank, run each and keep the healed adapter with the lower eval loss (each one's "
                     "rank_sweep.json)")
    lines.append(f"(from {Path.cwd()}, where this run started: the config's relative paths are the run's)")
    return lines

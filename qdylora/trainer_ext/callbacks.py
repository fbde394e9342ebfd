"""`RankSamplesCallback`: at each evaluation, answer a few prompts at a few ranks and log them.

How non-scalar values travel through `Trainer.log` (transformers 5.x): every entry goes
into `state.log_history` (saved as JSON in trainer_state.json), TensorBoardCallback writes
str values with `add_text` and drops anything else with a warning, WandbCallback hands
values to `wandb.log` as they are. A `wandb.Table` therefore cannot go through
`Trainer.log` (it would break trainer_state.json and TensorBoard), and a string would
reach wandb as loose text. So this callback writes to each integration in its own form,
through the writers the trainer's own integration callbacks hold:

- `state.log_history`: `{"eval_samples": [{"prompt", "rank", "output"}, ...], "step": N}`
  (no `eval_loss` key, so model cards and best-model tracking ignore it);
- TensorBoard: a markdown table under `eval/samples` (`add_text`, Text tab);
- Weights & Biases: a `wandb.Table` under `eval/samples`, on the `train/global_step` axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from ..errors import InputError
from ..generation import generate_across_ranks
from ..ranks import DynamicRank

SAMPLES_KEY = "eval_samples"
COLUMNS = ("prompt", "rank", "output")


class RankSamplesCallback(TrainerCallback):
    """Log answers to `prompts` at `ranks` after each evaluation of a QDyLoRA trainer.

    Usage: `trainer.add_callback(RankSamplesCallback(trainer, ["What is 3 plus 4?"]))`.
    The trainer is needed to reach its TensorBoard / wandb writers (as in wandb's own
    prediction-logging example). Generation runs on every process (so DeepSpeed ZeRO-3
    can gather weights); only the main process writes to the integrations.

    Args:
        trainer: The trainer (a `QDyLoraMixin` trainer, or any Trainer of a PEFT LoRA model).
        prompts: The prompts to answer.
        ranks: Ranks to answer at; default the trainer's sweep ranks (r_min, powers of
            two, r_max), or 1 and r_max for a plain trainer.
        tokenizer: Default: the trainer's `processing_class`.
        **generate_kwargs: For `generate_across_ranks` (max_new_tokens, template,
            chat_template, do_sample, seed, ...); greedy and 128 new tokens by default.

    Evaluations at a chosen rank (`trainer.evaluate(rank=b)`, i.e. the rank sweep, which
    stores its own samples) and repeated evaluations at one step (several eval datasets)
    do not generate again.
    """

    def __init__(
        self,
        trainer: Any,
        prompts: Sequence[str],
        ranks: Sequence[int] | None = None,
        *,
        tokenizer: Any = None,
        **generate_kwargs: Any,
    ) -> None:
        self.trainer = trainer
        self.prompts = list(prompts)
        if not self.prompts:
            raise InputError("RankSamplesCallback needs at least one prompt")
        self.tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
        if self.tokenizer is None:
            raise InputError("RankSamplesCallback needs a tokenizer: pass tokenizer= or processing_class= to the Trainer")
        config = getattr(trainer, "qdylora_config", None)
        if ranks is None:
            ranks = config.sweep_ranks if config is not None else sorted({1, DynamicRank.of(trainer.model).r_max})
        self.ranks = sorted(set(ranks))
        if config is not None:
            config.check_ranks(self.ranks, what="sample ranks")
            generate_kwargs.setdefault("method", config.default_method)  # svd for a plain (preset plain) run
        self.generate_kwargs = generate_kwargs
        self._last_step: int | None = None

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model = model if model is not None else self.trainer.model
        if DynamicRank.of(model).state.rank is not None or self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        samples = generate_across_ranks(model, self.tokenizer, self.prompts, self.ranks, **self.generate_kwargs)
        rows = [
            {"prompt": prompt, "rank": rank, "output": answers[i]}
            for i, prompt in enumerate(self.prompts)
            for rank, answers in samples.items()
        ]
        entry: dict[str, Any] = {SAMPLES_KEY: rows, "step": state.global_step}
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append(entry)
        if state.is_world_process_zero:
            self._to_integrations(rows, state.global_step)

    def _to_integrations(self, rows: list[dict[str, Any]], step: int) -> None:
        from transformers.integrations import TensorBoardCallback, WandbCallback

        for cb in self.trainer.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback) and getattr(cb, "tb_writer", None) is not None:
                cb.tb_writer.add_text("eval/samples", markdown_table(rows), step)
                cb.tb_writer.flush()
            elif isinstance(cb, WandbCallback) and getattr(getattr(cb, "_wandb", None), "run", None) is not None:
                table = cb._wandb.Table(columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in rows])
                cb._wandb.log({"eval/samples": table, "train/global_step": step})


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (TensorBoard's Text tab renders it); | and newlines escaped."""

    def cell(value: Any) -> str:
        return str(value).strip().replace("|", "\\|").replace("\n", "<br>") or " "

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)

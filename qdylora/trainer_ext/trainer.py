"""`QDyLoraMixin` and `QDyLoraTrainer`: a Trainer that trains a random LoRA rank each step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer

from ..adapter_io import umask_mode
from ..config import QDyLoraConfig
from ..distributed import check_engine
from ..errors import InputError
from ..ranks import DynamicRank, RankSampler, check_lora_model, rank_scale
from ..sweep_result import SweepResult
from .sweep import run_sweep


class QDyLoraMixin:
    """Adds QDyLoRA to any `transformers.Trainer` subclass.

    Put it first in the bases so its methods wrap the trainer's own:
    `class MySFT(QDyLoraMixin, trl.SFTTrainer): ...`.

    What it changes:
    - every training micro-batch runs at a rank b drawn from (seed, optimizer step);
      all micro-batches of one optimizer step share b unless `sample_every="micro_batch"`;
    - the drawn rank is logged with the loss (`rank`, and `rank_mean` over the window);
    - `evaluate(rank=b)` evaluates at rank b, logged as `eval_r{b}_*`;
      `evaluate_ranks()` runs the rank sweep;
    - every save writes `qdylora_config.json` beside the PEFT adapter (stored at r_max).
    Outside training steps and rank scopes the adapter runs at r_max.
    """

    def __init__(self, *args: Any, qdylora_config: QDyLoraConfig | None = None, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        # TRL trainers given `peft_config=` wrap the model themselves: checked after __init__
        if model is not None and kwargs.get("peft_config") is None:
            check_lora_model(model)  # before Trainer's own checks, with a message naming what was found
        super().__init__(*args, **kwargs)
        self.engine = check_engine(self)  # bad engine config / batch / 4-bit storage: InputError before training
        config = qdylora_config if qdylora_config is not None else QDyLoraConfig()
        self.dynamic_rank = DynamicRank.of(self.model, truncation=config.truncation)
        self.dynamic_rank.state.truncation = config.truncation
        self.qdylora_config = config.resolve(self.dynamic_rank.r_max, self.args.seed)
        self.dynamic_rank.set_scaling(config.scaling)
        if config.anchor_ranks and getattr(self, "is_deepspeed_enabled", False):
            raise InputError(
                "anchor_ranks runs several backward passes per micro-batch, which DeepSpeed's engine "
                "counts as separate micro-steps; use DDP or FSDP, or leave anchor_ranks unset"
            )
        self._loss_weight = 1.0
        self.rank_sampler = RankSampler.from_config(self.qdylora_config)
        self.rank_history: list[tuple[int, int]] = []  # (optimizer step, 1-based as in logs; rank)
        self.rank_sweep: SweepResult | None = None
        self._micro = (-1, 0)  # (optimizer step, micro-batches drawn in it)
        self._ranks_since_log: list[int] = []

    # -- training -----------------------------------------------------------------------
    def next_rank(self) -> int:
        """Draw the rank of the coming micro-batch from (seed, global step[, micro-batch])."""
        step = self.state.global_step
        micro = self._micro[1] + 1 if self._micro[0] == step else 0
        self._micro = (step, micro)
        if self.qdylora_config.sample_every == "optimizer_step":
            if micro > 0:  # same b for the whole accumulation window
                return self.rank_history[-1][1]
            rank = self.rank_sampler.draw(step)
        else:
            rank = self.rank_sampler.draw(step, micro)
        self.rank_history.append((step + 1, rank))
        self._ranks_since_log.append(rank)
        return rank

    def step_ranks(self, rank: int) -> list[int]:
        """The ranks a micro-batch trains: the drawn one, then each anchor rank."""
        return [rank] + [a for a in self.qdylora_config.anchor_ranks or [] if a != rank]

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        ranks = self.step_ranks(self.next_rank())
        frozen = self.qdylora_config.update == "frozen"
        # one forward+backward per rank (gradient checkpointing recomputes inside the scope);
        # each loss weighted 1/len(ranks) (times the rank's loss weight), and the logged
        # loss is the plain mean
        try:
            total = None
            for rank in ranks:
                weight = self.rank_loss_weight(rank)
                self._loss_weight = weight / len(ranks)
                with self.dynamic_rank.scope(rank, frozen=frozen):
                    loss = super().training_step(model, inputs, *args, **kwargs) / weight
                total = loss if total is None else total + loss
            return total
        finally:
            self._loss_weight = 1.0

    def rank_loss_weight(self, rank: int) -> float:
        """The weight of a rank-`rank` loss (`QDyLoraConfig.loss_weight`)."""
        if self.qdylora_config.loss_weight == "equal":
            return 1.0
        dr = self.dynamic_rank
        return 1.0 / rank_scale(rank, dr.r_max, dr.use_rslora)  # s(r_max) / s(b)

    def compute_loss(self, model, inputs, return_outputs: bool = False, **kwargs: Any):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self._loss_weight == 1.0:
            return out
        if return_outputs:
            return out[0] * self._loss_weight, out[1]
        return out * self._loss_weight

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._ranks_since_log:
            logs["rank"] = self._ranks_since_log[-1]
            logs["rank_mean"] = sum(self._ranks_since_log) / len(self._ranks_since_log)
            self._ranks_since_log = []
        return super().log(logs, *args, **kwargs)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        rank: int | None = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        """Trainer.evaluate, at rank `rank` when given (metrics named `eval_r{rank}_*`)."""
        if rank is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        self.qdylora_config.check_ranks([rank])
        with self.dynamic_rank.scope(rank):
            return super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_r{rank}", **kwargs)

    def evaluate_ranks(
        self,
        ranks: list[int] | None = None,
        eval_dataset: Any = None,
        *,
        refine: bool = False,
        tolerance: float = 0.01,
        metric: str = "eval_loss",
        greater_is_better: bool = False,
        sample_prompts: list[str] | None = None,
        sample_kwargs: dict[str, Any] | None = None,
        methods: Sequence[str] | None = None,
    ) -> dict[int, dict[str, float]]:
        """Evaluate every rank in `ranks` (default: the config's eval ranks) under each of `methods`.

        Returns {rank: metrics}, metric names as from `evaluate()` (`eval_loss`, ...); each
        rank is also logged as `eval_r{rank}_*`. The result, with the recommended rank (the
        smallest within `tolerance` of the best), is kept in `self.rank_sweep` and written
        to qdylora_config.json at the next save.

        With `sample_prompts`, each measured rank also answers them (greedy unless
        `sample_kwargs`, passed to `qdylora.generate_across_ranks`, says otherwise); the
        answers are in `self.rank_sweep.samples` and rank_sweep.json.

        `methods` (default: the config's `sweep_methods`): "prefix" (the rank-b slice QDyLoRA trains) and/or "svd" (each layer's
        delta SVD-truncated to b, logged as `eval_svd_r{rank}_*`). The returned dict is the
        run's own reading's (`default_method`) when measured (else prefix's, else the first method's), every method's is in
        `self.rank_sweep.by_method`, and the recommendation is a (rank, method) over all.
        """
        self.rank_sweep = run_sweep(
            self,
            ranks if ranks is not None else self.qdylora_config.sweep_ranks,
            eval_dataset=eval_dataset,
            refine=refine,
            tolerance=tolerance,
            metric=metric,
            greater_is_better=greater_is_better,
            sample_prompts=sample_prompts,
            sample_kwargs=sample_kwargs,
            methods=methods,
        )
        return self.rank_sweep.results

    # -- saving -------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            for weights in Path(output_dir or self.args.output_dir).glob("*.safetensors"):
                umask_mode(weights)  # safetensors writes 0600; give the usual mode, as other files have
            extra = {"sweep": self.rank_sweep.to_dict(samples=False)} if self.rank_sweep is not None else {}
            self.qdylora_config.save_pretrained(output_dir or self.args.output_dir, **extra)


class QDyLoraTrainer(QDyLoraMixin, Trainer):
    """`transformers.Trainer` with QDyLoRA: takes `qdylora_config=` plus every Trainer argument.

    The model must be a PEFT model with LoRA adapters (r = r_max), ideally on a 4-bit
    base from `qdylora.load_model`.
    """

"""`QDyLoraPlugin`: QDyLoRA in Axolotl with one line of YAML.

    plugins:
      - qdylora.plugin.QDyLoraPlugin
    adapter: qlora          # lora_r is r_max
    qdylora_r_min: 1        # ... and the other qdylora_* keys of `QDyLoraArgs`

What it does, hook by hook:
- `pre_model_load` / `post_model_build`: with `load_in_4bit`, makes bitsandbytes quantize
  nn.Linear subclasses too (Falcon's FalconLinear is skipped by transformers 5.x, which
  would silently train Falcon in full precision) and checks every linear layer is 4-bit.
- `register`: turns Axolotl's fused LoRA kernels off unless the config sets them (Axolotl
  would auto-enable them, and they read lora_A/lora_B directly, bypassing the truncation).
- `get_input_args`: the `qdylora_*` keys, validated at config time (`args.QDyLoraArgs`).
- `get_trainer_cls`: the class Axolotl would have used (AxolotlTrainer with its packing,
  scheduler, optimizer and checkpoint mixins; a custom `trainer_cls`; or another plugin's
  trainer) with `QDyLoraMixin` put in front of it. Never a plain Trainer.
- `post_trainer_create`: checks that the trainer really is the composed one and logs the
  rank settings; the rank drawn per step is logged with the loss (`rank`, `rank_mean`).
- `post_train` (Axolotl calls it right after `trainer.train()` and again after the final
  save): the steps of `qdylora.workflow` that follow training: first the rank sweep on the
  eval set (rank_sweep.json and rank_sweep.png in output_dir), then, once the adapter is
  in output_dir, qdylora_config.json beside it, the exports of `qdylora_export_ranks` into
  output_dir/qdylora-exports/rank-<b>/, and the report (the same lines `qdylora train` prints);
  with `qdylora_heal_rank` (one rank or a list), each rank's cut and the config of the short Axolotl run that heals it
  (`heal.prepare_healing`: output_dir/qdylora-healed/rank-<b>.yml, and the command to run).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

try:
    from axolotl.integrations.base import BasePlugin, PluginManager
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.logging import get_logger
except ImportError as exc:  # pragma: no cover - the lazy import in __init__ reports it
    raise ImportError(
        "qdylora.plugin.QDyLoraPlugin needs Axolotl: pip install 'qdylora[axolotl]' "
        "(install torch first; Axolotl pins its own transformers/peft versions)"
    ) from exc

from ..errors import is_int
from ..loading import linear_subclasses_quantizable, unquantized_linears
from ..trainer_ext import QDyLoraMixin
from .args import FUSED_KERNELS, PLUGIN, QDyLoraArgs, listed
from .compose import qdylora_config, settings, with_qdylora

# Axolotl shows INFO records of `axolotl.*` loggers only (others from WARNING up)
LOG = get_logger("axolotl.integrations.qdylora")

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class QDyLoraPlugin(BasePlugin):
    """Axolotl plugin: train the LoRA/QLoRA adapter with QDyLoRA (a random rank b each step)."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: QDyLoraMixin | None = None
        self._loading = contextlib.ExitStack()
        self._created_at = 0.0
        self._swept = False

    # -- config ---------------------------------------------------------------------------
    def get_input_args(self) -> str:
        return f"{QDyLoraArgs.__module__}.{QDyLoraArgs.__name__}"

    def register(self, cfg: dict) -> None:
        if not listed(cfg.get("plugins")):
            return
        if all(cfg.get(k) is None for k in FUSED_KERNELS):
            for k in FUSED_KERNELS:
                cfg[k] = False
            LOG.info("QDyLoRA: fused LoRA kernels left off (they would bypass the rank truncation)")

    # -- model --------------------------------------------------------------------------
    def pre_model_load(self, cfg: DictDefault) -> None:
        """Let bitsandbytes quantize nn.Linear subclasses too (Falcon's FalconLinear, ...).

        transformers 5.x swaps only modules whose type *is* nn.Linear, so such models would
        silently train in full precision under `load_in_4bit: true`.
        """
        if listed(cfg.plugins) and cfg.load_in_4bit:
            self._loading.enter_context(linear_subclasses_quantizable())

    def post_model_build(self, cfg: DictDefault, model: Any) -> None:
        self._loading.close()
        if not (listed(cfg.plugins) and cfg.load_in_4bit):
            return
        left = unquantized_linears(model)
        if left:
            raise RuntimeError(
                f"load_in_4bit is set but {len(left)} linear layer(s) were not quantized, e.g. {left[:3]}; "
                "QDyLoRA's memory budget assumes a 4-bit base"
            )
        import bitsandbytes as bnb

        n = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        LOG.info(f"QDyLoRA: base model in 4 bits ({n} Linear4bit layers)")

    # -- trainer --------------------------------------------------------------------------
    def get_trainer_cls(self, cfg: DictDefault) -> type | None:
        if not listed(cfg.plugins):
            return None
        return with_qdylora(self._axolotl_trainer_cls(cfg), qdylora_config(cfg))

    def _axolotl_trainer_cls(self, cfg: DictDefault) -> type:
        """The trainer class Axolotl would pick without this plugin."""
        manager = PluginManager.get_instance()
        for name, plugin in manager.plugins.items():
            if plugin is not self and name in cfg.plugins:
                found = plugin.get_trainer_cls(cfg)
                if found is not None:
                    return found
        from axolotl.core.builders.causal import HFCausalTrainerBuilder

        # the builder's own choice (mamba, reward model, `trainer_cls:`, else AxolotlTrainer)
        without_plugins = SimpleNamespace(cfg=DictDefault({**cfg, "plugins": None}))
        return HFCausalTrainerBuilder._get_trainer_cls(without_plugins)

    def post_trainer_create(self, cfg: DictDefault, trainer: Any) -> None:
        if not listed(cfg.plugins):
            return
        if not isinstance(trainer, QDyLoraMixin):
            raise RuntimeError(
                f"the trainer is a {type(trainer).__name__}, not a QDyLoRA trainer: another plugin's "
                f"get_trainer_cls won; list {PLUGIN} first in `plugins`"
            )
        self.trainer, self._created_at, self._swept = trainer, time.time(), False
        c = trainer.qdylora_config
        drawn = f"ranks {c.ranks}" if c.ranks else f"ranks {c.r_min}..{c.r_max}"
        base = next(b for b in type(trainer).__mro__ if not issubclass(b, QDyLoraMixin))  # what QDyLoRA wraps
        LOG.info(
            f"QDyLoRA: {type(trainer).__name__} (QDyLoraMixin + {base.__name__}) draws {drawn} "
            f"({c.distribution}, update={c.update}, one rank per {c.sample_every.replace('_', ' ')}, seed {c.seed}); "
            "the drawn rank is logged as 'rank'"
        )

    # -- after training -------------------------------------------------------------------
    def post_train(self, cfg: DictDefault, model: Any) -> None:
        if self.trainer is None or not listed(cfg.plugins):
            return
        if not self._swept:
            self._sweep(cfg)
        if self._adapter_saved(cfg):
            self._finish(cfg)

    def post_train_unload(self, cfg: DictDefault) -> None:
        self._loading.close()
        if self.trainer is not None and self._adapter_saved(cfg):
            self._finish(cfg)
        self.trainer = None

    def _sweep(self, cfg: DictDefault) -> None:
        """Evaluate every sweep rank on the eval set (on every process; rank 0 writes)."""
        from ..workflow import sweep

        self._swept = True
        if self.trainer.eval_dataset is None and cfg.get("qdylora_sweep") is not False:
            LOG.info("QDyLoRA: no eval set (val_set_size / test_datasets), so no rank sweep")
            return
        sweep(self.trainer, settings(cfg)[1], cfg.output_dir)

    def _adapter_saved(self, cfg: DictDefault) -> bool:
        """Whether this run's final adapter is in output_dir (not a previous run's)."""
        weights = Path(cfg.output_dir) / ADAPTER_WEIGHTS
        return weights.is_file() and weights.stat().st_mtime >= self._created_at

    def _finish(self, cfg: DictDefault) -> None:
        """qdylora_config.json beside the saved adapter, then the requested exports, then the report."""
        from ..workflow import export, record, report

        trainer, self.trainer = self.trainer, None
        if not trainer.is_world_process_zero():
            return
        out = Path(cfg.output_dir)
        record(trainer, out)
        _, _, export_settings, heal = settings(cfg)
        exports = export(out, export_settings)
        lines = report(out, trainer.qdylora_config.r_max, trainer.rank_sweep, exports, vllm=export_settings.vllm)
        if heal.rank is not None:
            lines += self._prepare_healing(cfg, trainer, heal)
        LOG.info("QDyLoRA:\n" + "\n".join(lines))

    @staticmethod
    def _prepare_healing(cfg: DictDefault, trainer: QDyLoraMixin, heal: Any) -> list[str]:
        """The cut of each qdylora_heal_rank and the config of the Axolotl run that heals it."""
        from .heal import prepare_healing

        lines, ranks = [], list(heal.ranks)
        if trainer.rank_sweep is None and any(not is_int(rank) for rank in ranks):
            ranks = [rank for rank in ranks if is_int(rank)]
            lines.append("qdylora_heal_rank: recommended, but no sweep ran (no eval set), so there is no rank to heal")
        if not ranks:
            return lines
        return lines + prepare_healing(cfg.output_dir, cfg.get("axolotl_config_path"), heal, ranks=ranks,
                                       run_steps=trainer.state.global_step, learning_rate=trainer.args.learning_rate,
                                       seed=trainer.args.seed)

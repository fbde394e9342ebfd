"""Which distributed engine a QDyLoRA run uses, and the checks that run before training.

QDyLoRA itself needs no communication: every process draws the same rank b from
(seed, optimizer step). What can go wrong is the engine set-up, and it goes wrong late
(after the model loaded, inside a collective) unless we look first:

- an engine config that is malformed or that the launcher cannot honour (a DeepSpeed
  JSON with a typo or a ZeRO stage outside 0-3, FSDP asked for on CPU processes, where
  accelerate silently runs plain DDP instead);
- a global batch (DeepSpeed's `train_batch_size`, the recipe's `global_batch_size`)
  that the world size does not divide;
- a 4-bit base whose packed-weight storage does not match the engine: ZeRO-3 and FSDP
  shard parameters and need `bnb_4bit_quant_storage` to be the float dtype the engine
  keeps parameters in; DeepSpeed in fp16/bf16 casts every float parameter to that dtype,
  which destroys packed weights stored in another float dtype.

Every check is a pure function of the configuration, so all processes raise the same
`InputError` at the same point: nobody is left waiting in a collective.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import read_json_file
from .errors import InputError

# DeepSpeed's documented top-level keys (https://www.deepspeed.ai/docs/config-json/). DeepSpeed
# ignores keys it does not know, so a misspelt one (zero_optimisation) silently disables ZeRO;
# we reject unknown keys that are close to a known one.
DEEPSPEED_KEYS = frozenset(
    """train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler
    fp16 bf16 amp torch_autocast gradient_clipping prescale_gradients gradient_predivide_factor
    sparse_gradients zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer aio
    activation_checkpointing flops_profiler monitor tensorboard wandb csv_monitor comet comms_logger
    autotuning elasticity data_efficiency curriculum_learning compression_training checkpoint data_types
    steps_per_print wall_clock_breakdown dump_state memory_breakdown communication_data_type
    seq_parallel_communication_data_type disable_allgather pipeline nebula weight_quantization
    dataloader_drop_last tensor_parallel compile hybrid_engine sparse_attention graph_harvesting
    use_data_before_expert_parallelism timers""".split()
)
FSDP_VERSIONS = (1, 2)
# accelerate's distributed types qdylora runs under (DDP flavours, DeepSpeed, FSDP)
SUPPORTED_TYPES = frozenset(
    "NO MULTI_CPU MULTI_GPU MULTI_NPU MULTI_MLU MULTI_SDAA MULTI_MUSA MULTI_XPU MULTI_HPU MULTI_NEURON DEEPSPEED FSDP".split()
)


@dataclass(frozen=True)
class Engine:
    """The engine of a run, as far as QDyLoRA cares.

    Attributes:
        name: "single", "ddp", "deepspeed" or "fsdp".
        world_size: Number of processes.
        zero_stage: DeepSpeed's ZeRO stage (None outside DeepSpeed).
        param_dtype: The dtype the engine casts float parameters to (DeepSpeed in fp16 /
            bf16), None when it leaves their dtype alone.
        shards_params: Parameters are partitioned across processes (ZeRO-3, FSDP).
    """

    name: str
    world_size: int = 1
    zero_stage: int | None = None
    param_dtype: torch.dtype | None = None
    shards_params: bool = False

    def describe(self) -> str:
        """E.g. "DeepSpeed ZeRO-3 on 2 processes"."""
        where = f"on {self.world_size} process{'es' if self.world_size > 1 else ''}"
        if self.name == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage} {where}"
        return {"single": "a single process", "ddp": f"DDP {where}", "fsdp": f"FSDP {where}"}[self.name]


# -- engine configs ---------------------------------------------------------------------------
def load_deepspeed_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config (a dict or a JSON file), checked: see `check_deepspeed_config`."""
    if isinstance(config, Mapping):
        data = dict(config)
    else:
        data = read_json_file(config, "DeepSpeed config", "; give a JSON file such as examples/accelerate/ds_zero3.json")
    check_deepspeed_config(data)
    return data


def check_deepspeed_config(config: Mapping[str, Any]) -> int:
    """Raise `InputError` on a DeepSpeed config DeepSpeed would reject late or misread; return its ZeRO stage.

    Checks: a mapping; no misspelt top-level key; the zero_optimization section against
    DeepSpeed's own schema (stage 0-3, no unknown keys; "auto" values are left to transformers);
    fp16/bf16 not both on; batch keys integers or "auto".
    """
    if not isinstance(config, Mapping):
        raise InputError(f"a DeepSpeed config must be a JSON object, got {type(config).__name__}")
    for key in config:
        if key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1, cutoff=0.8)
            if close:
                raise InputError(f"unknown DeepSpeed config key {key!r}: did you mean {close[0]!r}? (DeepSpeed would ignore it)")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        raise InputError(f"zero_optimization must be a JSON object with a 'stage', got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise InputError(f"unknown ZeRO stage {stage!r} in zero_optimization; DeepSpeed has stages 0, 1, 2 and 3")
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:  # without DeepSpeed installed the launcher fails anyway, with its own message
        DeepSpeedZeroConfig = None
    if DeepSpeedZeroConfig is not None:
        try:
            DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if v != "auto"})
        except Exception as exc:  # pydantic.ValidationError
            errors = getattr(exc, "errors", lambda: [])() or [{"loc": (), "msg": str(exc).splitlines()[0]}]
            what = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'section'}: {e['msg']}" for e in errors[:3])
            raise InputError(f"bad zero_optimization setting ({what}); see https://www.deepspeed.ai/docs/config-json/") from exc
    enabled = [k for k in ("fp16", "bf16") if _enabled(config.get(k)) is True]
    if len(enabled) == 2:
        raise InputError("the DeepSpeed config enables both fp16 and bf16; enable one (or set both to 'auto')")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = config.get(key, "auto")
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"DeepSpeed {key} must be a positive integer or 'auto', got {value!r}")
    return int(stage)


def check_fsdp_args(fsdp: Any, fsdp_config: Any) -> None:
    """Raise `InputError` on FSDP settings transformers would reject late (unknown option, version)."""
    if not fsdp:
        return
    from transformers.trainer_utils import FSDPOption

    if isinstance(fsdp, str) and fsdp.lower() not in ("true", "1"):
        allowed = {o.value for o in FSDPOption}
        bad = [o for o in fsdp.split() if o not in allowed]
        if bad:
            raise InputError(f"unknown fsdp option(s) {bad}; allowed: {sorted(allowed)}")
    if isinstance(fsdp_config, (str, os.PathLike)):
        fsdp_config = read_json_file(fsdp_config, "fsdp_config")
    version = (fsdp_config or {}).get("version", (fsdp_config or {}).get("fsdp_version", 2))
    if version not in FSDP_VERSIONS:
        raise InputError(f"unknown FSDP version {version!r}; use 1 or 2")


# -- batch --------------------------------------------------------------------------------------
def accumulation_for(global_batch: int, world_size: int, per_device: int) -> int:
    """Gradient-accumulation steps that make `world_size` x `per_device` x steps = `global_batch`."""
    if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
        raise InputError(f"global_batch_size must be a positive integer, got {global_batch!r}")
    per_step = world_size * per_device
    if global_batch % per_step:
        raise InputError(
            f"global_batch_size {global_batch} is not divisible by world size {world_size} x "
            f"per_device_train_batch_size {per_device} = {per_step}; pick a number of processes or a "
            "per-device batch whose product divides it"
        )
    return global_batch // per_step


def check_batch(config: Mapping[str, Any], world_size: int, per_device: int, accumulation: int) -> None:
    """A DeepSpeed config's fixed batch sizes against the world size and TrainingArguments."""
    total = config.get("train_batch_size", "auto")
    if isinstance(total, int) and not isinstance(total, bool):
        if total % world_size:
            raise InputError(
                f"DeepSpeed train_batch_size {total} is not divisible by the world size {world_size}; "
                "launch a number of processes that divides it, or set train_batch_size to 'auto'"
            )
        if total != world_size * per_device * accumulation:
            raise InputError(
                f"DeepSpeed train_batch_size {total} != world size {world_size} x per_device_train_batch_size "
                f"{per_device} x gradient_accumulation_steps {accumulation}; set gradient_accumulation_steps to "
                f"{total // world_size // per_device if total // world_size % per_device == 0 else '?'} "
                "or train_batch_size to 'auto'"
            )
    micro = config.get("train_micro_batch_size_per_gpu", "auto")
    if isinstance(micro, int) and micro != per_device:
        raise InputError(f"DeepSpeed train_micro_batch_size_per_gpu {micro} != per_device_train_batch_size {per_device}")


def world_size() -> int:
    """Processes in this run, as the launcher (torchrun, accelerate, deepspeed) announces it."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def check_training_engine(
    training: Mapping[str, Any], base_dir: str | os.PathLike = ".", global_batch: int | None = None
) -> dict[str, Any]:
    """Check a recipe's engine settings before anything loads; returns `training` with config paths resolved.

    `deepspeed` / `fsdp_config` paths are taken relative to the recipe's folder when they exist
    there. `global_batch` (the recipe's `global_batch_size`) must be divisible by the world
    size x per-device batch, and replaces gradient_accumulation_steps.
    """
    training = dict(training)
    for key in ("deepspeed", "fsdp_config"):
        value = training.get(key)
        if isinstance(value, (str, os.PathLike)) and not Path(value).is_absolute() and (Path(base_dir) / value).is_file():
            training[key] = str(Path(base_dir) / value)
    if training.get("deepspeed") and training.get("fsdp"):
        raise InputError("training sets both deepspeed and fsdp; choose one engine")
    check_fsdp_args(training.get("fsdp"), training.get("fsdp_config"))
    per_device = int(training.get("per_device_train_batch_size", 8))
    accumulation = int(training.get("gradient_accumulation_steps", 1))
    if global_batch is not None:
        if "gradient_accumulation_steps" in training:
            raise InputError("give global_batch_size or training.gradient_accumulation_steps, not both")
        accumulation = accumulation_for(global_batch, world_size(), per_device)
    if training.get("deepspeed"):
        config = load_deepspeed_config(training["deepspeed"])
        check_batch(config, world_size(), per_device, accumulation)
    return training


# -- the engine of a trainer ----------------------------------------------------------------------
def engine_of(trainer: Any) -> Engine:
    """The engine a `transformers.Trainer` (its accelerator) will train with."""
    state = trainer.accelerator.state
    world = int(trainer.args.world_size)
    kind = str(getattr(state.distributed_type, "value", state.distributed_type))
    if getattr(trainer, "is_deepspeed_enabled", False):
        config = state.deepspeed_plugin.deepspeed_config
        stage = int(config.get("zero_optimization", {}).get("stage", 0))
        dtype = torch.bfloat16 if _enabled(config.get("bf16")) else torch.float16 if _enabled(config.get("fp16")) else None
        return Engine("deepspeed", world, stage, dtype, shards_params=stage == 3)
    if getattr(trainer, "is_fsdp_enabled", False) or kind == "FSDP":
        # with mixed precision FSDP casts every parameter to that dtype for compute
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(state.mixed_precision))
        return Engine("fsdp", world, param_dtype=dtype, shards_params=True)
    return Engine("single" if world == 1 else "ddp", world)


def check_engine(trainer: Any) -> Engine:
    """Everything `QDyLoraMixin` checks about the engine before training; returns the engine."""
    state = trainer.accelerator.state
    kind = str(getattr(state.distributed_type, "value", state.distributed_type))
    if kind not in SUPPORTED_TYPES:
        raise InputError(
            f"accelerate's distributed_type {kind} is not supported by qdylora; use DDP (MULTI_GPU), "
            "DEEPSPEED or FSDP (see examples/accelerate/)"
        )
    args = trainer.args
    wants_fsdp = bool(getattr(args, "fsdp_plugin_args", None)) or _env_true("ACCELERATE_USE_FSDP")
    if wants_fsdp and kind != "FSDP":
        raise InputError(
            f"FSDP was configured but accelerate runs these processes as {kind} (it enables FSDP only on "
            "GPUs and other accelerators, and silently falls back to plain DDP on CPU); remove the FSDP "
            "settings or launch on accelerators"
        )
    engine = engine_of(trainer)
    if engine.name == "deepspeed":
        config = state.deepspeed_plugin.deepspeed_config
        check_deepspeed_config(config)
        check_batch(config, engine.world_size, args.per_device_train_batch_size, args.gradient_accumulation_steps)
    check_quant_storage(trainer.model, engine)
    return engine


def check_quant_storage(model: nn.Module, engine: Engine) -> None:
    """Raise unless the 4-bit weights' storage dtype survives `engine` (see the module docstring)."""
    storage = quant_storage_dtypes(model)
    if not storage:
        return
    fix = "load the base with qdylora.load_model(..., quant_storage={dt}) (recipe: quant_storage: {name})"
    if engine.shards_params:
        want = engine.param_dtype or _other_param_dtype(model)
        bad = sorted(str(d).replace("torch.", "") for d in storage if d != want)
        if bad:
            name = str(want).replace("torch.", "")
            raise InputError(
                f"{engine.describe()} shards the 4-bit base, whose weights are stored as {bad}; the storage "
                f"must be the float dtype the engine keeps parameters in ({name}): "
                + fix.format(dt=f"torch.{name}", name=name)
            )
    elif engine.param_dtype is not None:
        bad = sorted(str(d).replace("torch.", "") for d in storage if d.is_floating_point and d != engine.param_dtype)
        if bad:
            name = str(engine.param_dtype).replace("torch.", "")
            raise InputError(
                f"{engine.describe()} casts float parameters to {name}, which would corrupt 4-bit weights stored "
                f"as {bad}; store them as uint8 (the default) or {name}: " + fix.format(dt=f"torch.{name}", name=name)
            )


def quant_storage_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The storage dtypes of the model's bitsandbytes 4-bit weights (empty when there are none)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return set()
    return {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}


def _other_param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float parameters outside 4-bit layers (the one FSDP flattens with)."""
    import bitsandbytes as bnb

    packed = {id(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if id(p) not in packed and p.dtype.is_floating_point:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _enabled(section: Any) -> bool | None:
    if isinstance(section, Mapping):
        section = section.get("enabled", False)
    if section == "auto":
        return None
    return bool(section)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")

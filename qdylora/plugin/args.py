"""The plugin's YAML keys: a pydantic model that Axolotl merges into its config schema.

Every `qdylora_*` key becomes a top-level key of the Axolotl YAML. The values are checked
by `QDyLoraConfig` itself (one source of truth for what a valid setting is), together
with the parts of the Axolotl config QDyLoRA depends on: a LoRA/QLoRA adapter whose
`lora_r` is r_max, no fused LoRA kernels (they read lora_A/lora_B directly and would
bypass the rank truncation), no DoRA, and supervised fine-tuning (no `rl:`).

This module needs pydantic only, so it imports without Axolotl.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from ..config import QDyLoraConfig

PLUGIN = "qdylora.plugin.QDyLoraPlugin"
ADAPTERS = ("lora", "qlora")
# Axolotl's fused LoRA kernels compute B(A x) from the weights in one op: no truncation.
FUSED_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
RECOMMENDED = "recommended"


class QDyLoraArgs(BaseModel):
    """QDyLoRA settings in an Axolotl config (`plugins: [qdylora.plugin.QDyLoraPlugin]`).

    r_max is Axolotl's `lora_r`; the LoRA scale is `lora_alpha / b` at rank b
    (`lora_alpha / sqrt(b)` with `peft_use_rslora: true` or `qdylora_scaling: sqrt`).
    """

    qdylora_preset: str | None = Field(
        default=None,
        description="Start from a named recipe (QDyLoraConfig.preset: paper, ...); qdylora_* keys set here override it.",
    )
    qdylora_r_min: int = Field(default=1, description="Smallest rank drawn in training (>= 1).")
    qdylora_distribution: str = Field(
        default="uniform",
        description="How the rank b of each step is drawn from r_min..lora_r: uniform (the paper) or log_uniform.",
    )
    qdylora_ranks: list[int] | None = Field(
        default=None, description="Draw only from these ranks (e.g. [1, 8, 16, 32, 64]) instead of every integer."
    )
    qdylora_update: str = Field(
        default="full",
        description="full: the first b rows/columns all learn (the paper); frozen: only row/column b-1 learns (DyLoRA).",
    )
    qdylora_sample_every: str = Field(
        default="optimizer_step",
        description="optimizer_step: one rank per optimizer step (shared by its gradient-accumulation micro-batches); micro_batch: one per micro-batch.",
    )
    qdylora_seed: int | None = Field(
        default=None, description="Seed of the rank sequence; default: the config's `seed`."
    )
    qdylora_truncation: str = Field(
        default="slice", description="slice: compute follows b; mask: full shapes, rank dimension masked (sharding engines)."
    )
    qdylora_scaling: str | None = Field(
        default=None,
        description="LoRA scale at rank b: linear (lora_alpha / b, the paper) or sqrt (lora_alpha / sqrt(b), rsLoRA); "
        "default: follow peft_use_rslora.",
    )
    qdylora_anchor_ranks: list[int | Literal["r_max"]] | None = Field(
        default=None,
        description="Ranks also trained in every step beside the drawn one (e.g. [r_max], r_max meaning lora_r); one more forward/backward "
        "per anchor and step; not with DeepSpeed.",
    )
    qdylora_loss_weight: str = Field(
        default="equal",
        description="equal (the paper) or inverse_scale: the loss at rank b weighted s(r_max)/s(b), so the optimizer "
        "sees gradients of one size at every rank.",
    )
    qdylora_eval_ranks: list[int] | None = Field(
        default=None,
        description="Ranks measured by the rank sweep after training (needs an eval set); default: r_min, powers of two, lora_r.",
    )
    qdylora_sweep: bool = Field(
        default=True, description="Run the rank sweep after training when there is an eval set."
    )
    qdylora_export_ranks: list[int | Literal["recommended"]] | None = Field(
        default=None,
        description="Ranks to export after training as standard PEFT adapters into output_dir/qdylora-exports/rank-<b>; "
        "'recommended' is the sweep's pick.",
    )
    qdylora_export_vllm: bool = Field(
        default=False,
        description="Check each export for vLLM before writing it (vLLM's rules, shapes against the base) and log the vllm serve line.",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_axolotl_settings(cls, data: Any) -> Any:
        """The parts of the Axolotl config QDyLoRA relies on, checked before anything loads."""
        if not isinstance(data, dict) or not listed(data.get("plugins")):
            return data  # standalone use, or a config that does not list this plugin
        problem = axolotl_problem(data)
        if problem:
            raise ValueError(problem)
        return data

    @model_validator(mode="after")
    def _check_qdylora_settings(self) -> QDyLoraArgs:
        if hasattr(self, "plugins") and not listed(self.plugins):
            return self  # Axolotl keeps plugins of earlier configs registered in-process
        lora_r = getattr(self, "lora_r", None)  # present when merged into Axolotl's config
        try:
            config = self.to_qdylora_config(lora_r)
            if self.qdylora_export_ranks:
                config.check_ranks(
                    [r for r in self.qdylora_export_ranks if r != RECOMMENDED], what="qdylora_export_ranks"
                )
        except ValueError as exc:  # InputError: say which YAML keys to look at
            raise ValueError(f"qdylora_* settings: {exc}") from exc
        in_axolotl = hasattr(self, "plugins")  # merged into Axolotl's config, not standalone
        if in_axolotl and RECOMMENDED in (self.qdylora_export_ranks or []):
            has_eval = bool(getattr(self, "val_set_size", 0)) or bool(getattr(self, "test_datasets", None))
            if not (self.qdylora_sweep and has_eval):
                raise ValueError(
                    "qdylora_export_ranks lists 'recommended', which comes from the rank sweep: "
                    "set val_set_size (or test_datasets) and keep qdylora_sweep: true, or list explicit ranks"
                )
        return self

    def to_qdylora_config(self, lora_r: int | None = None) -> QDyLoraConfig:
        """The `QDyLoraConfig` these keys describe (r_max = Axolotl's lora_r).

        With `qdylora_preset`, the preset's values stand unless a key is set explicitly.
        """
        fields = {
            "r_min": self.qdylora_r_min,
            "distribution": self.qdylora_distribution,
            "ranks": self.qdylora_ranks,
            "update": self.qdylora_update,
            "sample_every": self.qdylora_sample_every,
            "eval_ranks": self.qdylora_eval_ranks,
            "seed": self.qdylora_seed,
            "truncation": self.qdylora_truncation,
            "scaling": self.qdylora_scaling,
            "anchor_ranks": self.qdylora_anchor_ranks,
            "loss_weight": self.qdylora_loss_weight,
        }
        if self.qdylora_preset is None:
            return QDyLoraConfig(r_max=lora_r, **fields)
        explicit = {k: v for k, v in fields.items() if f"qdylora_{k}" in self.model_fields_set}
        return QDyLoraConfig.preset(self.qdylora_preset, r_max=lora_r, **explicit)


def listed(plugins: Any) -> bool:
    """Whether this plugin is among an Axolotl config's `plugins`."""
    return PLUGIN in (plugins or [])


def axolotl_problem(cfg: Any) -> str | None:
    """What in an Axolotl config (raw mapping) stops QDyLoRA, as a message saying what to change."""
    adapter = cfg.get("adapter")
    if adapter not in ADAPTERS:
        return (
            f"{PLUGIN} trains LoRA adapters, but adapter is {adapter!r}: set `adapter: qlora` "
            "(with load_in_4bit: true) or `adapter: lora`, or remove the plugin from `plugins`"
        )
    if not cfg.get("lora_r"):
        return f"{PLUGIN} needs lora_r: it is QDyLoRA's maximum rank r_max (the paper uses 64)"
    if cfg.get("rl"):
        return (
            f"{PLUGIN} supports supervised fine-tuning only, but rl is {cfg.get('rl')!r}: "
            "remove `rl:` or the plugin"
        )
    if cfg.get("peft_use_dora"):
        return "QDyLoRA cannot truncate DoRA's magnitude vector: set peft_use_dora: false"
    if cfg.get("qdylora_export_vllm") and cfg.get("lora_modules_to_save"):
        return (
            "qdylora_export_vllm: vLLM rejects adapters with modules_to_save, and lora_modules_to_save is "
            f"{cfg.get('lora_modules_to_save')}: drop one of the two"
        )
    on = [k for k in FUSED_KERNELS if cfg.get(k)]
    if on:
        return (
            f"{', '.join(on)} fuse the LoRA matmuls and would bypass QDyLoRA's rank truncation: "
            f"set {', '.join(f'{k}: false' for k in on)}"
        )
    return None

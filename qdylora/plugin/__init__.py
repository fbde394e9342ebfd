"""QDyLoRA as an Axolotl plugin: `plugins: [qdylora.plugin.QDyLoraPlugin]` in the YAML.

Importing this package needs neither Axolotl nor pydantic: `QDyLoraPlugin` (which
subclasses Axolotl's BasePlugin) and `QDyLoraArgs` (the qdylora_* YAML keys) load on
first use, and `QDyLoraPlugin` says how to install Axolotl when it is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"QDyLoraPlugin": ".plugin", "QDyLoraArgs": ".args"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value

"""QDyLoRA as an Axolotl plugin: `plugins: [qdylora.plugin.QDyLoraPlugin]` in the YAML.

Importing this package needs neither Axolotl nor pydantic: `QDyLoraPlugin` (which
subclasses Axolotl's BasePlugin) and `QDyLoraArgs` (the qdylora_* YAML keys) load on
first use, and `QDyLoraPlugin` says how to install Axolotl when it is missing.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_LAZY = {"QDyLoraPlugin": ".plugin", "QDyLoraArgs": ".args"}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, globals(), _LAZY)

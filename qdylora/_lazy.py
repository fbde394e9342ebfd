"""Lazy public names for a package's `__init__` (PEP 562): importing the package stays light,
and each name imports its module on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, namespace: dict[str, Any], names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `names[name]` (a module relative to `package`) on first use
    and keeps the value in the package's `namespace`."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name], package), name)
        namespace[name] = value
        return value

    return __getattr__

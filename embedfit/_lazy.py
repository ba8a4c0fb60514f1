"""PEP 562 lazy attributes for the package __init__s (the pattern of scientific-python's `lazy_loader.attach`):
a name is imported from its module the first time it is used, so importing a package stays cheap."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def attach(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """`__getattr__`, `__dir__` and `__all__` for `package`, whose attribute `name` lives in module `names[name]`
    (absolute, or relative to `package` when it has no dot)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        module = names[name] if "." in names[name] else f"{package}.{names[name]}"
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | {n for n in vars(sys.modules[package]) if not n.startswith("_")})

    return __getattr__, __dir__, list(names)

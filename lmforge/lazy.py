"""Lazy package exports: a package names its public objects and the modules that define them, and
a module is imported only when one of its names is first used (so `import lmforge` stays fast and
loads no torch). Imports nothing from lmforge."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

# a public name -> "module" (the same name there) or ("module", "name there") for an alias
Target = str | tuple[str, str]


def lazy_exports(package: str, exports: Mapping[str, Target]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package` (PEP 562) for `exports`."""

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = (target, name) if isinstance(target, str) else target
        return getattr(importlib.import_module(module), attribute)

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__

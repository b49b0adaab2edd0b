"""The training engines by name (``experiments.<name>.engine``): ``make_engine``.

Light on purpose: the names, module paths and what each engine cannot do are plain data in
``luffy.config.engines`` (the config's checks read them; the config never imports
``luffy.engines``), and an engine's module is imported only by ``make_engine``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from luffy.config.engines import ENGINE_NAMES, ENGINES, unsupported_settings

if TYPE_CHECKING:
    from luffy.engines.base import Engine

__all__ = ["ENGINES", "ENGINE_NAMES", "make_engine", "unsupported_settings"]


def make_engine(name: str) -> "Engine":
    """The engine registered as ``name`` (its module is imported now)."""
    if name not in ENGINES:
        raise ValueError(f"unknown training engine '{name}', expected one of {ENGINE_NAMES}")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)()

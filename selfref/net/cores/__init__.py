"""Modifier cores: the registry.

``make_core(name, **options)`` builds a core by name; ``CORES`` maps the names whose module is
present to ``"module:Class"`` (a core added later appears here by adding one line to
``_REGISTRY``, and the CLI's ``--core`` choices follow). Cores implement
:class:`~selfref.net.cores.base.Core`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from selfref.net.cores.base import Core, CoreState

__all__ = ["Core", "CoreState", "CORES", "make_core", "core_names"]

# name -> "module:Class"; imported lazily.
_REGISTRY: dict[str, str] = {
    "lstm": "selfref.net.cores.lstm:LSTMCore",
    "hypernet": "selfref.net.cores.hypernet:HypernetCore",
    "srwm": "selfref.net.cores.srwm:SRWMCore",
    "lopt": "selfref.net.cores.lopt:LoptCore",
    "ensemble": "selfref.net.cores.ensemble:EnsembleCore",
}


def _present(target: str) -> bool:
    module = target.split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# Only the cores whose module exists (a read-only snapshot taken at import).
CORES: dict[str, str] = {n: t for n, t in _REGISTRY.items() if _present(t)}


def core_names() -> list[str]:
    """Names of the installed cores, in registry order."""
    return [n for n, t in _REGISTRY.items() if _present(t)]


def make_core(name: str, **options: Any) -> Core:
    """Build a modifier core by registry name.

    Raises:
        ValueError: unknown name (lists the installed cores) or a bad option.
    """
    if name not in _REGISTRY or not _present(_REGISTRY[name]):
        raise ValueError(f"unknown core {name!r}; valid cores: {', '.join(core_names())}")
    module, cls = _REGISTRY[name].split(":")
    klass = getattr(importlib.import_module(module), cls)
    try:
        return klass(**options)
    except TypeError as e:
        raise ValueError(f"bad option for core {name!r}: {e}") from e

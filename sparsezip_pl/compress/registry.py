"""The methods registry: every token-reduction method is one file in ``compress/methods/`` that
registers its class and its config dataclass under a name.

    @register_method("random", config=RandomConfig)
    class RandomSelection(VisionMethod):
        ...

The CLI, the Python API and the benchmarks harness find methods here by name
(:func:`get_method`); an unknown name is an error listing the known ones. Every module of
``compress/methods`` is imported on first use (:func:`discover`), so a new file is all it takes.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Literal

Side = Literal["vision", "llm"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, where it acts, its class and its config dataclass."""

    name: str
    side: Side
    cls: type
    config: type

    @property
    def summary(self) -> str:
        """The first line of the method class's docstring."""
        return (self.cls.__doc__ or "").strip().splitlines()[0] if self.cls.__doc__ else ""


_METHODS: dict[str, MethodSpec] = {}
_DISCOVERED = False


def register_method(name: str, config: type, side: Side = "vision"):
    """Class decorator: register a method class under ``name`` with its config dataclass."""

    def decorate(cls: type) -> type:
        if name in _METHODS and _METHODS[name].cls is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_METHODS[name].cls.__name__}, {cls.__name__})")
        _METHODS[name] = MethodSpec(name, side, cls, config)
        cls.method_name = name
        return cls

    return decorate


def discover() -> None:
    """Import every module of ``sparsezip_pl.compress.methods`` (each registers its method)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module("sparsezip_pl.compress.methods")
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _DISCOVERED = True


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; unknown names raise ValueError listing the known ones."""
    discover()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _METHODS[name]


def method_names(side: Side | None = None) -> list[str]:
    """Registered method names, sorted (optionally only one side's)."""
    discover()
    return sorted(name for name, spec in _METHODS.items() if side is None or spec.side == side)


def methods() -> dict[str, MethodSpec]:
    """All registered methods by name."""
    discover()
    return dict(sorted(_METHODS.items()))


def describe() -> list[dict[str, Any]]:
    """One row per method (name, side, summary), e.g. for ``--help`` texts and docs."""
    return [{"name": s.name, "side": s.side, "summary": s.summary} for s in methods().values()]

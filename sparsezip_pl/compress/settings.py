"""The compressor's configuration: a method name, a shared budget and one section per registered
method (built from the registry, so a new method file brings its section along).

    compressor:
      method: divprune          # any registered name (python -m sparsezip_pl.compress lists them)
      budget: 64                # visual tokens reaching the LLM per image, or a fraction (0.11)
      divprune: {...}           # that method's own options; the other sections are ignored

The flat keys of earlier versions (``k_max``, ``dominant``, ``merging`` ... at the top, which
were SparseZip's options and VisionZip's budget) still read, with a deprecation warning naming
the new key; so does a :class:`~sparsezip_pl.compress.config.SparseZipConfig` object.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Literal, Optional, Union

from .config import Alphas, DynKConfig, MergingConfig, SparseZipConfig, SparseZipOptions, VisualPositions
from .registry import get_method, methods
from .types import Geometry

# Flat keys of earlier versions: SparseZip's options, now under ``sparsezip:``.
_LEGACY_TYPES: dict[str, Any] = {
    "layers": list[int], "dynamic_k": bool, "dominant": int, "k_min": int, "k_max": int, "dynk": DynKConfig,
    "alphas": Alphas, "hybrid_scoring": bool, "tau_feat": float, "tau_sim": float, "cross_beta": float,
    "merging": MergingConfig, "select_tau": float, "weight_tau": float, "seed": int,
}


@dataclass
class CompressorSettings:
    """Which token-reduction method runs, and at what budget (the method's own options are in its
    section, named like the method)."""

    method: str = "sparsezip"
    """A registered method: ``none``, ``sparsezip``, ``visionzip``, ... (``python -m
    sparsezip_pl.compress`` lists them, where they act and their options)."""
    budget: Optional[Union[int, float]] = None  # noqa: UP007, UP045 (jsonargparse: 64 or 0.111)
    """Visual tokens per image reaching the LLM (an int, e.g. 64, 128, 192) or a fraction of the
    stock count (a float below 1). Fixed-budget methods hit it exactly; SparseZip's dynamic K
    spends at most that many per image. LLM-side methods (``fastv``, ``pdrop``) read it as the
    visual tokens averaged over the decoder's layers (the papers' convention; see each method).
    None: the method's own default settings."""
    visual_positions: Optional[VisualPositions] = None  # noqa: UP045
    """Deprecated here: ``visual_positions`` is a model setting (the module's and ``sparsezip()``'s)."""


def _compose() -> type:
    """``CompressorConfig``: :class:`CompressorSettings` plus one section per registered method
    and the deprecated flat keys."""
    specs = methods()
    # A method without options (``none``) has no section: jsonargparse has nothing to parse there.
    fields: list[tuple[str, Any, Any]] = [
        (name, spec.config, field(default_factory=spec.config))
        for name, spec in specs.items() if dataclasses.fields(spec.config)
    ]
    fields += [(key, Optional[kind], field(default=None)) for key, kind in _LEGACY_TYPES.items()]  # noqa: UP045
    names = tuple(specs)
    cls = make_dataclass("CompressorConfig", fields, bases=(CompressorSettings,), namespace={
        "__post_init__": _post_init,
        "__doc__": CompressorSettings.__doc__,
        "method_names": names,
        "options": _options,
        "coerce": classmethod(_coerce),
    })
    cls.__annotations__["method"] = Literal[names]  # type: ignore[valid-type]
    cls.__dataclass_fields__["method"].type = Literal[names]  # type: ignore[valid-type]
    cls.__module__ = __name__
    return cls


def _post_init(self) -> None:
    get_method(self.method)  # an unknown name lists the known ones
    if self.budget is not None and float(self.budget).is_integer():
        self.budget = int(self.budget)
    given = {key: getattr(self, key) for key in _LEGACY_TYPES if getattr(self, key) is not None}
    if not given:
        return
    moves = []
    for key, value in given.items():
        if self.method == "visionzip" and key == "dominant":
            self.visionzip = dataclasses.replace(self.visionzip, dominant=value)
            moves.append(f"{key} -> visionzip.dominant")
        elif self.method == "visionzip" and key == "merging":
            self.visionzip = dataclasses.replace(self.visionzip, contextual=value.contextual_num)
            moves.append("merging.contextual_num -> visionzip.contextual")
        else:
            self.sparsezip = dataclasses.replace(self.sparsezip, **{key: value})
            moves.append(f"{key} -> sparsezip.{key}")
        setattr(self, key, None)
    warnings.warn(f"compressor keys of earlier versions were moved: {', '.join(moves)}", DeprecationWarning,
                  stacklevel=3)


def _options(self) -> Any:
    """The chosen method's own config (its section)."""
    section = getattr(self, self.method, None)
    return section if section is not None else get_method(self.method).config()


def _coerce(cls, value: Any) -> Any:
    """A ``CompressorConfig`` from itself, a dict (new or flat keys) or a flat ``SparseZipConfig``."""
    if isinstance(value, cls):
        return value
    if isinstance(value, SparseZipConfig):
        options = {f.name: getattr(value, f.name) for f in dataclasses.fields(SparseZipOptions)}
        config = cls(method=value.method, sparsezip=SparseZipOptions(**options))
        if value.method == "visionzip":
            config.visionzip = dataclasses.replace(config.visionzip, dominant=value.dominant,
                                                   contextual=value.merging.contextual_num)
        if value.visual_positions != "contiguous":
            config.visual_positions = value.visual_positions
        return config
    if isinstance(value, dict):
        value = dict(value)
        sections = {}
        for name in cls.method_names:
            section = value.pop(name, None) if hasattr(cls, name) or name in cls.__dataclass_fields__ else None
            if isinstance(section, dict):
                sections[name] = _build_dataclass(get_method(name).config, section)
            elif section is not None:
                sections[name] = section
        legacy = {}
        for key in list(value):
            if key in _LEGACY_TYPES:
                item = value.pop(key)
                kind = _LEGACY_TYPES[key]
                legacy[key] = _build_dataclass(kind, item) if dataclasses.is_dataclass(kind) and isinstance(item, dict) else item
        return cls(**value, **sections, **legacy)
    raise TypeError(f"compressor config must be a CompressorConfig, a dict or a SparseZipConfig, got {type(value).__name__}")


def _build_dataclass(kind: type, values: dict[str, Any]) -> Any:
    """A (nested) dataclass from a dict."""
    kwargs = {}
    for item in dataclasses.fields(kind):
        if item.name not in values:
            continue
        value = values[item.name]
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        kwargs[item.name] = _build_dataclass(type(default), value) if dataclasses.is_dataclass(default) and isinstance(value, dict) else value
    unknown = set(values) - {item.name for item in dataclasses.fields(kind)}
    if unknown:
        raise ValueError(f"{kind.__name__} has no option(s) {sorted(unknown)}")
    return kind(**kwargs)


CompressorConfig = _compose()


def build_method(config: Any, geometry: Geometry):
    """The method module that ``config`` (anything :meth:`CompressorConfig.coerce` takes) names,
    built for ``geometry``; its budget is checked against the patch count when that is known."""
    config = CompressorConfig.coerce(config)
    spec = get_method(config.method)
    return spec.cls(config.options(), geometry, budget=config.budget)

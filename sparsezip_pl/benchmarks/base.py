"""The benchmark protocol and its registry.

A benchmark is one file in ``benchmarks/``: a :class:`Benchmark` subclass registered with
``@register_benchmark(name)``. An instance holds where its data is (its constructor's arguments,
which LightningCLI parses and documents) and knows the rest of the benchmark: how to read the
official layouts into sample dicts (``load``), the prompt rule (inside ``load``), how to parse a
model's answer (``parse``), its scores (``metric``, a torchmetrics ``Metric``) and the official
answer files its own scoring scripts read (``export``). The Lightning data modules, the
LightningModule and the callbacks reach benchmarks only through this protocol, by the ``task``
name every sample carries; a new benchmark is one file plus its test.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, ClassVar

from torchmetrics import Metric

from sparsezip_pl.data.common import RecordDataset, SkipLedger

_BENCHMARKS: dict[str, type[Benchmark]] = {}
_DISCOVERED = False


class Benchmark:
    """One benchmark's data source and rules (see the module doc).

    Args (common to every benchmark, after its own source arguments):
        max_per_category: only the first N items of each category (subtask, split).
        hf_split: split of a parquet / hub release.
        cache_dir: ``datasets`` cache folder for parquet / hub sources.
    """

    name: ClassVar[str] = ""

    def __init__(self, max_per_category: int | None = None, hf_split: str = "test", cache_dir: str | None = None) -> None:
        self.max_per_category = max_per_category
        self.hf_split = hf_split
        self.cache_dir = cache_dir

    def load(self, on_error: str = "raise", ledger: SkipLedger | None = None, verify_images: bool = False) -> RecordDataset:
        """The benchmark's samples (sample dicts with ``task == self.name``), in source order."""
        raise NotImplementedError

    def sources(self) -> dict[str, Any]:
        """The settings that choose the data (recorded in a run's identity)."""
        raise NotImplementedError

    @staticmethod
    def parse(answer: str) -> str:
        """A model's free-form answer -> the label the metric compares with the ground truth."""
        raise NotImplementedError

    @staticmethod
    def metric() -> Metric:
        """A fresh metric; ``update_from_samples(records, predictions)`` takes answered records."""
        raise NotImplementedError

    @staticmethod
    def export(records: list[dict[str, Any]], folder: Path) -> list[Path]:
        """Write the official answer files of ``records`` (in source order) under ``folder``;
        returns the files written."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sources()})"


def register_benchmark(name: str):
    """Class decorator: register a :class:`Benchmark` subclass under ``name`` (the samples' ``task``)."""

    def decorate(cls: type[Benchmark]) -> type[Benchmark]:
        _BENCHMARKS[name] = cls
        cls.name = name
        return cls

    return decorate


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        package = importlib.import_module("sparsezip_pl.benchmarks")
        for module in pkgutil.iter_modules(package.__path__):
            if module.name not in ("base", "metrics") and not module.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{module.name}")
        _DISCOVERED = True


def get_benchmark(name: str) -> type[Benchmark]:
    """The benchmark registered as ``name``; an unknown name (a sample's ``task`` that is no
    benchmark) is an error listing the known ones, never a fall-back to another's rules."""
    _discover()
    if name not in _BENCHMARKS:
        raise ValueError(f"sample task {name!r} is not a known benchmark; known: {benchmark_names()}")
    return _BENCHMARKS[name]


def benchmark_names() -> list[str]:
    """Registered benchmark names, sorted."""
    _discover()
    return sorted(_BENCHMARKS)

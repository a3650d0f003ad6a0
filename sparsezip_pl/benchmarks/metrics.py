"""The shared base of the benchmarks' scores: torchmetrics ``Metric``s that are correct under DDP.

Each ``update`` appends one row per answer to tensor states reduced with ``cat``: a 52-bit stable
hash of ``sample_id`` (blake2b, identical in every process, unlike Python's ``hash``), the category
index in a fixed vocabulary, and the parsed prediction / ground truth. ``compute`` drops repeated
sample hashes (keeping the first row, in rank order after gathering), so the samples that
``DistributedSampler`` repeats to even out the ranks are counted once.

Values are percentages (0..100) as in the papers. ``compute`` raises when no sample was seen:
there is never a silent score over zero samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

YES_NO = {"no": 0, "yes": 1}


def stable_id(text: str) -> int:
    """A 52-bit integer hash of a string, the same in every process and run (52 bits: exact in
    float64, the dtype the states are kept in; two of 100,000 ids collide with odds of about 1e-6)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 12


def partial_name(name: str, present: int, total: int) -> str:
    """``name`` for an aggregate over all ``total`` parts of a benchmark, ``name_{present}of{total}``
    over fewer: a partial total or average never carries the full benchmark's name."""
    return name if present == total else f"{name}_{present}of{total}"


def ground_truth(values: Sequence[str]) -> list[int]:
    out = []
    for value in values:
        key = value.strip().lower() if isinstance(value, str) else value
        if key not in YES_NO:
            raise ValueError(f"ground truth must be 'yes' or 'no', got {value!r}")
        out.append(YES_NO[key])
    return out


def category_index(values: Sequence[str], vocabulary: tuple[str, ...], what: str) -> list[int]:
    try:
        return [vocabulary.index(v) for v in values]
    except ValueError:
        unknown = sorted({v for v in values if v not in vocabulary})
        raise ValueError(f"unknown {what}(s) {unknown}; valid: {list(vocabulary)}") from None


def _first_occurrence(keys: Tensor) -> Tensor:
    """Indices of the first row of every distinct key, in row order."""
    _, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.arange(keys.numel(), device=keys.device)
    first = torch.full((int(inverse.max()) + 1,), keys.numel(), dtype=torch.long, device=keys.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first.sort().values


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A ``cat`` state as one tensor (a list before syncing, a tensor after)."""
    if isinstance(state, list) and not state:
        return torch.zeros(0, dtype=torch.long)
    return dim_zero_cat(state)


def check_lengths(**columns: Sequence[Any]) -> int:
    lengths = {name: len(col) for name, col in columns.items() if col is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"update() arguments differ in length: {lengths}")
    return next(iter(lengths.values()))


class DeduplicatedMetric(Metric):
    """Common state handling: hashed sample keys plus per-metric integer columns.

    Every column is a list state of float64 tensors (the 52-bit keys are exact in float64).
    Under DDP a process that saw no sample of a benchmark still takes part in ``compute()``: call
    :meth:`prepare_for_sync` first, so its columns hold an empty float64 tensor, which gathers with
    the other processes' (torchmetrics' own stand-in for an empty list takes the metric's default
    dtype, which moving the module to a device resets to float32).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    _columns: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for column in ("sample_key", *self._columns):
            self.add_state(column, default=[], dist_reduce_fx="cat")

    def _append(self, **columns: list[int]) -> None:
        for name, values in columns.items():
            getattr(self, name).append(torch.tensor(values, dtype=torch.float64, device=self.device))

    def prepare_for_sync(self) -> None:
        """Give every column an (empty) float64 tensor before a distributed ``compute()``."""
        for name in ("sample_key", *self._columns):
            getattr(self, name).append(torch.zeros(0, dtype=torch.float64, device=self.device))

    def _gathered(self) -> dict[str, Tensor]:
        """The de-duplicated columns, as long tensors on the metric's device."""
        keys = _cat(self.sample_key).long()
        if keys.numel() == 0:
            raise RuntimeError(f"{type(self).__name__}.compute(): no samples were seen (empty data set?)")
        keep = _first_occurrence(keys)
        out = {"sample_key": keys[keep]}
        for column in self._columns:
            out[column] = _cat(getattr(self, column)).long()[keep]
        return out



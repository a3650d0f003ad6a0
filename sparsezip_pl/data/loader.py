"""DataLoader pieces that drop lazily skipped samples and count them in the main process.

Flow with ``num_workers > 0``: a worker's ``Dataset.__getitem__`` returns a
:class:`~sparsezip_pl.data.common.SkippedSample` for an image it cannot decode (skip mode);
:class:`SkipAwareCollate` (also in the worker) removes those from the batch, calls the real collate
on the rest and returns ``CollatedBatch(batch, skipped)``; :class:`SkipCountingDataLoader` (main
process) unwraps it, records the skips in its :class:`~sparsezip_pl.data.common.SkipLedger` and
yields only ``batch``. Counts are therefore exact whatever the number of workers, and a sample
skipped again in a later epoch is not counted twice.

A batch whose samples were *all* skipped is not yielded. Under DDP that can give ranks different
batch counts; build eval data sets with ``verify_images=True`` when images may be corrupt, so that
skips happen at set-up, identically on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from torch.utils.data import DataLoader

from sparsezip_pl.data.common import SkipLedger, SkippedSample


def collate_as_list(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Default collate: the list of sample dicts, unchanged."""
    return list(samples)


class CollatedBatch(NamedTuple):
    """What :class:`SkipAwareCollate` returns: the batch (None if empty) and the skipped items."""

    batch: Any
    skipped: tuple[SkippedSample, ...]


class SkipAwareCollate:
    """Wraps a collate function: drops ``None`` / :class:`SkippedSample` items first (picklable)."""

    def __init__(self, collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None) -> None:
        self.collate_fn = collate_fn or collate_as_list

    def __call__(self, items: list[Any]) -> CollatedBatch:
        kept = [item for item in items if isinstance(item, dict)]
        skipped = tuple(
            item if isinstance(item, SkippedSample) else SkippedSample("unknown", "none_item", "dataset returned None")
            for item in items
            if not isinstance(item, dict)
        )
        return CollatedBatch(self.collate_fn(kept) if kept else None, skipped)


class SkipCountingDataLoader(DataLoader):
    """A ``DataLoader`` that unwraps :class:`CollatedBatch` and counts skips in ``skip_ledger``.

    Lightning can re-create it (to inject a ``DistributedSampler``): ``skip_ledger`` is both an
    ``__init__`` argument and an attribute.
    """

    def __init__(self, dataset: Any, *args: Any, skip_ledger: SkipLedger | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.skip_ledger = skip_ledger

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            if isinstance(item, CollatedBatch):
                if self.skip_ledger is not None:
                    for skip in item.skipped:
                        self.skip_ledger.record(skip.reason, skip.key, skip.message)
                if item.batch is None:
                    continue
                yield item.batch
            else:
                yield item

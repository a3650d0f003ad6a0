"""DataLoader pieces that drop lazily skipped samples and count them in the main process.

Flow with ``num_workers > 0``: a worker's ``Dataset.__getitem__`` returns a
:class:`~sparsezip_pl.data.common.SkippedSample` for an image it cannot decode (skip mode);
:class:`SkipAwareCollate` (also in the worker) removes those from the batch, calls the real collate
on the rest and returns ``CollatedBatch(batch, skipped)``; :class:`SkipCountingDataLoader` (main
process) unwraps it, records the skips in its :class:`~sparsezip_pl.data.common.SkipLedger` and
yields only ``batch``. Counts are therefore exact whatever the number of workers, and a sample
skipped again in a later epoch is not counted twice. The real collate may itself return a
``CollatedBatch`` for samples it refuses (the LightningModule's does, for prompts too long for the
LLM under ``on_error: skip``).

A batch whose samples were *all* skipped is not yielded. Under DDP that can give ranks different
batch counts; build eval data sets with ``verify_images=True`` when images may be corrupt, so that
skips happen at set-up, identically on every rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, RandomSampler

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
        batch = self.collate_fn(kept) if kept else None
        if isinstance(batch, CollatedBatch):  # the collate function dropped samples itself (e.g. too long)
            batch, skipped = batch.batch, skipped + batch.skipped
        return CollatedBatch(batch, skipped)


class EpochSeededRandomSampler(RandomSampler):
    """A random order that depends only on ``seed + epoch`` (DistributedSampler's convention), so
    the order of an interrupted epoch can be replayed when a run resumes.

    Lightning calls ``set_epoch`` every epoch, and under DDP swaps it for a ``DistributedSampler``
    (it is a ``RandomSampler``), which is seeded the same way.
    """

    def __init__(self, data_source: Any, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class _ResumableIndexSampler:
    """The loader's (batch) sampler, without the batches that a resumed pass must skip.

    The count is read from the loader each time a pass starts, so an iterator that persistent
    workers keep across epochs skips only in the resumed pass. ``len`` stays the full length, as
    Lightning expects of a resumed loader (it counts the batches already done itself).
    """

    def __init__(self, loader: SkipCountingDataLoader, sampler: Any) -> None:
        self.loader = loader
        self.sampler = sampler

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.loader._resume_at, None)

    def __len__(self) -> int:
        return len(self.sampler)


class SkipCountingDataLoader(DataLoader):
    """A ``DataLoader`` that unwraps :class:`CollatedBatch` and counts skips in ``skip_ledger``.

    Lightning can re-create it (to inject a ``DistributedSampler``): ``skip_ledger`` is both an
    ``__init__`` argument and an attribute.

    It is resumable (Lightning saves ``state_dict`` in checkpoints): the state is how many batches
    of the current pass were drawn and the sampler's seed; after ``load_state_dict`` the next pass
    starts right after those batches, skipping their indices without loading them. With a sampler
    whose order depends only on its seed and epoch (:class:`EpochSeededRandomSampler`,
    ``DistributedSampler``, sequential), a resumed epoch sees exactly the batches it had not seen.
    """

    def __init__(self, dataset: Any, *args: Any, skip_ledger: SkipLedger | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.skip_ledger = skip_ledger
        self._drawn = 0  # index batches drawn in the current pass (kept or all-skipped)
        self._resume_at = 0

    @property
    def _index_sampler(self) -> Any:
        # DataLoader's private hook for the (batch) sampler its iterators draw from: the one place
        # that sees the sampler Lightning injects under DDP, so a resumed pass can skip what was
        # drawn (torch has no public resumable DataLoader; tests/test_private_apis.py breaks if it
        # is renamed, tests/test_reliability_resume.py checks the behaviour).
        return _ResumableIndexSampler(self, super()._index_sampler)

    def state_dict(self) -> dict[str, Any]:
        """Batches drawn in the current pass and the sampler's seed (Lightning's resumable-loader hook)."""
        return {"batches_drawn": self._drawn, "sampler_seed": getattr(self.sampler, "seed", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the next pass after the batches that ``state`` says were drawn."""
        self._resume_at = int(state.get("batches_drawn", 0))
        seed = state.get("sampler_seed")
        if seed is not None and hasattr(self.sampler, "seed"):
            self.sampler.seed = seed

    def __iter__(self) -> Iterator[Any]:
        self._drawn = self._resume_at
        iterator = super().__iter__()
        self._resume_at = 0  # the skip applies to this pass only
        for item in iterator:
            self._drawn += 1
            if isinstance(item, CollatedBatch):
                if self.skip_ledger is not None:
                    for skip in item.skipped:
                        self.skip_ledger.record(skip.reason, skip.key, skip.message)
                if item.batch is None:
                    continue
                yield item.batch
            else:
                yield item

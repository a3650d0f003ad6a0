"""LightningDataModules for instruction tuning and MME / POPE evaluation.

Every module yields the sample dicts of :mod:`sparsezip_pl.data.common` (``SAMPLE_KEYS``). The
LightningModule sets ``datamodule.collate_fn`` (a picklable ``list[dict] -> batch``) before the
loaders are built; without it a batch is the list of sample dicts.

Evaluation loaders are deterministic (no shuffling, no ``drop_last``): every sample exactly once per
rank set, and the padding that Lightning's ``DistributedSampler`` adds is removed by the metrics'
de-duplication by ``sample_id``.

``datamodule.skipped`` maps skip reason -> count (see :mod:`sparsezip_pl.data.common`): set-up skips
(identical on every rank) plus lazy image-decode skips seen by this rank's loaders.
``EvalDataModule`` serves any registered benchmarks together in one loader (in the order given),
so one ``test`` run reports them all; each sample's ``task`` names its benchmark.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler, Sampler

from sparsezip_pl.data.common import SkipLedger, check_on_error
from sparsezip_pl.data.instruction import build_instruct_dataset
from sparsezip_pl.data.loader import EpochSeededRandomSampler, SkipAwareCollate, SkipCountingDataLoader
from sparsezip_pl.benchmarks import MME, POPE, Benchmark

log = logging.getLogger(__name__)


class _BaseDataModule(pl.LightningDataModule):
    """Loader construction, collate hand-off and skip accounting shared by all modules."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        on_error: str,
        cache_dir: str | None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.on_error = check_on_error(on_error)
        self.cache_dir = cache_dir
        self.collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None
        self.skip_ledger = SkipLedger()

    @property
    def skipped(self) -> dict[str, int]:
        """Skip reason -> number of skipped items (see the module doc)."""
        return self.skip_ledger.counts

    def _loader(self, dataset: Dataset, shuffle: bool, sampler: Sampler | None = None) -> SkipCountingDataLoader:
        return SkipCountingDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=False,
            collate_fn=SkipAwareCollate(self.collate_fn),
            skip_ledger=self.skip_ledger,
        )

    def _log_built(self, what: str, dataset: Dataset) -> None:
        log.info("%s: %d samples, %s", what, len(dataset), self.skip_ledger.summary())

    def identity(self) -> dict[str, Any]:
        """What the data is: the settings that choose it (local paths made absolute) and, per data
        set, its sample count and content digest (ids, questions, answers, image paths). A run
        record stores it; a resumed run must match it."""
        raise NotImplementedError


def _absolute(source: Any) -> Any:
    """A local path as an absolute string (so runs from other folders compare equal); hub ids as given."""
    if isinstance(source, str) and os.path.exists(source):
        return os.path.abspath(source)
    return source


def _describe(dataset: Any) -> dict[str, Any]:
    return {"samples": len(dataset), "digest": dataset.digest()}


class InstructDataModule(_BaseDataModule):
    """LLaVA-Instruct-style conversations for tuning (train, optional val).

    Args:
        train_source: training records: a JSON list / JSONL file, a folder of them or of parquet
            files, or a Hugging Face hub id.
        image_dir: folder the records' ``image`` paths are relative to (default: the source's folder).
        val_source: optional validation records, same forms as ``train_source`` (validated by
            the tuning loss: ``val/loss``, ``val/distill`` ...).
        val_image_dir: image folder for ``val_source`` (default: ``image_dir``).
        val_benchmark: optional MME / POPE data to validate on instead, answered by generation
            like ``test`` (``val/mme/total``, ``val/pope/avg/f1`` ...), so a ``ModelCheckpoint``
            can keep the compressor that answers best. Use a split that is not the test set.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (image decoding runs there).
        pin_memory: pin batches in page-locked memory (GPU runs).
        shuffle: shuffle the training set each epoch. The order of epoch ``e`` depends only on
            ``seed + e``, so a run resumed mid-epoch from a checkpoint replays it exactly.
        on_error: ``raise`` stops at the first bad record or image; ``skip`` drops it, counts it in
            ``datamodule.skipped`` and logs a warning.
        check_images: check at set-up that every referenced image file exists.
        max_samples: use only the first N valid training records.
        hf_split: split name for parquet / hub sources (train and validation).
        cache_dir: ``datasets`` cache folder for parquet / hub sources.
        seed: shuffling seed; default: the run's ``seed_everything`` value (``PL_GLOBAL_SEED``), else 0.
    """

    def __init__(
        self,
        train_source: str,
        image_dir: str | None = None,
        val_source: str | None = None,
        val_image_dir: str | None = None,
        val_benchmark: EvalDataModule | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        pin_memory: bool = False,
        shuffle: bool = True,
        on_error: Literal["raise", "skip"] = "raise",
        check_images: bool = True,
        max_samples: int | None = None,
        hf_split: str = "train",
        cache_dir: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, on_error, cache_dir)
        self.seed = seed
        self.train_source = train_source
        self.image_dir = image_dir
        self.val_source = val_source
        self.val_image_dir = val_image_dir
        if val_source and val_benchmark is not None:
            raise ValueError("InstructDataModule: give val_source or val_benchmark, not both")
        self.val_benchmark = val_benchmark
        if val_benchmark is not None:
            val_benchmark.skip_ledger = self.skip_ledger  # one count of skips for the run
        self.shuffle = shuffle
        self.check_images = check_images
        self.max_samples = max_samples
        self.hf_split = hf_split
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self._hide_val_hook()

    def _hide_val_hook(self) -> None:
        """Without validation data, un-override ``val_dataloader`` on this instance so Lightning
        skips validation silently (an empty loader list would make it warn)."""
        if not self.val_source and self.val_benchmark is None:
            self.val_dataloader = super().val_dataloader

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("val_dataloader", None)  # a bound method; re-created on unpickling
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hide_val_hook()

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the records (once)."""
        if self.train_dataset is None and stage in (None, "fit"):
            self.train_dataset = build_instruct_dataset(
                self.train_source, self.image_dir, self.on_error, self.skip_ledger, "instruct",
                self.hf_split, self.cache_dir, self.check_images, self.max_samples,
            )
            self._log_built(f"instruction data {self.train_source}", self.train_dataset)
            self.train_dataset.check_first_sample()
        if self.val_dataset is None and self.val_source and stage in (None, "fit", "validate"):
            self.val_dataset = build_instruct_dataset(
                self.val_source, self.val_image_dir or self.image_dir, self.on_error, self.skip_ledger,
                "instruct-val", self.hf_split, self.cache_dir, self.check_images, None,
            )
            self._log_built(f"validation data {self.val_source}", self.val_dataset)
            self.val_dataset.check_first_sample()
        if self.val_benchmark is not None and stage in (None, "fit", "validate"):
            self.val_benchmark.setup(stage)

    def identity(self) -> dict[str, Any]:
        """The training data (source, image folder, sample limit, digest) and the validation data."""
        identity: dict[str, Any] = {
            "train_source": _absolute(self.train_source), "image_dir": _absolute(self.image_dir),
            "max_samples": self.max_samples, "hf_split": self.hf_split,
        }
        if self.train_dataset is not None:
            identity["train"] = _describe(self.train_dataset)
        if self.val_source:
            identity["val_source"] = _absolute(self.val_source)
            if self.val_dataset is not None:
                identity["val"] = _describe(self.val_dataset)
        if self.val_benchmark is not None:
            identity["val_benchmark"] = self.val_benchmark.identity()
        return identity

    def state_dict(self) -> dict[str, Any]:
        """Saved in training checkpoints: what the run trained on (see :meth:`load_state_dict`)."""
        return {"train": {key: value for key, value in self.identity().items()
                          if key in ("train_source", "image_dir", "max_samples", "hf_split", "train")}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resuming ``fit`` from a checkpoint of a run that trained on other data is refused: the
        restored loop position and shuffle order would be applied to another data set."""
        saved = state.get("train")
        trainer = getattr(self, "trainer", None)
        if saved is None or trainer is None or trainer.state.fn != "fit":
            return
        current = self.state_dict()["train"]
        changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
        if changed:
            details = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}" for key in changed)
            raise ValueError(
                f"the checkpoint being resumed was trained on other data ({details}). Resume with the same "
                "training data, or start a new run without --ckpt_path."
            )

    def train_dataloader(self) -> SkipCountingDataLoader:
        """Training batches (shuffled unless ``shuffle`` is False), resumable mid-epoch."""
        self.setup("fit")
        return self._loader(self.train_dataset, shuffle=False, sampler=self._train_sampler())

    def _train_sampler(self) -> Sampler | None:
        """An order that depends only on the seed and the epoch (so a resumed run replays it).

        Under DDP this is a ``DistributedSampler`` built here, because the one Lightning would
        inject always shuffles training data; with the same seed it draws the same permutation
        as the one-process sampler, so the global batches of 1 x B and P x B/P runs are the same.
        """
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))  # Lightning's default
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                return DistributedSampler(self.train_dataset, shuffle=self.shuffle, seed=seed, drop_last=False)
        return EpochSeededRandomSampler(self.train_dataset, seed) if self.shuffle else None

    def val_dataloader(self) -> SkipCountingDataLoader:
        """Validation batches in file order (only with a ``val_source`` or ``val_benchmark``)."""
        if self.val_benchmark is not None:
            return self.val_benchmark.val_dataloader()
        if not self.val_source:
            raise ValueError("InstructDataModule has no val_source or val_benchmark")
        self.setup("validate")
        return self._loader(self.val_dataset, shuffle=False)


class EvalDataModule(_BaseDataModule):
    """Benchmarks for validate / test / predict: each benchmark's samples in their source order,
    one benchmark after the other in one loader, so one ``test`` run reports them all.

    Args:
        benchmarks: the benchmarks to serve (``sparsezip_pl.benchmarks.MME``, ``POPE`` or any
            registered benchmark), each with its data source:

                benchmarks:
                  - class_path: sparsezip_pl.benchmarks.MME
                    init_args: {root: /data/MME_Benchmark_release_version}
                  - class_path: sparsezip_pl.benchmarks.POPE
                    init_args: {source: /data/pope/coco, image_dir: /data/coco/val2014}

        mme_root, mme_subtasks, pope_source, pope_image_dir, pope_splits, pope_label_dir: the
            keywords of earlier versions, still accepted: they add an MME / POPE benchmark.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (image decoding runs there).
        pin_memory: pin batches in page-locked memory (GPU runs).
        on_error: ``raise`` stops at the first bad file, line or image; ``skip`` drops the item
            (an MME image's question pair, a POPE question), counts it in ``datamodule.skipped``
            and logs a warning.
        verify_images: decode every image at set-up, so no sample can be skipped later (use with
            ``skip`` on multi-GPU runs).
        max_per_category: first N items per category of every benchmark given by the earlier
            keywords (a benchmark object has its own).
        hf_split: split of parquet / hub sources (earlier keywords).
        cache_dir: ``datasets`` cache folder for parquet / hub sources (earlier keywords).
    """

    def __init__(
        self,
        benchmarks: list[Benchmark] | None = None,
        mme_root: str | None = None,
        mme_subtasks: list[str] | None = None,
        pope_source: str | None = None,
        pope_image_dir: str | None = None,
        pope_splits: list[str] | None = None,
        pope_label_dir: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_error: Literal["raise", "skip"] = "raise",
        verify_images: bool = False,
        max_per_category: int | None = None,
        hf_split: str = "test",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, on_error, cache_dir)
        self.benchmarks: list[Benchmark] = list(benchmarks or [])
        if mme_root is not None:
            self.benchmarks.append(MME(mme_root, mme_subtasks, max_per_category, hf_split, cache_dir))
        if pope_source is not None:
            self.benchmarks.append(POPE(pope_source, pope_image_dir, pope_splits, pope_label_dir, max_per_category,
                                        hf_split, cache_dir))
        if not self.benchmarks:
            raise ValueError("EvalDataModule needs at least one benchmark (benchmarks: [...], or mme_root / pope_source)")
        names = [benchmark.name for benchmark in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"EvalDataModule: each benchmark at most once, got {names}")
        self.verify_images = verify_images
        self.dataset: Dataset | None = None
        self.parts: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the annotations and decode each source's first image (once; the same
        set serves every stage)."""
        if self.dataset is None:
            self.parts = {b.name: b.load(self.on_error, self.skip_ledger, self.verify_images) for b in self.benchmarks}
            for part in self.parts.values():
                part.check_first_sample()
            parts = list(self.parts.values())
            self.dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
            self._log_built(", ".join(self.parts), self.dataset)

    def identity(self) -> dict[str, Any]:
        """The sources and, per benchmark, the sample count and digest."""
        self.setup()
        sources: dict[str, Any] = {}
        for benchmark in self.benchmarks:
            sources.update({key: _absolute(value) for key, value in benchmark.sources().items()})
        return {"sources": sources, **{name: _describe(part) for name, part in self.parts.items()}}

    def _eval_loader(self) -> SkipCountingDataLoader:
        self.setup()
        return self._loader(self.dataset, shuffle=False)

    def val_dataloader(self) -> SkipCountingDataLoader:
        """The evaluation set, in order."""
        return self._eval_loader()

    def test_dataloader(self) -> SkipCountingDataLoader:
        """The evaluation set, in order."""
        return self._eval_loader()

    def predict_dataloader(self) -> SkipCountingDataLoader:
        """The evaluation set, in order."""
        return self._eval_loader()


class MMEDataModule(EvalDataModule):
    """MME alone (the name of earlier versions; ``EvalDataModule(benchmarks=[MME(...)])`` is the same).

    Args:
        root, subtasks: see :class:`sparsezip_pl.benchmarks.MME`; the other arguments are
            :class:`EvalDataModule`'s.
    """

    def __init__(
        self,
        root: str,
        subtasks: list[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_error: Literal["raise", "skip"] = "raise",
        verify_images: bool = False,
        max_per_category: int | None = None,
        hf_split: str = "test",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(mme_root=root, mme_subtasks=subtasks, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, on_error=on_error, verify_images=verify_images,
                         max_per_category=max_per_category, hf_split=hf_split, cache_dir=cache_dir)


class POPEDataModule(EvalDataModule):
    """POPE alone (the name of earlier versions; ``EvalDataModule(benchmarks=[POPE(...)])`` is the same).

    Args:
        source, image_dir, splits, label_dir: see :class:`sparsezip_pl.benchmarks.POPE`; the other
            arguments are :class:`EvalDataModule`'s.
    """

    def __init__(
        self,
        source: str,
        image_dir: str | None = None,
        splits: list[str] | None = None,
        label_dir: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_error: Literal["raise", "skip"] = "raise",
        verify_images: bool = False,
        max_per_category: int | None = None,
        hf_split: str = "test",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(pope_source=source, pope_image_dir=image_dir, pope_splits=splits, pope_label_dir=label_dir,
                         batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, on_error=on_error,
                         verify_images=verify_images, max_per_category=max_per_category, hf_split=hf_split,
                         cache_dir=cache_dir)

"""MME and POPE scores as torchmetrics ``Metric``s that are correct under DDP.

Each ``update`` appends one row per answer to tensor states reduced with ``cat``: a 63-bit stable
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

from sparsezip_pl.data.answers import parse_mme_answer, parse_pope_answer
from sparsezip_pl.data.mme import MME_COGNITION, MME_PERCEPTION, MME_SUBTASKS
from sparsezip_pl.data.pope import POPE_SPLITS

_YES_NO = {"no": 0, "yes": 1}
_MME_PRED = {"no": 0, "yes": 1, "other": 2}


def stable_id(text: str) -> int:
    """A 63-bit integer hash of a string, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def partial_name(name: str, present: int, total: int) -> str:
    """``name`` for an aggregate over all ``total`` parts of a benchmark, ``name_{present}of{total}``
    over fewer: a partial total or average never carries the full benchmark's name."""
    return name if present == total else f"{name}_{present}of{total}"


def _ground_truth(values: Sequence[str]) -> list[int]:
    out = []
    for value in values:
        key = value.strip().lower() if isinstance(value, str) else value
        if key not in _YES_NO:
            raise ValueError(f"ground truth must be 'yes' or 'no', got {value!r}")
        out.append(_YES_NO[key])
    return out


def _category_index(values: Sequence[str], vocabulary: tuple[str, ...], what: str) -> list[int]:
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


def _check_lengths(**columns: Sequence[Any]) -> int:
    lengths = {name: len(col) for name, col in columns.items() if col is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"update() arguments differ in length: {lengths}")
    return next(iter(lengths.values()))


class _DedupMetric(Metric):
    """Common state handling: hashed sample keys plus per-metric integer columns."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    _columns: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sample_key", default=[], dist_reduce_fx="cat")
        for column in self._columns:
            self.add_state(column, default=[], dist_reduce_fx="cat")

    def _append(self, **columns: list[int]) -> None:
        for name, values in columns.items():
            getattr(self, name).append(torch.tensor(values, dtype=torch.long, device=self.device))

    def prepare_empty_sync(self) -> None:
        """Before a distributed ``compute()`` on a process that saw no sample: typed empty states.

        torchmetrics stands in a float32 empty tensor for an empty list state; concatenated with
        other processes' int64 sample hashes it would turn them into floats and break the
        de-duplication by sample id.
        """
        for name in self._defaults:
            setattr(self, name, [torch.zeros(0, dtype=torch.long, device=self.device)])

    def _gathered(self) -> dict[str, Tensor]:
        """The de-duplicated columns, as long tensors on the metric's device."""
        keys = _cat(self.sample_key)
        if keys.numel() == 0:
            raise RuntimeError(f"{type(self).__name__}.compute(): no samples were seen (empty data set?)")
        keep = _first_occurrence(keys)
        out = {"sample_key": keys[keep]}
        for column in self._columns:
            out[column] = _cat(getattr(self, column))[keep]
        return out


class MMEScore(_DedupMetric):
    """MME scores: per subtask acc, acc+ and score = acc + acc+; perception / cognition totals.

    ``compute()`` returns floats (as 0-dim tensors) under these keys, for the subtasks seen:
    ``SUBTASK/acc``, ``SUBTASK/acc_plus``, ``SUBTASK/score``; ``perception_total`` (sum of the 10
    perception subtask scores, 0..2000) and ``cognition_total`` (the 4 cognition ones, 0..800)
    when all of theirs were seen; a sum over fewer is named for what it covers, e.g.
    ``perception_total_4of10``, never like the benchmark's total; ``num_samples`` (after
    de-duplication) and ``incomplete_pairs``. A pair counts for
    acc+ only when both of its questions were seen and answered correctly (as in MME's own script),
    so a pair cut in half by ``limit_test_batches`` or a skip counts as wrong and is reported in
    ``incomplete_pairs``.
    """

    _columns = ("pair_key", "category", "prediction", "target")

    def update(
        self,
        sample_ids: Sequence[str],
        categories: Sequence[str],
        predictions: Sequence[str],
        targets: Sequence[str],
        pair_ids: Sequence[str] | None = None,
    ) -> None:
        """Add answers.

        Args:
            sample_ids: unique sample ids (``"subtask/NAME.jpg#k"``).
            categories: MME subtask names.
            predictions: raw model text or already parsed ``yes``/``no``/``other``.
            targets: ground truths ``yes``/``no`` (any case).
            pair_ids: question-pair ids; default: ``sample_id`` without its ``#k`` suffix.
        """
        _check_lengths(sample_ids=sample_ids, categories=categories, predictions=predictions,
                       targets=targets, pair_ids=pair_ids)
        if pair_ids is None:
            pair_ids = [s.rsplit("#", 1)[0] for s in sample_ids]
        self._append(
            sample_key=[stable_id(s) for s in sample_ids],
            pair_key=[stable_id(p) for p in pair_ids],
            category=_category_index(categories, MME_SUBTASKS, "MME subtask"),
            prediction=[_MME_PRED[parse_mme_answer(p)] for p in predictions],
            target=_ground_truth(targets),
        )

    def update_from_samples(self, samples: Sequence[dict[str, Any]], predictions: Sequence[str]) -> None:
        """``update`` from sample dicts (``task == "mme"`` ones only) and their predictions."""
        rows = [(s, p) for s, p in zip(samples, predictions, strict=True) if s["task"] == "mme"]
        if rows:
            self.update([s["sample_id"] for s, _ in rows], [s["category"] for s, _ in rows],
                        [p for _, p in rows], [s["answer"] for s, _ in rows], [s["pair_id"] for s, _ in rows])

    def compute(self) -> dict[str, Tensor]:
        """Scores of the de-duplicated answers (see the class doc for the keys)."""
        cols = self._gathered()
        correct = (cols["prediction"] == cols["target"]).long()
        out: dict[str, Tensor] = {}
        totals = {"perception_total": (MME_PERCEPTION, []), "cognition_total": (MME_COGNITION, [])}
        incomplete = 0
        for index, subtask in enumerate(MME_SUBTASKS):
            mask = cols["category"] == index
            if not bool(mask.any()):
                continue
            acc = correct[mask].double().mean() * 100
            _, pair_index = torch.unique(cols["pair_key"][mask], return_inverse=True)
            n_pairs = int(pair_index.max()) + 1
            size = torch.zeros(n_pairs, dtype=torch.long, device=correct.device).scatter_add(
                0, pair_index, torch.ones_like(pair_index))
            right = torch.zeros(n_pairs, dtype=torch.long, device=correct.device).scatter_add(
                0, pair_index, correct[mask])
            incomplete += int((size != 2).sum())
            acc_plus = ((size == 2) & (right == 2)).double().mean() * 100
            out[f"{subtask}/acc"] = acc
            out[f"{subtask}/acc_plus"] = acc_plus
            out[f"{subtask}/score"] = acc + acc_plus
            for names, scores in totals.values():
                if subtask in names:
                    scores.append(acc + acc_plus)
        for key, (names, scores) in totals.items():
            if scores:
                out[partial_name(key, len(scores), len(names))] = torch.stack(scores).sum()
        out["num_samples"] = torch.tensor(float(correct.numel()), dtype=torch.float64)
        out["incomplete_pairs"] = torch.tensor(float(incomplete), dtype=torch.float64)
        return {k: v.float() for k, v in out.items()}


class POPEScore(_DedupMetric):
    """POPE scores per split (positive = yes) and their mean over the splits seen.

    ``compute()`` keys: ``SPLIT/accuracy``, ``SPLIT/precision``, ``SPLIT/recall``, ``SPLIT/f1``,
    ``SPLIT/yes_ratio``, ``SPLIT/num_samples``, ``SPLIT/precision_undefined``,
    ``SPLIT/recall_undefined`` for each split seen; ``avg/accuracy`` ... ``avg/yes_ratio`` (plain
    mean over the three splits; a mean over fewer is named ``avg_2of3/...``); ``num_samples``. Percentages. When the model never says yes,
    precision is 0/0: it is reported as 0 with ``precision_undefined = 1`` (likewise recall with no
    positive ground truth); F1 is 0 when precision + recall is 0. Never NaN.
    """

    _columns = ("category", "prediction", "target")

    def update(
        self,
        sample_ids: Sequence[str],
        categories: Sequence[str],
        predictions: Sequence[str],
        targets: Sequence[str],
    ) -> None:
        """Add answers.

        Args:
            sample_ids: unique sample ids (``"split/question_id"``).
            categories: POPE split names.
            predictions: raw model text or ``yes``/``no`` (parsed with LLaVA's rule).
            targets: ground truths ``yes``/``no`` (any case).
        """
        _check_lengths(sample_ids=sample_ids, categories=categories, predictions=predictions, targets=targets)
        self._append(
            sample_key=[stable_id(s) for s in sample_ids],
            category=_category_index(categories, POPE_SPLITS, "POPE split"),
            prediction=[_YES_NO[parse_pope_answer(p)] for p in predictions],
            target=_ground_truth(targets),
        )

    def update_from_samples(self, samples: Sequence[dict[str, Any]], predictions: Sequence[str]) -> None:
        """``update`` from sample dicts (``task == "pope"`` ones only) and their predictions."""
        rows = [(s, p) for s, p in zip(samples, predictions, strict=True) if s["task"] == "pope"]
        if rows:
            self.update([s["sample_id"] for s, _ in rows], [s["category"] for s, _ in rows],
                        [p for _, p in rows], [s["answer"] for s, _ in rows])

    def compute(self) -> dict[str, Tensor]:
        """Scores of the de-duplicated answers (see the class doc for the keys)."""
        cols = self._gathered()
        out: dict[str, Tensor] = {}
        per_split: list[dict[str, float]] = []
        for index, split in enumerate(POPE_SPLITS):
            mask = cols["category"] == index
            n = int(mask.sum())
            if n == 0:
                continue
            pred, target = cols["prediction"][mask], cols["target"][mask]
            tp = int(((pred == 1) & (target == 1)).sum())
            fp = int(((pred == 1) & (target == 0)).sum())
            tn = int(((pred == 0) & (target == 0)).sum())
            fn = int(((pred == 0) & (target == 1)).sum())
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            values = {
                "accuracy": 100 * (tp + tn) / n,
                "precision": 100 * precision,
                "recall": 100 * recall,
                "f1": 100 * f1,
                "yes_ratio": 100 * (tp + fp) / n,
            }
            per_split.append(values)
            for name, value in values.items():
                out[f"{split}/{name}"] = torch.tensor(value)
            out[f"{split}/num_samples"] = torch.tensor(float(n))
            out[f"{split}/precision_undefined"] = torch.tensor(float(tp + fp == 0))
            out[f"{split}/recall_undefined"] = torch.tensor(float(tp + fn == 0))
        average = partial_name("avg", len(per_split), len(POPE_SPLITS))
        for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            out[f"{average}/{name}"] = torch.tensor(sum(v[name] for v in per_split) / len(per_split))
        out["num_samples"] = torch.tensor(float(cols["target"].numel()))
        return {k: v.float().to(self.device) for k, v in out.items()}

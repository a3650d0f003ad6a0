"""Callbacks: token budgets, pictures of what was kept, prediction files, a results table, and a
validation before the first training step.

The logging callbacks read what the module's steps return (``{"records": [...], "compression":
CompressionOutput}`` for evaluation, ``{"loss", "compression"}`` for training), so none of them
reaches into the model. ``ValidateBeforeTraining`` drives the fit's own validation loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from sparsezip_pl.data.mme import write_mme_export

STAGES = ("train", "validate", "test", "predict")


def _tensorboard(trainer: L.Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's version folder, or the trainer's root dir.

    Collective under DDP (``trainer.log_dir`` broadcasts): every process must call it.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def unused_path(path: Path) -> Path:
    """``path`` if nothing is there yet, else the first free ``STEM-N.SUFFIX`` beside it (N = 2, 3, ...).

    How a run without a logger folder writes into ``default_root_dir`` (by default the working
    directory) without replacing a file already there, which may be someone's own.
    """
    if not path.exists():
        return path
    numbered = (path.with_name(f"{path.stem}-{n}{path.suffix}") for n in itertools.count(2))
    return next(free for free in numbered if not free.exists())


def _all_gather_objects(trainer: L.Trainer, obj: Any) -> list[Any]:
    """``obj`` of every process (``[obj]`` in a single process); collective under DDP."""
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def llm_parameter_count(backend) -> int:
    """Parameters the LLM applies to every prefilled token: all of LLaVA's minus the vision tower,
    the projector and the input and output embedding tables."""
    model = backend.model
    excluded = {id(p) for module in (backend.vision_tower, backend.projector) for p in module.parameters()}
    for table in (model.get_input_embeddings(), model.get_output_embeddings()):
        if table is not None:
            excluded.update(id(p) for p in table.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)


class TokenBudgetLogger(L.Callback):
    """Logs visual tokens per image (mean, min, max, histogram), K, compression ratio, and
    the LLM prefill FLOPs saved per image.

    FLOPs saved are estimated as ``2 * P * removed_tokens``, with ``P`` the LLM's parameters
    outside the embedding table and ``removed_tokens = N - T_b`` the visual tokens the image no
    longer sends; attention's quadratic term is left out, so the figure is a lower bound.

    Evaluation figures come from the answered records, per sample id: samples answered by an
    earlier, interrupted run count too, and under DDP the processes' records are gathered and
    each sample counted once (DistributedSampler's padding repeats some).
    """

    def __init__(self, train_log_every_n_steps: int = 10) -> None:
        self.train_log_every_n_steps = train_log_every_n_steps
        self._tokens: list[torch.Tensor] = []
        self._dominant: list[torch.Tensor] = []
        self._samples: dict[str, tuple[int, int | None]] = {}
        self._num_patches = 0
        self._llm_params: int | None = None

    def _llm_parameters(self, pl_module) -> int:
        if self._llm_params is None:
            self._llm_params = llm_parameter_count(pl_module.backend)
        return self._llm_params

    def _collect(self, outputs: Any) -> None:
        if not isinstance(outputs, dict):
            return
        if outputs.get("records") is not None:
            for record in outputs["records"]:
                if "visual_tokens" in record:
                    self._samples[record["sample_id"]] = (record["visual_tokens"], record.get("dominant_tokens"))
            if outputs.get("compression") is not None:
                self._num_patches = outputs["compression"].cluster_map.shape[1]
            return
        if outputs.get("compression") is None:
            return
        compression = outputs["compression"]
        self._num_patches = compression.cluster_map.shape[1]
        self._tokens.append(compression.num_tokens.detach().cpu())
        self._dominant.append(compression.num_dominant.detach().cpu())

    def _summary(self, tokens: torch.Tensor, dominant: torch.Tensor, pl_module) -> dict[str, float]:
        tokens = tokens.float()
        num_patches = self._num_patches or getattr(getattr(pl_module, "backend", None), "num_patches", 0)
        removed = (num_patches - tokens).clamp(min=0)
        stats = {
            "tokens_mean": tokens.mean().item(),
            "tokens_min": tokens.min().item(),
            "tokens_max": tokens.max().item(),
            "compression_ratio": (tokens.mean() / max(num_patches, 1)).item(),
            "prefill_gflops_saved_per_image": (2 * self._llm_parameters(pl_module) * removed.mean() / 1e9).item(),
        }
        if dominant.numel():
            stats["k_mean"] = dominant.float().mean().item()
        return stats

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._collect(outputs)
        if self._tokens and (trainer.global_step % self.train_log_every_n_steps == 0):
            stats = self._summary(self._tokens[-1], self._dominant[-1], pl_module)
            pl_module.log_dict({f"budget/train_{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)
        self._tokens.clear()
        self._dominant.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def _flush(self, trainer, pl_module, stage: str) -> None:
        if stage != "val" or self._samples:  # test / predict batches always carry records
            merged: dict[str, tuple[int, int | None]] = {}
            for samples in _all_gather_objects(trainer, self._samples):
                for sample_id, counts in samples.items():
                    merged.setdefault(sample_id, counts)
            self._samples = {}
            if not merged:
                return
            tokens = torch.tensor([t for t, _ in merged.values()])
            dominant = torch.tensor([k for _, k in merged.values() if k is not None], dtype=torch.long)
        elif self._tokens:
            tokens, dominant = torch.cat(self._tokens), torch.cat(self._dominant)
        else:
            return
        self._tokens.clear()
        self._dominant.clear()
        stats = self._summary(tokens, dominant, pl_module)
        pl_module.budget_stats = stats
        if stage != "predict":
            pl_module.log_dict({f"budget/{stage}_{k}": v for k, v in stats.items()})
        writer = _tensorboard(trainer)
        if writer is not None and trainer.is_global_zero:
            writer.add_histogram(f"budget/{stage}_tokens_per_image", tokens, trainer.global_step)
            writer.add_histogram(f"budget/{stage}_k_per_image", dominant, trainer.global_step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer, pl_module, "predict")


_PALETTE = torch.tensor(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
     [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195]],
    dtype=torch.float32,
)


def draw_kept_tokens(pixel_values: torch.Tensor, kept_indices: torch.Tensor, cluster_map: torch.Tensor) -> torch.Tensor:
    """A picture of one image's compression: uint8 [3, H, W].

    Dominant (kept) patches keep their pixels with a white border; every other patch is tinted
    with the colour of the contextual token it was merged into (grey where it was dropped).
    """
    image = pixel_values.detach().float().cpu()
    image = (image - image.amin()) / (image.amax() - image.amin()).clamp(min=1e-6) * 255.0
    _, height, width = image.shape
    num_patches = cluster_map.shape[0]
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"cannot draw a non-square patch grid of {num_patches} patches")
    ph, pw = height // side, width // side
    clusters = cluster_map.detach().cpu().long()
    colours = torch.where(
        (clusters >= 0).unsqueeze(-1), _PALETTE[clusters.clamp(min=0) % len(_PALETTE)], torch.full((num_patches, 3), 128.0)
    )
    kept = torch.zeros(num_patches, dtype=torch.bool)
    valid = kept_indices[kept_indices >= 0].cpu().long()
    kept[valid] = True
    colours = colours.T.reshape(3, side, side)
    tint = colours.repeat_interleave(ph, 1).repeat_interleave(pw, 2)
    kept_mask = kept.reshape(side, side).repeat_interleave(ph, 0).repeat_interleave(pw, 1)
    canvas = image[:, : side * ph, : side * pw].clone()
    canvas = torch.where(kept_mask, canvas, 0.45 * canvas + 0.55 * tint)
    border = torch.zeros(side * ph, side * pw, dtype=torch.bool)
    border[::ph, :] = True
    border[:, ::pw] = True
    canvas = torch.where(kept_mask & border, torch.full_like(canvas, 255.0), canvas)
    return canvas.clamp(0, 255).to(torch.uint8)


class KeptTokensPictures(L.Callback):
    """Logs pictures of the kept patches and contextual clusters of the first images of a run.

    Args:
        num_images: pictures per logged batch.
        every_n_train_steps: during ``fit``, log pictures every this many steps.
    """

    def __init__(self, num_images: int = 4, every_n_train_steps: int = 100) -> None:
        self.num_images = num_images
        self.every_n_train_steps = every_n_train_steps

    def _log(self, trainer, outputs, batch, tag: str) -> None:
        writer = _tensorboard(trainer)
        compression = outputs.get("compression") if isinstance(outputs, dict) else None
        if writer is None or compression is None or not trainer.is_global_zero or "pixel_values" not in batch:
            return
        has_image = batch.get("has_image", torch.ones(len(batch["pixel_values"]), dtype=torch.bool))
        shown = 0
        for i in range(len(batch["pixel_values"])):
            if shown >= self.num_images:
                break
            if not bool(has_image[i]):
                continue
            picture = draw_kept_tokens(batch["pixel_values"][i], compression.kept_indices[i], compression.cluster_map[i])
            writer.add_image(f"{tag}/image_{shown}", picture, trainer.global_step)
            shown += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_train_steps == 0:
            self._log(trainer, outputs, batch, "kept_tokens/train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self._log(trainer, outputs, batch, "kept_tokens/val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self._log(trainer, outputs, batch, "kept_tokens/test")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self._log(trainer, outputs, batch, "kept_tokens/predict")


class PredictionWriter(L.Callback):
    """Writes every answered sample of ``test`` and ``predict`` to disk as it goes.

    Each process appends one JSON line per sample to ``predictions.rank{R}.jsonl`` and flushes
    after every batch, so a killed run loses at most the batch in flight. At the end of the
    epoch, the first process merges the rank files into ``predictions.jsonl`` (each sample once,
    whatever a distributed sampler padded) and writes the benchmarks' official files:
    ``mme/SUBTASK.txt`` (``image<TAB>question<TAB>ground truth<TAB>prediction``, the layout of
    MME's calculation script) and ``pope/SPLIT_answers.jsonl`` (``question_id``, ``prompt``,
    ``text``, the answers file of LLaVA's POPE evaluation).

    With ``resume`` (the default), records already in ``output_dir`` are handed to the module,
    which answers only the samples not yet there; point ``output_dir`` at a fixed folder to
    resume an interrupted run. The rank files are the source of truth and are only ever appended
    to; a line torn by a kill is ignored (that sample is answered again) and closed with a newline
    before appending. ``predictions.jsonl`` and the official files are derived from them at the
    end of each run and replaced atomically (written aside, then renamed), so a kill during that
    step leaves the previous version and the next run writes them again.

    ``run.json`` in the folder records what determines the answers (model, dtype, compressor
    settings and weights, decoding length); resuming into a folder written with other settings is
    an error rather than a silent mix of two methods' answers.

    Args:
        output_dir: folder of the prediction files; default: ``predictions/`` in the run's log
            folder (a new folder per run, so give a fixed folder to be able to resume).
        resume: reuse the answers already in ``output_dir``; False refuses a folder that holds any.
    """

    def __init__(self, output_dir: str | None = None, resume: bool = True) -> None:
        self.output_dir = output_dir
        self.resume = resume
        self._file = None
        self._folder: Path | None = None

    def folder(self, trainer: L.Trainer) -> Path:
        if self._folder is None:
            self._folder = Path(self.output_dir) if self.output_dir else _run_dir(trainer) / "predictions"
        return self._folder

    @staticmethod
    def read_records(folder: Path) -> dict[str, dict[str, Any]]:
        """Records of all rank files in ``folder`` by sample id; a torn last line is ignored."""
        records: dict[str, dict[str, Any]] = {}
        for path in sorted(folder.glob("predictions.rank*.jsonl")):
            with open(path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill: that sample is answered again
                    if isinstance(record, dict) and "sample_id" in record:
                        records.setdefault(record["sample_id"], record)
        return records

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage in ("test", "predict"):
            self.folder(trainer)  # collective under DDP: resolve it on every process now

    def _open(self, trainer, pl_module) -> None:
        """Check the folder's settings, hand the module the finished records, open this rank's
        file. Runs when the loop starts, after Lightning has loaded any ``ckpt_path``."""
        folder = self.folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self._check_settings(trainer, pl_module, folder)
        if self.resume:
            done = self.read_records(folder)
            pl_module.completed_records = done
            if done and trainer.is_global_zero:
                pl_module.print(f"PredictionWriter: resuming, {len(done)} samples already answered in {folder}")
        path = folder / f"predictions.rank{trainer.global_rank}.jsonl"
        _end_torn_line(path)
        self._file = open(path, "a", encoding="utf-8")

    def on_test_start(self, trainer, pl_module) -> None:
        self._open(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._open(trainer, pl_module)

    @staticmethod
    def settings(pl_module) -> dict[str, Any]:
        """What decides the answers: the module's evaluation hyper-parameters and a digest of the
        compressor's weights (as loaded from any checkpoint)."""
        training_only = {"objective", "distill_weight", "distill_temperature", "budget_target", "budget_weight"}
        hparams = {k: v for k, v in dict(getattr(pl_module, "hparams", {})).items()
                   if k not in training_only and not k.startswith("_")}
        model = getattr(pl_module, "model", None)
        compressor = getattr(model, "compressor", None)
        if compressor is not None:
            digest = hashlib.sha256()
            for name, tensor in sorted(compressor.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            hparams["compressor_weights_sha256"] = digest.hexdigest()
        return json.loads(json.dumps(hparams, sort_keys=True, default=to_jsonable))

    def _check_settings(self, trainer, pl_module, folder: Path) -> None:
        """Refuse to add answers to a folder holding answers of other settings (every process
        reaches the same verdict: they read the same files before rank 0 writes ``run.json``)."""
        current = self.settings(pl_module)
        path = folder / "run.json"
        has_predictions = any(folder.glob("predictions.rank*.jsonl"))
        advice = "Use another predictions.output_dir or delete the folder."
        if has_predictions and not self.resume:
            raise ValueError(f"{folder} already holds predictions and predictions.resume is false. {advice}")
        if path.exists():
            previous = json.loads(path.read_text(encoding="utf-8"))
            if previous != current:
                changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
                raise ValueError(
                    f"{folder} holds predictions made with other settings (differing: {changed}); resuming "
                    f"there would mix two configurations' answers. {advice}"
                )
        elif has_predictions:
            raise ValueError(f"{folder} holds predictions but no run.json saying how they were made. {advice}")
        trainer.strategy.barrier()
        if trainer.is_global_zero and not path.exists():
            _atomic_write(path, json.dumps(current, indent=1, sort_keys=True) + "\n")

    def _write(self, outputs) -> None:
        if self._file is None or not isinstance(outputs, dict):
            return
        for record in outputs.get("new_records", outputs.get("records", [])):
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._write(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._write(outputs)

    def _finish(self, trainer) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            write_official_files(self.folder(trainer), self.read_records(self.folder(trainer)))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def to_jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: dataclasses (configs) as dicts, anything else as its string."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _end_torn_line(path: Path) -> None:
    """Close a last line that a kill left without its newline, so appended records start clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) != b"\n":
            handle.write(b"\n")


def write_official_files(folder: Path, records: dict[str, dict[str, Any]]) -> None:
    """Merged predictions plus MME's and POPE's official answer files, written atomically."""

    def write(path: Path, lines: list[str]) -> None:
        _atomic_write(path, "".join(lines))

    ordered = sorted(records.values(), key=lambda r: r["sample_id"])
    write(folder / "predictions.jsonl", [json.dumps(r, ensure_ascii=False) + "\n" for r in ordered])
    mme = [r for r in ordered if r["task"] == "mme"]
    if mme:
        write_mme_export(folder / "mme", mme)
    pope: dict[str, list[str]] = defaultdict(list)
    for r in ordered:
        if r["task"] == "pope":
            question_id = r["sample_id"].split("/", 1)[-1]
            line = {
                "question_id": int(question_id) if question_id.isdigit() else question_id,
                "prompt": r.get("question"),
                "text": r["prediction"],
            }
            pope[r["category"]].append(json.dumps(line, ensure_ascii=False) + "\n")
    for split, lines in pope.items():
        write(folder / "pope" / f"{split}_answers.jsonl", lines)


class ResultsTable(L.Callback):
    """At the end of ``test``, prints the benchmark figures and saves them as ``results.json``
    and a TensorBoard text table, alongside the token budget and the skipped samples
    (``skipped/REASON``, ``skipped/total``: set-up skips plus every process's lazy ones).

    Without a logger the file goes to ``default_root_dir``; an existing ``results.json`` there is
    left alone and the figures go to the first free ``results-N.json`` (:func:`unused_path`),
    with a warning that names it.
    """

    def on_test_end(self, trainer, pl_module) -> None:
        folder = _run_dir(trainer)  # collective: before the rank check
        skipped = _skipped_counts(trainer)
        if not trainer.is_global_zero:
            return
        results = dict(getattr(pl_module, "eval_results", {}))
        results.update({f"budget/{k}": v for k, v in getattr(pl_module, "budget_stats", {}).items()})
        if skipped:
            results.update({f"skipped/{k}": float(v) for k, v in skipped.items()})
            results["skipped/total"] = float(sum(skipped.values()))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "results.json"
        if not trainer.loggers and (free := unused_path(path)) != path:
            rank_zero_warn(f"{path} exists and the run has no logger folder: results saved as {free} instead")
            path = free
        path.write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
        table = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v:.2f} |\n" for k, v in sorted(results.items()))
        pl_module.print(table)
        writer = _tensorboard(trainer)
        if writer is not None:
            writer.add_text("results", table, trainer.global_step)


def _skipped_counts(trainer: L.Trainer) -> dict[str, int]:
    """Skip reason -> distinct skipped items over all processes (collective under DDP)."""
    ledger = getattr(trainer.datamodule, "skip_ledger", None) if trainer.datamodule is not None else None
    keys = ledger.keys if ledger is not None else {}
    merged: dict[str, set[str]] = defaultdict(set)
    for part in _all_gather_objects(trainer, keys):
        for reason, items in part.items():
            merged[reason] |= items
    return {reason: len(items) for reason, items in sorted(merged.items())}


class ValidateBeforeTraining(L.Callback):
    """Validate once before the first optimizer step, and let checkpointing consider that state.

    Tuning on a few thousand samples can fail to beat the starting compressor on validation.
    Lightning validates only after training steps, and ``ModelCheckpoint`` skips step 0, so
    ``best.ckpt`` could be a state that validated worse than where tuning began. This callback
    runs the fit's validation loop at the start (logged at step 0, so TensorBoard shows the
    starting point) and lets every ``ModelCheckpoint`` save there, so a ``monitor``-ed best
    checkpoint is never worse on validation than the untuned start. Skipped on resume.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != 0:
            return
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        val_loop.setup_data()
        if val_loop.skip:  # no validation data, or limit_val_batches=0
            return
        for callback in trainer.checkpoint_callbacks:
            # ModelCheckpoint treats step 0 as "already saved" (nothing trained yet).
            callback._last_global_step_saved = -1
        first_loop_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        val_loop.run()
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter

"""Callbacks: token budgets, pictures of what was kept, prediction files, a results table, and a
validation before the first training step.

The logging callbacks read what the module's steps return (``{"records": [...], "compression":
CompressionOutput}`` for evaluation, ``{"loss", "compression"}`` for training), so none of them
reaches into the model. ``ValidateBeforeTraining`` drives the fit's own validation loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sparsezip_pl.benchmarks import get_benchmark
from sparsezip_pl.lit.run_folder import RunFolder, RunFolderError

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


def _all_gather_objects(trainer: L.Trainer, obj: Any) -> list[Any]:
    """``obj`` of every process (``[obj]`` in a single process); collective under DDP."""
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def budget_summary(tokens: torch.Tensor, dominant: torch.Tensor, stock: torch.Tensor, llm_parameters: int) -> dict[str, float]:
    """Visual tokens per image (mean, min, max), K, compression ratio and the LLM prefill FLOPs saved
    per image, from per-image counts: ``tokens`` the LLM saw, ``dominant`` kept patches (may be
    empty), ``stock`` what the stock model would have sent.

    FLOPs saved are estimated as ``2 * P * removed_tokens``, with ``P`` the LLM's parameters
    outside the embedding tables; attention's quadratic term is left out, so it is a lower bound.
    """
    tokens, stock = tokens.double(), stock.double()
    removed = (stock - tokens).clamp(min=0)
    stats = {
        "tokens_mean": tokens.mean().item(),
        "tokens_min": tokens.min().item(),
        "tokens_max": tokens.max().item(),
        "compression_ratio": (tokens.sum() / stock.sum().clamp(min=1)).item(),
        "prefill_gflops_saved_per_image": (2 * llm_parameters * removed.mean() / 1e9).item(),
    }
    if dominant.numel():
        stats["k_mean"] = dominant.double().mean().item()
    return stats


class _RecordCounts:
    """Per sample id, the visual tokens an evaluation gave it; gathered over processes once."""

    def __init__(self) -> None:
        self.samples: dict[str, tuple[int, int | None, int]] = {}

    def add(self, outputs: Any) -> None:
        if isinstance(outputs, dict):
            for record in outputs.get("records") or []:
                if "visual_tokens" in record:
                    self.samples[record["sample_id"]] = (
                        record["visual_tokens"], record.get("dominant_tokens"), record.get("stock_visual_tokens", 0))

    def merged(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(tokens, dominant, stock) over all processes, each sample once; None if none was seen.
        Collective under DDP."""
        merged: dict[str, tuple] = {}
        for part in _all_gather_objects(trainer, self.samples):
            for sample_id, counts in part.items():
                merged.setdefault(sample_id, counts)
        self.samples = {}
        if not merged:
            return None
        tokens = torch.tensor([t for t, _, _ in merged.values()])
        dominant = torch.tensor([k for _, k, _ in merged.values() if k is not None], dtype=torch.long)
        stock = torch.tensor([n for _, _, n in merged.values()])
        return tokens, dominant, stock


class TokenBudgetLogger(L.Callback):
    """Logs visual tokens per image (mean, min, max, histograms), K, compression ratio and the LLM
    prefill FLOPs saved per image (:func:`budget_summary`) to the loggers and TensorBoard.

    Evaluation figures come from the answered records, per sample id: samples answered by an
    earlier, interrupted run count too, and under DDP the processes' records are gathered and
    each sample counted once (DistributedSampler's padding repeats some).
    """

    def __init__(self, train_log_every_n_steps: int = 10) -> None:
        self.train_log_every_n_steps = train_log_every_n_steps
        self._records = _RecordCounts()
        self._tokens: list[torch.Tensor] = []
        self._dominant: list[torch.Tensor] = []
        self._stock: list[torch.Tensor] = []
        self._llm_params: int | None = None

    def _llm_parameters(self, pl_module) -> int:
        if self._llm_params is None:
            self._llm_params = pl_module.llm_parameter_count()
        return self._llm_params

    def _collect_training(self, outputs: Any) -> None:
        compression = outputs.get("compression") if isinstance(outputs, dict) else None
        if compression is None:
            return
        tokens = compression.visual_tokens.detach().cpu()
        stock = compression.stock_tokens
        stock = stock.detach().cpu() if stock is not None else torch.full_like(tokens, compression.num_patches)
        images = stock > 0  # per image: text-only samples are not counted
        self._tokens.append(tokens[images])
        self._dominant.append(compression.num_dominant.detach().cpu()[images])
        self._stock.append(stock[images])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._collect_training(outputs)
        if self._tokens and self._tokens[-1].numel() and (trainer.global_step % self.train_log_every_n_steps == 0):
            stats = budget_summary(self._tokens[-1], self._dominant[-1], self._stock[-1], self._llm_parameters(pl_module))
            pl_module.log_dict({f"budget/train_{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)
        self._tokens.clear()
        self._dominant.clear()
        self._stock.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, dict) and outputs.get("records") is not None:
            self._records.add(outputs)
        else:
            self._collect_training(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._records.add(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._records.add(outputs)

    def _flush(self, trainer, pl_module, stage: str) -> None:
        counts = self._records.merged(trainer)  # collective
        if counts is None and self._tokens:
            counts = torch.cat(self._tokens), torch.cat(self._dominant), torch.cat(self._stock)
        self._tokens.clear()
        self._dominant.clear()
        self._stock.clear()
        if counts is None:
            return
        tokens, dominant, stock = counts
        stats = budget_summary(tokens, dominant, stock, self._llm_parameters(pl_module))
        if stage != "predict":
            pl_module.log_dict({f"budget/{stage}_{k}": v for k, v in stats.items()})
        writer = _tensorboard(trainer)
        if writer is not None and trainer.is_global_zero:
            writer.add_histogram(f"budget/{stage}_tokens_per_image", tokens, trainer.global_step)
            if dominant.numel():
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
    """Logs pictures of the kept patches and contextual clusters (:func:`draw_kept_tokens`) to
    TensorBoard, per benchmark category: the first ``num_images`` images of each category of every
    evaluation, tagged ``kept_tokens/STAGE/TASK/CATEGORY/I`` (``kept_tokens/test/mme/count/0``),
    and during ``fit`` those of one batch every ``every_n_train_steps`` steps.

    Args:
        num_images: pictures per category (per logged training batch).
        every_n_train_steps: during ``fit``, log pictures every this many steps.
    """

    def __init__(self, num_images: int = 4, every_n_train_steps: int = 100) -> None:
        self.num_images = num_images
        self.every_n_train_steps = every_n_train_steps
        self._shown: dict[str, dict[str, int]] = defaultdict(dict)

    def _log(self, trainer, outputs, batch, stage: str) -> None:
        writer = _tensorboard(trainer)
        compression = outputs.get("compression") if isinstance(outputs, dict) else None
        if writer is None or compression is None or not trainer.is_global_zero or "pixel_values" not in batch:
            return
        pixel_values = batch["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor) or compression.kept_indices.shape[0] != len(pixel_values):
            return  # several rows per sample (the views of a tiled image): no one picture per image
        has_image = batch.get("has_image", torch.ones(len(pixel_values), dtype=torch.bool)).tolist()
        meta = batch.get("meta") or [{}] * len(pixel_values)
        shown = self._shown[stage]
        for i, sample in enumerate(meta):
            group = f"{sample.get('task') or 'data'}/{sample.get('category') or 'all'}"
            count = shown.get(group, 0)
            if count >= self.num_images or not has_image[i]:
                continue
            pixels, kept, clusters = pixel_values[i], compression.kept_indices[i], compression.cluster_map[i]
            if pixels.dim() == 4:
                # A tiled image's views (LLaVA-NeXT), its maps view-major: draw the base view.
                patches = clusters.shape[0] // pixels.shape[0]
                pixels, kept, clusters = pixels[0], kept[(kept >= 0) & (kept < patches)], clusters[:patches]
            try:
                picture = draw_kept_tokens(pixels, kept, clusters)
            except ValueError:
                return  # a patch grid that is not square: nothing to draw for this method / family
            writer.add_image(f"kept_tokens/{stage}/{group}/{count}", picture, trainer.global_step)
            shown[group] = count + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_train_steps == 0:
            self._shown.pop("train", None)
            self._log(trainer, outputs, batch, "train")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._shown.pop("val", None)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._shown.pop("test", None)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._shown.pop("predict", None)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, outputs, batch, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(trainer, outputs, batch, "test")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(trainer, outputs, batch, "predict")


def _hparam_value(value: Any) -> str | int | float | bool:
    """A value TensorBoard's HParams view shows: numbers and booleans as they are, None as
    ``"none"``, anything else as text."""
    if isinstance(value, bool):
        return str(value).lower()  # torch's hparams summary would store a bool as the number 0 / 1
    if isinstance(value, (int, float, str)):
        return value
    if value is None:
        return "none"
    return json.dumps(value, default=to_jsonable) if isinstance(value, (list, tuple, dict)) else str(value)


def run_hparams(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, Any]:
    """The settings a comparison of runs needs: the method, its budget and options, the model,
    the checkpoint and the data (from ``pl_module.identity()`` and the data module's identity);
    for ``fit`` also the tuning settings (objective, budget target, learning rate, steps)."""
    from sparsezip_pl.integrations.tuned import model_name

    identity = pl_module.identity() if hasattr(pl_module, "identity") else {}
    compressor = identity.get("compressor") or {}
    method = compressor.get("method")
    params: dict[str, Any] = {
        "stage": stage,
        "method": method,
        "budget": compressor.get("budget") if compressor.get("budget") is not None else "default",
        "family": identity.get("backend"),
        "model": model_name(identity.get("model_path")),
        "dtype": identity.get("dtype"),
        "visual_positions": identity.get("visual_positions"),
        "max_new_tokens": identity.get("max_new_tokens"),
    }
    section = compressor.get(method)
    if isinstance(section, dict):
        params.update({f"{method}.{key}": value for key, value in _flat(section).items()})
    if identity.get("tuned_compressor"):
        params["tuned_compressor"] = identity["tuned_compressor"]["source"]
    if stage != "fit":
        checkpoint = evaluated_checkpoint(trainer, pl_module)
        params["checkpoint"] = Path(checkpoint).name if checkpoint else "none"
    datamodule = trainer.datamodule
    if datamodule is not None:
        names = [b.name for b in getattr(datamodule, "benchmarks", [])]
        source = getattr(datamodule, "train_source", None)
        params["data"] = ",".join(names) if names else (Path(str(source)).name if source else type(datamodule).__name__)
    if stage == "fit":
        hparams = getattr(pl_module, "hparams", {})
        for key in ("objective", "budget_target", "budget_weight", "distill_weight"):
            if key in hparams:
                params[key] = hparams[key]
        if trainer.optimizers:
            params["lr"] = trainer.optimizers[0].param_groups[0].get("lr")
        params["steps"] = trainer.global_step
    return {key: _hparam_value(value) for key, value in params.items()}


def _flat(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update(_flat(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


class HParamsSummary(L.Callback):
    """Records each run as one row of TensorBoard's HParams view: its method, budget and key
    settings (:func:`run_hparams`) as hyperparameters, at the end of ``fit``, ``validate`` and
    ``test``. The view takes each metric's last logged value in the run, so the final metrics
    (``test/mme/...``, ``budget/test_tokens_mean``, ``val/...`` after tuning) sit beside the
    settings; a monitored checkpoint's best value is logged as ``best/MONITOR`` at the end of ``fit``.

    Only the session's settings are written (no per-run experiment definition), so TensorBoard
    builds the table from every run under the log folder: runs of different methods, whose
    options differ, still compare in one view. For the same reason the TensorBoard logger's
    ``default_hp_metric`` (a placeholder ``hp_metric`` = -1 with Lightning's hyperparameters, which
    would define the table by itself) is switched off for the run.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Private attribute of TensorBoardLogger (the constructor's default_hp_metric); read
                # before Lightning logs the module's hyperparameters, after this hook
                # (tests/test_tensorboard.py checks that no hp_metric reaches TensorBoard).
                logger._default_hp_metric = False

    def _write(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            return
        from torch.utils.tensorboard.summary import hparams
        from torch.utils.tensorboard.writer import FileWriter

        params = run_hparams(trainer, pl_module, stage)
        _, start, end = hparams(params, {})
        for logger in loggers:
            logger.experiment.flush()
            writer = FileWriter(logger.log_dir, filename_suffix=".hparams")
            writer.add_summary(start)
            writer.add_summary(end)
            writer.close()

    def on_fit_end(self, trainer, pl_module) -> None:
        best = {f"best/{cb.monitor}": float(cb.best_model_score) for cb in trainer.checkpoint_callbacks
                if getattr(cb, "monitor", None) and getattr(cb, "best_model_score", None) is not None}
        if best and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(best, step=trainer.global_step)
        self._write(trainer, pl_module, "fit")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")


class SamplesProgressBar(TQDMProgressBar):
    """Lightning's progress bar with what a person following a long run wants: samples per
    second, and while answering benchmarks the running accuracy (answers that the benchmark's own
    rule parses to the ground truth, over the answered samples; per process under DDP) and the
    visual tokens per image so far. The project's CLI uses it unless the trainer's
    ``enable_progress_bar`` is false or another progress bar is given."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate, process_position, leave)
        self._running: dict[str, dict[str, float]] = {}

    def _begin(self, stage: str) -> None:
        self._running[stage] = {"start": time.monotonic(), "samples": 0, "scored": 0, "correct": 0,
                                "images": 0, "tokens": 0}

    def _count(self, stage: str, outputs: Any, batch: Any) -> None:
        running = self._running.get(stage)
        if running is None:
            self._begin(stage)
            running = self._running[stage]
        records = outputs.get("records") if isinstance(outputs, dict) else None
        if records is not None:
            running["samples"] += len(records)
            for record in records:
                if record.get("answer") is not None and record.get("parsed") is not None:
                    running["scored"] += 1
                    running["correct"] += str(record["parsed"]).lower() == str(record["answer"]).lower()
                if record.get("visual_tokens") is not None:
                    running["images"] += 1
                    running["tokens"] += record["visual_tokens"]
        elif isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
            running["samples"] += len(batch["input_ids"])

    def _postfix(self, stage: str) -> dict[str, str]:
        running = self._running.get(stage)
        if not running:
            return {}
        elapsed = max(time.monotonic() - running["start"], 1e-9)
        postfix = {"samples/s": f"{running['samples'] / elapsed:.2f}"}
        if running["scored"]:
            postfix["acc"] = f"{100.0 * running['correct'] / running['scored']:.1f}%"
        if running["images"]:
            postfix["tokens/img"] = f"{running['tokens'] / running['images']:.1f}"
        return postfix

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        """Through the active bar, or plainly when none is open (Lightning's prints nothing then)."""
        # TQDMProgressBar's private bar attributes (checked by tests/test_tensorboard.py)
        bars = [getattr(self, f"_{stage}_progress_bar", None) for stage in ("train", "val", "test", "predict")]
        if any(bar is not None and not bar.disable for bar in bars):
            super().print(*args, sep=sep, **kwargs)
        else:
            print(*args, sep=sep, **kwargs)

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        if trainer.training and "train" in self._running:
            metrics.update(self._postfix("train"))
        return metrics

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._begin("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count("train", outputs, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        if not trainer.sanity_checking:
            self._begin("val")

    def on_validation_end(self, trainer, pl_module) -> None:
        # Training's samples/s leaves out the time spent validating.
        if "train" in self._running and "val" in self._running and trainer.state.fn == "fit":
            self._running["train"]["start"] += time.monotonic() - self._running["val"]["start"]
        super().on_validation_end(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        bar = getattr(self, "_val_progress_bar", None)  # None outside a validation loop
        if not trainer.sanity_checking and bar is not None:
            self._count("val", outputs, batch)
            bar.set_postfix(self._postfix("val"), refresh=False)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_start(self, trainer, pl_module) -> None:
        super().on_test_start(trainer, pl_module)
        self._begin("test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count("test", outputs, batch)
        self.test_progress_bar.set_postfix(self._postfix("test"), refresh=False)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self._begin("predict")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count("predict", outputs, batch)
        self.predict_progress_bar.set_postfix(self._postfix("predict"), refresh=False)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


def checkpoint_identity(path: str | None) -> dict[str, Any] | None:
    """Which checkpoint a run evaluates: its absolute path and the sha256 of its bytes."""
    if not path:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"path": os.path.abspath(path), "sha256": digest.hexdigest()}


def evaluated_checkpoint(trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
    """The checkpoint a run evaluates: ``trainer.ckpt_path`` once Lightning has set it, before that
    what the CLI announced on the module (``pl_module.evaluated_checkpoint``)."""
    return trainer.ckpt_path or getattr(pl_module, "evaluated_checkpoint", None)


def run_identity(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, Any]:
    """What a run computes: the model and method (``pl_module.identity()``, which needs no weights),
    the data (``datamodule.identity()``) and, when evaluating, the checkpoint. Two runs with the
    same identity give the same answers, so one may continue the other."""
    identity: dict[str, Any] = {"model": pl_module.identity() if hasattr(pl_module, "identity") else {}}
    datamodule = trainer.datamodule
    if datamodule is not None and hasattr(datamodule, "identity"):
        identity["data"] = datamodule.identity()
    if stage != "fit":
        identity["checkpoint"] = checkpoint_identity(evaluated_checkpoint(trainer, pl_module))
    return json.loads(json.dumps(identity, sort_keys=True, default=to_jsonable))


def enter_run_folder(trainer: L.Trainer, folder: RunFolder, identity: dict[str, Any], restart: bool,
                     stage: str) -> str:
    """Check, lock and claim ``folder`` for this run (process 0 does; the others learn its verdict).
    Collective under DDP. Raises :class:`RunFolderError` on every process when the run may not
    write there; nothing is written then."""
    outcome: tuple[str, str | None] = ("", None)
    if trainer.is_global_zero:
        try:
            folder.check(identity, restart)  # read only: a refusal writes nothing, not even the lock
            folder.lock()
            verdict = folder.check(identity, restart)  # again, under the lock
            folder.claim(identity, verdict, stage)
            outcome = (verdict, None)
        except RunFolderError as error:
            folder.unlock()
            outcome = ("", str(error))
    outcome = trainer.strategy.broadcast(outcome)
    if outcome[1] is not None:
        raise RunFolderError(outcome[1])
    return outcome[0]


class RunRecord(L.Callback):
    """Claims the run's folder (the logger's version folder, or ``default_root_dir`` without a
    logger) before anything is written there, and keeps its record up to date.

    The record (``sparsezip_run.json``, see :mod:`sparsezip_pl.lit.run_folder`) says what the run
    computes, whether it finished or was interrupted, which files the project wrote and which
    samples were skipped (by reason, with the first file or line of each). A run into a folder that
    is not the project's, or that holds a run of something else, stops with an error naming the
    folder or each difference, before any model weight loads. A stage that answered or trained on
    no sample at all is an error with the skip counts, never an empty result.

    Args:
        restart: start a folder that holds another run afresh (its project files are deleted,
            nothing else) instead of refusing.
    """

    def __init__(self, restart: bool = False) -> None:
        self.restart = restart
        self.folder: RunFolder | None = None
        self._samples: dict[str, int] = {}
        self._verdict = ""
        self._started = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.folder = RunFolder(_run_dir(trainer), "run folder", "--run.restart")  # _run_dir is collective
        self._verdict = enter_run_folder(trainer, self.folder, run_identity(trainer, pl_module, stage),
                                         self.restart, stage)
        self._started = False
        if trainer.is_global_zero:
            self.folder.own_files(["config.yaml"])

    # -- a stage has started once its loop does (set-up is over)
    def on_fit_start(self, trainer, pl_module) -> None:
        self._started = True

    def on_validation_start(self, trainer, pl_module) -> None:
        self._started = True

    def on_test_start(self, trainer, pl_module) -> None:
        self._started = True

    def on_predict_start(self, trainer, pl_module) -> None:
        self._started = True

    # -- counting what each loop used
    def _count(self, loop: str, outputs: Any, batch: Any) -> None:
        if isinstance(outputs, dict) and outputs.get("records") is not None:
            used = len(outputs["records"])
        else:
            used = len(batch["input_ids"]) if isinstance(batch, dict) and "input_ids" in batch else 0
        self._samples[loop] = self._samples.get(loop, 0) + used

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count("train", None, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count("val", outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count("test", outputs, batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count("predict", outputs, batch)

    def _end_of_loop(self, trainer: L.Trainer, loop: str, what: str) -> None:
        """Every loop must have used a sample: zero (all skipped, say) is an error with the counts."""
        used = sum(_all_gather_objects(trainer, self._samples.pop(loop, 0)))
        if used == 0:
            report = skip_report(trainer)
            counts = ", ".join(f"{reason}: {item['count']} (first: {item['first']})" for reason, item in report.items())
            raise NoUsableSamplesError(f"{what}: no usable sample; {counts or 'the data set yielded no batch'}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._end_of_loop(trainer, "train", "fit (training data)")

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self._samples.pop("val", None)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._end_of_loop(trainer, "val", "validation")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._end_of_loop(trainer, "test", "test")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._end_of_loop(trainer, "predict", "predict")

    # -- status
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close(trainer, "finished", skip_report(trainer))  # collective: every process reports

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        folder = self.folder
        if folder is not None and self._verdict == "new" and not self._started and trainer.is_global_zero:
            # Refused during set-up (another callback's check, say): this run wrote nothing but its
            # claim, which would otherwise keep the next run out of a folder holding no result.
            self.folder = None
            folder.unlock()
            folder.release_claim()
            return
        stopped = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        # No collective here: the other processes may not reach this point.
        self._close(trainer, "interrupted" if stopped else "failed", skip_report(trainer, gather=False))

    def _close(self, trainer: L.Trainer, status: str, skipped: dict[str, Any]) -> None:
        folder, self.folder = self.folder, None
        if folder is None or not trainer.is_global_zero or folder._lock_handle is None:
            return
        folder.update(status=status, skipped=skipped)
        folder.unlock()


class NoUsableSamplesError(RuntimeError):
    """Every sample of a stage was skipped (or its data set yielded nothing)."""


class PredictionWriter(L.Callback):
    """Writes every answered sample of ``test`` and ``predict`` to disk as it goes.

    Each process appends one JSON line per sample to ``predictions.rank{R}.jsonl`` and flushes
    after every batch, so a killed run loses at most the batch in flight. At the end of the
    epoch, the first process merges the rank files into ``predictions.jsonl`` and writes the
    benchmarks' official files: ``mme/SUBTASK.txt`` (``image<TAB>question<TAB>ground
    truth<TAB>prediction``, what MME's calculation script reads) and ``pope/SPLIT_answers.jsonl``
    (``question_id``, ``prompt``, ``text``: the answers file of LLaVA's POPE evaluation). Every file
    keeps the order of its source file (LLaVA's ``eval_pope.py`` pairs the i-th answer with the
    i-th question), whatever order the processes answered in, and holds only the samples of this
    run's data.

    The folder is a run folder (:mod:`sparsezip_pl.lit.run_folder`): a folder with files of
    someone else's is refused before anything is written, and a folder holding the answers of
    another run (other model, checkpoint, method settings, prompt settings or data) is refused
    with the list of differences, unless ``restart``. With ``resume`` (the default) a folder with
    this run's identity continues: answered samples are read back, not recomputed. The rank files
    are the source of truth and only appended to; a line torn by a kill is ignored (that sample is
    answered again). The merged and official files are derived from them and replaced atomically.

    Args:
        output_dir: folder of the prediction files; default: ``predictions/`` in the run's log
            folder (a new folder per run, so give a fixed folder to be able to resume).
        resume: reuse the answers already in ``output_dir``; False refuses a folder that holds any.
        restart: start a folder holding another run's answers afresh (deleting only the files
            this project wrote there) instead of refusing.
    """

    def __init__(self, output_dir: str | None = None, resume: bool = True, restart: bool = False) -> None:
        self.output_dir = output_dir
        self.resume = resume
        self.restart = restart
        self._file = None
        self._folder: RunFolder | None = None
        self._sample_ids: set[str] | None = None

    def folder(self, trainer: L.Trainer) -> Path:
        """The predictions folder (collective under DDP the first time: it may ask for the log dir)."""
        if self._folder is None:
            path = Path(self.output_dir) if self.output_dir else _run_dir(trainer) / "predictions"
            self._folder = RunFolder(path, "predictions folder", "--predictions.restart")
        return self._folder.path

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
        if stage not in ("test", "predict"):
            return
        folder = self.folder(trainer)
        verdict = enter_run_folder(trainer, self._folder, run_identity(trainer, pl_module, stage), self.restart, stage)
        if verdict == "continue" and not self.resume and any(folder.glob("predictions.rank*.jsonl")):
            self._release(trainer, "failed")
            raise RunFolderError(f"{folder} already holds predictions and predictions.resume is false; "
                                 "use another predictions.output_dir, or --predictions.restart=true")
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "dataset", None)
        self._sample_ids = _sample_ids(dataset)

    def _open(self, trainer, pl_module) -> None:
        """Hand the module the finished records and open this rank's file. Runs when the loop
        starts, after Lightning has loaded any ``ckpt_path``."""
        folder = self.folder(trainer)
        if self.resume:
            done = self.read_records(folder)
            if self._sample_ids is not None:
                done = {k: v for k, v in done.items() if k in self._sample_ids}
            pl_module.resume_from(done)
            if done and trainer.is_global_zero:
                pl_module.print(f"PredictionWriter: resuming, {len(done)} samples already answered in {folder}")
        name = f"predictions.rank{trainer.global_rank}.jsonl"
        path = folder / name
        _end_torn_line(path)
        self._file = open(path, "a", encoding="utf-8")
        names = _all_gather_objects(trainer, name)
        if trainer.is_global_zero:
            self._folder.own_files(names)

    def on_test_start(self, trainer, pl_module) -> None:
        self._open(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._open(trainer, pl_module)

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
            folder = self.folder(trainer)
            records = self.read_records(folder)
            if self._sample_ids is not None:
                records = {k: v for k, v in records.items() if k in self._sample_ids}
            record = self._folder.read_record() or {}
            written = write_official_files(folder, records)
            stale = set(record.get("files", [])) - set(written) - {p.name for p in folder.glob("predictions.rank*.jsonl")}
            for name in stale:
                (folder / name).unlink(missing_ok=True)
            self._folder.update(files=sorted((set(record.get("files", [])) - stale) | set(written)))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def _release(self, trainer, status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        folder = self._folder
        if folder is not None and trainer.is_global_zero and folder._lock_handle is not None:
            folder.update(status=status)
            folder.unlock()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._release(trainer, "finished")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._release(trainer, "interrupted" if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) else "failed")


def _sample_ids(dataset: Any) -> set[str] | None:
    """The sample ids of a (concatenation of) record data set(s), read from the stored records."""
    if dataset is None:
        return None
    parts = getattr(dataset, "datasets", [dataset])
    if not all(hasattr(part, "records") for part in parts):
        return None
    return {record["sample_id"] for part in parts for record in part.records}


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


def _source_order(record: dict[str, Any]) -> tuple:
    """Where a record's sample stands in its benchmark's source files."""
    order = record.get("order")
    return (record.get("task", ""), order if order is not None else float("inf"), record["sample_id"])


def write_official_files(folder: Path, records: dict[str, dict[str, Any]]) -> list[str]:
    """Merged predictions plus each benchmark's official answer files (``Benchmark.export``: MME's
    ``mme/SUBTASK.txt``, POPE's ``pope/SPLIT_answers.jsonl``), in source order. Returns the files
    written (relative to ``folder``)."""
    ordered = sorted(records.values(), key=_source_order)
    _atomic_write(folder / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    written = ["predictions.jsonl"]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in ordered:
        by_task[record["task"]].append(record)
    for task, rows in by_task.items():
        written += [str(path.relative_to(folder)) for path in get_benchmark(task).export(rows, folder)]
    return written


def skip_report(trainer: L.Trainer, gather: bool = True) -> dict[str, dict[str, Any]]:
    """Skip reason -> ``{"count", "first"}`` over all processes (collective under DDP unless
    ``gather`` is False, then this process's alone): each skipped item counted once, with the
    message of the first (which file, line or sample)."""
    ledger = getattr(trainer.datamodule, "skip_ledger", None) if trainer.datamodule is not None else None
    part = (ledger.keys, ledger.first_messages) if ledger is not None else ({}, {})
    merged: dict[str, set[str]] = defaultdict(set)
    first: dict[str, str] = {}
    for keys, messages in _all_gather_objects(trainer, part) if gather else [part]:
        for reason, items in keys.items():
            merged[reason] |= items
        for reason, message in messages.items():
            first.setdefault(reason, message)
    return {reason: {"count": len(items), "first": first.get(reason, "")} for reason, items in sorted(merged.items())}


_HEADLINE = re.compile(r"^[^/]+/[^/]+/((perception_total|cognition_total|total)(_\d+of\d+)?|avg(_\d+of\d+)?/(accuracy|f1))$")
_NOT_A_SCORE = re.compile(r"(num_samples|incomplete_pairs|_undefined)$")


def headline_metrics(results: dict[str, float]) -> dict[str, float]:
    """The figures a person looks at first: MME's totals and POPE's average accuracy and F1
    (``test/mme/perception_total``, ``test/pope/avg/f1`` ...); for another benchmark, its first
    two scores."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(results):
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] in ("val", "test") and not _NOT_A_SCORE.search(key):
            groups["/".join(parts[:2])].append(key)
    shown: dict[str, float] = {}
    for keys in groups.values():
        picked = [k for k in keys if _HEADLINE.match(k)] or keys[:2]
        shown.update({k: results[k] for k in picked})
    return shown


def summary_line(stage: str, results: dict[str, float], identity: dict[str, Any], files: list[str]) -> str:
    """One line at the end of a run: the method, the headline metrics, the visual tokens per
    image, the skipped samples and where the files went."""
    compressor = identity.get("compressor") or {}
    budget = compressor.get("budget")
    parts = [f"{stage} done: {compressor.get('method', 'model')}" + ("" if budget is None else f" (budget {budget})")]
    headline = headline_metrics(results)
    if headline:
        parts.append(", ".join(f"{key.split('/', 1)[1]} {value:.2f}" for key, value in headline.items()))
    if "budget/tokens_mean" in results:
        ratio = results.get("budget/compression_ratio")
        parts.append(f"{results['budget/tokens_mean']:.1f} visual tokens per image"
                     + ("" if ratio is None else f" ({100 * ratio:.1f}% of stock)"))
    parts.append(f"{int(results.get('skipped/total', 0))} skipped")
    parts.append("files: " + ", ".join(files))
    return " | ".join(parts)


class ResultsTable(L.Callback):
    """At the end of ``validate``, ``test`` and ``predict``, prints the figures and saves them as
    ``results.json`` (``results-validate.json``, ``results-predict.json``) in the run folder and as
    a TensorBoard text table: the benchmark metrics the module logged (``trainer.callback_metrics``),
    the token budget of the answered samples (:func:`budget_summary`, ``budget/...``) and the
    skipped samples (``skipped/REASON``, ``skipped/total``: set-up skips plus every process's lazy
    ones). A POPE average or MME total over fewer splits or subtasks than the benchmark has is
    named for what it covers (``avg_2of3``, ``perception_total_4of10``). A last line sums the run
    up (:func:`summary_line`: method, headline metrics, visual tokens per image, skips, files)."""

    def __init__(self) -> None:
        self._records = _RecordCounts()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "validate":
            self._records.add(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._records.add(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._records.add(outputs)

    def _report(self, trainer, pl_module, stage: str, prefix: str | None) -> None:
        folder = _run_dir(trainer)  # collective: before the rank check
        skipped = skip_report(trainer)
        counts = self._records.merged(trainer)
        if not trainer.is_global_zero:
            return
        results: dict[str, float] = {}
        if prefix is not None:
            results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{prefix}/")}
        if counts is not None:
            stats = budget_summary(*counts, pl_module.llm_parameter_count())
            results.update({f"budget/{k}": v for k, v in stats.items()})
        if skipped:
            results.update({f"skipped/{k}": float(v["count"]) for k, v in skipped.items()})
            results["skipped/total"] = float(sum(v["count"] for v in skipped.values()))
        name = "results.json" if stage == "test" else f"results-{stage}.json"
        _atomic_write(folder / name, json.dumps(results, indent=2, sort_keys=True))
        RunFolder(folder).own_files([name])
        table = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v:.2f} |\n" for k, v in sorted(results.items()))
        # Plain print (process 0 only, checked above): at the end of a stage Lightning's progress bar
        # is closed, and LightningModule.print through a closed bar prints nothing.
        print(table, flush=True)
        files = [str(folder / name)]
        writer_callback = next((c for c in trainer.callbacks if isinstance(c, PredictionWriter) and c._folder), None)
        if writer_callback is not None:
            files.append(f"{writer_callback._folder.path}{os.sep}")
        identity = pl_module.identity() if hasattr(pl_module, "identity") else {}
        print(summary_line(stage, results, identity, files), flush=True)
        writer = _tensorboard(trainer)
        if writer is not None:
            writer.add_text(f"results/{stage}", table, trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, "validate", "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "test", "test")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "predict", None)


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
        # No public API runs the fit's validation loop before the first step and lets checkpoints
        # save at step 0; this uses Lightning's loop and ModelCheckpoint internals
        # (tests/test_private_apis.py breaks if they change; tests/test_validate_before_training.py
        # checks the behaviour).
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

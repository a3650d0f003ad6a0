"""Callbacks: token budgets, pictures of what was kept, prediction files and a results table.

Every callback reads what the module's steps return (``{"records": [...], "compression":
CompressionOutput}`` for evaluation, ``{"loss", "compression"}`` for training), so none of them
reaches into the model.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from sparsezip_pl.data.mme import write_mme_export

STAGES = ("train", "validate", "test", "predict")


def _tensorboard(trainer: L.Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's version folder, or the trainer's root dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


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
    """

    def __init__(self, train_log_every_n_steps: int = 10) -> None:
        self.train_log_every_n_steps = train_log_every_n_steps
        self._tokens: list[torch.Tensor] = []
        self._dominant: list[torch.Tensor] = []
        self._num_patches = 0
        self._llm_params: int | None = None

    def _llm_parameters(self, pl_module) -> int:
        if self._llm_params is None:
            self._llm_params = llm_parameter_count(pl_module.backend)
        return self._llm_params

    def _collect(self, outputs: Any) -> None:
        if not isinstance(outputs, dict) or outputs.get("compression") is None:
            return
        compression = outputs["compression"]
        self._num_patches = compression.cluster_map.shape[1]
        self._tokens.append(compression.num_tokens.detach().cpu())
        self._dominant.append(compression.num_dominant.detach().cpu())

    def _summary(self, tokens: torch.Tensor, dominant: torch.Tensor, pl_module) -> dict[str, float]:
        tokens = tokens.float()
        removed = (self._num_patches - tokens).clamp(min=0)
        return {
            "tokens_mean": tokens.mean().item(),
            "tokens_min": tokens.min().item(),
            "tokens_max": tokens.max().item(),
            "k_mean": dominant.float().mean().item(),
            "compression_ratio": (tokens.mean() / max(self._num_patches, 1)).item(),
            "prefill_gflops_saved_per_image": (2 * self._llm_parameters(pl_module) * removed.mean() / 1e9).item(),
        }

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
        if not self._tokens:
            return
        tokens, dominant = torch.cat(self._tokens), torch.cat(self._dominant)
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
    """Logs pictures of the kept patches and contextual clusters of the first images of a run."""

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
    resume an interrupted run. Existing files are only ever appended to.
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
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill: that sample is answered again
                    records.setdefault(record["sample_id"], record)
        return records

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage not in ("test", "predict"):
            return
        folder = self.folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        if self.resume:
            done = self.read_records(folder)
            pl_module.completed_records = done
            if done and trainer.is_global_zero:
                pl_module.print(f"PredictionWriter: resuming, {len(done)} samples already answered in {folder}")
        self._file = open(folder / f"predictions.rank{trainer.global_rank}.jsonl", "a", encoding="utf-8")

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


def write_official_files(folder: Path, records: dict[str, dict[str, Any]]) -> None:
    """Merged predictions plus MME's and POPE's official answer files, written atomically."""

    def write(path: Path, lines: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        tmp.replace(path)

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
    and a TensorBoard text table, alongside the token budget."""

    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        results = dict(getattr(pl_module, "eval_results", {}))
        results.update({f"budget/{k}": v for k, v in getattr(pl_module, "budget_stats", {}).items()})
        folder = _run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
        table = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v:.2f} |\n" for k, v in sorted(results.items()))
        pl_module.print(table)
        writer = _tensorboard(trainer)
        if writer is not None:
            writer.add_text("results", table, trainer.global_step)

"""``python -m sparsezip_pl fit|validate|test|predict --config configs/X.yaml`` (LightningCLI)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sparsezip_pl.lit.callbacks import (
    KeptTokensPictures,
    PredictionWriter,
    ResultsTable,
    TokenBudgetLogger,
    to_jsonable,
)
from sparsezip_pl.lit.module import SparseZipModule


class SparseZipCLI(LightningCLI):
    """LightningCLI with the project's callbacks always on, each configurable under its own key:
    ``budget``, ``pictures``, ``predictions`` and ``results``.

    ``fit --ckpt_path last`` resumes from the newest ``last*.ckpt`` of this experiment, whatever
    logger version wrote it (plain Lightning looks only in the new run's version folder, finds
    nothing and silently starts over). Only checkpoints of the same model and compressor settings
    qualify; with none, training starts from scratch (with Lightning's warning).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TokenBudgetLogger, "budget")
        parser.add_lightning_class_args(KeptTokensPictures, "pictures")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ResultsTable, "results")

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer, self.model)
            if found is not None:
                rank_zero_info(f"Resuming from {found}")
                config["ckpt_path"] = str(found)


_IDENTITY = ("backend", "model_path", "dtype", "compressor")


def _identity(hparams) -> str:
    return json.dumps({k: dict(hparams).get(k) for k in _IDENTITY}, sort_keys=True, default=to_jsonable)


def find_last_checkpoint(trainer: L.Trainer, module: L.LightningModule | None = None) -> Path | None:
    """The newest ``last*.ckpt`` in the checkpoint folders of ``trainer``'s ModelCheckpoint
    callbacks and in every version folder of its first logger (``ROOT/version_*/checkpoints``);
    with ``module``, only one saved with the same model and compressor settings."""
    callbacks = trainer.checkpoint_callbacks
    folders = [Path(cb.dirpath) for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    if trainer.loggers and getattr(trainer.loggers[0], "root_dir", None):
        folders += sorted(Path(trainer.loggers[0].root_dir).glob("*/checkpoints"))
    elif not trainer.loggers:
        folders.append(Path(trainer.default_root_dir) / "checkpoints")
    candidates = {path for folder in folders if folder.is_dir() for path in folder.glob("last*.ckpt")}
    for path in sorted(candidates, key=lambda path: path.stat().st_mtime, reverse=True):
        if module is None:
            return path
        saved = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        if _identity(saved) == _identity(module.hparams):
            return path
        rank_zero_warn(f"{path} was saved with other model or compressor settings; not resuming from it")
    return None


def main(args=None) -> SparseZipCLI:
    # The compressor's options are documented by attribute docstrings (config.py).
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return SparseZipCLI(
        SparseZipModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        trainer_defaults={"logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="sparsezip")},
        # A resumed run may write into the interrupted run's folder (fixed log or output folders).
        save_config_kwargs={"overwrite": True},
        args=args,
    )

"""``python -m sparsezip_pl fit|validate|test|predict --config configs/X.yaml`` (LightningCLI)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sparsezip_pl.lit.callbacks import (
    KeptTokensPictures,
    PredictionWriter,
    ResultsTable,
    TokenBudgetLogger,
    to_jsonable,
    unused_path,
)
from sparsezip_pl.lit.module import SparseZipModule


class SaveConfigInRunFolder(SaveConfigCallback):
    """Lightning's ``config.yaml`` of the run, never written over a file outside a run folder.

    With a logger the file goes into the run's version folder, where rewriting it is safe (a
    resumed run may reuse a fixed folder). With ``--trainer.logger=false`` Lightning writes it to
    ``default_root_dir``, by default the working directory, where a ``config.yaml`` may be the
    user's own: an existing one is then left alone and the run's config goes to the first free
    ``config-N.yaml`` (:func:`~sparsezip_pl.lit.callbacks.unused_path`, as ``results.json`` does),
    with a warning that names it.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.loggers and not self.already_saved and self.save_to_log_dir:
            path = Path(trainer.log_dir) / self.config_filename  # log_dir is collective under DDP
            free = trainer.strategy.broadcast(unused_path(path).name if trainer.is_global_zero else None)
            if free != path.name:
                rank_zero_warn(f"{path} exists and the run has no logger folder: its config saved as {free} instead")
                self.config_filename = free
        super().setup(trainer, pl_module, stage)


class SparseZipCLI(LightningCLI):
    """LightningCLI with the project's callbacks always on, each configurable under its own key:
    ``budget``, ``pictures``, ``predictions`` and ``results``.

    ``fit --ckpt_path last`` resumes from the newest ``last*.ckpt`` of this experiment, whatever
    logger version wrote it (plain Lightning looks only in the new run's version folder, finds
    nothing and silently starts over). Only checkpoints of the same model and compressor settings
    qualify; with none, training starts from scratch (with Lightning's warning).

    With ``--ckpt_path FILE`` the run keeps the model settings it was given (config files and
    ``--model.*`` options); plain LightningCLI would replace them with the checkpoint's saved
    hyperparameters, so ``test --ckpt_path X --model.model_path Y`` would quietly ignore Y. Every
    setting that differs from the checkpoint's is printed as a warning, so a forgotten overlay
    (say, the one that turned text-aware scoring on) shows up before any number is computed.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TokenBudgetLogger, "budget")
        parser.add_lightning_class_args(KeptTokensPictures, "pictures")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ResultsTable, "results")

    def _parse_ckpt_path(self) -> None:
        # Overrides LightningCLI's hook that loads the checkpoint's hyperparameters over the config
        # (tests/test_lit.py checks that a --model option survives --ckpt_path).
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        given = self.config[subcommand].get("model")
        for key, (ours, theirs) in sorted(settings_differences(given, saved).items()):
            rank_zero_warn(f"{ckpt_path} was saved with model.{key} = {theirs!r}; this run uses {ours!r}")

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


def _flatten(value, prefix: str = "") -> dict:
    value = json.loads(json.dumps(value, default=to_jsonable))
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}{key}."))
    return {key.rstrip("."): item for key, item in flat.items()}


def settings_differences(given, saved) -> dict[str, tuple]:
    """``{dotted key: (given value, saved value)}`` for the settings both have and that differ
    (``given``: the run's model namespace; ``saved``: a checkpoint's ``hyper_parameters``)."""
    given = _flatten(given.as_dict() if hasattr(given, "as_dict") else dict(given or {}))
    saved = _flatten({k: v for k, v in dict(saved).items() if not k.startswith("_")})
    return {key: (given[key], saved[key]) for key in given.keys() & saved.keys() if given[key] != saved[key]}


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
        save_config_callback=SaveConfigInRunFolder,
        save_config_kwargs={"overwrite": True},
        args=args,
    )

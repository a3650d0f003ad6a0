"""``python -m sparsezip_pl fit|validate|test|predict --config configs/X.yaml`` (LightningCLI), and
``python -m sparsezip_pl export --ckpt_path CKPT OUT/`` (a tuned compressor to share)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch
from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sparsezip_pl.lit.callbacks import (
    HParamsSummary,
    KeptTokensPictures,
    PredictionWriter,
    ResultsTable,
    RunRecord,
    SamplesProgressBar,
    TokenBudgetLogger,
    to_jsonable,
)
from sparsezip_pl.lit.module import SparseZipModule


class SparseZipCLI(LightningCLI):
    """LightningCLI with the project's callbacks always on, each configurable under its own key:
    ``budget``, ``pictures``, ``predictions``, ``results`` and ``hparams``; and the progress bar
    :class:`~sparsezip_pl.lit.callbacks.SamplesProgressBar` (samples/s, running accuracy, visual
    tokens) unless ``trainer.enable_progress_bar`` is false or another progress bar is given.

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
        # ``run`` first: its callback claims the run folder before any other writes there.
        parser.add_lightning_class_args(RunRecord, "run")
        parser.add_lightning_class_args(TokenBudgetLogger, "budget")
        parser.add_lightning_class_args(KeptTokensPictures, "pictures")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ResultsTable, "results")
        parser.add_lightning_class_args(HParamsSummary, "hparams")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}
        given = trainer.get("callbacks") or []
        given = list(given) if isinstance(given, (list, tuple)) else [given]
        wants_bar = kwargs.get("enable_progress_bar", trainer.get("enable_progress_bar")) is not False
        if "callbacks" not in kwargs and wants_bar and not any(isinstance(c, ProgressBar) for c in given):
            kwargs["callbacks"] = [*given, SamplesProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # Private LightningCLI hook, overridden on purpose: no public one runs before LightningCLI
        # merges a checkpoint's hyperparameters over the config, which would silently drop the
        # settings the user gave (tests/test_private_apis.py breaks if Lightning renames it;
        # tests/test_lit.py checks that a --model option survives --ckpt_path).
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = read_checkpoint(ckpt_path).get("hyper_parameters", {})
        given = self.config[subcommand].get("model")
        for key, (ours, theirs) in sorted(settings_differences(given, saved).items()):
            rank_zero_warn(f"{ckpt_path} was saved with model.{key} = {theirs!r}; this run uses {ours!r}")

    def _resolve_last(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer, self.model)
            if found is not None:
                rank_zero_info(f"Using {found}")
                config["ckpt_path"] = str(found)

    def _announce_checkpoint(self) -> None:
        """Tell the module which checkpoint this evaluation reads, so that the run's record (written
        at set-up, before Lightning sets ``trainer.ckpt_path``) names it and its sha256."""
        path = self.config_init[self.subcommand].get("ckpt_path")
        self.model.evaluated_checkpoint = str(path) if path and Path(path).is_file() else None

    def before_fit(self) -> None:
        self._resolve_last()

    def before_validate(self) -> None:
        self._resolve_last()
        self._announce_checkpoint()

    def before_test(self) -> None:
        self._resolve_last()
        self._announce_checkpoint()

    def before_predict(self) -> None:
        self._resolve_last()
        self._announce_checkpoint()


_IDENTITY = ("backend", "model_path", "dtype", "compressor", "visual_positions")


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
        try:
            saved = read_checkpoint(path).get("hyper_parameters", {})
        except CheckpointError as error:
            rank_zero_warn(f"skipping {path}: {error}")
            continue
        if module is None or _identity(saved) == _identity(module.hparams):
            return path
        rank_zero_warn(f"{path} was saved with other model or compressor settings; not resuming from it")
    return None


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint)."""


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` of a checkpoint (tensors on CPU, weights only), or :class:`CheckpointError`
    naming the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError...
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{type(error).__name__}: {error}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


_STOPPED_BY: list[int] = []


def _stop_at_the_next_batch(signum, frame) -> None:
    """Ctrl-C: the first one stops the run as SIGTERM does (at the next batch boundary, answers
    and a resumable state kept); a second one interrupts at once."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _STOPPED_BY.append(signal.SIGINT)
    rank_zero_info("Stopping after the current batch (Ctrl-C again to stop at once)")
    signal.raise_signal(signal.SIGTERM)


def export_main(args: list[str] | None = None) -> Path:
    """``python -m sparsezip_pl export --ckpt_path CKPT OUT/``: write the tuned compressor of a
    training checkpoint as a small folder to share (settings, weights as safetensors, model card;
    see :mod:`sparsezip_pl.integrations.tuned`). Returns the folder."""
    from sparsezip_pl.integrations.tuned import TunedCompressorError, export_checkpoint

    parser = argparse.ArgumentParser(
        prog="python -m sparsezip_pl export",
        description="Write the tuned compressor of a training checkpoint to a folder: compressor.json (the "
                    "method settings, base model, data, scores), compressor.safetensors (its weights only) "
                    "and README.md (a model card). Load it with sparsezip(model, compressor=OUT), "
                    "--model.compressor_path OUT, or lmms-eval's --model_args compressor=OUT.")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `python -m sparsezip_pl fit`")
    parser.add_argument("out", help="the folder to write (new or empty)")
    parser.add_argument("--runs", action="append", default=None, metavar="FOLDER",
                        help="where to look for finished test / validate runs of this checkpoint, whose scores go "
                             "into the model card (repeatable; default: the logger folder above the checkpoint's "
                             "run, e.g. runs/)")
    parser.add_argument("--overwrite", action="store_true", help="replace the three files in a non-empty OUT")
    options = parser.parse_args(args)
    try:
        out = export_checkpoint(options.ckpt_path, options.out, options.runs, options.overwrite)
    except (TunedCompressorError, CheckpointError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    info = json.loads((out / "compressor.json").read_text(encoding="utf-8"))
    size = (out / "compressor.safetensors").stat().st_size
    scores = len(info["scores"]["monitored"]) + len(info["scores"]["evaluations"])
    print(f"Wrote {out}: {info['compressor']['method']} compressor (budget {info['compressor']['budget']}), "
          f"{info['weights']['parameters']} parameters in compressor.safetensors ({size / 1024:.1f} KiB), "
          f"tuned on {info['base_model']['model_path']}; {scores} score source(s) in README.md")
    return out


_EPILOG = ("Also: `python -m sparsezip_pl export --ckpt_path CKPT OUT/` writes the tuned compressor of a "
           "checkpoint as a folder to share (see `python -m sparsezip_pl export --help`).")


def main(args=None) -> SparseZipCLI | Path:
    """Run the CLI (``export`` runs :func:`export_main`). A run stopped by SIGTERM or Ctrl-C exits
    with a non-zero status (143 or 130, 128 + the signal's number): Lightning ends it at a batch
    boundary with ``SystemExit()``, which alone would exit 0, as if the run had finished."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "export":
        return export_main(list(argv[1:]))
    # The compressor's options are documented by attribute docstrings (config.py).
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _stop_at_the_next_batch) if in_main_thread else None
    try:
        return SparseZipCLI(
            SparseZipModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            trainer_defaults={"logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="sparsezip",
                                                      default_hp_metric=False)},
            parser_kwargs={"epilog": _EPILOG},
            # config.yaml goes into the run folder, which RunRecord has claimed for this project by then
            # (a resumed run rewrites its own).
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except SIGTERMException:
        stopped_by = _STOPPED_BY[-1] if _STOPPED_BY else signal.SIGTERM
        rank_zero_info("Stopped by a signal: the run is incomplete; rerun the same command to resume")
        raise SystemExit(128 + stopped_by) from None
    finally:
        _STOPPED_BY.clear()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

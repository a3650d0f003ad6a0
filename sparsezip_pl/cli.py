"""``python -m sparsezip_pl fit|validate|test|predict --config configs/X.yaml`` (LightningCLI)."""

from __future__ import annotations

import lightning as L
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from sparsezip_pl.lit.callbacks import KeptTokensPictures, PredictionWriter, ResultsTable, TokenBudgetLogger
from sparsezip_pl.lit.module import SparseZipModule


class SparseZipCLI(LightningCLI):
    """LightningCLI with the project's callbacks always on, each configurable under its own key:
    ``budget``, ``pictures``, ``predictions`` and ``results``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TokenBudgetLogger, "budget")
        parser.add_lightning_class_args(KeptTokensPictures, "pictures")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ResultsTable, "results")


def main(args=None) -> SparseZipCLI:
    return SparseZipCLI(
        SparseZipModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        trainer_defaults={"logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="sparsezip")},
        args=args,
    )

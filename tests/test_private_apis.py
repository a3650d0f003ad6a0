"""The few private Lightning and torch internals the project relies on, because no public API does
the job (each use says why in a comment). This test breaks on an upgrade that renames them, before
any behaviour silently changes."""

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader


def test_lightning_and_torch_internals_still_exist():
    # cli.SparseZipCLI overrides the hook that merges a checkpoint's hyperparameters.
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    # lit.callbacks.ValidateBeforeTraining runs the fit's validation loop before the first step.
    assert hasattr(ModelCheckpoint(), "_last_global_step_saved")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert hasattr(trainer._logger_connector, "_first_loop_iter")
    assert hasattr(trainer.fit_loop.epoch_loop, "val_loop")
    # data.loader.SkipCountingDataLoader skips the batches a resumed pass has seen.
    assert isinstance(DataLoader.__dict__.get("_index_sampler"), property)

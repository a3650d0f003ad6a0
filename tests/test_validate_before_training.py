"""ValidateBeforeTraining: step 0 is validated, logged and eligible for best.ckpt."""

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from sparsezip_pl.lit.callbacks import ValidateBeforeTraining


class DriftingModule(L.LightningModule):
    """A model whose validation score only gets worse with training (the case the callback is for)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.validated_at: list[int] = []
        self.trained_in_eval_mode = False

    def training_step(self, batch, batch_idx):
        self.trained_in_eval_mode |= not self.training
        return -self.weight  # SGD raises the weight every step

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -self.weight.detach())

    def on_validation_epoch_end(self):
        self.validated_at.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)


def fit(tmp_path, callbacks, max_steps=6, ckpt_path=None, module=None):
    module = module or DriftingModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="best", monitor="val/score", mode="max",
                                 save_top_k=1)
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=3, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, callbacks=[*callbacks, checkpoint],
                        logger=CSVLogger(tmp_path, name="log"), enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, checkpoint


def test_best_checkpoint_is_the_start_when_training_only_hurts(tmp_path):
    trainer, module, checkpoint = fit(tmp_path, [ValidateBeforeTraining()])
    assert module.validated_at == [0, 3, 6]
    assert trainer.global_step == 6 and not module.trained_in_eval_mode
    best = torch.load(checkpoint.best_model_path, weights_only=False)
    assert best["global_step"] == 0
    assert checkpoint.best_model_score.item() == 0.0
    assert best["state_dict"]["weight"].item() == 0.0
    logged = (tmp_path / "log" / "version_0" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    first_val = next(line.split(",") for line in logged[1:] if line.split(",")[header.index("val/score")])
    assert int(first_val[header.index("step")]) == 0


def test_without_it_best_checkpoint_skips_the_start(tmp_path):
    _, module, checkpoint = fit(tmp_path, [])
    assert module.validated_at == [3, 6]
    assert torch.load(checkpoint.best_model_path, weights_only=False)["global_step"] == 3


def test_no_extra_validation_on_resume(tmp_path):
    trainer, _, _ = fit(tmp_path / "first", [ValidateBeforeTraining()], max_steps=3)
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    _, module, _ = fit(tmp_path / "resumed", [ValidateBeforeTraining()], max_steps=6, ckpt_path=tmp_path / "step3.ckpt")
    assert module.validated_at == [6]


def test_nothing_to_validate_is_a_no_op():
    module = DriftingModule()
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, callbacks=[ValidateBeforeTraining()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    assert module.validated_at == [] and trainer.global_step == 2

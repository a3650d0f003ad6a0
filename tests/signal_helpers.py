"""A callback that sends its own process a signal, for tests of interrupted runs (imported by the
CLI in a subprocess, so it lives in an importable module)."""

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Sends ``signal_name`` (``SIGTERM`` / ``SIGINT``) to this process when the given training
    step or test / predict batch starts."""

    def __init__(self, signal_name: str = "SIGTERM", train_step: int | None = None, batch: int | None = None) -> None:
        self.signum = getattr(signal, signal_name)
        self.train_step = train_step
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.train_step:
            os.kill(os.getpid(), self.signum)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)

"""What the LightningModule and the callbacks exchange: the steps' outputs and a few methods.

The callbacks read only :class:`StepOutput` (what ``training_step`` / ``validation_step`` /
``test_step`` / ``predict_step`` return), Lightning's public state (``trainer.callback_metrics``,
``trainer.datamodule``) and the methods of :class:`CompressionModule`; they set nothing on the
module. Any LightningModule with these methods works with them.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict, runtime_checkable

import torch

from sparsezip_pl.compress.types import CompressionOutput


class StepOutput(TypedDict, total=False):
    """What a step returns.

    loss:        the training loss (training and loss-validation steps).
    compression: the batch's :class:`CompressionOutput`.
    records:     evaluation: one dict per sample of the batch (its fields, ``prediction``,
                 ``parsed``, ``visual_tokens`` the LLM saw, ``stock_visual_tokens``, ``order``).
    new_records: the records answered in this run (the others were read back from an earlier,
                 interrupted run of the same identity).
    """

    loss: torch.Tensor
    compression: CompressionOutput
    records: list[dict[str, Any]]
    new_records: list[dict[str, Any]]


@runtime_checkable
class CompressionModule(Protocol):
    """The module methods the callbacks call."""

    def identity(self) -> dict[str, Any]:
        """What decides the answers (model, method, prompt settings), known before weights load."""

    def resume_from(self, records: dict[str, dict[str, Any]]) -> None:
        """Answers an earlier run gave, by sample id: those samples are not answered again."""

    def llm_parameter_count(self) -> int:
        """Parameters the LLM applies to every prefilled token (for the FLOPs-saved estimate)."""

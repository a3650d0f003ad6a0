"""``none``: the stock model, every patch reaches the LLM (the reference every method is scored against)."""

from __future__ import annotations

from dataclasses import dataclass

from ..baselines import compress_none
from ..method import VisionMethod
from ..registry import register_method
from ..types import CompressionOutput, VisionCapture


@dataclass
class NoneConfig:
    """The stock model has no options (its budget is the tower's patch count)."""


@register_method("none", config=NoneConfig)
class NoCompression(VisionMethod):
    """All patches, as the stock model sends them (no CLS: LLaVA-1.5's 'default' feature select)."""

    def check_budget(self, num_patches: int) -> None:
        if self.budget is not None:
            raise ValueError(f"method 'none' keeps all {num_patches} patches; it takes no budget (got {self.budget!r})")

    def output_length(self, num_patches: int) -> int:
        return num_patches

    def forward(self, capture: VisionCapture) -> CompressionOutput:
        return compress_none(capture.patches())

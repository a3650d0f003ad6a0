"""What the token-selection methods share (``random``, ``divprune``, ``vispruner``, ``cdpruner``):
their token count and their output, the kept patches in spatial order."""

from __future__ import annotations

import torch

from .method import VisionMethod
from .types import CompressionOutput, VisionCapture


class SelectionMethod(VisionMethod):
    """A vision-side method that keeps exactly ``budget`` patches per image and drops the rest.

    ``default_tokens`` is the count when no budget is given (clamped to the patch count).
    """

    default_tokens = 64

    def tokens(self, num_patches: int) -> int:
        tokens = super().tokens(num_patches)
        return min(self.default_tokens, num_patches) if tokens is None else tokens

    def output_length(self, num_patches: int) -> int:
        return self.tokens(num_patches)

    def kept_count(self, capture: VisionCapture) -> int:
        """Tokens per row for this capture (a Python int: no device sync); a budget larger than
        its patch count is a ValueError."""
        self.check_budget(capture.num_patches)
        return self.tokens(capture.num_patches)


def require(capture: VisionCapture, field: str, method: str, why: str) -> torch.Tensor:
    """``capture.<field>``, or a ValueError naming the field when it is None."""
    value = getattr(capture, field)
    if value is None:
        raise ValueError(f"{method} needs capture.{field} ({why}), but it is None")
    return value


def selection_output(
    patches: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor | None = None
) -> CompressionOutput:
    """The kept patches as a :class:`CompressionOutput`.

    patches [B, N, C]; kept [B, K] distinct patch indices in any order (they are sorted, so the
    tokens reach the LLM in spatial order); scores [B, N] the method's per-patch score (zeros if
    None). Every row has exactly K tokens, all real; each token stands at its own patch.
    """
    batch, n, width = patches.shape
    kept = kept.sort(dim=1).values
    count = kept.shape[1]
    device = patches.device
    tokens = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))
    return CompressionOutput(
        tokens=tokens,
        mask=torch.ones(batch, count, dtype=torch.bool, device=device),
        kept_indices=kept,
        num_dominant=torch.full((batch,), count, dtype=torch.long, device=device),
        num_contextual=torch.zeros(batch, dtype=torch.long, device=device),
        cluster_map=torch.full((batch, n), -1, dtype=torch.long, device=device),
        scores=torch.zeros(batch, n, device=device) if scores is None else scores.float(),
        expected_tokens=torch.full((batch,), float(count), device=device),
        positions=kept,
    )

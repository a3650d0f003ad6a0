"""``divprune``: DivPrune (Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token
Pruning for Large Multimodal Models", CVPR 2025, arXiv:2503.02175; code:
github.com/vbdi/divprune, read at commit 799e2d9).

Keeps the patches that solve the max-min diversity problem greedily on the projector outputs
(the LLM's input space): with cosine distances d(i, j) = 1 - cos(P_i, P_j), the first pick is the
most isolated patch (the largest distance to its nearest other patch), every further pick the
patch farthest from the kept set (the largest minimum distance to it). The kept patches reach
the LLM in spatial order. Text-agnostic, no attention, no CLS token needed.

Published default: a retained ratio of 0.098 (``SUBSET_RATIO`` in their scripts), i.e.
round(0.098 * 576) = 56 tokens on LLaVA-1.5; it applies here when no budget is given. A budget
(64, 128, 192, or a fraction) sets the count exactly, as the papers comparing at 64 tokens do.

Where this follows the code rather than a literal reading of it:

* Distances in float32 (the official code computes them in the model's dtype, float16 in their
  runs), so near-ties may break differently there.
* The first pick takes each patch's nearest *other* patch (the diagonal masked out); the code
  takes the second-smallest distance of each column, the smallest being the self-distance 0:
  the same unless rounding puts a self-distance above a true neighbour's.
* A kept patch is never picked again (masked); the code relies on its distance to itself being
  0, which rounding can break.
* Batched over images (the code runs batch size 1 and reads the image at a fixed prompt offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..method import resolve_budget
from ..registry import register_method
from ..selection import SelectionMethod, require, selection_output
from ..types import CompressionOutput, VisionCapture


@dataclass
class DivPruneConfig:
    """DivPrune's options (the budget, when given, sets the count)."""

    ratio: float = 0.098
    """Retained share of the patches when no budget is given (the published 0.098: 56 of 576)."""


def max_min_diversity(features: torch.Tensor, count: int) -> torch.Tensor:
    """DivPrune's greedy picks: features [B, N, D] -> [B, count] patch indices, in pick order.

    Cosine distances D = 1 - cos; first the argmax over patches j of min_{i != j} D[i, j], then
    ``count - 1`` times the argmax over unpicked j of min over picked s of D[s, j] (first index on
    ties). A Python loop over the picks only; each step is O(B N).
    """
    batch, n, _ = features.shape
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [B, N, N]
    diagonal = torch.eye(n, dtype=torch.bool, device=features.device)
    nearest = distance.masked_fill(diagonal, float("inf")).amin(dim=1)  # column j: its nearest other patch
    pick = nearest.argmax(dim=1)
    rows = torch.arange(batch, device=features.device)
    picked = torch.zeros(batch, n, dtype=torch.bool, device=features.device)
    closest = torch.full((batch, n), float("inf"), device=features.device)  # min distance to the kept set
    picks = []
    for step in range(count):
        if step:
            pick = closest.masked_fill(picked, float("-inf")).argmax(dim=1)
        picks.append(pick)
        picked[rows, pick] = True
        closest = torch.minimum(closest, distance[rows, pick])
    return torch.stack(picks, dim=1)


@register_method("divprune", config=DivPruneConfig)
class DivPrune(SelectionMethod):
    """DivPrune: greedy max-min cosine diversity on the projector outputs, in spatial order."""

    needs_projected = True

    def __init__(self, config: DivPruneConfig, geometry, budget=None) -> None:
        if not 0 < config.ratio <= 1:
            raise ValueError(f"divprune.ratio must lie in (0, 1], got {config.ratio!r}")
        super().__init__(config, geometry, budget)

    def tokens(self, num_patches: int) -> int:
        if self.budget is None:
            return max(1, min(num_patches, round(self.config.ratio * num_patches)))
        return resolve_budget(self.budget, num_patches)

    def forward(self, capture: VisionCapture) -> CompressionOutput:
        project = require(capture, "project", "divprune", "it measures diversity on the projector outputs")
        patches = capture.patches()
        count = self.kept_count(capture)
        with torch.no_grad():
            kept = max_min_diversity(project(patches), count)
        return selection_output(patches, kept)

"""``cdpruner``: CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs", NeurIPS 2025, arXiv:2506.10967; code:
github.com/Theia-4869/CDPruner, read at commit 9541616).

Keeps the ``budget`` patches that a conditional determinantal point process finds most diverse
given the question: with P the projector outputs of the patches, S = cos(P_i, P_j) and r_i the
patch's relevance to the question, the kernel is L = diag(r) S diag(r) and the kept set the greedy
MAP of det(L_S), by the fast greedy MAP inference of Chen, Zhang and Zhou (NeurIPS 2018,
"Fast Greedy MAP Inference for Determinantal Point Process to Improve Recommendation Diversity":
incremental Cholesky rows, each step picks the largest remaining squared Schur complement).
Batched over images; the Python loop runs over the K picks only. The kept patches reach the LLM
in spatial order. No CLS token needed.

Relevance: NOT the official one. The code takes CLIP's *text* tower embedding of the question
and the penultimate patch features pushed through CLIP's final norm and image projection, and
negates their cosine. The models here have no CLIP text tower (llava-hf checkpoints ship only the
vision tower; other families have none), so the documented substitute is: r_i = cosine between
the projected patch P_i and the mean of the question's LLM input embeddings
(``capture.text_embeds`` over ``capture.text_mask``), min-max normalised per image. The sign is
NOT flipped by default: the authors explain the flip as an empirical property of CLIP's
penultimate patch embeddings against CLIP text embeddings (CDPruner issues #9, #14), which says
nothing about projector outputs against LLM word embeddings; ``negate_relevance`` restores it. A
row without question tokens (or whose relevance is constant) gets r = 1 everywhere: a plain DPP
on similarity.

Other differences from the code, with the code's behaviour where it matters:

* Min-max per image; the code takes min and max over the whole batch (its evaluation runs batch
  size 1, where the two agree). Both add 1e-6 to the numerator only, so the least relevant patch
  keeps a tiny positive weight.
* The code's optional re-weighting r <- exp(alpha r), alpha = theta / (2 (1 - theta)), is a
  comment there (theta = 0.5 suggested); here ``theta`` enables it, off (None) by default as in
  the code. The paper presents this theta form; the released code's active path is linear.
* Once the kernel's rank is spent (a squared gain <= 1e-10, e.g. duplicate patches) the code
  divides by the square root of a non-positive gain (NaN); here that step adds no Cholesky row
  and the remaining picks take the largest remaining gains (first index on ties).

Published defaults: the budget alone (``--visual_token_num``; no ratio, no theta in the active
code path). Default here without a budget: 64 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register_method
from ..selection import SelectionMethod, require, selection_output
from ..types import CompressionOutput, VisionCapture

#: squared gains at or below this count as zero (the kernel's rank is spent)
GAIN_EPS = 1e-10
#: added to the numerator of the min-max normalisation, as in the code
RELEVANCE_EPS = 1e-6


@dataclass
class CDPrunerConfig:
    """CDPruner's options."""

    theta: float | None = None
    """Relevance re-weighting r <- exp(alpha r), alpha = theta / (2 (1 - theta)), theta in (0, 1)
    (the paper's form; 0.5 suggested in a code comment); None: linear r, the code's active path."""
    negate_relevance: bool = False
    """Negate the cosine before normalising, as the code does for CLIP penultimate features
    (module docstring: off for the substitute relevance used here)."""


def question_relevance(unit: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                       negate: bool = False) -> torch.Tensor:
    """r [B, N] in (0, 1] (plus the numerator's 1e-6): the cosine of each unit patch ``unit``
    [B, N, D] with the mean of the valid question embeddings ``text`` [B, T, D] (``text_mask``
    [B, T]; None: all valid), min-max normalised per image; 1 where a row has no question tokens
    or a constant cosine."""
    valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if text_mask is None else text_mask
    weight = valid.to(torch.float32).unsqueeze(-1)
    mean = (text.float() * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # [B, D]
    cosine = unit @ F.normalize(mean, dim=-1).unsqueeze(-1)  # [B, N, 1]
    cosine = -cosine.squeeze(-1) if negate else cosine.squeeze(-1)
    low, high = cosine.amin(dim=1, keepdim=True), cosine.amax(dim=1, keepdim=True)
    spread = high - low
    relevance = (cosine - low + RELEVANCE_EPS) / spread.clamp_min(torch.finfo(torch.float32).tiny)
    usable = (spread > 0) & valid.any(dim=1, keepdim=True)
    return torch.where(usable, relevance, torch.ones_like(relevance))


def greedy_map(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Fast greedy MAP of a DPP (Chen et al. 2018), batched: kernel [B, N, N] symmetric PSD ->
    [B, count] indices in pick order. Each step picks argmax_j d2_j (d2 = the squared Schur
    complement, i.e. the gain in log det), appends the Cholesky row e = (L_j - C^T C_j) / sqrt(d2_j)
    and updates d2 -= e^2."""
    batch, n, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    cholesky = kernel.new_zeros(count, batch, n)
    gain = kernel.diagonal(dim1=1, dim2=2).clone()  # [B, N]
    picks = []
    for step in range(count):
        pick = gain.argmax(dim=1)
        picks.append(pick)
        best = gain[rows, pick]
        done = cholesky[:step, rows, pick]  # [step, B]
        row = kernel[rows, pick] - torch.einsum("tb,tbn->bn", done, cholesky[:step])
        row = row / best.clamp_min(GAIN_EPS).sqrt().unsqueeze(-1)
        row = torch.where((best > GAIN_EPS).unsqueeze(-1), row, torch.zeros_like(row))
        cholesky[step] = row
        gain = (gain - row.square()).scatter(1, pick.unsqueeze(1), float("-inf"))
    return torch.stack(picks, dim=1)


@register_method("cdpruner", config=CDPrunerConfig)
class CDPruner(SelectionMethod):
    """CDPruner: greedy MAP of a question-conditioned DPP on the projector outputs, in spatial order."""

    needs_text = True
    needs_projected = True

    def __init__(self, config: CDPrunerConfig, geometry, budget=None) -> None:
        if config.theta is not None and not 0 < config.theta < 1:
            raise ValueError(f"cdpruner.theta must lie in (0, 1) or be None, got {config.theta!r}")
        super().__init__(config, geometry, budget)

    def kernel(self, capture: VisionCapture) -> tuple[torch.Tensor, torch.Tensor]:
        """(L [B, N, N], r [B, N]) of a capture."""
        project = require(capture, "project", "cdpruner", "its similarity is on the projector outputs")
        text = require(capture, "text_embeds", "cdpruner", "its relevance is to the question's embeddings")
        unit = F.normalize(project(capture.patches()).float(), dim=-1)
        if text.shape[-1] != unit.shape[-1]:
            raise ValueError(f"cdpruner: capture.text_embeds has width {text.shape[-1]}, the projector outputs "
                             f"{unit.shape[-1]}; both must be the LLM's input space")
        if capture.text_mask is not None and tuple(capture.text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"cdpruner: capture.text_mask must be [B, T] = {tuple(text.shape[:2])}, "
                             f"got {tuple(capture.text_mask.shape)}")
        relevance = question_relevance(unit, text, capture.text_mask, self.config.negate_relevance)
        if self.config.theta is not None:
            alpha = self.config.theta / (2 * (1 - self.config.theta))
            relevance = torch.exp(alpha * relevance)
        similarity = unit @ unit.transpose(1, 2)
        return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1), relevance

    def forward(self, capture: VisionCapture) -> CompressionOutput:
        count = self.kept_count(capture)
        with torch.no_grad():
            kernel, relevance = self.kernel(capture)
            kept = greedy_map(kernel, count)
        return selection_output(capture.patches(), kept, relevance)

"""``visionzip``: VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025, arXiv:2412.04467; code: github.com/dvlab-research/VisionZip).

Dominant tokens: CLS and the patches of highest CLS attention at the feature layer (-2), summed
over heads, in spatial order; the CLS token counts as one of the ``dominant`` (the official
``visionzip(model, dominant=54, contextual=10)`` sends 54 + 10 = 64 tokens). Contextual tokens:
``contextual`` anchors spaced uniformly along the remaining patches (in their order, not on the
grid), every other remaining patch assigned to the anchor of highest cosine similarity of
head-averaged keys, each token = anchor + mean of its members. Budget splits: the published 64 =
54 + 10; 128 = 108 + 20 and 192 = 162 + 30 keep that 10 : 64 share of contextual tokens, which
is the rule here for any budget. On a tower without CLS the family's substitute attention ranks
the patches and all ``dominant`` tokens are patches.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..baselines import compress_visionzip
from ..compressor import patch_attention_and_keys
from ..method import VisionMethod, check_budget_fits
from ..registry import register_method
from ..types import CompressionOutput, VisionCapture

#: contextual tokens per budget token in the published splits (10 of 64, 20 of 128, 30 of 192)
CONTEXTUAL_SHARE = 10 / 64


@dataclass
class VisionZipConfig:
    """VisionZip's options; ``dominant`` and ``contextual`` override the split of ``budget``."""

    dominant: int | None = None
    """Dominant tokens, the CLS token included (VisionZip's count); None: budget - contextual."""
    contextual: int | None = None
    """Contextual (merged) tokens; None: round(budget * 10 / 64)."""
    layer: int = -2
    """Vision layer whose CLS attention and keys are used (``hidden_states`` indexing)."""


def split_budget(config: VisionZipConfig, budget: int | None) -> tuple[int, int]:
    """(dominant, contextual) for a budget: 64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30);
    no budget and no explicit counts -> (54, 10)."""
    total = 64 if budget is None else budget
    contextual = config.contextual if config.contextual is not None else round(total * CONTEXTUAL_SHARE)
    dominant = config.dominant if config.dominant is not None else total - contextual
    if dominant < 1 or contextual < 0:
        raise ValueError(f"visionzip: dominant ({dominant}) must be >= 1 and contextual ({contextual}) >= 0")
    return dominant, contextual


@register_method("visionzip", config=VisionZipConfig)
class VisionZip(VisionMethod):
    """VisionZip: CLS-attention dominant tokens plus anchor-merged contextual tokens."""

    needs_attention = True
    needs_keys = True

    @property
    def scoring_layers(self) -> list[int]:
        return [self.config.layer]

    def _split(self, num_patches: int) -> tuple[int, int]:
        return split_budget(self.config, self.tokens(num_patches))

    def check_budget(self, num_patches: int) -> None:
        check_budget_fits(self.budget, num_patches)
        dominant, contextual = self._split(num_patches)
        patches = dominant - int(self.geometry.has_cls)
        if patches > num_patches or dominant + contextual > num_patches:
            raise ValueError(
                f"visionzip: dominant = {dominant} + contextual = {contextual} is more than the {num_patches} "
                "patches the vision tower produces per image: nothing would be compressed"
            )

    def output_length(self, num_patches: int) -> int:
        return sum(self._split(num_patches))

    def forward(self, capture: VisionCapture) -> CompressionOutput:
        dominant, contextual = self._split(capture.num_patches)
        attention, keys = patch_attention_and_keys(capture)
        patches = dominant - int(capture.has_cls)
        return compress_visionzip(
            capture.hidden, attention[0], keys[0], patches, contextual, capture.has_cls, capture.grid
        )

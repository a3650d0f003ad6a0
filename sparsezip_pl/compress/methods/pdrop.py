"""``pdrop``: PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv:2410.17247; code:
github.com/Cooperx521/PyramidDrop).

Inside the LLM, once, at prefill, in stages: before each stage layer s_i the image tokens still
present are ranked by the attention the last instruction token (the prompt's last token) pays
them, computed with the q/k projections, input norm and rotary embedding of layer s_i itself (the
layer about to run) on its input, mean over heads; the top ``floor(N * r_i)`` of the N ORIGINAL
image tokens go on, in their order. Published defaults (official scripts, v1.5 and v1.6, 7B and
13B alike): stages [8, 16, 24], lambda = 0.5, i.e. r = 0.5, 0.25, 0.125 (576 -> 288 -> 144 -> 72,
an average of 270 tokens over 32 layers).

Positions: the official code renumbers the remaining tokens contiguously after each stage and
moves every decoding step's position down by the tokens dropped before it; that is the default
here too (the hook's ``renumber_positions``). ``keep_positions: true`` keeps the original position
ids instead (FastV's way).

Stages (``layers``): given, they are used as they are (the official 13B scripts keep [8, 16, 24]
on 40 layers). Not given, the default [8, 16, 24] of 32 layers is scaled to the decoder's depth L:
round(i * L / 4) for i = 1, 2, 3, kept within 1..L-1, repeats dropped ([10, 20, 30] on 40
layers, [1] on 2).

Budget: ``budget`` is the number of visual tokens averaged over all L decoder layers (the papers'
convention for in-LLM methods; a fraction is one of N):

    T_avg(lambda) = (s_1 * N + sum_i (s_{i+1} - s_i) * floor(N * lambda**i)) / L,  s_{m+1} = L,

and lambda is chosen so that T_avg is as close to the budget as the whole counts allow (every
lambda where a count changes, (c / N)**(1/i), is tried; of two equally close the smaller average
wins). A budget below the least average (one token left after the last stage) is an error. The
papers' settings for their 64/128/192 tables are not published; with [8, 16, 24] on 32 layers no
average below 163.5 of 576 is reachable, so such budgets need earlier stages (``layers``).
Without a budget, ``lam`` gives r_i = lam**i; explicit ``ratios`` (of N, one per stage, as the
official ``image_token_ratio_list``) override both. The run records the average the decoder
actually saw (:attr:`~sparsezip_pl.compress.types.CompressionOutput.llm_visual_tokens`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..method import BudgetOutOfReach, LLMMethod, resolve_budget
from ..registry import register_method
from ..types import Geometry

#: the official stages on a 32-layer decoder, as fractions of its depth
DEFAULT_STAGES = (1 / 4, 2 / 4, 3 / 4)


@dataclass
class PDropConfig:
    """PyramidDrop's options."""

    layers: list[int] | None = None
    """Decoder layers before which the image tokens are ranked and dropped (the official ``layer_list``);
    None: [8, 16, 24] of 32 layers scaled to the decoder's depth."""
    lam: float = 0.5
    """lambda: stage i keeps floor(N * lam**i) of the N original image tokens (when no budget is given)."""
    ratios: list[float] | None = None
    """The fraction of the N original image tokens kept from each stage on (the official
    ``image_token_ratio_list``, e.g. [0.5, 0.25, 0.125]); overrides ``budget`` and ``lam``."""
    keep_positions: bool = False
    """Keep the original position ids of the kept tokens instead of renumbering them contiguously (official)."""


def stage_layers(config: PDropConfig, num_layers: int) -> list[int]:
    """The stage layers on a decoder of ``num_layers`` layers (see the module docstring)."""
    if config.layers is not None:
        layers = list(config.layers)
        if not layers or any(not isinstance(x, int) or not 0 <= x < num_layers for x in layers) \
                or any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(f"pdrop.layers must be increasing decoder layers in 0..{num_layers - 1}, got {layers!r}")
        return layers
    if num_layers < 2:
        raise ValueError(f"pdrop needs a decoder of at least 2 layers, this one has {num_layers}")
    return sorted({min(max(math.floor(f * num_layers + 0.5), 1), num_layers - 1) for f in DEFAULT_STAGES})


def average_tokens(counts: list[int], stages: list[int], num_visual: int, num_layers: int) -> float:
    """T_avg: the image tokens per layer averaged over the decoder, for ``counts`` kept from each stage on."""
    ends = [*stages[1:], num_layers]
    return (stages[0] * num_visual + sum((end - start) * c for start, end, c in zip(stages, ends, counts))) / num_layers


def lambda_counts(lam: float, num_visual: int, num_stages: int) -> list[int]:
    """floor(N * lam**i) for the stages i = 1..m (a hair of slack against rounding below a whole count)."""
    return [math.floor(num_visual * lam**i + 1e-9) for i in range(1, num_stages + 1)]


def fit_lambda(target: float, stages: list[int], num_visual: int, num_layers: int) -> tuple[float, list[int]]:
    """The lambda (and its counts) whose T_avg is closest to ``target``."""
    if target > num_visual:
        raise ValueError(f"pdrop: budget asks for an average of {target} visual tokens, more than the "
                         f"{num_visual} of the image")
    best = None
    for power in range(1, len(stages) + 1):
        for count in range(1, num_visual + 1):
            lam = (count / num_visual) ** (1 / power)
            counts = lambda_counts(lam, num_visual, len(stages))
            if counts[-1] < 1:
                continue
            average = average_tokens(counts, stages, num_visual, num_layers)
            key = (abs(average - target), average)
            if best is None or key < best[0]:
                best = (key, lam, counts)
    (gap, average), lam, counts = best
    if gap > 1 and average > target:
        raise BudgetOutOfReach(
            f"pdrop: an average of {target} visual tokens over the {num_layers} decoder layers is out of reach with "
            f"stages {stages}: layers 0..{stages[0] - 1} see all {num_visual}, so the least average (one token "
            f"left) is {average:g}; give earlier stages (pdrop.layers) or a larger budget")
    return lam, counts


@register_method("pdrop", config=PDropConfig, side="llm")
class PyramidDrop(LLMMethod):
    """PyramidDrop: image tokens dropped in stages inside the LLM, ranked by the last instruction token's attention."""

    def __init__(self, config: PDropConfig, geometry: Geometry, budget: int | float | None = None) -> None:
        if config.ratios is not None:
            ratios = list(config.ratios)
            if not ratios or any(not 0 < r <= 1 for r in ratios) or any(a < b for a, b in zip(ratios, ratios[1:])):
                raise ValueError(f"pdrop.ratios must be non-increasing fractions in (0, 1], got {config.ratios!r}")
            if budget is not None:
                warnings.warn(f"pdrop.ratios {ratios} set the kept tokens; budget = {budget!r} is not used",
                              UserWarning, stacklevel=2)
        elif not 0 < config.lam <= 1:
            raise ValueError(f"pdrop.lam must lie in (0, 1], got {config.lam!r}")
        super().__init__(config, geometry, budget)
        self._counts: dict[tuple[int, int], list[int]] = {}

    @property
    def renumber_positions(self) -> bool:  # type: ignore[override]
        return not self.config.keep_positions

    def prune_layers(self, num_layers: int) -> list[int]:
        return stage_layers(self.config, num_layers)

    def stage_counts(self, num_visual: int, num_layers: int) -> list[int]:
        """The image tokens kept from each stage on, for ``num_visual`` original ones on a decoder
        of ``num_layers`` layers."""
        key = (num_visual, num_layers)
        if key not in self._counts:
            stages = stage_layers(self.config, num_layers)
            if self.config.ratios is not None:
                if len(self.config.ratios) != len(stages):
                    raise ValueError(f"pdrop.ratios has {len(self.config.ratios)} entries for the "
                                     f"{len(stages)} stages {stages}")
                counts = [math.floor(num_visual * r) for r in self.config.ratios]
            elif self.budget is not None:
                _, counts = fit_lambda(resolve_budget(self.budget, num_visual), stages, num_visual, num_layers)
            else:
                counts = lambda_counts(self.config.lam, num_visual, len(stages))
            if min(counts) < 1:
                raise ValueError(f"pdrop: the stages {stages} would keep {counts} of the {num_visual} image "
                                 "tokens; every stage must keep at least one (raise pdrop.ratios / pdrop.lam)")
            self._counts[key] = counts
        return self._counts[key]

    def scores(self, state) -> torch.Tensor:
        """[B, V] the last instruction token's attention to each visual token present, computed
        with the stage layer's own projections, mean over heads."""
        return state.visual_scores(state.attention(state.layer).mean(dim=1)[:, 0])

    def select(self, layer: int, state) -> torch.Tensor:
        stage = stage_layers(self.config, state.num_layers).index(layer)
        keep = self.stage_counts(state.prompt_visual, state.num_layers)[stage]
        return self.scores(state).topk(min(keep, state.num_visual), dim=1).indices.sort(dim=1).values

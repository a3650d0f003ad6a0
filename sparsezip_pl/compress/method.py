"""Base classes of the two kinds of method (see :mod:`sparsezip_pl.compress.types`).

A vision-side method is an ``nn.Module`` built from its config dataclass, the model's
:class:`~sparsezip_pl.compress.types.Geometry` and the shared ``budget``; its forward turns a
:class:`~sparsezip_pl.compress.types.VisionCapture` into a
:class:`~sparsezip_pl.compress.types.CompressionOutput`. An LLM-side method is an ``nn.Module``
too; the decoder hook (:mod:`sparsezip_pl.models.llm_hook`) asks it, before each layer it names,
which visual tokens the later layers keep.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .types import CompressionOutput, Geometry, VisionCapture


class BudgetOutOfReach(ValueError):
    """A budget the method cannot meet on this model with these options (an LLM-side method's
    average over decoder layers below what its first pruning layer allows, for example)."""


def resolve_budget(budget: int | float | None, num_patches: int) -> int | None:
    """Visual tokens per row for a ``budget``: an int is a count, a float in (0, 1) a fraction of
    the stock count ``num_patches`` (rounded, at least 1); None stays None (the method's default)."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise ValueError(f"budget must be an int (tokens) or a float in (0, 1) (a fraction), got {budget!r}")
    if isinstance(budget, float) and not budget.is_integer() or 0 < budget < 1:
        if not 0 < budget < 1:
            raise ValueError(f"a fractional budget must lie in (0, 1), got {budget!r}")
        return max(1, round(budget * num_patches))
    count = int(budget)
    if count < 1:
        raise ValueError(f"budget must be at least 1 visual token, got {budget!r}")
    return count


def check_budget_fits(budget: int | float | None, num_patches: int) -> None:
    """A budget larger than the stock token count is an error, never a silent run without compression."""
    tokens = resolve_budget(budget, num_patches)
    if tokens is not None and tokens > num_patches:
        raise ValueError(
            f"budget = {budget!r} asks for {tokens} visual tokens, more than the {num_patches} the vision "
            "tower produces per image: nothing would be compressed"
        )


class VisionMethod(nn.Module):
    """Base of the vision-side methods (capture in, compressed tokens out).

    Subclasses set what they read from the capture (``needs_*``, ``scoring_layers``) so the model
    side captures only that, and implement :meth:`forward` and :meth:`output_length`.

    Args:
        config: the method's own config dataclass.
        geometry: the model's vision geometry.
        budget: visual tokens per row reaching the LLM (int) or a fraction of the stock count
            (float in (0, 1)); None: the method's own default.
    """

    method_name = ""
    #: reads the CLS attention (the family's substitute on towers without CLS)
    needs_attention = False
    #: reads the scoring layers' keys
    needs_keys = False
    #: reads the question's embeddings
    needs_text = False
    #: scores tokens in the LLM's input space (after the projector)
    needs_projected = False

    def __init__(self, config: Any, geometry: Geometry, budget: int | float | None = None) -> None:
        super().__init__()
        self.config = config
        self.geometry = geometry
        self.budget = budget
        if geometry.num_patches is not None:
            self.check_budget(geometry.num_patches)

    @property
    def scoring_layers(self) -> list[int]:
        """Vision layers whose CLS query and keys the capture must record (``hidden_states``
        indexing, -2 = LLaVA's feature layer); empty when the method needs neither."""
        return [-2] if self.needs_attention or self.needs_keys else []

    def tokens(self, num_patches: int) -> int | None:
        """This method's budget in tokens for rows of ``num_patches`` patches."""
        return resolve_budget(self.budget, num_patches)

    def check_budget(self, num_patches: int) -> None:
        """Raise ValueError when the budget cannot fit rows of ``num_patches`` patches."""
        check_budget_fits(self.budget, num_patches)

    def output_length(self, num_patches: int) -> int:
        """T_max, the static width of the output for rows of ``num_patches`` patches."""
        raise NotImplementedError

    def forward(self, capture: VisionCapture) -> CompressionOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.method_name}, budget={self.budget}"


class LLMMethod(nn.Module):
    """Base of the LLM-side methods: prune visual tokens inside the decoder, once, at prefill.

    Before each decoder layer in :meth:`prune_layers`, the decoder hook calls :meth:`select`
    with the layer's input state (:class:`~sparsezip_pl.models.llm_hook.PruneState`); the method
    returns, per row, the indices (into the visual tokens still present) that later layers keep.
    Kept tokens keep their position ids, unless :attr:`renumber_positions` is set: then, from each
    pruning layer on, they are renumbered contiguously (see :mod:`sparsezip_pl.models.llm_hook`).
    After a run the decoder's visual tokens, averaged over its layers, are reported in
    :attr:`~sparsezip_pl.compress.types.CompressionOutput.llm_visual_tokens`.

    Args:
        config: the method's own config dataclass.
        geometry: the vision geometry (``num_patches`` is the stock visual token count).
        budget: visual tokens (int, or fraction of the stock count) that the LLM works on. For a
            method that prunes in stages, the budget is the average over the decoder's layers
            (the convention of the papers' tables); each method documents how it maps it.
    """

    method_name = ""
    #: renumber the kept rows' positions contiguously from each pruning layer on (PyramidDrop)
    renumber_positions = False

    def __init__(self, config: Any, geometry: Geometry, budget: int | float | None = None) -> None:
        super().__init__()
        self.config = config
        self.geometry = geometry
        self.budget = budget
        if geometry.num_patches is not None:
            check_budget_fits(budget, geometry.num_patches)

    def prune_layers(self, num_layers: int) -> list[int]:
        """Indices of the decoder layers before which this method prunes."""
        raise NotImplementedError

    def select(self, layer: int, state: Any) -> torch.Tensor:
        """[B, K] indices of the visual tokens (among those present before ``layer``) to keep."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.method_name}, budget={self.budget}"



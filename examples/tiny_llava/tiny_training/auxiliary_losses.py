"""Stage 2 auxiliary losses on where the answer looks (attention) and what it carries (probes)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsezip_pl.data import synthetic as S
from tiny_training.language_data import SIDE_WORDS, YES_NO


def grounding_loss(capture, packed, fams, ground, keep, n_text: int, C: int, shape_only: bool = False):
    """Grounding supervision (like training with region annotations): in the last layer, head 0 of
    a yes/no answer position should put its attention over the visual tokens on the patches the
    question asks about (``_asked_target``), or, when nothing matches, on the text prefix (BOS, the
    usual attention sink). -log(attention mass on the target), averaged."""
    q, k, scale = capture["q"][:, 0].float(), capture["k"][:, 0].float(), capture["scale"]  # [B, RC, hd], [B, P, hd]
    maps = ground["shape_maps"]  # [B, 576] 16 * shape label + colour label per patch (0 = background)
    if keep is not None:
        maps = torch.gather(maps, 1, keep)
    terms = []
    for b, (firsts, fam_list) in enumerate(zip(packed[4], fams)):
        for rc, (fam, ans, asked), shape in zip(firsts, fam_list, ground["asked_shapes"][b]):
            if rc is None or ans not in YES_NO:
                continue
            if shape_only and fam in ("color", "position"):  # the shape is always present in these
                asked = (shape, None)
            s = (q[b, rc[0] * C + rc[1]] @ k[b].T) * scale  # over the prefix (text + visual tokens)
            logp = torch.log_softmax(s, -1)
            if asked is None:  # nothing in the image matches: look at the text prefix (BOS) instead
                terms.append(-torch.logsumexp(logp[:n_text], 0))
                continue
            shape, color = asked
            target = maps[b] // 16 == S.SHAPES.index(shape) + 1
            if color is not None:
                target &= maps[b] % 16 == S.COLOR_NAMES.index(color) + 1
            if bool(target.any()):
                terms.append(-torch.logsumexp(logp[n_text:][target], 0))
    return torch.stack(terms).mean() if terms else q.sum() * 0.0


class RouteHeads(nn.Module):
    """Temporary linear probes: what a yes/no question asks (shape, colour, side, number), read from
    the last LLM layer's input at the answer position. Thrown away after training."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.shape = nn.Linear(width, len(S.SHAPES) + 1)
        self.color = nn.Linear(width, len(S.COLOR_NAMES) + 1)
        self.side = nn.Linear(width, len(SIDE_WORDS) + 1)
        self.number = nn.Linear(width, len(S.NUMBER_WORDS) + 1)
        # readout: what the image says about the asked shape
        self.seen_colors = nn.Linear(width, len(S.COLOR_NAMES))
        self.seen_lr = nn.Linear(width, 3)
        self.seen_tb = nn.Linear(width, 3)
        self.seen_count = nn.Linear(width, S.MAX_PER_SHAPE + 1)
        # the same, straight from the last layer's head 0 (shape) and head 1 (count) outputs
        self.head_colors = nn.Linear(head_dim, len(S.COLOR_NAMES))
        self.head_lr = nn.Linear(head_dim, 3)
        self.head_tb = nn.Linear(head_dim, 3)
        self.head_count = nn.Linear(head_dim, S.MAX_PER_SHAPE + 1)
        # keep: what each visual token still says about its patch inside the LLM
        self.patch_shape = nn.Linear(width, len(S.SHAPES) + 1)
        self.patch_color = nn.Linear(width, len(S.COLOR_NAMES) + 1)
        self.patch_row = nn.Linear(width, S.GRID)
        self.patch_col = nn.Linear(width, S.GRID)
        self.patch_center = nn.Linear(width, 2)


def keep_loss(route: RouteHeads, capture, ground, keep, n_text: int):
    """Dense probes on the visual tokens entering the last LLM layer (shape, colour, row, column,
    object centre per patch), so the projector and the first layers keep what the questions need."""
    x = capture["prefix_x"][:, n_text:].float()
    maps, centre = ground["shape_maps"], ground["centre_maps"]
    cells = torch.arange(S.GRID * S.GRID).expand(x.shape[0], -1)
    if keep is not None:
        maps, centre, cells = (torch.gather(t, 1, keep) for t in (maps, centre, cells))
    ce = lambda head, t: F.cross_entropy(head(x).flatten(0, 1), t.flatten())  # noqa: E731
    return (ce(route.patch_shape, maps // 16) + ce(route.patch_color, maps % 16)
            + 0.3 * (ce(route.patch_row, cells // S.GRID) + ce(route.patch_col, cells % S.GRID))
            + F.cross_entropy(route.patch_center(x).flatten(0, 1), centre.flatten(), weight=torch.tensor([1.0, 10.0])))


def readout_loss(route: RouteHeads, capture, packed, fams, ground, C: int):
    """The probes' losses at every yes/no answer position naming a shape."""
    x, heads = capture["post_attention"].float(), capture["head_out"].float()
    rows, head0, head1, labels = [], [], [], {k: [] for k in ("colors", "lr", "tb", "count")}
    for b, (firsts, fam_list) in enumerate(zip(packed[4], fams)):
        for rc, (_, ans, _), lab in zip(firsts, fam_list, ground["readout"][b]):
            if rc is None or ans not in YES_NO or lab is None:
                continue
            rows.append(x[b, rc[0] * C + rc[1]])
            head0.append(heads[b, 0, rc[0] * C + rc[1]])
            head1.append(heads[b, 1, rc[0] * C + rc[1]])
            for k in labels:
                labels[k].append(lab[k])
    if not rows:
        return x.sum() * 0.0
    y = {k: torch.tensor(v) for k, v in labels.items()}
    h, h0, h1 = torch.stack(rows), torch.stack(head0), torch.stack(head1)
    return (F.binary_cross_entropy_with_logits(route.seen_colors(h), y["colors"])
            + F.cross_entropy(route.seen_lr(h), y["lr"]) + F.cross_entropy(route.seen_tb(h), y["tb"])
            + F.cross_entropy(route.seen_count(h), y["count"])
            + F.binary_cross_entropy_with_logits(route.head_colors(h0), y["colors"])
            + F.cross_entropy(route.head_lr(h0), y["lr"]) + F.cross_entropy(route.head_tb(h0), y["tb"])
            + F.cross_entropy(route.head_count(h1), y["count"]))


def routing_loss(route: RouteHeads, capture, packed, fams, ground, C: int):
    """Cross-entropy of the probes at every yes/no answer position (summed over the four attributes)."""
    x = capture["x"].float()
    rows, labels = [], {k: [] for k in ("shape", "color", "side", "number")}
    for b, (firsts, fam_list) in enumerate(zip(packed[4], fams)):
        for rc, (_, ans, _), attrs in zip(firsts, fam_list, ground["attributes"][b]):
            if rc is None or ans not in YES_NO:
                continue
            rows.append(x[b, rc[0] * C + rc[1]])
            for k in labels:
                labels[k].append(attrs[k])
    if not rows:
        return x.sum() * 0.0
    h = torch.stack(rows)
    return sum(F.cross_entropy(getattr(route, k)(h), torch.tensor(v)) for k, v in labels.items())


COUNT_SHARE = 0.2  # "linear" target: attention share per counted instance (at most MAX_PER_SHAPE = 3 -> 0.6)
COUNT_RATIO = 0.4  # "softmax" target: one instance's attention relative to the sink's


def instance_share(n: int, target: str = "linear") -> float:
    """Attention share the counting loss asks for on each of ``n`` instances of the asked shape.

    ``linear``: ``COUNT_SHARE`` each, so the shapes' total grows linearly with n. No fixed attention
    logit per instance gives that (softmax shares n w / (1 + n w) grow slower than n), so the head
    could meet it by looking at more of a scene where there is more of the shape, by area (runs
    33-34 of the history: the softmax target did not change that, so it is not the main cause).
    ``softmax``: ``COUNT_RATIO / (1 + n COUNT_RATIO)``, what one fixed logit per instance (its
    weight COUNT_RATIO times the sink's) gives for every n; 0.4 roughly maximizes the gap between
    the totals for two and three instances (0.44 and 0.55)."""
    if target == "linear":
        return COUNT_SHARE
    if target == "softmax":
        return COUNT_RATIO / (1 + n * COUNT_RATIO)
    raise ValueError(f"count target must be 'linear' or 'softmax', got {target!r}")


def counting_loss(capture, packed, fams, ground, keep, n_text: int, C: int, head: int = 1, target: str = "linear"):
    """Counting supervision: in the last layer, head ``head`` of a yes/no answer position puts
    ``instance_share(n, target)`` of its attention on each of the n instances of the asked shape
    (``count_targets``) and the rest on the text prefix (the sink), so its output moves with the
    number of instances. Cross-entropy between that target distribution and the head's attention,
    averaged."""
    q, k, scale = capture["q"][:, head].float(), capture["k"][:, head].float(), capture["scale"]
    terms = []
    for b, (firsts, fam_list) in enumerate(zip(packed[4], fams)):
        targets = ground["count_targets"][b]
        position = None
        if keep is not None:  # grid cell -> index among the kept visual tokens (-1: dropped)
            position = torch.full((S.GRID * S.GRID,), -1, dtype=torch.long)
            position[keep[b]] = torch.arange(keep.shape[1])
        for rc, (fam, ans, _), shape in zip(firsts, fam_list, ground["asked_shapes"][b]):
            if rc is None or ans not in YES_NO or shape is None:
                continue
            mine = [(cells, share) for s_, cells, share in targets if s_ == shape]
            cells = torch.from_numpy(np.concatenate([c for c, _ in mine])) if mine else torch.zeros(0, dtype=torch.long)
            share = torch.from_numpy(np.concatenate([w for _, w in mine])).float() if mine else torch.zeros(0)
            if position is not None:
                cells = position[cells]
                share, cells = share[cells >= 0], cells[cells >= 0]
            share = instance_share(len(mine), target) * share
            logp = torch.log_softmax((q[b, rc[0] * C + rc[1]] @ k[b].T) * scale, -1)
            sink = torch.logsumexp(logp[:n_text], 0)
            term = -(1 - share.sum()) * sink
            if len(cells):
                term = term - (share * logp[n_text:][cells]).sum()
            terms.append(term)
    return torch.stack(terms).mean() if terms else q.sum() * 0.0

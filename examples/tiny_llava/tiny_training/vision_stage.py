"""Stage 1: the CLIP tower learns to see, with dense per-patch and CLS supervision from temporary heads."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsezip_pl.data import synthetic as S
import training_world as W
from tiny_llava import normalize_images, tower_features
from tiny_training.common import cosine, log, save_state


class VisionHeads(nn.Module):
    """Temporary dense heads on the feature layer (patches) and CLS."""

    def __init__(self, width: int, size: bool = False):
        super().__init__()
        ns, nc = len(S.SHAPES), len(S.COLOR_NAMES)
        self.shape = nn.Linear(width, ns + 1)
        self.color = nn.Linear(width, nc + 1)
        self.center = nn.Linear(width, 2)
        self.count = nn.Linear(width, S.MAX_PER_SHAPE + 1)
        self.occ = nn.Linear(width, 49)
        self.row = nn.Linear(width, S.GRID)
        self.col = nn.Linear(width, S.GRID)
        self.cls_present = nn.Linear(width, ns)
        self.cls_pair = nn.Linear(width, ns * nc)
        self.cls_count = nn.Linear(width, ns * (S.MAX_PER_SHAPE + 1))
        if size:  # created only when used, so earlier runs' random draws stay as they were
            self.size = nn.Linear(width, 1)


WINDOW = 12  # crop phase: 12x12-patch windows (168 px), a quarter of the image


def vision_batch(seed: int, start: int, n: int, centre_label: str = "centre"):
    """Rendered (JPEG round-tripped) training images with dense labels (``centre_label``: see
    ``--vision-centre-label``)."""
    imgs, lab = [], {k: [] for k in ("shape", "color", "center", "count", "occ", "size")}
    present, pairs, counts = [], [], []
    ns, nc = len(S.SHAPES), len(S.COLOR_NAMES)
    for i in range(start, start + n):
        rng = S.rng_for(seed, "train", i)
        force = (S.SHAPES[int(rng.integers(ns))], int(rng.integers(1, 4))) if rng.random() < 0.4 else None
        scene = S.sample_scene(rng, force)
        arr, labels = W.render_with_labels(scene)
        owner = W.instance_map(scene)
        area = np.bincount(owner[owner >= 0], minlength=len(scene.objects)).astype(np.float32)
        labels["size"] = np.where(owner >= 0, np.log(np.maximum(area[owner], 1.0)), 0.0).reshape(S.GRID, S.GRID)
        if centre_label != "centre":
            labels["center"] = np.zeros_like(labels["center"])
            labels["center"].flat[W.instance_anchors(scene, "cover" if centre_label == "anchor" else centre_label)] = 1
        imgs.append(W.jpeg_roundtrip(arr))
        for k in lab:
            lab[k].append(labels[k])
        pr, pa, co = np.zeros(ns), np.zeros(ns * nc), np.zeros(ns, np.int64)
        for o in scene.objects:
            si, ci = S.SHAPES.index(o.shape), S.COLOR_NAMES.index(o.color)
            pr[si] = 1
            pa[si * nc + ci] = 1
            co[si] += 1
        present.append(pr)
        pairs.append(pa)
        counts.append(co)
    px = torch.from_numpy(normalize_images(np.stack(imgs)))
    y = {k: torch.from_numpy(np.stack(v)) for k, v in lab.items()}  # [N, 24, 24]
    y["present"] = torch.tensor(np.stack(present), dtype=torch.float32)
    y["pair"] = torch.tensor(np.stack(pairs), dtype=torch.float32)
    y["cls_count"] = torch.from_numpy(np.stack(counts))
    return px, y


def crop_batch(px, y, rng: np.random.Generator, crops_per_image: int = 2):
    """Random 12x12-patch windows of each image, with their patch labels and grid indices."""
    P = S.PATCH
    xs, ys, idx = [], {k: [] for k in ("shape", "color", "center", "occ", "size")}, []
    for i in range(px.shape[0]):
        for _ in range(crops_per_image):
            r0, c0 = (int(v) for v in rng.integers(0, S.GRID - WINDOW + 1, 2))
            xs.append(px[i, :, r0 * P:(r0 + WINDOW) * P, c0 * P:(c0 + WINDOW) * P])
            for k in ys:
                ys[k].append(y[k][i, r0:r0 + WINDOW, c0:c0 + WINDOW])
            rows = torch.arange(r0, r0 + WINDOW)[:, None] * S.GRID + torch.arange(c0, c0 + WINDOW)[None]
            idx.append(rows.flatten())
    return torch.stack(xs), {k: torch.stack(v) for k, v in ys.items()}, torch.stack(idx)


def tower_window(model, px_crop, grid_idx):
    """Feature-layer hidden states of crops, with the position embeddings of their grid cells."""
    vt = model.model.vision_tower
    emb = vt.embeddings
    patches = emb.patch_embedding(px_crop.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
    pos = emb.position_embedding.weight
    cls = (emb.class_embedding + pos[0]).expand(px_crop.shape[0], 1, -1)
    h = torch.cat([cls, patches + pos[1 + grid_idx]], 1)
    h = vt.pre_layrnorm(h)
    for layer in vt.encoder.layers[:-1]:
        h = layer(h, None)
    return h


def vision_losses(model, heads: VisionHeads, px, y, grid_idx=None, count_weight: float = 1.0,
                  size_weight: float = 0.0, centre_weight: float = 1.0):
    """Dense losses; full images (all heads) or crops (``grid_idx``: patch heads + crop presence).

    Counts are trained on full images only: a crop cannot see how many objects the scene holds.
    """
    full = grid_idx is None
    h = (tower_features(model, px, with_cls=True) if full else tower_window(model, px, grid_idx)).float()
    cls, p = h[:, 0], h[:, 1:]
    ns = len(S.SHAPES)
    ys = {k: y[k].flatten(1, 2) for k in ("shape", "color", "center", "occ")}
    obj = (ys["shape"] > 0).float()
    w = 1.0 + 5.0 * obj  # objects are a small fraction of the patches
    ce = lambda logits, t: (F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none")  # noqa: E731
                            * w.flatten()).sum() / w.sum()
    if grid_idx is None:
        grid_idx = torch.arange(S.GRID * S.GRID).expand(px.shape[0], -1)
    losses = {
        "shape": ce(heads.shape(p), ys["shape"]),
        "color": ce(heads.color(p), ys["color"]),
        "center": centre_weight * F.cross_entropy(heads.center(p).flatten(0, 1), ys["center"].flatten(),
                                                  weight=torch.tensor([1.0, 10.0])),
        "occ": F.binary_cross_entropy_with_logits(heads.occ(p), ys["occ"]),
        "rowcol": 0.2 * (F.cross_entropy(heads.row(p).flatten(0, 1), (grid_idx // S.GRID).flatten())
                         + F.cross_entropy(heads.col(p).flatten(0, 1), (grid_idx % S.GRID).flatten())),
    }
    if size_weight > 0:
        size = y["size"].flatten(1, 2).float()
        losses["size"] = size_weight * (((heads.size(p)[..., 0] - size) ** 2) * obj).sum() / obj.sum().clamp(min=1)
    if full:
        count = y["count"].flatten(1)
        losses["count"] = count_weight * ce(heads.count(p), count)
        losses["cls"] = (F.binary_cross_entropy_with_logits(heads.cls_present(cls), y["present"])
                         + F.binary_cross_entropy_with_logits(heads.cls_pair(cls), y["pair"])
                         + count_weight * F.cross_entropy(
                             heads.cls_count(cls).view(-1, ns, S.MAX_PER_SHAPE + 1).flatten(0, 1),
                             y["cls_count"].clamp(max=S.MAX_PER_SHAPE).flatten()))
    else:  # CLS of a crop: which shapes have patches inside it
        present = torch.zeros(px.shape[0], ns + 1).scatter_(1, ys["shape"], 1.0)[:, 1:]
        losses["cls"] = F.binary_cross_entropy_with_logits(heads.cls_present(cls), present)
    with torch.no_grad():
        on = ys["shape"] > 0
        acc = {
            "shape": (heads.shape(p).argmax(-1)[on] == ys["shape"][on]).float().mean().item(),
            "color": (heads.color(p).argmax(-1)[on] == ys["color"][on]).float().mean().item(),
        }
        marked, truth = heads.center(p).argmax(-1) == 1, ys["center"] == 1
        hits = (marked & truth).sum()
        acc["centre_f1"] = (2 * hits / (marked.sum() + truth.sum()).clamp(min=1)).item()
        if size_weight > 0:
            acc["size_abs_err"] = (heads.size(p)[..., 0] - y["size"].flatten(1, 2))[on].abs().mean().item()
        if full:
            acc["count"] = (heads.count(p).argmax(-1)[on] == count[on]).float().mean().item()
            acc["present"] = ((heads.cls_present(cls) > 0).float() == y["present"]).float().mean().item()
    return losses, acc


def train_vision(model, args, state_path: Path, state: dict | None, crop_steps: int, full_steps: int,
                 data_offset: int = 0, stage: str = "vision", carry: dict | None = None):
    """Crop phase (cheap: 144-patch windows) then full-image phase (counts and CLS need the whole image).

    ``data_offset`` shifts the training images so a refresh of a trained tower sees new scenes;
    ``stage`` names the saved state and ``carry`` is saved along with it (times of earlier stages).
    """
    heads = VisionHeads(args.vision_width, size=args.vision_size_weight > 0)
    prior = 0.0
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.05, betas=(0.9, 0.98))
    start = 0
    if state and state.get("stage") == stage and state.get("heads") is not None:
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        prior = state.get("elapsed", 0.0)
        log(f"vision: resumed at step {start}")
    model.train()
    eval_px, eval_y = vision_batch(args.eval_seed + 1000, 0, 32, args.vision_centre_label)
    total = crop_steps + full_steps
    t_start = time.time()
    for step in range(start, total):
        for g in opt.param_groups:
            g["lr"] = args.vision_lr * cosine(step, total, min(60, total // 10))
        crop = step < crop_steps
        px, y = vision_batch(args.seed, data_offset + step * args.vision_batch, args.vision_batch,
                             args.vision_centre_label)
        idx = None
        if crop:
            px, y, idx = crop_batch(px, y, np.random.default_rng([args.seed, step]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            losses, acc = vision_losses(model, heads, px, y, idx, args.vision_count_weight, args.vision_size_weight,
                                        args.vision_centre_weight)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == total - 1:
            parts = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            accs = " ".join(f"{k}={v:.2f}" for k, v in acc.items())
            rate = (time.time() - t_start) / (step + 1 - start)
            log(f"vision {'crop' if crop else 'full'} step {step:4d} loss={loss.item():.3f} ({parts}) "
                f"train-acc {accs} ({rate:.2f} s/step)")
        if (step + 1) % args.vision_save_every == 0 or step == total - 1:
            model.eval()
            with torch.no_grad():
                _, acc = vision_losses(model, heads, eval_px, eval_y, size_weight=args.vision_size_weight)
            model.train()
            log("vision held-out patch/CLS accuracy: " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
            save_state(state_path, stage=stage, step=step + 1, model=model.state_dict(),
                       heads=heads.state_dict(), opt=opt.state_dict(), elapsed=prior + time.time() - t_start,
                       **(carry or {}))
    return prior + time.time() - t_start

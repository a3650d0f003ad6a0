"""Stage 2: projector + LLM learn to answer (with the auxiliary losses); the tower is frozen unless
``--tower-lr`` trains it too, end to end."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tiny_llava import Tokenized, shared_prefix_hidden, tower_features
from tiny_training.auxiliary_losses import (
    RouteHeads,
    counting_loss,
    grounding_loss,
    keep_loss,
    readout_loss,
    routing_loss,
)
from tiny_training.common import cosine, log, save_state
from tiny_training.language_data import YES_NO, lm_batch


def lm_forward(model, tz: Tokenized, px, packed, keep=None, fams=None, ground=None, aux_weight: float = 0.0,
               count_weight: float = 0.0, family_weights: dict | None = None, route=None, route_weight: float = 0.0,
               parts: dict | None = None, readout_weight: float = 0.0, shape_only: bool = False,
               keep_weight: float = 0.0, count_heads: tuple[int, ...] = (1,), count_target: str = "linear",
               isolate_count_heads: bool = False):
    ids, pos, seg, labels, answer_at = packed
    tower_trains = model.model.vision_tower.embeddings.patch_embedding.weight.requires_grad  # --tower-lr
    with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
        feats = tower_features(model, px)
    n_text = len(tz.prefix)
    prefix_pos = None
    if keep is not None:  # curriculum: a subset of the visual tokens, at their own positions
        feats = torch.gather(feats, 1, keep[..., None].expand(-1, -1, feats.shape[-1]))
        prefix_pos = torch.cat([torch.arange(n_text).expand(px.shape[0], -1), n_text + keep], 1)
    img = model.model.multi_modal_projector(feats)
    embed = model.model.language_model.embed_tokens
    prefix = torch.cat([embed(torch.tensor([tz.prefix])).expand(px.shape[0], -1, -1), img.to(embed.weight.dtype)], 1)
    capture = {} if max(aux_weight, count_weight, route_weight, readout_weight, keep_weight) > 0 else None
    hidden = shared_prefix_hidden(model, prefix, embed(ids), pos, seg, prefix_pos, capture,
                                  count_heads if isolate_count_heads and count_weight > 0 else ())
    sel = labels != -100
    logits = model.lm_head(hidden[sel]).float()
    if family_weights:
        weight = torch.ones(labels.shape)
        for b, (firsts, fam_list) in enumerate(zip(answer_at, fams)):
            for rc, (fam, ans, _) in zip(firsts, fam_list):
                if rc is not None and ans in YES_NO:
                    weight[b, rc[0], rc[1]] = family_weights.get(fam, 1.0)
        weight = weight[sel]
        loss = (F.cross_entropy(logits, labels[sel], reduction="none") * weight).sum() / weight.sum()
    else:
        loss = F.cross_entropy(logits, labels[sel])
    terms = {"lm": loss}
    if aux_weight > 0:
        terms["ground"] = aux_weight * grounding_loss(capture, packed, fams, ground, keep, n_text, ids.shape[2],
                                                      shape_only)
    if count_weight > 0:
        terms["count"] = count_weight * sum(counting_loss(capture, packed, fams, ground, keep, n_text, ids.shape[2], h,
                                                          count_target) for h in count_heads) / len(count_heads)
    if route_weight > 0:
        terms["route"] = route_weight * routing_loss(route, capture, packed, fams, ground, ids.shape[2])
    if readout_weight > 0:
        terms["readout"] = readout_weight * readout_loss(route, capture, packed, fams, ground, ids.shape[2])
    if keep_weight > 0:
        terms["keep"] = keep_weight * keep_loss(route, capture, ground, keep, n_text)
    if parts is not None:
        for k, v in terms.items():
            parts.setdefault(k, []).append(v.item())
    return sum(terms.values()), hidden


def curriculum_tokens(step: int, args):
    """Visual tokens fed at ``step``: few (objects first) early, ramping up to all 576."""
    if step < args.curriculum_steps:
        return args.curriculum_tokens
    t = (step - args.curriculum_steps) / max(1, args.curriculum_ramp)
    if t >= 1 or args.curriculum_ramp <= 0:
        return None
    return int(args.curriculum_tokens + t * (576 - args.curriculum_tokens))


def subset_tokens(step: int, args):
    """Visual tokens fed at ``step`` after the curriculum: all 576, or with probability
    ``--p-subset`` (drawn from the step, so a resumed run draws the same) one of ``--subset-tokens``
    (objects first, at their original positions), so the LLM also learns to answer from a kept
    subset."""
    n_keep = curriculum_tokens(step, args)
    if n_keep is not None or args.p_subset <= 0:
        return n_keep
    rng = np.random.default_rng([args.seed, step, 11])
    return int(rng.choice(args.subset_tokens)) if rng.random() < args.p_subset else None


def yes_no_accuracy(model, hidden, packed, fams, yes_id: int, no_id: int, into: dict) -> None:
    """First-answer-token accuracy (Yes vs No logit) per family, accumulated into ``into``."""
    answer_at = packed[4]
    with torch.no_grad():
        for b, (firsts, fam_list) in enumerate(zip(answer_at, fams)):
            for rc, (fam, ans, _) in zip(firsts, fam_list):
                if ans not in YES_NO:
                    continue
                lg = model.lm_head(hidden[b, rc[0], rc[1]]).float()
                pred = "Yes" if lg[yes_id] > lg[no_id] else "No"
                into.setdefault(fam, []).append(pred == ans)


def quick_eval(model, tz, args, stats, n_images: int = 48) -> dict:
    """Held-out first-token accuracy per family (fresh scenes from the eval seed)."""
    model.eval()
    yes_id, no_id = (tz.tok.convert_tokens_to_ids("▁" + w) for w in YES_NO)
    accs: dict = {}
    with torch.no_grad():
        for start in range(0, n_images, 8):
            px, packed, fams, _, _ = lm_batch(tz, args.eval_seed, start, 8, args, stats, purpose="extra")
            _, hidden = lm_forward(model, tz, px, packed)
            yes_no_accuracy(model, hidden, packed, fams, yes_id, no_id, accs)
    model.train()
    return {k: float(np.mean(v)) for k, v in sorted(accs.items())}


def train_lm(model, tz: Tokenized, args, stats, state_path: Path, state: dict | None, vision_time: float):
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    if args.tower_lr > 0:  # the layers the features come from (the last one feeds nothing)
        tower.embeddings.requires_grad_(True)
        tower.pre_layrnorm.requires_grad_(True)
        tower.encoder.layers[:-1].requires_grad_(True)
    text = model.config.text_config
    route = RouteHeads(text.hidden_size, text.hidden_size // text.num_attention_heads)
    if state and state.get("route") is not None:
        route.load_state_dict(state["route"])
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    if max(args.route_weight, args.readout_weight, args.keep_weight) > 0:
        params += list(route.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    tower_params = [p for p in tower.parameters() if p.requires_grad]
    if tower_params:
        groups.append({"params": tower_params, "weight_decay": 0.01})
        params += tower_params
    peak_lrs = [args.lm_lr, args.lm_lr, args.tower_lr][:len(groups)]
    opt = torch.optim.AdamW(groups, lr=args.lm_lr, betas=(0.9, 0.98))
    start, prior = 0, 0.0
    if state and state.get("stage") == "language" and state.get("opt") is not None:
        opt.load_state_dict(state["opt"])
        start = state["step"]
        prior = state.get("elapsed", 0.0)
        log(f"language: resumed at step {start}")
    yes_id, no_id = (tz.tok.convert_tokens_to_ids("▁" + w) for w in YES_NO)
    family_weights = {k: float(v) for k, v in (kv.split("=") for kv in args.family_weights.split(",") if kv)}
    model.train()
    t_start = time.time()
    window: dict = {}
    losses = []
    parts: dict = {}
    for step in range(start, args.lm_steps):
        for g, peak in zip(opt.param_groups, peak_lrs):
            g["lr"] = peak * cosine(step, args.lm_steps, args.lm_warmup)
        n_keep = subset_tokens(step, args)
        px, packed, fams, keep, ground = lm_batch(tz, args.seed, step * args.lm_batch, args.lm_batch, args, stats,
                                                  n_keep=n_keep)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            loss, hidden = lm_forward(model, tz, px, packed, keep, fams, ground, args.grounding_weight,
                                      args.count_grounding_weight, family_weights, route, args.route_weight, parts,
                                      args.readout_weight, bool(args.ground_shape_only), args.keep_weight,
                                      args.count_heads, args.count_target, bool(args.isolate_count_heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        yes_no_accuracy(model, hidden.detach(), packed, fams, yes_id, no_id, window)
        if (step + 1) % 25 == 0:
            accs = " ".join(f"{k}={np.mean(v):.2f}" for k, v in sorted(window.items()))
            rate = (time.time() - t_start) / (step + 1 - start)
            log(f"lm step {step + 1:5d} visual tokens {n_keep or 576} loss={np.mean(losses):.4f} "
                f"({' '.join(f'{k}={np.mean(v):.3f}' for k, v in parts.items())}) "
                f"lr={opt.param_groups[0]['lr']:.2e} "
                f"train-acc {accs} ({rate:.2f} s/step)")
            window, losses, parts = {}, [], {}
        if (step + 1) % args.eval_every == 0 or step == args.lm_steps - 1:
            qe = quick_eval(model, tz, args, stats)
            log("lm held-out first-token acc: " + " ".join(f"{k}={v:.3f}" for k, v in qe.items()))
            save_state(state_path, stage="language", step=step + 1, model=model.state_dict(),
                       opt=opt.state_dict(), route=route.state_dict(), elapsed=prior + time.time() - t_start,
                       vision_time=vision_time, earlier_attempt=(state or {}).get("earlier_attempt", 0.0))
    return prior + time.time() - t_start

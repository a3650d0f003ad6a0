"""Shared pieces of the training script: the model it builds, its schedule, logging and saving."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from sparsezip_pl.data import synthetic as S
from tiny_llava import llava_config

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{(time.time() - T0) / 60:6.2f} min] {msg}", flush=True)


def build(args, processor):
    tok = processor.tokenizer
    vision = dict(hidden_size=args.vision_width, intermediate_size=4 * args.vision_width,
                  num_hidden_layers=args.vision_layers, num_attention_heads=4, hidden_act="quick_gelu")
    text = dict(hidden_size=args.lm_width, intermediate_size=int(round(args.lm_width * 8 / 3 / 16)) * 16,
                num_hidden_layers=args.lm_layers, num_attention_heads=args.lm_heads,
                num_key_value_heads=args.lm_heads, rms_norm_eps=1e-5, hidden_act="silu")
    cfg = llava_config(tok, processor.image_token_id, vision, text)
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(cfg)
    init_position_embeddings(model)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def init_position_embeddings(model, scale: float = 0.5) -> None:
    """Start the tower's (learned) patch position embeddings from a 2D sine-cosine code, so
    attention can find neighbouring patches from the first step."""
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    width = emb.shape[1]
    q = width // 4
    freqs = 1.0 / (100.0 ** (torch.arange(q) / q))
    grid = torch.arange(S.GRID, dtype=torch.float32)
    r, c = torch.meshgrid(grid, grid, indexing="ij")
    parts = [f(r.flatten()[:, None] * freqs) for f in (torch.sin, torch.cos)] + \
            [f(c.flatten()[:, None] * freqs) for f in (torch.sin, torch.cos)]
    with torch.no_grad():
        emb[1:, : 4 * q] = scale * torch.cat(parts, 1)
        emb[0].zero_()


def grown_state(model, state: dict, n_new: int) -> dict:
    """``state`` of a model with ``n_new`` fewer LLM layers, mapped onto ``model``: the old last
    layer stays last, the new layers sit just before it and start as the identity (their attention
    output and MLP down projections are zero), so the grown model computes what the old one did."""
    prefix = "model.language_model.layers."
    n = model.config.text_config.num_hidden_layers
    old_n = n - n_new
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    fresh = model.state_dict()
    for k, v in state.items():
        if k.startswith(prefix):
            i, rest = k[len(prefix):].split(".", 1)
            j = int(i) if int(i) < old_n - 1 else n - 1
            out[f"{prefix}{j}.{rest}"] = v
    for j in range(old_n - 1, n - 1):
        for k, v in fresh.items():
            if k.startswith(f"{prefix}{j}."):
                zero = k.endswith("self_attn.o_proj.weight") or k.endswith("mlp.down_proj.weight")
                out[k] = torch.zeros_like(v) if zero else v.clone()
    return out


def reinit_heads(model, state: dict, heads: tuple[int, ...], seed: int) -> dict:
    """``state`` with the query and key projections of ``heads`` in the last LLM layer drawn afresh
    (normal, the config's ``initializer_range``): those heads forget where they looked, the rest of
    the model (their value and output projections included) is kept."""
    cfg = model.config.text_config
    if cfg.num_key_value_heads != cfg.num_attention_heads:  # grouped keys are shared by several heads
        raise ValueError("redrawing a head's keys needs one key head per query head, got "
                         f"{cfg.num_key_value_heads} key heads for {cfg.num_attention_heads} query heads")
    last = f"model.language_model.layers.{cfg.num_hidden_layers - 1}.self_attn."
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for proj in ("q_proj", "k_proj"):
        weight = state[last + proj + ".weight"].clone()
        for h in heads:
            rows = slice(h * cfg.head_dim, (h + 1) * cfg.head_dim)
            weight[rows] = torch.randn(weight[rows].shape, generator=gen) * cfg.initializer_range
        out[last + proj + ".weight"] = weight
    return out


def param_counts(model) -> dict:
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"total": n(model), "vision_tower": n(model.model.vision_tower),
            "projector": n(model.model.multi_modal_projector),
            "language_model": n(model.model.language_model) + n(model.lm_head)}


def cosine(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def save_state(path: Path, **state) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)

"""Building blocks of the tiny LLaVA-1.5 (llava-hf layout): tokenizer, processor, configs."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsezip_pl.models.tiny import CLIP_MEAN, CLIP_STD, clip_image_processor

# LLaVA-1.5 (vicuna_v1) conversation format, as llava-hf's template renders it:
#   USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:
# The user turn and the generation prompt are exactly llava-hf/llava-1.5-7b-hf's; an assistant turn
# ends with </s> (the original LLaVA training format, sep2="</s>"), where llava-hf's inference
# template ends it with a space. {% generation %} marks the assistant tokens for loss masks.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + '</s>' }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_processor(texts, folder: str | os.PathLike, vocab_size: int = 640):
    """Train the tokenizer on ``texts`` and assemble a LlavaProcessor (saved to ``folder``)."""
    from transformers import LlavaProcessor

    from sparsezip_pl.models.tokenizer import build_llama_tokenizer

    folder = Path(folder)
    tok = build_llama_tokenizer(texts, folder / "_tokenizer", vocab_size=vocab_size)
    image_processor = clip_image_processor(336)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return processor


def user_turn(text: str, image: bool = True) -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def llava_config(tokenizer, image_token_id: int, vision: dict, text: dict):
    """LlavaConfig with a CLIP tower (336/14 -> 576 patches) and a LLaMA LLM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vcfg = CLIPVisionConfig(image_size=336, patch_size=14, num_channels=3, **vision)
    tcfg = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **text,
    )
    return LlavaConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=576,
        multimodal_projector_bias=True,
    )


# ----------------------------------------------------------------------------- fast training paths
#
# Two shortcuts make CPU training affordable; both are checked against the stock forward of
# LlavaForConditionalGeneration (``check_fast_paths``, run by the training script and the tests):
# - the tower runs only up to the feature layer (-2); the last layer never feeds LLaVA;
# - prefix sharing: an image's tokens  [BOS USER: ▁ <576 image tokens>]  come before any question
#   and attention is causal, so the prefix is computed once per image and each of its questions
#   ("items": the tokens after the image, through the answer) attends to the shared prefix keys
#   plus its own earlier tokens. Items are packed into rows (a block-causal mask keeps them apart;
#   each item's positions restart right after the prefix). In the last layer the prefix only
#   needs keys and values. This equals running every [prefix | item] sequence separately.


def tower_features(model, pixel_values, with_cls: bool = False):
    """Hidden states of the vision feature layer (-2): CLS + 576 patches, or patches only."""
    vt = model.model.vision_tower
    h = vt.pre_layrnorm(vt.embeddings(pixel_values))
    for layer in vt.encoder.layers[:-1]:
        h = layer(h, None)
    return h if with_cls else h[:, 1:]


def shared_prefix_hidden(model, prefix_emb, row_emb, row_pos, row_seg, prefix_pos=None, capture=None,
                         pattern_detached_heads: tuple[int, ...] = ()):
    """LLM hidden states (after the final norm) of packed item rows.

    prefix_emb [B, P, D]; row_emb [B, R, C, D]; row_pos [B, R, C] absolute positions;
    row_seg [B, R, C] item number inside the row (0 = padding); prefix_pos [B, P] positions of
    the prefix tokens (default 0..P-1; a subset of the image tokens keeps its own). Returns [B, R, C, D].
    ``capture`` (a dict) receives the last layer's row queries [B, H, R*C, hd], prefix keys
    [B, H, P, hd], normalized row and prefix inputs [B, R*C, D], [B, P, D] the heads' outputs [B, H, R*C, hd] and the normalized rows after attention (for losses on where the answer looks and
    on what it knows of the question). ``pattern_detached_heads``: last-layer heads whose attention
    pattern gets no gradient from this forward's output (their queries and keys are detached there;
    the captured ones are not, so only losses on ``capture`` decide where those heads look).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    B, P, D = prefix_emb.shape
    R, C = row_emb.shape[1:3]
    attn0 = lm.layers[0].self_attn
    H, hd = D // attn0.head_dim, attn0.head_dim
    cos_p, sin_p = lm.rotary_emb(prefix_emb, torch.arange(P)[None] if prefix_pos is None else prefix_pos)
    cos_r, sin_r = lm.rotary_emb(row_emb, row_pos.reshape(B, R * C))
    # items of an image attend to its prefix (all of it) and, inside their row, causally to themselves
    same = (row_seg[..., :, None] == row_seg[..., None, :]) & (torch.arange(C)[:, None] >= torch.arange(C)[None, :])
    eye_r = torch.eye(R, dtype=torch.bool)
    within = (eye_r[None, :, None, :, None] & same[:, :, :, None, :]).reshape(B, R * C, R * C)
    mask = torch.cat([torch.ones(B, R * C, P, dtype=torch.bool), within], -1)[:, None]
    hp, hr = prefix_emb, row_emb.reshape(B, R * C, D)

    def heads(x):  # [B, T, D] -> [B, H, T, hd]
        return x.view(x.shape[0], x.shape[1], H, hd).transpose(1, 2)

    for li, layer in enumerate(lm.layers):
        attn = layer.self_attn
        xp = layer.input_layernorm(hp)
        kp, vp = heads(attn.k_proj(xp)), heads(attn.v_proj(xp))
        xr = layer.input_layernorm(hr)
        qr, kr, vr = heads(attn.q_proj(xr)), heads(attn.k_proj(xr)), heads(attn.v_proj(xr))
        qr, kr = apply_rotary_pos_emb(qr, kr, cos_r, sin_r)
        if li < len(lm.layers) - 1:  # the prefix itself moves on (not needed after the last layer)
            qp = heads(attn.q_proj(xp))
            qp, kp = apply_rotary_pos_emb(qp, kp, cos_p, sin_p)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=attn.scaling)
            hp_next = hp + attn.o_proj(op.transpose(1, 2).reshape(B, P, D))
            hp_next = hp_next + layer.mlp(layer.post_attention_layernorm(hp_next))
        else:
            _, kp = apply_rotary_pos_emb(kp, kp, cos_p, sin_p)
            hp_next = None
        if capture is not None and li == len(lm.layers) - 1:
            capture.update(q=qr, k=kp, scale=attn.scaling, x=xr, prefix_x=xp)
        qa, ka = qr, torch.cat([kp, kr], 2)
        if pattern_detached_heads and li == len(lm.layers) - 1:
            detached = torch.zeros(H, dtype=torch.bool)
            detached[list(pattern_detached_heads)] = True
            detached = detached[None, :, None, None]
            qa, ka = torch.where(detached, qa.detach(), qa), torch.where(detached, ka.detach(), ka)
        o = F.scaled_dot_product_attention(qa, ka, torch.cat([vp, vr], 2), attn_mask=mask, scale=attn.scaling)
        hr = hr + attn.o_proj(o.transpose(1, 2).reshape(B, R * C, D))
        post = layer.post_attention_layernorm(hr)
        if capture is not None and li == len(lm.layers) - 1:
            capture.update(post_attention=post, head_out=o)
        hr = hr + layer.mlp(post)
        hp = hp_next
    return lm.norm(hr).reshape(B, R, C, D)


class Tokenized:
    """Token ids of conversations in the chat template, split at the image.

    ``prefix`` is the token list before the image (BOS USER: ▁); an item is the token list after
    the 576 image tokens, with a 0/1 list marking the assistant tokens (loss targets).
    """

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_id = processor.image_token_id
        ids = self.tok(self.render([("Q", None)], True)).input_ids
        cut = ids.index(self.image_id)
        self.prefix = ids[:cut]
        self._cache: dict = {}

    def render(self, turns, generation_prompt: bool) -> str:
        msgs = []
        for i, (q, a) in enumerate(turns):
            msgs.append(user_turn(q, image=(i == 0)))
            if a is not None:
                msgs.append(assistant_turn(a))
        return self.processor.apply_chat_template(msgs, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok(text).input_ids
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def item(self, turns):
        """(ids after the image, loss mask) for a conversation ``[(question, answer), ...]``."""
        full = self._ids(self.render(turns, False))
        mask = [0] * len(full)
        for k in range(len(turns)):
            prompt = self._ids(self.render(turns[:k] + [(turns[k][0], None)], True))
            done = self._ids(self.render(turns[: k + 1], False))
            assert full[: len(done)] == done and done[: len(prompt)] == prompt, "tokenization drift"
            for t in range(len(prompt), len(done)):
                mask[t] = 1
        cut = full.index(self.image_id) + 1
        assert full[:cut - 1] == self.prefix
        return full[cut:], mask[cut:]


def pack_rows(items_per_image, P: int, pad_id: int, capacity: int = 96):
    """Pack each image's items (first-fit, longest first) into rows of ``capacity`` tokens.

    Returns ids, positions, segments, labels (all [B, R, C]; label -100 = no loss; the label at a
    position is the next token, where that token is an answer token) and, per image, the
    (row, column) where each item's first answer token is predicted (None if no answer).
    """
    B = len(items_per_image)
    layouts = []
    for items in items_per_image:
        rows: list[list[int]] = []  # item indices per row
        fill: list[int] = []
        for j in sorted(range(len(items)), key=lambda j: -len(items[j][0])):
            n = len(items[j][0])
            r = next((r for r in range(len(rows)) if fill[r] + n <= max(capacity, n)), None)
            if r is None:
                rows.append([])
                fill.append(0)
                r = len(rows) - 1
            rows[r].append(j)
            fill[r] += n
        layouts.append((rows, fill))
    R = max(len(rows) for rows, _ in layouts)
    C = max(max(fill) for _, fill in layouts)
    ids = torch.full((B, R, C), pad_id, dtype=torch.long)
    pos = torch.full((B, R, C), P, dtype=torch.long)
    seg = torch.zeros((B, R, C), dtype=torch.long)
    labels = torch.full((B, R, C), -100, dtype=torch.long)
    answer_at = []
    for b, (items, (rows, _)) in enumerate(zip(items_per_image, layouts)):
        firsts = [None] * len(items)
        for r, members in enumerate(rows):
            t = 0
            for k, j in enumerate(members, start=1):
                item_ids, item_mask = items[j]
                n = len(item_ids)
                ids[b, r, t: t + n] = torch.tensor(item_ids)
                pos[b, r, t: t + n] = torch.arange(P, P + n)
                seg[b, r, t: t + n] = k
                for i in range(1, n):
                    if item_mask[i]:
                        labels[b, r, t + i - 1] = item_ids[i]
                        if firsts[j] is None:
                            firsts[j] = (r, t + i - 1)
                t += n
        answer_at.append(firsts)
    return ids, pos, seg, labels, answer_at


def check_fast_paths(model, processor, image, turns, atol: float = 1e-4) -> float:
    """Max |logit difference| between the shared-prefix fast path and the stock HF forward."""
    import numpy as np

    tz = Tokenized(processor)
    item = tz.item(turns)
    short = tz.item([("Is there a star in the image?", "Yes")])
    with torch.no_grad():
        text = tz.render(turns, False)
        inputs = processor(images=image, text=text, return_tensors="pt")
        ref = model(**inputs).logits[0]
        px = torch.from_numpy(normalize_images(np.asarray(image)[None]))
        assert torch.allclose(px, inputs["pixel_values"], atol=1e-5), "pixel normalization differs"
        feats = model.model.multi_modal_projector(tower_features(model, px))
        embed = model.model.language_model.embed_tokens
        prefix = torch.cat([embed(torch.tensor([tz.prefix])), feats], 1)
        # the item twice, packed with a short one, so rows hold several items
        ids, pos, seg, _, _ = pack_rows([[short, item, item]], prefix.shape[1], 0, capacity=len(item[0]) + len(short[0]))
        hidden = shared_prefix_hidden(model, prefix, embed(ids), pos, seg)
        logits = model.lm_head(hidden)[0]
        n = len(item[0])
        r = ref[-n:]
        err, found = 0.0, 0
        for row in range(ids.shape[1]):
            for start in range(ids.shape[2] - n + 1):
                if ids[0, row, start: start + n].tolist() == item[0] and seg[0, row, start] > 0:
                    err = max(err, (logits[row, start: start + n] - r).abs().max().item())
                    found += 1
    assert found == 2 and err < atol, f"fast path differs from the stock forward by {err} ({found} found)"
    return err


def normalize_images(arr):
    """uint8 [N, H, W, 3] -> CLIP-normalized float32 [N, 3, H, W] (== the processor for 336x336)."""
    import numpy as np

    x = arr.astype(np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

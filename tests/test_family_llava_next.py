"""LLaVA-NeXT (1.6) in both codes: transformers' ``llava-next`` and the original code's
``llava-next-original``, on tiny random-weight checkpoints (56 px views: 4 x 4 patches, up to 5 views)."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from sparsezip_pl.api import build_config, sparsezip, unwrap
from sparsezip_pl.compress import CompressorConfig
from sparsezip_pl.models import CompressedLlava, detect_family, load_family
from sparsezip_pl.models.families import get_family
from sparsezip_pl.models.families.llava import cache_kwarg_compat
from sparsezip_pl.models.tiny import cached_tiny_llava, cached_tiny_llava_next, synthetic_samples

FAMILIES = ["llava-next", "llava-next-original"]
# (height, width): 2x2 crops unpadded to 4 x 8 patches (52 stock tokens); 3x1 crops, 10 x 4 (66);
# 1x3 crops, 2 x 12 (42); 2x2 crops of a square (16 + 8 * 9 = 88).
SIZES = [(60, 100), (130, 50), (40, 170), (90, 90)]


def _sample(index: int, size: tuple[int, int], seed: int = 0) -> dict:
    rng = np.random.RandomState(seed + index)
    height, width = size
    pixels = (rng.rand(height, width, 3) * 255).astype("uint8")
    pixels[: height // 2, : width // 3] = rng.randint(0, 255, 3)  # some structure for the attention
    sample = synthetic_samples(1, seed=index)[0]
    return {**sample, "sample_id": f"next-{index}", "image": Image.fromarray(pixels)}


SAMPLES = [_sample(i, size) for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return load_family(request.param, cached_tiny_llava_next(request.param, image_size=56))


def _processor(family):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(family.model.name_or_path)
    processor.tokenizer.padding_side = "left"
    return processor


def _stock_inputs(family, samples):
    """What a user of the stock model passes to ``generate`` / ``forward`` (the family's own padding)."""
    if family.family == "llava-next":
        processor = _processor(family)
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"]}]}],
                add_generation_prompt=True,
            )
            for s in samples
        ]
        return dict(processor(images=[s["image"] for s in samples], text=prompts, padding=True, return_tensors="pt"))
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    ids = []
    for s in samples:
        conv = conv_templates["vicuna_v1"].copy()
        conv.append_message(conv.roles[0], "<image>\n" + s["question"])
        conv.append_message(conv.roles[1], None)
        ids.append(tokenizer_image_token(conv.get_prompt(), family.tokenizer, return_tensors="pt"))
    length = max(len(i) for i in ids)
    input_ids = torch.stack([torch.cat([i, i.new_zeros(length - len(i))]) for i in ids])  # right padding
    attention_mask = torch.stack([torch.arange(length) < len(i) for i in ids]).long()
    images = process_images([s["image"] for s in samples], family.image_processor, family.model.config)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "images": images,
            "image_sizes": [s["image"].size for s in samples]}


def _stock_forward(family, inputs):
    """The stock forward's logits and the attention mask of the sequence they belong to."""
    with torch.no_grad(), cache_kwarg_compat(family.model):
        logits = family.model(**inputs).logits
        if family.family == "llava-next":
            return logits, inputs["attention_mask"]
        # The original code expands the placeholders itself (right-padded): its own mask.
        mask = family.model.prepare_inputs_labels_for_multimodal(
            inputs["input_ids"], None, inputs["attention_mask"], None, None, inputs["images"], inputs["image_sizes"]
        )[2]
        return logits, mask


def _stock_generate(family, inputs, new_tokens):
    with torch.no_grad(), cache_kwarg_compat(family.model):
        if family.family == "llava-next":
            out = family.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            return out[:, inputs["input_ids"].shape[1]:]
        inputs = dict(inputs)
        return family.model.generate(inputs.pop("input_ids"), max_new_tokens=new_tokens, do_sample=False, **inputs)


def _real_logits(logits, mask):
    return [row[m.bool()] for row, m in zip(logits, mask)]


# ------------------------------------------------------------------------------------ the family
def test_detection_picks_each_stock_model_its_family(family):
    assert detect_family(family.model) == family.family
    assert get_family(family.family).matches(family.model)
    others = {"hf", "llava", "llava-next", "llava-next-original"} - {family.family}
    assert not any(get_family(name).matches(family.model) for name in others)
    # LLaVA-1.5 checkpoints of both codes keep their families.
    for name in ("hf", "llava"):
        assert detect_family(load_family(name, cached_tiny_llava(name)).model) == name


def test_the_other_code_refuses_the_wrong_checkpoint():
    original = load_family("llava-next-original", cached_tiny_llava_next("llava-next-original", image_size=56))
    with pytest.raises(ValueError, match="llava-next-original"):
        get_family("llava")(original.model, original.tokenizer)
    old = load_family("llava", cached_tiny_llava("llava"))
    with pytest.raises(ValueError, match="anyres"):
        get_family("llava-next-original")(old.model, old.tokenizer)


def test_geometry_and_stock_token_counts(family):
    assert family.num_patches == 16 and family.max_views == 5
    assert family.max_stock_tokens == 16 + 8 * 9  # the 2x2 crop map without letterbox
    assert [family.stock_tokens(size) for size in SIZES] == [52, 66, 42, 88]
    assert get_family(family.family).patch_count(family.model.name_or_path) == 16 * 5


def test_method_none_equals_the_stock_model(family):
    """Logits (float32, atol 1e-5) and greedy tokens of a batch of differently tiled images."""
    samples = SAMPLES[:3]
    model = CompressedLlava(family, CompressorConfig(method="none"))
    batch = family.batch_builder("generate")(samples)
    stock = _stock_inputs(family, samples)
    with torch.no_grad():
        ours = model(batch)
    reference, reference_mask = _stock_forward(family, stock)
    assert ours.visual_mask.sum(1).tolist() == [52, 66, 42]
    assert ours.compression.num_tokens.tolist() == [52, 66, 42]
    for got, want in zip(_real_logits(ours.logits, ours.attention_mask), _real_logits(reference, reference_mask)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    generated, _ = model.generate(batch, max_new_tokens=6)
    for row, sample in enumerate(samples):  # the original code's stock batch is right-padded: one at a time
        assert torch.equal(generated[row], _stock_generate(family, _stock_inputs(family, [sample]), 6)[0])


# ------------------------------------------------------------------------------ compression
def _expected_visual_sequence(family, batch, rows, projected, newlines="occupied"):
    """The placement rule in plain Python: base tokens in output order, crop tokens by window
    row then column (ties: view, slot), letterbox dropped, a newline after each occupied row."""
    side = family.side
    newline = family.image_newline.detach()
    sequences, first = [], 0
    for size in batch["image_sizes"].tolist():
        tiling = family.tiling(size)
        r0, c0, rows_n, cols_n = tiling.window
        sequence = [projected[first, t] for t in range(rows.mask.shape[1]) if rows.mask[first, t]]
        crop_tokens = []
        for view in range(1, tiling.views):
            row = first + view
            crop_r, crop_c = divmod(view - 1, tiling.grid[1])
            for t in range(rows.mask.shape[1]):
                if not rows.mask[row, t]:
                    continue
                pos = int(rows.positions[row, t])
                line, column = crop_r * side + pos // side - r0, crop_c * side + pos % side - c0
                if 0 <= line < rows_n and 0 <= column < cols_n:
                    crop_tokens.append(((line, column, view, t), projected[row, t]))
        crop_tokens.sort(key=lambda item: item[0])
        for line in range(rows_n):
            in_row = [token for key, token in crop_tokens if key[0] == line]
            sequence += in_row
            if newlines == "all" or (newlines == "occupied" and in_row):
                sequence.append(newline)
        sequences.append(torch.stack(sequence))
        first += tiling.views
    return sequences


@pytest.mark.parametrize("newlines", ["occupied", "all"])
def test_per_view_budget_reaches_the_llm_in_stock_order(family, newlines):
    """VisionZip at 40 tokens per image: 40 // 5 = 8 per view (7 dominant with CLS + 1 contextual);
    the LLM receives exactly the placement rule's sequence."""
    family.configure_anyres("per_view", newlines)
    try:
        model = CompressedLlava(family, CompressorConfig(method="visionzip", budget=40))
        assert model.compressor.budget == 8
        batch = family.batch_builder("generate")(SAMPLES)
        with torch.no_grad():
            rows = model.compress(batch)
            spliced, compression = model.prepare_inputs(batch)
        assert rows.mask.shape[0] == sum(family.tiling(s).views for s in SIZES) == 5 + 4 + 4 + 5
        assert rows.num_tokens.tolist() == [8] * rows.mask.shape[0]
        expected = _expected_visual_sequence(family, batch, rows, family.project(rows.tokens), newlines)
        counts = [len(e) for e in expected]
        assert spliced.visual_mask.sum(1).tolist() == counts == compression.num_tokens.tolist()
        assert all(count < family.stock_tokens(size) for count, size in zip(counts, SIZES))
        for row, sequence in enumerate(expected):
            torch.testing.assert_close(spliced.inputs_embeds[row][spliced.visual_mask[row]], sequence)
        text = batch["attention_mask"].sum(1) - 1
        assert torch.equal(spliced.attention_mask.sum(1), text + torch.tensor(counts))
    finally:
        family.configure_anyres()


def test_newline_rules_with_method_none_and_without_newlines(family):
    batch = family.batch_builder("generate")(SAMPLES[:2])
    counts = {}
    for newlines in ("occupied", "all", "none"):
        family.configure_anyres("per_view", newlines)
        try:
            with torch.no_grad():
                spliced, _ = CompressedLlava(family, CompressorConfig(method="none")).prepare_inputs(batch)
        finally:
            family.configure_anyres()
        counts[newlines] = spliced.visual_mask.sum(1).tolist()
    assert counts["occupied"] == counts["all"] == [52, 66]
    assert counts["none"] == [52 - 4, 66 - 10]  # one newline per window row
    with pytest.raises(ValueError, match="newlines"):
        family.configure_anyres("per_view", "sometimes")
    with pytest.raises(ValueError, match="compress_views"):
        family.configure_anyres("per_crop")


def test_images_of_different_sizes_batch_like_each_alone(family):
    """Per-sample view counts (5, 4, 4; a text-only sample) and token counts in one batch: logits
    and greedy tokens equal each sample run alone; SparseZip's dynamic K (CLS attention of each
    view) gives every view a budget of its own."""
    model = CompressedLlava(family, build_config(method="sparsezip", k_max=10, merging={"contextual_num": 2}))
    builder = family.batch_builder("generate")
    samples = [*SAMPLES[:3], {**SAMPLES[3], "image": None, "sample_id": "text-only"}]
    batch = builder(samples)
    with torch.no_grad():
        together = model(batch)
    generated, compression = model.generate(batch, max_new_tokens=4)
    counts = compression.num_tokens.tolist()
    assert len(set(counts[:3])) == 3 and counts[3] == 0 and together.visual_mask[3].sum() == 0
    for row, sample in enumerate(samples):
        alone_batch = builder([sample])
        with torch.no_grad():
            alone = model(alone_batch)
        alone_generated, alone_compression = model.generate(alone_batch, max_new_tokens=4)
        assert alone_compression.num_tokens.tolist() == [compression.num_tokens[row].item()]
        assert torch.equal(generated[row], alone_generated[0])
        real = together.attention_mask[row].bool()
        torch.testing.assert_close(together.logits[row][real], alone.logits[0], rtol=1e-4, atol=1e-4)


def _greedy_without_cache(family, spliced, new_tokens):
    """Greedy decoding by full recomputation (no KV cache) from the spliced prompt."""
    embeds, mask, positions = spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids
    embedding = family.model.get_input_embeddings()
    out = []
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = family.language_model(embeds, mask, positions).logits[:, -1]
        token = logits.argmax(-1)
        out.append(token)
        embeds = torch.cat([embeds, embedding(token)[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("visual_positions", ["contiguous", "original"])
def test_generation_with_the_kv_cache_after_compression(family, visual_positions):
    model = CompressedLlava(family, CompressorConfig(method="visionzip", budget=30), visual_positions=visual_positions)
    batch = family.batch_builder("generate")(SAMPLES[:3])
    generated, _ = model.generate(batch, max_new_tokens=6)
    with torch.no_grad():
        spliced, _ = model.prepare_inputs(batch)
    reference = _greedy_without_cache(family, spliced, 6)
    for got, want in zip(generated, reference):  # after EOS generate pads
        stop = (want == family.eos_token_id).nonzero()
        length = int(stop[0]) + 1 if len(stop) else 6
        assert torch.equal(got[:length], want[:length])


def test_original_positions_are_the_stock_offsets(family):
    """With original positions a compressed sequence is the stock one with the dropped tokens
    masked out. A selection (every other patch of every view, newlines of occupied rows) keeps
    stock tokens only, so the last prompt token's logits must be equal."""
    batch = family.batch_builder("generate")(SAMPLES[:2])
    model = CompressedLlava(family, CompressorConfig(method="none"), visual_positions="original")
    contiguous = CompressedLlava(family, CompressorConfig(method="none"))
    with torch.no_grad():
        full, _ = model.prepare_inputs(batch)
        assert torch.equal(full.position_ids, contiguous.prepare_inputs(batch)[0].position_ids)
        rows = model.compress(batch)
        every_other = torch.arange(rows.mask.shape[1]) % 2 == 0
        selection = dataclasses.replace(rows, mask=rows.mask & every_other)
        short = model.splice(batch, selection)
    for row in range(2):
        full_real, short_real = full.attention_mask[row].bool(), short.attention_mask[row].bool()
        full_embeds, full_pos = full.inputs_embeds[row][full_real], full.position_ids[row][full_real]
        short_embeds, short_pos = short.inputs_embeds[row][short_real], short.position_ids[row][short_real]
        keep = torch.isin(full_pos, short_pos)
        assert keep.sum() == short_pos.numel() < full_pos.numel()
        torch.testing.assert_close(full_embeds[keep], short_embeds, rtol=0, atol=0)
        assert torch.equal(full_pos[keep], short_pos)
        with torch.no_grad():
            reference = family.language_model(full_embeds[None], keep.long()[None], full_pos[None]).logits[0, -1]
            ours = family.language_model(short_embeds[None], torch.ones_like(short_pos)[None], short_pos[None])
        torch.testing.assert_close(ours.logits[0, -1], reference, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ together
def test_together_compresses_each_image_to_its_budget(family):
    """One row per image (its patches 48, 56, 40, 80): VisionZip keeps exactly 20 per
    image, rows of different lengths are grouped by length, newlines follow the occupied rows."""
    family.configure_anyres("together")
    try:
        model = CompressedLlava(family, CompressorConfig(method="visionzip", budget=20))
        assert model.compressor.geometry.num_patches is None and not model.compressor.geometry.has_cls
        builder = family.batch_builder("generate")
        batch = builder(SAMPLES)
        with torch.no_grad():
            rows = model.compress(batch)
            spliced, _ = model.prepare_inputs(batch)
            out = model(batch)
        assert rows.mask.shape[0] == len(SAMPLES) and rows.num_tokens.tolist() == [20] * 4
        assert rows.cluster_map.shape[1] == 80
        # The placement rule in plain Python: base patches (index < 16) in output order, then the
        # crop patches (16 + window row * cols + col) by row and column, a newline after each
        # occupied row.
        projected = family.project(rows.tokens)
        newline = family.image_newline.detach()
        for row, size in enumerate(SIZES):
            _, _, lines, cols = family.tiling(size).window
            real = [t for t in range(rows.mask.shape[1]) if rows.mask[row, t]]
            base = [projected[row, t] for t in real if rows.positions[row, t] < 16]
            crops = sorted((divmod(int(rows.positions[row, t]) - 16, cols), t)
                           for t in real if rows.positions[row, t] >= 16)
            expected = base
            for line in range(lines):
                in_line = [projected[row, t] for (r, _), t in crops if r == line]
                expected += in_line + ([newline] if in_line else [])
            torch.testing.assert_close(spliced.inputs_embeds[row][spliced.visual_mask[row]], torch.stack(expected))
        newlines = out.compression.num_tokens - 20
        assert bool(((newlines >= 1) & (newlines <= torch.tensor([4, 10, 2, 8]))).all())
        for row, sample in enumerate(SAMPLES):
            with torch.no_grad():
                alone = model(builder([sample]))
            real = out.attention_mask[row].bool()
            torch.testing.assert_close(out.logits[row][real], alone.logits[0], rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            together_stock = CompressedLlava(family, CompressorConfig(method="none"))(batch)
    finally:
        family.configure_anyres()
    with torch.no_grad():  # method none: the stock sequence (equal to per-view's, equal to stock)
        per_view_stock = CompressedLlava(family, CompressorConfig(method="none"))(batch)
    assert together_stock.visual_mask.sum(1).tolist() == [52, 66, 42, 88]
    assert torch.equal(together_stock.logits, per_view_stock.logits)


def test_budget_split_over_views():
    family = load_family("llava-next", cached_tiny_llava_next("llava-next", image_size=56))
    config, _ = family.method_setup(CompressorConfig(method="visionzip", budget=160), None)
    assert config.budget == 32  # the papers' "32 x 5 = 160"
    config, _ = family.method_setup(CompressorConfig(method="visionzip", budget=0.25), None)
    assert config.budget == 0.25
    with pytest.raises(ValueError, match="less than one per view"):
        CompressedLlava(family, CompressorConfig(method="visionzip", budget=4))


# ------------------------------------------------------------------------------ the API
def test_two_line_api_on_the_stock_model(family):
    """``sparsezip(model)`` detects the family, ``generate(**stock inputs)`` (with image_sizes)
    runs the compressed model, ``unwrap`` gives the stock model back unchanged."""
    model = family.model
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    forward, generate = type(model).forward, type(model).generate
    samples = SAMPLES[:2]
    inputs = _stock_inputs(family, samples)
    before = _stock_generate(family, inputs, 4)
    wrapped = sparsezip(model, method="visionzip", budget=40)
    assert wrapped.family == family.family
    output = wrapped.generate(**inputs, max_new_tokens=4)
    new = output[:, inputs["input_ids"].shape[1]:] if family.family == "llava-next" else output
    reference = CompressedLlava(family, wrapped.sparsezip.config)
    expected, compression = reference.generate(family.batch_builder("generate")(samples), max_new_tokens=4)
    assert torch.equal(new, expected)
    assert bool((compression.num_tokens < torch.tensor([family.stock_tokens(s) for s in SIZES[:2]])).all())
    assert unwrap(wrapped) is model
    assert type(model).forward is forward and type(model).generate is generate
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert torch.equal(_stock_generate(family, inputs, 4), before)
    stock = sparsezip(model, method="none")
    out = stock.generate(**_stock_inputs(family, samples[:1]), max_new_tokens=4)
    one = _stock_inputs(family, samples[:1])
    assert torch.equal(out[:, one["input_ids"].shape[1]:] if family.family == "llava-next" else out,
                       _stock_generate(family, one, 4))


def test_api_family_options_and_input_checks(family):
    wrapped = sparsezip(family.model, method="visionzip", budget=20, family_options={"compress_views": "together"})
    assert wrapped.sparsezip.backend.compress_views == "together"
    inputs = _stock_inputs(family, SAMPLES[:1])
    without_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="image_sizes"):
        wrapped.generate(**without_sizes, max_new_tokens=2)
    if family.family == "llava-next":
        wrong = dict(inputs, image_sizes=torch.tensor([[130, 50]]))
        with pytest.raises(ValueError, match="stock number"):
            wrapped.generate(**wrong, max_new_tokens=2)



@pytest.mark.parametrize(("name", "dtype"), [("llava-next", "bfloat16"), ("llava-next", "float16"),
                                             ("llava-next-original", "float16")])
def test_method_none_equals_the_stock_model_in_half_precision(name, dtype, monkeypatch):
    """Loaded in half precision the way the stock loaders load (transformers: ``from_pretrained``
    in the dtype; the original code: its ``load_pretrained_model``, float16 only), method
    ``none`` gives exactly the stock model's logits and greedy tokens for differently tiled images."""
    from types import SimpleNamespace

    path = cached_tiny_llava_next(name, image_size=56)
    family = load_family(name, path, dtype=dtype)
    assert family.dtype == getattr(torch, dtype)
    if name == "llava-next":
        stock = SimpleNamespace(family=name, model=transformers_model(path, dtype))
    else:
        from llava.model.builder import load_pretrained_model

        monkeypatch.chdir(path)  # the stock loader resolves a relative mm_vision_tower from here
        stock = SimpleNamespace(family=name, model=load_pretrained_model(str(path), None, "llava-tiny", device="cpu")[1])
    assert stock.model is not family.model

    def stock_inputs(samples, positions=False):
        inputs = _stock_inputs(family, samples)
        # The stock evaluation scripts pass the images in the model's dtype.
        if name == "llava-next":
            inputs["pixel_values"] = inputs["pixel_values"].to(family.dtype)
            if positions:  # left padding: the positions generate() gives (a bare forward counts the pads)
                inputs["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        else:
            inputs["images"] = [image.to(family.dtype) for image in inputs["images"]]
        return inputs

    model = CompressedLlava(family, CompressorConfig(method="none"))
    # transformers' model batches left-padded; the original code's evaluation runs one image at a
    # time (its batches are right-padded, and half-precision kernels round padded rows differently).
    batches = [SAMPLES[:3]] if name == "llava-next" else [[sample] for sample in SAMPLES[:3]]
    for samples in batches:
        batch = family.batch_builder("generate")(samples)
        with torch.no_grad():
            ours = model(batch)
        reference, reference_mask = _stock_forward(stock, stock_inputs(samples, positions=True))
        assert ours.logits.dtype == reference.dtype == getattr(torch, dtype)
        for got, want in zip(_real_logits(ours.logits, ours.attention_mask), _real_logits(reference, reference_mask)):
            assert torch.equal(got, want)
        generated, _ = model.generate(batch, max_new_tokens=6)
        for row, sample in enumerate(samples):
            assert torch.equal(generated[row], _stock_generate(stock, stock_inputs([sample]), 6)[0])


def transformers_model(path, dtype):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()

"""Pieces of the tiny model's training script that decide what it learns: growth, labels, losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_tiny_llava as T
import training_world as W
from sparsezip_pl.data import synthetic as S
from tiny_llava import Tokenized
from tiny_training import auxiliary_losses as losses
from tiny_training import common
from tiny_training import language_data as data
from tiny_training import vision_stage as vision

CKPT = Path(__file__).resolve().parents[3] / "checkpoints" / "tiny-llava-synth"


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(CKPT)


def _small(processor, layers: int):
    args = T.parse_args(["--vision-width", "32", "--vision-layers", "2", "--lm-width", "48", "--lm-heads", "2",
                         "--lm-layers", str(layers)])
    return common.build(args, processor)


def test_grown_model_computes_what_the_smaller_one_did(processor):
    small, big = _small(processor, 2), _small(processor, 4)
    with torch.no_grad():  # make the old last layer distinguishable from a fresh one
        for p in small.model.language_model.layers[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    big.load_state_dict(common.grown_state(big, small.state_dict(), 2))
    grown = big.model.language_model.layers
    assert torch.equal(grown[3].self_attn.q_proj.weight, small.model.language_model.layers[1].self_attn.q_proj.weight)
    assert not grown[1].self_attn.o_proj.weight.any() and not grown[2].mlp.down_proj.weight.any()
    embeds = torch.randn(2, 7, 48)
    with torch.no_grad():
        a = small.model.language_model(inputs_embeds=embeds).last_hidden_state
        b = big.model.language_model(inputs_embeds=embeds).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6)


def test_question_attributes_name_what_each_family_asks():
    assert data.question_attributes(S.q_color("star", "blue")) == {
        "shape": S.SHAPES.index("star") + 1, "color": S.COLOR_NAMES.index("blue") + 1, "side": 0, "number": 0}
    assert data.question_attributes(S.q_position("cross", "bottom"))["side"] == 4
    assert data.question_attributes(S.q_position("cross", "left"))["side"] == 1
    count = data.question_attributes(S.q_count("cross", 3))
    assert count["shape"] == S.SHAPES.index("cross") + 1 and count["number"] == 3
    assert data.question_attributes(S.q_count("ring", 1))["number"] == 1
    assert data.question_attributes("Which shapes are there?") == {"shape": 0, "color": 0, "side": 0, "number": 0}


def test_readout_labels_are_true_to_the_scene():
    scene = S.Scene([S.Obj("circle", "red", 50, 300, 40), S.Obj("circle", "blue", 250, 60, 40),
                     S.Obj("star", "green", 200, 200, 30)], theme=0)
    circles = data.readout_labels("circle", scene.objects)
    assert circles["count"] == 2 and circles["lr"] == 1 and circles["tb"] == 2  # first circle: left, lower
    assert [S.COLOR_NAMES[i] for i, v in enumerate(circles["colors"]) if v] == ["red", "blue"]
    assert data.readout_labels("moon", scene.objects) == {"colors": [0.0] * 6, "lr": 0, "tb": 0, "count": 0}
    assert data.readout_labels(None, scene.objects) is None


@pytest.mark.parametrize("anchor", ["cover", "spread"])
@pytest.mark.parametrize("target", ["linear", "softmax"])
def test_counting_loss_is_lowest_when_attention_matches_the_instance_count(processor, anchor, target):
    """Attention of instance_share(n) per instance of the asked shape (on its anchor patch, or
    spread over its patches) beats a share scaled up or down."""
    tz = Tokenized(processor)
    args = T.parse_args(["--p-conversation", "0", "--count-anchor", anchor])
    stats = S.world_statistics(0, n=200)
    _, packed, fams, _, ground = data.lm_batch(tz, args.seed, 0, 1, args, stats)
    n_text, C = len(tz.prefix), packed[0].shape[2]
    P = n_text + 576
    items = [(j, rc) for j, (rc, (_, ans, _), shape) in enumerate(zip(packed[4][0], fams[0], ground["asked_shapes"][0]))
             if rc is not None and ans in data.YES_NO and shape is not None]
    assert items

    def loss_with(scale: float) -> float:
        """Attention logits that put ``scale`` times the target share on each instance of the asked shape."""
        q = torch.zeros(1, 2, packed[0].shape[1] * C, P)
        k = torch.eye(P)[None, None].expand(1, 2, P, P)
        for j, rc in items:
            mine = [(cells, w) for s, cells, w in ground["count_targets"][0] if s == ground["asked_shapes"][0][j]]
            share = scale * losses.instance_share(len(mine), target)
            probs = torch.full((P,), 1e-9)
            probs[:n_text] = (1 - share * len(mine)) / n_text
            for cells, w in mine:
                probs[n_text + torch.from_numpy(cells)] += share * torch.from_numpy(w).float()
            q[0, :, rc[0] * C + rc[1]] = probs.log()
        capture = {"q": q, "k": k, "scale": 1.0}
        return losses.counting_loss(capture, packed, fams, ground, None, n_text, C, target=target).item()

    best = loss_with(1.0)
    for other in (0.25, 0.5, 1.25, 1.5):
        assert loss_with(other) > best


def test_counting_loss_reads_the_head_it_is_given(processor):
    """Only the named head's attention counts: the optimum in head 2 scores best for head=2 alone."""
    tz = Tokenized(processor)
    args = T.parse_args(["--p-conversation", "0", "--count-anchor", "cover"])
    stats = S.world_statistics(0, n=200)
    _, packed, fams, _, ground = data.lm_batch(tz, args.seed, 0, 1, args, stats)
    n_text, C = len(tz.prefix), packed[0].shape[2]
    P = n_text + 576
    q = torch.zeros(1, 3, packed[0].shape[1] * C, P)  # heads 0 and 1: uniform attention
    for rc, (_, ans, _), shape in zip(packed[4][0], fams[0], ground["asked_shapes"][0]):
        if rc is None or ans not in data.YES_NO or shape is None:
            continue
        mine = [cells for s, cells, _ in ground["count_targets"][0] if s == shape]
        probs = torch.full((P,), 1e-9)
        probs[:n_text] = (1 - losses.COUNT_SHARE * len(mine)) / n_text
        for cells in mine:
            probs[n_text + torch.from_numpy(cells)] += losses.COUNT_SHARE
        q[0, 2, rc[0] * C + rc[1]] = probs.log()
    capture = {"q": q, "k": torch.eye(P)[None, None].expand(1, 3, P, P), "scale": 1.0}
    by_head = [losses.counting_loss(capture, packed, fams, ground, None, n_text, C, h).item() for h in range(3)]
    assert by_head[2] < by_head[1] and by_head[0] == by_head[1]


def test_anchor_centre_label_marks_one_patch_per_object_where_the_counting_loss_points():
    _, centre = vision.vision_batch(0, 0, 4)
    _, anchor = vision.vision_batch(0, 0, 4, centre_label="anchor")
    assert torch.equal(centre["shape"], anchor["shape"]) and not torch.equal(centre["center"], anchor["center"])
    for i in range(4):
        rng = S.rng_for(0, "train", i)
        force = (S.SHAPES[int(rng.integers(len(S.SHAPES)))], int(rng.integers(1, 4))) if rng.random() < 0.4 else None
        scene = S.sample_scene(rng, force)
        marked = set(torch.nonzero(anchor["center"][i].flatten()).flatten().tolist())
        assert marked == {int(cells[0]) for _, cells, _ in data.count_targets(scene, "cover")}


def test_first_centre_label_marks_where_the_first_anchor_counting_loss_points():
    _, first = vision.vision_batch(0, 0, 4, centre_label="first")
    for i in range(4):
        rng = S.rng_for(0, "train", i)
        force = (S.SHAPES[int(rng.integers(len(S.SHAPES)))], int(rng.integers(1, 4))) if rng.random() < 0.4 else None
        scene = S.sample_scene(rng, force)
        marked = set(torch.nonzero(first["center"][i].flatten()).flatten().tolist())
        targets = data.count_targets(scene, "first")
        assert marked == {int(cells[0]) for _, cells, _ in targets} == set(W.first_patches(scene))
        assert [s for s, _, _ in targets] == [o.shape for o in scene.objects]


def test_count_heads_option_is_validated():
    assert T.parse_args(["--count-heads", "1,2,3"]).count_heads == (1, 2, 3)
    for bad in ("1,1", "a", "-1", "6"):  # the default LLM has heads 0..5
        with pytest.raises(SystemExit):
            T.parse_args(["--count-heads", bad])


def test_spread_count_targets_weigh_every_visible_object_the_same():
    """Overlapping objects: each patch goes to the object drawn last, and each object's shares sum to 1."""
    scene = S.Scene([S.Obj("circle", "red", 100, 100, 60), S.Obj("circle", "blue", 130, 110, 60),
                     S.Obj("star", "green", 260, 260, 20)], theme=0)
    targets = data.count_targets(scene, "spread")
    first, second, star = (set(cells.tolist()) for _, cells, _ in targets)
    assert first and second and star and not first & second
    assert second == set(W.object_patches(scene.objects[1]).tolist())  # drawn last: all its patches
    assert len(first) < len(W.object_patches(scene.objects[0]))  # partly hidden by the second circle
    for _, cells, share in targets:
        assert share.sum() == pytest.approx(1.0)
    cover = data.count_targets(scene, "cover")
    assert [cells.tolist() for _, cells, _ in cover] == [[W.anchor_patch(o)] for o in scene.objects]


def _count_attention_bench():
    """count_attention.py, the lab's counting-head bench, as a module."""
    import count_attention

    return count_attention


def test_count_attention_bench_measures_each_count_question_of_the_shipped_model(processor):
    from transformers import LlavaForConditionalGeneration

    bench = _count_attention_bench()
    model = LlavaForConditionalGeneration.from_pretrained(CKPT).eval()
    rows = bench.measure(model, Tokenized(processor), seed=2, n_images=8, anchor=bench.trained_anchor(CKPT))
    assert len(rows) >= 8  # every scene asks count pairs (--p-count-scene 1)
    for r in rows:
        assert 1 <= r["n"] <= S.MAX_PER_SHAPE and r["patches"] >= 1
        assert abs(r["asked"] - r["n"]) <= 1  # the count asked: the true one or a neighbour of it
        assert 0.0 <= r["anchor"] and r["sink"] + r["shape"] <= 1.0 + 1e-5
    assert sum(r["right"] for r in rows) > len(rows) / 2  # the shipped model counts better than chance


def test_count_attention_bench_threshold_accuracy_is_the_best_single_cut():
    bench = _count_attention_bench()
    assert bench.threshold_accuracy([0.1, 0.2], [0.3]) == 1.0
    assert bench.threshold_accuracy([0.5, 0.6], [0.1, 0.2]) == 0.5  # reversed: best is one class for all
    assert bench.threshold_accuracy([0.1, 0.4], [0.3, 0.5]) == 0.75


def test_count_attention_bench_reads_the_anchor_a_checkpoint_was_trained_with(tmp_path):
    bench = _count_attention_bench()
    command = "python examples/tiny_llava/train_tiny_llava.py --out 'some dir' --lm-steps 600"
    (tmp_path / "eval_results.json").write_text(json.dumps({"command": command + " --count-anchor cover"}))
    assert bench.trained_anchor(tmp_path) == "cover"
    # the shipped checkpoint's run recorded the script as the package's module it then was
    former = "python -m sparsezip_pl.demo.train_tiny_llava --out 'some dir' --lm-steps 600 --count-anchor first"
    (tmp_path / "eval_results.json").write_text(json.dumps({"command": former}))
    assert bench.trained_anchor(tmp_path) == "first"
    assert bench.trained_anchor(CKPT) == "first"
    (tmp_path / "eval_results.json").write_text(json.dumps({"command": command}))
    assert bench.trained_anchor(tmp_path) == T.parse_args([]).count_anchor  # the script's default
    with pytest.raises(SystemExit, match="pass --anchor"):
        bench.trained_anchor(tmp_path / "elsewhere")


@pytest.mark.parametrize("rule", ["cover", "first"])
def test_keep_probe_can_mark_the_patch_the_counting_loss_points_at(processor, rule):
    """--keep-centre-label: the keep probe's object mark is, per instance, the counting loss's anchor."""
    tz = Tokenized(processor)
    args = T.parse_args(["--p-conversation", "0", "--count-anchor", rule, "--keep-centre-label", rule])
    stats = S.world_statistics(0, n=200)
    _, _, _, _, ground = data.lm_batch(tz, args.seed, 0, 8, args, stats)
    for marks, targets in zip(ground["centre_maps"], ground["count_targets"]):
        anchors = sorted(int(cells[0]) for _, cells, _ in targets)
        assert torch.nonzero(marks).flatten().tolist() == sorted(set(anchors))
    default = data.lm_batch(tz, args.seed, 0, 8, T.parse_args(["--p-conversation", "0"]), stats)[4]["centre_maps"]
    assert not torch.equal(default, ground["centre_maps"])  # the default still marks object centres


def test_anchor_probe_quality_scores_a_perfect_and_a_blind_probe_apart():
    bench = _count_attention_bench()
    gen = torch.Generator().manual_seed(0)
    owner = torch.arange(40).repeat_interleave(10).view(4, 100)  # 4 images, 10 instances of 10 patches each
    label = (torch.arange(400).view(4, 100) % 10 == 3).float()  # one anchor per instance
    assert bench.probe_quality(label.clone(), label, owner) == (1.0, 1.0)
    f1, top = bench.probe_quality(torch.rand(4, 100, generator=gen), label, owner)
    assert f1 < 0.5 and top < 0.5
    features = torch.randn(4, 100, 8, generator=gen)
    features[..., 0] += 4 * label  # the label is linearly readable from feature 0
    f1, top = bench.probe_quality(bench.fit_probe(features, label)(features), label, owner)
    assert f1 > 0.9 and top > 0.9


def test_anchor_features_label_one_patch_per_instance_of_the_shipped_model(processor):
    from transformers import LlavaForConditionalGeneration

    bench = _count_attention_bench()
    model = LlavaForConditionalGeneration.from_pretrained(CKPT).eval()
    feats = bench.anchor_features(model, Tokenized(processor), seed=2, n_images=3, anchor="first")
    width = model.config.text_config.hidden_size
    assert feats["tower"].shape == (3, 576, model.config.vision_config.hidden_size)
    assert feats["last"].shape == (3, 576, width)
    for label, owner in zip(feats["label"], feats["owner"]):
        instances = owner[owner >= 0].unique()
        assert int(label.sum()) == len(instances)  # one anchor per instance, on one of its own patches
        assert set(owner[label.bool()].tolist()) == set(instances.tolist())


def test_softmax_count_target_is_what_one_fixed_logit_per_instance_gives():
    """With the softmax target, each instance's share over the sink's is the same for every count,
    so one attention logit per instance (whatever its size or the scene) fits it exactly; the
    linear target's ratio changes with the count, so no fixed logit fits it."""
    ratios = {}
    for target in ("linear", "softmax"):
        ratios[target] = [losses.instance_share(n, target) / (1 - n * losses.instance_share(n, target))
                          for n in range(1, S.MAX_PER_SHAPE + 1)]
    assert ratios["softmax"] == pytest.approx([losses.COUNT_RATIO] * S.MAX_PER_SHAPE)
    assert ratios["linear"][0] < ratios["linear"][-1] / 2
    totals = [n * losses.instance_share(n, "softmax") for n in range(1, S.MAX_PER_SHAPE + 1)]
    assert totals == sorted(totals) and totals[-1] < 1  # more instances, more mass; the sink keeps some
    with pytest.raises(ValueError, match="softmax"):
        losses.instance_share(2, "log")


def test_isolated_count_heads_get_no_answer_gradient_on_where_they_look(processor):
    """--isolate-count-heads: the output is unchanged and still trains head 1's values, but not its
    queries or keys; a loss on the captured queries (the counting loss's) still reaches them."""
    from tiny_llava import shared_prefix_hidden

    model = _small(processor, 2)
    last = model.model.language_model.layers[-1].self_attn
    hd = last.head_dim
    torch.manual_seed(0)
    prefix, rows = torch.randn(1, 9, 48), torch.randn(1, 2, 3, 48)
    pos, seg = 9 + torch.arange(6).view(1, 2, 3), torch.ones(1, 2, 3, dtype=torch.long)

    def grads(detached: tuple[int, ...], on_capture: bool = False):
        model.zero_grad(set_to_none=True)
        capture: dict = {}
        hidden = shared_prefix_hidden(model, prefix, rows, pos, seg, None, capture, detached)
        (capture["q"][:, 1].sum() if on_capture else hidden.square().sum()).backward()
        return hidden.detach(), last.q_proj.weight.grad, last.k_proj.weight.grad, last.v_proj.weight.grad

    h_all, q_all, k_all, v_all = grads(())
    h_iso, q_iso, k_iso, v_iso = grads((1,))
    assert torch.allclose(h_all, h_iso)
    assert q_iso[hd:].abs().max() == 0 and k_iso[hd:].abs().max() == 0  # head 1: pattern untouched
    assert torch.allclose(q_iso[:hd], q_all[:hd]) and torch.allclose(k_iso[:hd], k_all[:hd])  # head 0 as before
    assert q_all[hd:].abs().max() > 0 and v_iso[hd:].abs().max() > 0
    assert grads((1,), on_capture=True)[1][hd:].abs().max() > 0


def test_subset_steps_follow_p_subset_and_draw_the_same_on_a_resume():
    from tiny_training.language_stage import subset_tokens

    args = T.parse_args(["--curriculum-steps", "0", "--curriculum-ramp", "0", "--p-subset", "0.3",
                         "--subset-tokens", "64,128"])
    drawn = [subset_tokens(step, args) for step in range(2000)]
    assert set(drawn) == {None, 64, 128}
    assert 0.25 < sum(d is not None for d in drawn) / len(drawn) < 0.35
    assert drawn == [subset_tokens(step, args) for step in range(2000)]
    assert all(subset_tokens(s, T.parse_args(["--curriculum-steps", "0", "--curriculum-ramp", "0"])) is None
               for s in range(50))
    assert subset_tokens(10, T.parse_args(["--p-subset", "1"])) == 64  # the curriculum still comes first
    with pytest.raises(SystemExit):
        T.parse_args(["--subset-tokens", "0,64"])


def test_count_area_match_draws_area_matched_count_scenes_and_nothing_when_off():
    """--count-area-match 1: every counting scene's counted shape gets area-matched sizes; at 0
    (the default) the training scenes are drawn exactly as the shipped runs drew them (the option
    takes no random draw), so the card's commands still reproduce."""
    import numpy as np

    stats = S.world_statistics(0, n=200)
    base = ["--p-count-scene", "1.0"]
    off, on = T.parse_args(base), T.parse_args(base + ["--count-area-match", "1.0"])
    areas: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for i in range(150):
        scene_off, _ = data.training_items(np.random.default_rng([3, i]), off, stats)
        rng = np.random.default_rng([3, i])  # the draws training_items made before the option existed
        rng.random()
        force = (S.SHAPES[int(rng.integers(len(S.SHAPES)))], S.draw_pinned_count(rng))
        assert scene_off == S.sample_scene(rng, force)
        scene_on, _ = data.training_items(np.random.default_rng([3, i]), on, stats)
        pinned = [o.size ** 2 for o in scene_on.objects if o.shape == force[0]]
        assert len(pinned) == force[1]
        areas[force[1]].append(sum(pinned))
    # the range area_matched_sizes draws from (its independence of the count: test_training_world)
    assert all(2600 * 0.9 <= a <= 7000 * 1.1 for values in areas.values() for a in values)

"""The training script end to end on a micro model: stages, saving, card, resume (a minute or two)."""

import json
import shlex

import pytest
import torch

import train_tiny_llava as T
from tiny_training import common
from tiny_training import vision_stage as vision

pytestmark = pytest.mark.slow

MICRO = ["--vision-width", "32", "--vision-layers", "1", "--lm-width", "48", "--lm-layers", "1", "--lm-heads", "2",
         "--vision-crop-steps", "2", "--vision-steps", "2", "--vision-batch", "2", "--lm-steps", "3", "--lm-batch", "2",
         "--lm-warmup", "1", "--curriculum-steps", "1", "--curriculum-ramp", "1", "--eval-mme-images", "2",
         "--eval-pope-images", "2", "--other-seeds", "", "--honest-images", "1", "--bf16", "0",
         # every auxiliary loss and item kind on, so each is exercised
         "--grounding-weight", "1", "--count-grounding-weight", "1", "--route-weight", "1", "--readout-weight", "1",
         "--keep-weight", "1", "--p-caption", "1", "--p-listing", "1"]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    argv = ["--out", str(root / "out"), "--workdir", str(root / "work"), *MICRO]
    T.main(argv)
    return root, argv


def test_a_micro_run_saves_a_checkpoint_its_card_and_results_describe(micro_run):
    from transformers import LlavaForConditionalGeneration

    root, argv = micro_run
    out = root / "out"
    info = json.loads((out / "eval_results.json").read_text())
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.vision_config.hidden_size == 32 and model.config.text_config.num_hidden_layers == 1
    assert common.param_counts(model) == info["params"]
    assert info["fast_path_err"] < 1e-4  # the evaluation's fast path reproduces the stock forward
    assert set(info["eval"]["all"]) >= {"mme_count", "pope_adversarial"}
    assert info["command"].endswith(shlex.join(argv))
    assert T.recorded_args(out) == T.parse_args(argv)  # the recorded command parses back to the run's options
    assert info["command"] in (out / "MODEL_CARD.md").read_text()
    state = torch.load(root / "work" / "state.pt", weights_only=False)
    assert (state["stage"], state["step"]) == ("language", 3)


def test_card_only_reevaluate_measures_the_checkpoint_again_and_keeps_what_training_recorded(micro_run, tmp_path):
    import shutil

    root, argv = micro_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    measured = json.loads((out / "eval_results.json").read_text())
    stale = {**measured, "eval": {"all": {}}, "items_per_image": 99.0}
    (out / "eval_results.json").write_text(json.dumps(stale))

    T.main(["--out", str(out), "--workdir", str(tmp_path / "work"), "--card-only", "1", "--reevaluate", "1", *MICRO])
    info = json.loads((out / "eval_results.json").read_text())
    assert info["eval"] == measured["eval"]  # same weights, same worlds: the same figures again
    assert info["items_per_image"] == 99.0 and info["command"] == measured["command"]
    assert info["reevaluated"] is True
    assert "measured again after training" in (out / "MODEL_CARD.md").read_text()


def test_a_refresh_interrupted_mid_way_resumes_to_the_same_weights(micro_run, tmp_path, monkeypatch):
    root, _ = micro_run
    refresh = ["--init-from", str(root / "work" / "state.pt"), "--vision-refresh-steps", "4",
               "--vision-save-every", "2", "--vision-centre-label", "anchor", *MICRO]
    T.main(["--out", str(tmp_path / "straight"), "--workdir", str(tmp_path / "w1"), *refresh])

    save_state = vision.save_state

    def save_then_stop(path, **state):
        save_state(path, **state)
        if state["stage"] == "vision-refresh" and state["step"] == 2:
            raise KeyboardInterrupt

    argv = ["--out", str(tmp_path / "resumed"), "--workdir", str(tmp_path / "w2"), *refresh]
    monkeypatch.setattr(vision, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        T.main(argv)
    assert torch.load(tmp_path / "w2" / "state.pt", weights_only=False)["stage"] == "vision-refresh"
    monkeypatch.setattr(vision, "save_state", save_state)
    T.main(argv)

    from transformers import LlavaForConditionalGeneration

    straight, resumed = (LlavaForConditionalGeneration.from_pretrained(tmp_path / d).state_dict()
                         for d in ("straight", "resumed"))
    initial = torch.load(root / "work" / "state.pt", weights_only=False)["model"]
    tower = [k for k in straight if "vision_tower" in k]
    assert any(not torch.equal(straight[k], initial[k]) for k in tower)  # the refresh trained the tower
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("tower_lr", ["0", "1e-2"])
def test_tower_lr_trains_the_layers_features_come_from_and_nothing_else_of_the_tower(micro_run, tmp_path, tower_lr):
    from transformers import LlavaForConditionalGeneration

    root, _ = micro_run
    T.main(["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "w"), *MICRO,
            "--init-from", str(root / "work" / "state.pt"), "--tower-lr", tower_lr])
    trained = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    initial = torch.load(root / "work" / "state.pt", weights_only=False)["model"]
    changed = {k for k in trained if "vision_tower" in k and not torch.equal(trained[k], initial[k])}
    if tower_lr == "0":
        assert not changed
    else:  # the micro tower's feature layer is its embeddings (layer -2 of 1); its last layer feeds nothing
        assert "model.vision_tower.embeddings.patch_embedding.weight" in changed
        assert not any(".encoder.layers.0." in k or "post_layernorm" in k for k in changed)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if "language_model" in k)


def test_init_from_a_checkpoint_folder_continues_its_weights_with_its_own_tokenizer(micro_run, tmp_path, monkeypatch):
    """A clean clone has no state.pt, only the shipped folder: --init-from takes the folder's
    weights and processor (not a tokenizer rebuilt from the world's text) and its recorded times."""
    from transformers import LlavaForConditionalGeneration

    import training_world

    root, _ = micro_run
    source = root / "out"
    # were the tokenizer rebuilt from the world's text, this corpus would give another vocabulary
    monkeypatch.setattr(training_world, "world_texts", lambda seed=0, n=400: ["a b c d"] * 50)
    T.main(["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "w"), *MICRO, "--lm-lr", "0",
            "--init-from", str(source)])
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    before, after = (LlavaForConditionalGeneration.from_pretrained(d).state_dict() for d in (source, tmp_path / "out"))
    for key in before:  # lr 0: the language stage ran and changed nothing
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    recorded, info = (json.loads((d / "eval_results.json").read_text()) for d in (source, tmp_path / "out"))
    assert info["init_step"] == 3  # the source run's --lm-steps
    assert info["time"]["earlier_attempt"] == pytest.approx(recorded["time"]["language"])
    assert info["time"]["vision"] == pytest.approx(recorded["time"]["vision"])


def test_init_from_a_folder_without_results_names_what_is_missing(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="eval_results.json"):
        T.load_init(tmp_path / "ckpt")


def test_card_only_needs_no_init_state_once_its_step_is_recorded(micro_run, tmp_path):
    """The states runs start from are git-ignored: a card rewrite on a clean clone must not load one."""
    import shutil

    root, _ = micro_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    info = json.loads((out / "eval_results.json").read_text())
    (out / "eval_results.json").write_text(json.dumps({**info, "init_step": 7}))
    gone = tmp_path / "gone" / "state.pt"
    T.main(["--out", str(out), "--workdir", str(tmp_path / "work"), "--card-only", "1", "--init-from", str(gone), *MICRO])
    assert json.loads((out / "eval_results.json").read_text())["init_step"] == 7
    card = " ".join((out / "MODEL_CARD.md").read_text().split())
    assert f"continued from `{gone}` (saved at language step 7" in card


def test_reinit_count_heads_redraws_only_their_query_and_key_rows(micro_run):
    from transformers import LlavaForConditionalGeneration

    root, _ = micro_run
    model = LlavaForConditionalGeneration.from_pretrained(root / "out")
    state = model.state_dict()
    fresh = common.reinit_heads(model, state, (1,), seed=0)
    hd = model.config.text_config.head_dim
    attn = "model.language_model.layers.0.self_attn."  # the micro LLM's only (= last) layer
    for proj in ("q_proj", "k_proj"):
        key = attn + proj + ".weight"
        assert torch.equal(fresh[key][:hd], state[key][:hd])  # head 0 kept
        assert not torch.equal(fresh[key][hd:2 * hd], state[key][hd:2 * hd])  # head 1 redrawn
    assert all(torch.equal(fresh[k], v) for k, v in state.items() if not k.endswith(("q_proj.weight", "k_proj.weight")))


def test_reinit_count_heads_refuses_grouped_key_heads(micro_run):
    from transformers import LlavaForConditionalGeneration

    root, _ = micro_run
    model = LlavaForConditionalGeneration.from_pretrained(root / "out")
    model.config.text_config.num_key_value_heads = 1  # as if two query heads shared one key head
    with pytest.raises(ValueError, match="one key head per query head"):
        common.reinit_heads(model, model.state_dict(), (1,), seed=0)

"""The model card: how the checkpoint was trained and what it scored, every figure from the run."""

from __future__ import annotations

from pathlib import Path

import evaluate_worlds as E
from tiny_training.auxiliary_losses import COUNT_RATIO, COUNT_SHARE


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


REEVALUATED = """The figures in this section were measured again after training, by `--card-only 1 --reevaluate 1`
with the world generator and evaluation of the commit that wrote this card; the held-out scores the
training history quotes were measured with the code of their time.

"""


def write_card(out: Path, model, args, info: dict) -> None:
    refresh = ""
    if args.vision_refresh_steps:
        refresh = (f"\n   Then, on the --init-from tower, {args.vision_refresh_steps} more full-image steps on new images "
                   f"(fresh heads, lr {args.vision_lr}; count losses x{args.vision_count_weight}"
                   + (f", plus a per-patch regression of log(patches its object shows), x{args.vision_size_weight}"
                      if args.vision_size_weight else "")
                   + {"centre": "", "anchor": ", the centre label on each object's anchor patch",
                      "first": ", the centre label on each object's top-left patch"}[args.vision_centre_label]
                   + (f", centre loss x{args.vision_centre_weight}" if args.vision_centre_weight != 1 else "") + ").")
    tower = (f"the tower trained too, end to end, at lr {args.tower_lr} (the same schedule)" if args.tower_lr > 0
             else "tower frozen")
    c = model.config
    v, t = c.vision_config, c.text_config
    pc = info["params"]
    cols = {"all 576 tokens": info["eval"]["all"], "random 64": info["eval"]["random64"],
            "uniform stride 64": info["eval"]["stride64"]}
    pope = info["eval"]["all"]
    caption = (f"In {args.p_caption:.0%} of images a caption item as well (\"Describe the image briefly.\" -> "
               f"\"The image shows a red circle, two blue stars and ...\"), LLaVA's stage-1 signal: every caption "
               f"word must be read off the image, which grounds the words in the visual tokens. "
               if args.p_caption > 0 else "")
    if args.p_listing > 0:
        caption += (f"In {args.p_listing:.0%} of images a listing item too (\"Which shapes are there?\" / \"Which colors "
                    f"are there?\" + the short-answer suffix -> \"circle, star and square\"). ")
    if args.grounding_weight > 0:
        caption += (f"A grounding loss (weight {args.grounding_weight}) acts like region annotations: in the last LLM "
                    f"layer, head 0 at each yes/no answer position is pushed to put its attention over the visual "
                    f"tokens on the patches the question asks about (the shape; for colour and position "
                    f"questions the patches of that shape in that colour / on that side), or, when nothing "
                    f"matches, on the text prefix (BOS, the usual attention sink); the loss is -log of that "
                    f"attention mass, with patch masks from the generator. ")
        if args.ground_shape_only:
            caption += ("In this run colour and position questions are grounded on all patches of the asked shape "
                        "(the attribute is compared after attention, see the readout loss). ")
    if args.count_grounding_weight > 0:
        where = {"centre": "on the patch holding its centre",
                 "cover": "on the patch the instance covers most, never a ring's hole",
                 "first": "on its top-left patch, the first it shows in raster order",
                 "spread": "spread evenly over the patches the instance shows, so a big and a small instance "
                           "weigh the same"}[args.count_anchor]
        share = (f"{COUNT_SHARE}" if args.count_target == "linear" else
                 f"{COUNT_RATIO} / (1 + {COUNT_RATIO} n) (n instances: what one fixed attention logit per instance gives)")
        heads = [str(h) for h in args.count_heads]
        who = f"head {heads[0]}" if len(heads) == 1 else f"each of heads {', '.join(heads)}"
        caption += (f"A counting loss (weight {args.count_grounding_weight}): {who} of the last layer puts "
                    f"{share} of its attention on each instance of the asked shape ({where}) and the rest "
                    f"on the text prefix, so its output moves with the number of instances. ")
    if args.route_weight > 0 or args.readout_weight > 0 or args.keep_weight > 0:
        caption += ("Linear probes, thrown away after training, add losses that keep the information each step "
                    "of the answer needs where the next step can read it: ")
        probes = []
        if args.keep_weight > 0:
            mark = {"centre": "the patch holding an object's centre",
                    "cover": "the patch an object's pixels cover most (where the counting loss points)",
                    "first": "an object's top-left patch (where the counting loss points)"}[
                args.keep_centre_label]
            probes.append(f"each visual token entering the last LLM layer still tells its patch's shape, colour, row, "
                          f"column and whether it is {mark} (weight {args.keep_weight})")
        if args.route_weight > 0:
            probes.append(f"the answer position entering the last layer knows the asked shape, colour, side and number "
                          f"(weight {args.route_weight})")
        if args.readout_weight > 0:
            probes.append(f"after the last layer's attention it knows the asked shape's colours, side and count in the "
                          f"image, and the raw outputs of head 0 (colours, side) and head 1 (count) tell them too "
                          f"(weight {args.readout_weight})")
        caption += "; ".join(probes) + ". "
    if args.family_weights:
        caption += f"The first answer token's loss is weighted per family ({args.family_weights}). "
    if args.grow_lm_layers:
        caption += (f"{args.grow_lm_layers} LLM layers were inserted before the last one, starting as the identity "
                    f"(zero output projections). ")
    curriculum = (f"Curriculum: the first {args.curriculum_steps} steps see only {args.curriculum_tokens} of the 576 "
                  f"visual tokens (every patch an object touches plus random background patches, at their own "
                  f"positions), the next {args.curriculum_ramp} ramp up to all 576, the rest see all 576."
                  if args.curriculum_steps > 0 and args.curriculum_tokens < 576 else "All steps see all 576 visual tokens.")
    if args.p_subset > 0:
        sizes = " or ".join(str(n) for n in args.subset_tokens)
        after = " after the curriculum" if args.curriculum_steps > 0 and args.curriculum_tokens < 576 else ""
        curriculum = curriculum.removesuffix("All steps see all 576 visual tokens.") + (
            f"{args.p_subset:.0%} of the steps{after} (drawn per step) see only {sizes} of the visual tokens: every "
            f"patch an object touches, then random background patches, at their original positions (more when a "
            f"batch's objects cover more patches), so the LLM also answers from a selection that keeps the objects; "
            f"the others see all 576.")
    low = [f"{f} {info['eval']['all'][f]['acc']:.1f}%" for f in E.FAMILIES if info["eval"]["all"][f]["acc"] < 90.0]
    shortfall = ("On this world every family is at 90% or more with all tokens." if not low else
                 "Below the 90% target with all tokens: " + ", ".join(low) + " (yes/no pairs: chance is 50%).")
    others = info.get("other_worlds", {})
    other_section = ""
    if others:
        mean = E.mean_accuracy(others.values())
        low = [f"{f} {mean[f]['acc']:.1f}%" for f in E.FAMILIES if mean[f]["acc"] < 90.0]
        columns = {**{f"seed {k}": v for k, v in others.items()}, "mean": mean}
        other_section = f"""
### Other worlds

The held-out world above (seed {args.eval_seed}) also served to choose between the training runs
listed above, so its figures are biased upwards. Worlds of seeds {", ".join(others)}, which no
choice looked at ({args.eval_mme_images} images per MME subtask, 20 per POPE split, all 576
tokens; `python examples/tiny_llava/evaluate_worlds.py --seeds {" ".join(others)}` prints the same table):

{E.format_table(columns)}

""" + ("Every family's mean is at 90% or more." if not low else
       "Below the 90% target on these worlds (mean): " + ", ".join(low) + ".") + "\n"
    history = ""
    if args.init_from:
        history = (f"""
The language stage above continued from `{args.init_from}` (saved at language step
{info.get('init_step', '?')} of an earlier run): the vision stage ({info['time']['vision'] / 60:.1f} min) and
{info['time']['earlier_attempt'] / 60:.1f} min of earlier language steps, all counted below, come from the
earlier runs listed here.
""")
        if args.history:
            history += "\n" + Path(args.history).read_text().strip() + "\n"
    card = f"""# tiny-llava-synth

A tiny LLaVA-1.5 (transformers `LlavaForConditionalGeneration`, llava-hf layout) that really sees
the project's synthetic world (`sparsezip_pl.data.synthetic`): coloured shapes, some covering only
a few 14-px patches, on cluttered backgrounds. It exists so the SparseZip demo and tests have a
model whose answers depend on the visual tokens. Everything below was written by the training
script from its own measurements.

## Architecture

- Vision tower: `CLIPVisionModel`, image 336, patch 14 (576 patches + CLS), width {v.hidden_size},
  {v.num_hidden_layers} layers, {v.num_attention_heads} heads, MLP {v.intermediate_size}, `{v.hidden_act}`.
  `vision_feature_layer={c.vision_feature_layer}`, `vision_feature_select_strategy="{c.vision_feature_select_strategy}"`
  (the last tower layer is not used by LLaVA and stays at its initialization).
- Projector: LLaVA-1.5 MLP `Linear({v.hidden_size}->{t.hidden_size}) -> {c.projector_hidden_act} -> Linear({t.hidden_size}->{t.hidden_size})`.
- LLM: `LlamaForCausalLM`-style, width {t.hidden_size}, {t.num_hidden_layers} layers, {t.num_attention_heads} heads,
  MLP {t.intermediate_size} (SiLU), RoPE, vocab {t.vocab_size}.
- Tokenizer: SentencePiece BPE (byte fallback) trained on the world's sentences by
  `sparsezip_pl.models.tokenizer.build_llama_tokenizer`; `<image>` = id {c.image_token_id}; BOS 1, EOS 2, pad 0.
- Processor: `LlavaProcessor` + `CLIPImageProcessor` (336, CLIP mean/std), `patch_size=14`,
  `vision_feature_select_strategy="default"`, `num_additional_image_tokens=1`: `<image>` expands to 576 tokens.
  Chat template: `USER: <image>\\nQ ASSISTANT:` (llava-1.5-hf's) and an assistant turn ` A</s>`.
- Parameters: {pc['total']:,} in total (vision tower {pc['vision_tower']:,}, projector {pc['projector']:,},
  language model {pc['language_model']:,}); weights stored as float32 safetensors; folder size {info['size_mb']:.1f} MB.

## Data

Generated on the fly from `sparsezip_pl.data.synthetic` (training seed {args.seed}, images never
repeat): 9 shapes x 6 colours, 2-5 objects per scene (about 45% small, 26-36 px), theme-driven
co-occurrence and unequal shape frequencies. Per training image: an MME-style yes/no pair for each
of existence / count / color / position (when the scene allows one), a POPE-style positive +
negative probe (negative drawn by the random, popular or adversarial rule), and in
{args.p_conversation:.0%} of images a multi-turn LLaVA-Instruct-style conversation. Yes/no prompts
are the question + "\\nAnswer the question using a single word or phrase." (LLaVA-1.5), answers
"Yes"/"No"; all text goes through `processor.apply_chat_template`.

## Training

Command (run from the repository root, {args.threads} CPU thread{'s' if args.threads > 1 else ''}, bf16 autocast={bool(args.bf16)}):

    {info['command']}

1. Vision ({args.vision_crop_steps} steps on random 12x12-patch crops, 2 per image, {args.vision_batch} images
   per step -- a quarter of the tokens per crop, so much cheaper steps -- then {args.vision_steps} steps on full images,
   {args.vision_batch} per step; AdamW lr {args.vision_lr}, warm-up + cosine): dense heads on the feature layer
   (shape, colour, centre, per-shape count, row/column per patch; shapes, shape-colour pairs and
   counts from CLS; on crops only the patch heads and which shapes the crop holds).{refresh}
   {info['time']['vision'] / 60:.1f} min.
2. Language ({args.lm_steps} steps x {args.lm_batch} images, {info['items_per_image']:.1f} items per image on average,
   AdamW lr {args.lm_lr}, {args.lm_warmup} warm-up steps + cosine; {tower}; projector + LLM trained;
   loss on assistant tokens only). {caption}{curriculum}
   An image's questions share its visual prefix (computed once; the questions are packed in rows of
   at most {args.row_tokens} tokens behind it, with a block-causal mask and positions restarting after
   the prefix), which equals separate sequences (checked against the stock forward: max logit
   difference {info['fast_path_err']:.1e}). {info['time']['language'] / 60:.1f} min.
{history}
Training time {info['time']['total'] / 60:.1f} min (wall clock, all stages{' and the earlier attempt' if info['time'].get('earlier_attempt') else ''}) on this machine: an AMD EPYC
with 2 cores shared with other jobs (threads per run: `--threads`, default 1). Held-out evaluation and saving took
{info['time']['eval'] / 60:.1f} min more.

## Held-out accuracy

{REEVALUATED if info.get("reevaluated") else ""}Held-out world: `generate_world(seed={args.eval_seed}, n_mme_images={args.eval_mme_images}, n_pope_images={args.eval_pope_images})`,
read back from its files (MME txt, POPE json lines), greedy decoding of up to 3 tokens, answers
parsed with docs/formats.md's MME and POPE rules. Accuracy in % (MME: per question; POPE: per probe).
"random 64" / "uniform stride 64" keep 64 of the 576 visual tokens (a random subset per image / a
uniform 8x8 grid) in their original order, the careless baselines the compressor must beat.

{E.format_table(cols)}

{shortfall}

MME scores (acc + acc+, 0..200) with all tokens: {", ".join(f"{f[4:]} {info['eval']['all'][f]['score']:.1f}" for f in E.FAMILIES[:4])}.
POPE F1 / yes-ratio with all tokens: {", ".join(f"{f[5:]} {pope[f]['f1']:.1f} / {pope[f]['yes_ratio']:.1f}" for f in E.FAMILIES[4:])}.
{other_section}
Stock path check: on the first {args.honest_images} images of each subtask / split, answers through
`processor(...)` + `model.generate` agree with the fast feature-splicing path on
{info['honest']['agree']:.1f}% of {info['honest']['n']} questions (accuracy there: {info['honest']['acc']:.1f}%).

The test `tests/test_tiny_checkpoint.py` re-checks the accuracy on a small held-out slice through
the project's `test` command (hf backend, all tokens); it allows {info['test_margin']:.0f} points below the
overall all-token accuracy documented here ({info['overall_all']:.1f}%), for the slice's sampling noise.
"""
    (out / "MODEL_CARD.md").write_text(card)

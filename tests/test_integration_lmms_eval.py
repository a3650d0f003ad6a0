"""lmms-eval's ``sparsezip`` model gives the scores ``python -m sparsezip_pl test`` gives, offline.

Needs the optional extra; skipped without it (``make test`` / CI does not install it). To run it:

    grep -v '^protobuf' constraints.txt > /tmp/constraints-lmms.txt
    pip install torch==2.13.0 -e ".[dev,llava,lmms-eval]" -c /tmp/constraints-lmms.txt
    pip install --no-deps llava-torch==1.2.2.post1
    pip install protobuf==7.36.2    # for SentencePiece tokenizers (the llava family); breaks only wandb logging
    pip uninstall -y torchvision    # only where the CUDA torchvision wheel cannot import (a CPU-only machine)
    python -m pytest -q tests/test_integration_lmms_eval.py

What runs: the shipped ``checkpoints/tiny-llava-synth`` (trained on the project's synthetic world,
it answers exactly "Yes" or "No"), compressed by VisionZip at 64 tokens and by SparseZip, on a
small synthetic world written here in the Hugging Face columns of MME (``question_id, image,
question, answer, category``) and POPE (``id, question_id, question, answer, image_source, image,
category``). lmms-eval runs as users run it, ``python -m lmms_eval --model sparsezip ...`` in a
subprocess with no network, on local task YAMLs that are the 0.7.3 ``mme`` / ``pope`` ones with
the data set pointed at the parquet files (their own ``utils`` functions score). The project
runs ``python -m sparsezip_pl test`` on the same parquet files.

What is compared, and why it is comparable:

* the raw answers, sample by sample (same prompts: lmms-eval's MME/POPE prompt is LLaVA-1.5's);
* MME: lmms-eval's ``mme_perception_score`` / ``mme_cognition_score`` equal the project's
  ``perception_total_NofM`` / ``cognition_total_NofM`` (the same rule, acc + acc+ per subtask
  summed over the subtasks present);
* POPE: lmms-eval scores exact matches after lower-casing, the project LLaVA's ``eval_pope``
  rule (a "no"/"not" word before the first "." means no); the two agree when the answers are
  exactly yes or no, which the test asserts first. lmms-eval pools all rows, the project
  reports each split and their mean, so the data here hold one split (``random``).
  lmms-eval's ``pope_yes_ratio`` is computed from the ground truth, not from the answers (a bug
  in 0.7.3), so it is checked against the ground truth, and the project's answer yes-ratio
  against lmms-eval's logged answers;
* the visual tokens: lmms-eval's ``avg_visual_tokens/TASK`` throughput figures equal the mean of
  the project's per-sample ``visual_tokens``.

Image processors: lmms-eval pulls torchvision, with which transformers switches to its
torchvision image processors; no CPU build of torchvision exists here, so both sides run the PIL
backend (asserted: both runs report the same processor class).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="the lmms-eval extra is not installed (pip install sparsezip_pl[lmms-eval])")

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "checkpoints" / "tiny-llava-synth"

MME_YAML = """dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
task: mme_local
test_split: test
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.mme.utils.mme_doc_to_visual
doc_to_text: !function lmms_eval.tasks.mme.utils.mme_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function lmms_eval.tasks.mme.utils.mme_process_results
metric_list:
  - metric: mme_perception_score
    aggregation: !function lmms_eval.tasks.mme.utils.mme_aggregate_results
    higher_is_better: true
  - metric: mme_cognition_score
    aggregation: !function lmms_eval.tasks.mme.utils.mme_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  - version: 0.0
"""

POPE_YAML = """dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
task: pope_local
test_split: test
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.pope.utils.pope_doc_to_visual
doc_to_text: !function lmms_eval.tasks.pope.utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 128
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function lmms_eval.tasks.pope.utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_precision
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_precision
    higher_is_better: true
  - metric: pope_recall
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_recall
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_f1_score
    higher_is_better: true
  - metric: pope_yes_ratio
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_yes_ratio
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  - version: 0.0
"""


def write_hub_layout(world: dict, folder: Path, pope_split: str = "random") -> tuple[Path, Path]:
    """The world's MME and POPE (one split) as parquet files in the Hub releases' columns."""
    from datasets import Dataset, Features, Image, Value

    mme_rows = []
    for image in sorted(Path(world["mme_root"]).glob("*/*.jpg")):
        lines = image.with_suffix(".txt").read_text(encoding="utf-8").splitlines()
        for line in lines:
            question, answer = line.split("\t")
            mme_rows.append({"question_id": f"{image.parent.name}/{image.name}", "category": image.parent.name,
                             "image": {"bytes": image.read_bytes(), "path": None}, "question": question,
                             "answer": answer})
    mme_features = Features(question_id=Value("string"), image=Image(), question=Value("string"),
                            answer=Value("string"), category=Value("string"))
    pope_rows = []
    for line in Path(world["pope_files"][pope_split]).read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        image = Path(world["pope_image_folder"]) / item["image"]
        pope_rows.append({"id": str(len(pope_rows)), "question_id": str(item["question_id"]), "question": item["text"],
                          "answer": item["label"], "image_source": image.stem,
                          "image": {"bytes": image.read_bytes(), "path": None}, "category": pope_split})
    pope_features = Features(id=Value("string"), question_id=Value("string"), question=Value("string"),
                             answer=Value("string"), image_source=Value("string"), image=Image(),
                             category=Value("string"))
    folder.mkdir(parents=True, exist_ok=True)
    mme, pope = folder / "mme_test.parquet", folder / "pope_test.parquet"
    Dataset.from_list(mme_rows, features=mme_features).to_parquet(str(mme))
    Dataset.from_list(pope_rows, features=pope_features).to_parquet(str(pope))
    return mme, pope


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sparsezip_pl.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("lmms")
    world = generate_world(root / "world", seed=11, n_mme_images=2, n_pope_images=2, n_instruct=1)
    mme, pope = write_hub_layout(world, root / "hub")
    tasks = root / "tasks"
    for name, text, path in (("mme_local", MME_YAML, mme), ("pope_local", POPE_YAML, pope)):
        (tasks / name).mkdir(parents=True)
        (tasks / name / f"{name}.yaml").write_text(text.format(data=path), encoding="utf-8")
    return {"root": root, "mme": mme, "pope": pope, "tasks": tasks}


def run_lmms_eval(data: dict, model_args: str, out: Path, tasks: str = "mme_local,pope_local") -> dict:
    """``python -m lmms_eval --model sparsezip`` offline; the results JSON and the logged samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(data["root"] / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "sparsezip", "--model_args", model_args,
               "--tasks", tasks, "--include_path", str(data["tasks"]), "--batch_size", "4",
               "--output_path", str(out), "--log_samples", "--verbosity", "DEBUG"]
    # --verbosity DEBUG: otherwise lmms-eval 0.7.3 reports a failure with exit status 0
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    results = sorted(out.rglob("*_results.json"))
    assert len(results) == 1, (list(out.rglob("*")), process.stderr[-3000:])
    samples = {}
    for task in tasks.split(","):
        path = next(out.rglob(f"*_samples_{task}.jsonl"))
        samples[task] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {"results": json.loads(results[0].read_text(encoding="utf-8")), "samples": samples,
            "log": process.stderr}


def run_project_test(data: dict, tmp: Path, compressor: dict | None, model: Path = MODEL, backend: str = "hf",
                     pope: bool = True, **settings) -> dict:
    """``python -m sparsezip_pl test`` on the same parquet files."""
    import yaml

    from sparsezip_pl.cli import main

    config = {
        "model": {"backend": backend, "model_path": str(model), "dtype": "float32", "max_new_tokens": 16,
                  **({"compressor": compressor} if compressor else {}), **settings},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp / "runs"), "name": "project"}}},
        "data": {"class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
                 "init_args": {"mme_root": str(data["mme"]), "pope_source": str(data["pope"]) if pope else None,
                               "batch_size": 4, "cache_dir": str(tmp / "datasets")}},
    }
    path = tmp / "project.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["test", "--config", str(path)])
    folder = Path(cli.trainer.log_dir)
    records = [json.loads(line) for line in (folder / "predictions" / "predictions.jsonl").read_text().splitlines()]
    return {"results": json.loads((folder / "results.json").read_text()), "records": records,
            "image_processor": type(cli.model.backend.image_processor).__name__}


def write_tuned_compressor(folder: Path) -> Path:
    """A tuned SparseZip compressor for the shipped model, exported as users export one: a
    training checkpoint of the module's layout (compressor weights moved off their initial
    values) through ``python -m sparsezip_pl export``."""
    import torch

    from sparsezip_pl.cli import main
    from sparsezip_pl.models import CompressedLlava, load_family

    config = {"method": "sparsezip", "budget": 48, "sparsezip": {"cross_beta": 0.5}}
    compressor = CompressedLlava(load_family("hf", MODEL), config).compressor
    state = {f"model.compressor.{key}": value * 1.5 + 0.05 if value.is_floating_point() else value
             for key, value in compressor.state_dict().items()}
    hparams = {"backend": "hf", "model_path": str(MODEL), "dtype": "float32", "compressor": config,
               "visual_positions": "contiguous"}
    folder.mkdir(parents=True)
    torch.save({"state_dict": state, "hyper_parameters": hparams, "global_step": 1, "epoch": 0}, folder / "tuned.ckpt")
    return main(["export", "--ckpt_path", str(folder / "tuned.ckpt"), str(folder / "tuned")])


def _response(sample: dict) -> str:
    """The answer lmms-eval scored (``filtered_resps``: the text, or a list holding it)."""
    response = sample["filtered_resps"]
    return response[0] if isinstance(response, list) else response


@pytest.mark.parametrize("method,compressor", [
    ("visionzip", {"method": "visionzip", "budget": 64}),
    ("sparsezip", {"method": "sparsezip"}),
    ("sparsezip", "tuned"),
])
def test_lmms_eval_scores_equal_the_project_test(data, tmp_path, method, compressor):
    """lmms-eval's ``sparsezip`` model against ``python -m sparsezip_pl test`` (see the module doc):
    VisionZip at 64 tokens, SparseZip's defaults, and a tuned SparseZip compressor folder
    (``compressor=`` there, ``--model.compressor_path`` here)."""
    args = f"pretrained={MODEL},dtype=float32,stats_path={tmp_path / 'stats.json'}"
    settings = {}
    if compressor == "tuned":
        tuned = write_tuned_compressor(tmp_path / "export")
        args += f",compressor={tuned}"
        compressor, settings = None, {"compressor_path": str(tuned)}
    else:
        args += f",method={method}" + (f",budget={compressor['budget']}" if "budget" in compressor else "")
    lmms = run_lmms_eval(data, args, tmp_path / "lmms")
    project = run_project_test(data, tmp_path, compressor, **settings)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["method"] == method and stats["family"] == "hf"  # family read from the checkpoint's config
    if settings:
        assert stats["budget"] == 48 and stats["tuned_compressor"]["source"] == settings["compressor_path"]
    assert stats["image_processor"] == project["image_processor"]  # the same backend on both sides (PIL here)
    results = lmms["results"]
    assert results["config"]["model_args"] == args  # the method and budget are recorded with the scores

    # the same answers, sample by sample (MME by image and prompt, POPE by question id)
    mme, pope = lmms["samples"]["mme_local"], lmms["samples"]["pope_local"]
    project_mme = [r for r in project["records"] if r["task"] == "mme"]
    project_pope = [r for r in project["records"] if r["task"] == "pope"]
    assert len(mme) == len(project_mme) == 16 and len(pope) == len(project_pope) > 8
    lmms_mme = {(s["mme_perception_score"]["question_id"], s["input"]): _response(s) for s in mme}
    assert lmms_mme == {(r["image_path"], r["question"]): r["prediction"] for r in project_mme}
    lmms_pope = {s["pope_accuracy"]["question_id"]: _response(s) for s in pope}
    assert lmms_pope == {r["sample_id"].split("/", 1)[1]: r["prediction"] for r in project_pope}
    answers = list(lmms_mme.values()) + list(lmms_pope.values())
    assert set(answers) <= {"Yes", "No"} and len(set(answers)) == 2  # exact yes/no: the two POPE rules agree

    # MME: the same rule on both sides
    ours = project["results"]
    perception = next(v for k, v in ours.items() if k.startswith("test/mme/perception_total"))
    theirs = results["results"]["mme_local"]
    assert theirs["mme_perception_score,none"] == pytest.approx(perception, abs=1e-4)
    assert "mme_cognition_score,none" not in theirs or theirs["mme_cognition_score,none"] == 0.0
    assert 0 < perception < 800  # neither all wrong nor all right: the comparison can fail
    # POPE: one split, exact yes/no answers
    theirs = results["results"]["pope_local"]
    assert theirs["pope_accuracy,none"] * 100 == pytest.approx(ours["test/pope/random/accuracy"], abs=1e-3)
    assert theirs["pope_precision,none"] * 100 == pytest.approx(ours["test/pope/random/precision"], abs=1e-3)
    assert theirs["pope_recall,none"] * 100 == pytest.approx(ours["test/pope/random/recall"], abs=1e-3)
    assert theirs["pope_f1_score,none"] * 100 == pytest.approx(ours["test/pope/random/f1"], abs=1e-3)
    truth_yes = sum(r["answer"] == "yes" for r in project_pope) / len(project_pope)
    assert theirs["pope_yes_ratio,none"] == pytest.approx(truth_yes)  # lmms-eval's: the ground truth's
    said_yes = sum(a == "Yes" for a in lmms_pope.values()) / len(lmms_pope)
    assert ours["test/pope/random/yes_ratio"] == pytest.approx(100 * said_yes, abs=1e-3)

    # the visual tokens the LLM saw
    throughput = results["throughput"]
    for task, name in (("mme", "mme_local"), ("pope", "pope_local")):
        tokens = [r["visual_tokens"] for r in project["records"] if r["task"] == task]
        assert throughput[f"avg_visual_tokens/{name}"] == pytest.approx(sum(tokens) / len(tokens))
        assert stats["tasks"][name]["visual_tokens_mean"] == pytest.approx(sum(tokens) / len(tokens))
    if method == "visionzip":
        assert throughput["avg_visual_tokens"] == pytest.approx(64.0)
    assert throughput["avg_stock_visual_tokens"] == 576
    # each logged sample's input_tokens: the prompt's text tokens plus the visual tokens it kept
    from PIL import Image

    from sparsezip_pl.models import load_family

    builder = load_family("hf", MODEL).batch_builder("generate")
    visual = {(r["image_path"], r["question"]): r["visual_tokens"] for r in project_mme}
    for sample in mme:
        key = (sample["mme_perception_score"]["question_id"], sample["input"])
        ids = builder.encode({"sample_id": "x", "question": sample["input"], "image": Image.new("RGB", (8, 8))})
        text = len(ids["input_ids"]) - 1  # the image placeholder becomes the visual tokens
        assert sample["token_counts"][0]["input_tokens"] == text + visual[key]


def test_lmms_eval_runs_the_original_llava_code_family(data, tmp_path):
    """Family ``llava`` (the original LLaVA code, detected from ``mm_vision_tower`` in the config):
    a tiny random-weight checkpoint, so the answers are arbitrary text; compared are the answers
    themselves and MME's score, which both sides compute with the same rule (none of the answers
    holds lmms-eval's ``until`` string "\\n\\n", checked, so lmms-eval's cut changes none)."""
    pytest.importorskip("llava", reason="the original LLaVA code (llava-torch) is not installed")
    try:  # transformers converts the tiny checkpoint's SentencePiece tokenizer with sentencepiece's protobuf code
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a protobuf runtime older than sentencepiece's generated code
        pytest.skip(f"SentencePiece tokenizers cannot be converted here ({error}); lmms-eval 0.7.3's wandb pin "
                    "resolves protobuf 6: pip install protobuf==7.36.2 (see docs/ecosystem.md)")
    from sparsezip_pl.models.tiny import cached_tiny_llava

    model = cached_tiny_llava("llava", image_size=112)
    args = f"pretrained={model},method=visionzip,budget=16,stats_path={tmp_path / 'stats.json'}"
    lmms = run_lmms_eval(data, args, tmp_path / "lmms", tasks="mme_local")
    project = run_project_test(data, tmp_path, {"method": "visionzip", "budget": 16}, model=model, backend="llava",
                               pope=False)
    assert json.loads((tmp_path / "stats.json").read_text())["family"] == "llava"
    mme = lmms["samples"]["mme_local"]
    records = [r for r in project["records"] if r["task"] == "mme"]
    assert len(mme) == len(records) == 16
    assert not any("\n\n" in r["prediction"] for r in records)
    assert ({(s["mme_perception_score"]["question_id"], s["input"]): _response(s) for s in mme}
            == {(r["image_path"], r["question"]): r["prediction"] for r in records})
    perception = next(v for k, v in project["results"].items() if k.startswith("test/mme/perception_total"))
    assert lmms["results"]["results"]["mme_local"]["mme_perception_score,none"] == pytest.approx(perception, abs=1e-4)
    assert lmms["results"]["throughput"]["avg_visual_tokens/mme_local"] == pytest.approx(16.0)

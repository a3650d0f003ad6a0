"""What TensorBoard shows, read back from a real TensorBoard server through its HTTP API: the
runs' scalars, one HParams row per run (method, budget, options beside the final metrics), and
the kept-token pictures per benchmark category; plus the progress bar and the one-line summary a
person follows in the terminal.

The server listens on 127.0.0.1 only, on a port the system picks, and is terminated at the end
of the test whatever happens."""

from __future__ import annotations

import contextlib
import io
import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sparsezip_pl.cli import main
from sparsezip_pl.data.synthetic import generate_world
from sparsezip_pl.models.tiny import cached_tiny_llava

RUNS = {"visionzip": {"method": "visionzip", "budget": 16}, "sparsezip": {"method": "sparsezip", "budget": 24}}
MME_SUBTASKS = ("existence", "count", "position", "color")
POPE_SPLITS = ("random", "popular", "adversarial")

pytestmark = pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two ``test`` runs (VisionZip at 16 tokens, SparseZip at 24) with the progress bar on."""
    root = tmp_path_factory.mktemp("tb")
    world = generate_world(root / "world", seed=5, n_mme_images=1, n_pope_images=1, n_instruct=1)
    model = str(cached_tiny_llava("hf", image_size=112))
    out = {"root": root, "world": world, "model": model, "logdir": root / "runs", "folders": {}, "output": {}}
    for name, compressor in RUNS.items():
        config = {
            "model": {"backend": "hf", "model_path": model, "max_new_tokens": 2, "compressor": compressor},
            "trainer": {"accelerator": "cpu", "enable_model_summary": False,
                        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(out["logdir"]), "name": name}}},
            "pictures": {"num_images": 1},
            "data": {"class_path": "sparsezip_pl.lit.datamodules.EvalDataModule",
                     "init_args": {"mme_root": world["mme_root"], "pope_source": world["pope_root"],
                                   "pope_image_dir": world["pope_image_folder"], "batch_size": 4}},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            cli = main(["test", "--config", str(path)])
        out["folders"][name] = Path(cli.trainer.log_dir)
        out["output"][name] = printed.getvalue()
    return out


@contextlib.contextmanager
def tensorboard_server(logdir: Path, timeout: float = 90.0):
    """A TensorBoard on 127.0.0.1 (a free port), yielding its base URL; always terminated."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", "0", "--load_fast=false", "--reload_interval", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + timeout, []
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"TensorBoard did not start within {timeout} s: {''.join(seen)}") from None
            seen.append(line)
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if match:
                yield f"http://127.0.0.1:{match.group(1)}"
                return
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"TensorBoard did not start: {''.join(seen)}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def fetch(url: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with _OPENER.open(request, timeout=30) as response:
        return response.read()


def fetch_json(url: str, body: dict | None = None):
    return json.loads(fetch(url, body))


def wait_for(condition, timeout: float = 60.0):
    """Poll ``condition()`` (TensorBoard loads event files in the background) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_tensorboard_shows_scalars_hparams_and_pictures_per_category(runs):
    results = {name: json.loads((folder / "results.json").read_text()) for name, folder in runs["folders"].items()}
    perception = "test/mme/perception_total_4of10"
    with tensorboard_server(runs["logdir"]) as url:
        run_names = {name: f"{name}/{folder.name}" for name, folder in runs["folders"].items()}
        tags = wait_for(lambda: (lambda t: t if set(run_names.values()) <= set(t) else None)(
            fetch_json(f"{url}/data/plugin/scalars/tags")))
        assert tags, "TensorBoard never listed both runs"
        for name, run in run_names.items():
            assert {perception, "test/pope/avg/f1", "budget/test_tokens_mean"} <= set(tags[run])
            query = urllib.parse.urlencode({"run": run, "tag": "budget/test_tokens_mean"})
            (point,) = fetch_json(f"{url}/data/plugin/scalars/scalars?{query}")
            assert point[2] == pytest.approx(results[name]["budget/tokens_mean"], rel=1e-6)

        # HParams: one session per run; the columns are the union of both runs' settings
        experiment = fetch_json(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
        infos = {info["name"]: info for info in experiment["hparamInfos"]}
        assert sorted(infos["method"]["domainDiscrete"]) == ["sparsezip", "visionzip"]
        assert {"budget", "family", "model", "checkpoint", "visionzip.dominant", "sparsezip.k_max"} <= set(infos)
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert perception in metrics and "hp_metric" not in metrics
        groups = fetch_json(f"{url}/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                                      "STATUS_RUNNING"],
            "colParams": [], "startIndex": 0, "sliceSize": 10})["sessionGroups"]
        assert len(groups) == 2
        for group in groups:
            name = group["hparams"]["method"]
            assert group["name"] == run_names[name] and group["hparams"]["budget"] == RUNS[name]["budget"]
            values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
            assert values[perception] == pytest.approx(results[name][perception], rel=1e-6)
            assert values["budget/test_tokens_mean"] == pytest.approx(results[name]["budget/tokens_mean"], rel=1e-6)

        # pictures: one per benchmark category, the image with its kept patches and clusters
        images = fetch_json(f"{url}/data/plugin/images/tags")
        for run in run_names.values():
            pictures = {tag for tag in images[run] if tag.startswith("kept_tokens/test/")}
            assert pictures == {f"kept_tokens/test/mme/{s}/0" for s in MME_SUBTASKS} | \
                {f"kept_tokens/test/pope/{s}/0" for s in POPE_SPLITS}
        query = urllib.parse.urlencode({"run": run_names["visionzip"], "tag": "kept_tokens/test/mme/count/0"})
        (entry,) = fetch_json(f"{url}/data/plugin/images/images?{query}")
        png = fetch(f"{url}/data/plugin/images/individualImage?{entry['query']}")
    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.array_equal(shown, expected_picture(runs, "count"))


def expected_picture(runs: dict, category: str) -> np.ndarray:
    """The picture of the first MME ``category`` sample, drawn here from a fresh compression."""
    from sparsezip_pl.benchmarks import MME
    from sparsezip_pl.lit.callbacks import draw_kept_tokens
    from sparsezip_pl.models import CompressedLlava, load_family

    dataset = MME(runs["world"]["mme_root"]).load()
    sample = next(dataset[i] for i in range(len(dataset)) if dataset[i]["category"] == category)
    family = load_family("hf", runs["model"])
    batch = family.batch_builder("generate")([sample])
    compression = CompressedLlava(family, RUNS["visionzip"]).compress(batch)
    picture = draw_kept_tokens(batch["pixel_values"][0], compression.kept_indices[0], compression.cluster_map[0])
    assert int((compression.cluster_map[0] >= 0).sum()) > 0  # contextual clusters are drawn, not only kept patches
    return picture.permute(1, 2, 0).numpy()


def test_progress_bar_and_summary_line(runs):
    output = runs["output"]["visionzip"]
    results = json.loads((runs["folders"]["visionzip"] / "results.json").read_text())
    bar = re.findall(r"samples/s=([\d.]+), acc=([\d.]+)%, tokens/img=([\d.]+)", output)
    assert bar, output[-2000:]
    assert float(bar[-1][2]) == pytest.approx(16.0)  # VisionZip at 16: every image sends 16 tokens
    records = [json.loads(line) for line in
               (runs["folders"]["visionzip"] / "predictions" / "predictions.jsonl").read_text().splitlines()]
    right = sum(r["parsed"] == r["answer"].lower() for r in records)
    assert float(bar[-1][1]) == pytest.approx(100.0 * right / len(records), abs=0.05)
    (summary,) = [line for line in output.splitlines() if line.startswith("test done:")]
    folder = runs["folders"]["visionzip"]
    assert summary.startswith("test done: visionzip (budget 16) | ")
    assert f"mme/perception_total_4of10 {results['test/mme/perception_total_4of10']:.2f}" in summary
    assert f"pope/avg/f1 {results['test/pope/avg/f1']:.2f}" in summary
    assert "16.0 visual tokens per image" in summary and "| 0 skipped |" in summary
    assert summary.endswith(f"files: {folder / 'results.json'}, {folder / 'predictions'}/")


def test_the_private_lightning_attributes_used_still_exist(tmp_path):
    """SamplesProgressBar reads TQDMProgressBar's bar attributes, HParamsSummary sets
    TensorBoardLogger's ``_default_hp_metric`` (its absence above shows it takes effect)."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    bar = TQDMProgressBar()
    for stage in ("train", "val", "test", "predict"):
        assert getattr(bar, f"_{stage}_progress_bar", "missing") is None
    assert TensorBoardLogger(str(tmp_path), default_hp_metric=True)._default_hp_metric is True

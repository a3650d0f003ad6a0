"""MMEScore / POPEScore against hand-computed references, de-duplication and state merging."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsezip_pl.benchmarks import MMEScore, POPEScore
from sparsezip_pl.benchmarks.metrics import stable_id

# (sample_id, category, prediction, ground truth)
MME_ROWS = [
    ("existence/a.jpg#0", "existence", "Yes", "yes"),  # pair a: both right
    ("existence/a.jpg#1", "existence", "No.", "no"),
    ("existence/b.jpg#0", "existence", "yes", "yes"),  # pair b: one wrong
    ("existence/b.jpg#1", "existence", "yes", "no"),
    ("code_reasoning/c.png#0", "code_reasoning", "no", "yes"),  # pair c: one wrong
    ("code_reasoning/c.png#1", "code_reasoning", "n", "no"),
    ("code_reasoning/d.png#0", "code_reasoning", "I don't know", "no"),  # "other": wrong
    ("code_reasoning/d.png#1", "code_reasoning", "Yes, it is.", "yes"),
]
# existence: acc 3/4 = 75, acc+ 1/2 = 50, score 125; code_reasoning: acc 2/4 = 50, acc+ 0, score 50.
MME_EXPECTED = {
    "existence/acc": 75.0, "existence/acc_plus": 50.0, "existence/score": 125.0,
    "code_reasoning/acc": 50.0, "code_reasoning/acc_plus": 0.0, "code_reasoning/score": 50.0,
    # One perception and one cognition subtask: the sums are named for what they cover.
    "perception_total_1of10": 125.0, "cognition_total_1of4": 50.0, "num_samples": 8.0, "incomplete_pairs": 0.0,
}


def _update(metric, rows):
    ids, cats, preds, truths = zip(*rows) if rows else ((), (), (), ())
    metric.update(list(ids), list(cats), list(preds), list(truths))


def _values(result):
    return {k: round(float(v), 4) for k, v in result.items()}


def test_mme_reference():
    metric = MMEScore()
    _update(metric, MME_ROWS[:3])
    _update(metric, MME_ROWS[3:])
    assert _values(metric.compute()) == MME_EXPECTED


def test_mme_duplicates_and_merge():
    # rank 0 gets rows 0..4, rank 1 rows 5..7 plus rows 0 and 1 again (DistributedSampler padding)
    rank0, rank1 = MMEScore(), MMEScore()
    _update(rank0, MME_ROWS[:5])
    _update(rank1, MME_ROWS[5:] + MME_ROWS[:2])
    rank0.merge_state(rank1)
    assert _values(rank0.compute()) == MME_EXPECTED
    single = MMEScore()
    _update(single, MME_ROWS + [MME_ROWS[3]])  # a duplicate in the same process
    assert _values(single.compute()) == MME_EXPECTED


def test_mme_explicit_pair_ids_and_samples_api():
    metric = MMEScore()
    samples = [{"task": "mme", "sample_id": s, "category": c, "answer": t, "pair_id": s.split("#")[0]}
               for s, c, _, t in MME_ROWS]
    samples.append({"task": "pope", "sample_id": "random/1", "category": "random", "answer": "yes", "pair_id": None})
    metric.update_from_samples(samples, [p for _, _, p, _ in MME_ROWS] + ["yes"])
    assert _values(metric.compute()) == MME_EXPECTED


def test_mme_incomplete_pair_counts_wrong():
    metric = MMEScore()
    _update(metric, MME_ROWS[:3])  # pair b has only its (correct) first question
    result = _values(metric.compute())
    assert result["existence/acc"] == 100.0
    assert result["existence/acc_plus"] == 50.0 and result["incomplete_pairs"] == 1.0
    assert not any(key.startswith("cognition_total") for key in result)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_mme_bad_input():
    metric = MMEScore()
    with pytest.raises(RuntimeError, match="no samples"):
        metric.compute()
    with pytest.raises(ValueError, match="unknown MME subtask"):
        metric.update(["x#0"], ["Existence"], ["yes"], ["yes"])
    with pytest.raises(ValueError, match="ground truth"):
        metric.update(["x#0"], ["existence"], ["yes"], ["maybe"])
    with pytest.raises(ValueError, match="differ in length"):
        metric.update(["x#0", "x#1"], ["existence"], ["yes"], ["yes"])


# random: gt yes yes no no yes / pred yes no no yes yes -> TP 2 FN 1 TN 1 FP 1
# popular: all-"no" predictions -> precision undefined (0 with a flag)
POPE_ROWS = [
    ("random/1", "random", "Yes", "yes"),
    ("random/2", "random", "No, there is not.", "yes"),
    ("random/3", "random", "no", "no"),
    ("random/4", "random", "There is a dog.", "no"),
    ("random/5", "random", "yes", "yes"),
    ("popular/1", "popular", "No", "yes"),
    ("popular/2", "popular", "no", "no"),
]
POPE_EXPECTED = {
    "random/accuracy": 60.0, "random/precision": 66.6667, "random/recall": 66.6667, "random/f1": 66.6667,
    "random/yes_ratio": 60.0, "random/num_samples": 5.0, "random/precision_undefined": 0.0,
    "random/recall_undefined": 0.0,
    "popular/accuracy": 50.0, "popular/precision": 0.0, "popular/recall": 0.0, "popular/f1": 0.0,
    "popular/yes_ratio": 0.0, "popular/num_samples": 2.0, "popular/precision_undefined": 1.0,
    "popular/recall_undefined": 0.0,
    "avg_2of3/accuracy": 55.0, "avg_2of3/precision": 33.3333, "avg_2of3/recall": 33.3333, "avg_2of3/f1": 33.3333,
    "avg_2of3/yes_ratio": 30.0,
    "num_samples": 7.0,
}


def test_pope_reference_dedup_and_merge():
    metric = POPEScore()
    _update(metric, POPE_ROWS)
    assert _values(metric.compute()) == POPE_EXPECTED
    rank0, rank1 = POPEScore(), POPEScore()
    _update(rank0, POPE_ROWS[:4])
    _update(rank1, POPE_ROWS[4:] + POPE_ROWS[:1])  # padding repeats random/1
    rank0.merge_state(rank1)
    result = rank0.compute()
    assert _values(result) == POPE_EXPECTED
    assert not any(torch.isnan(v) for v in result.values())


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_pope_recall_undefined_and_errors():
    metric = POPEScore()
    _update(metric, [("adversarial/1", "adversarial", "yes", "no"), ("adversarial/2", "adversarial", "no", "no")])
    result = _values(metric.compute())
    assert result["adversarial/recall"] == 0.0 and result["adversarial/recall_undefined"] == 1.0
    assert result["adversarial/precision"] == 0.0 and result["adversarial/precision_undefined"] == 0.0
    assert result["adversarial/f1"] == 0.0 and result["avg_1of3/accuracy"] == 50.0
    with pytest.raises(ValueError, match="unknown POPE split"):
        metric.update(["x"], ["hard"], ["yes"], ["yes"])
    with pytest.raises(RuntimeError, match="no samples"):
        POPEScore().compute()


def test_stable_id():
    assert stable_id("existence/a.jpg#0") == stable_id("existence/a.jpg#0") != stable_id("existence/a.jpg#1")
    assert 0 <= stable_id("x") < 2**52  # exact in the float64 states


def _ddp_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mme, pope = MMEScore(), POPEScore()
        # uneven shards plus padding duplicates, like DistributedSampler(shuffle=False) over 8 + 7 rows
        _update(mme, MME_ROWS[rank::2] + ([MME_ROWS[0]] if rank else []))
        _update(pope, POPE_ROWS[rank::2] + ([POPE_ROWS[0]] if rank else []))
        results[rank] = (_values(mme.compute()), _values(pope.compute()))
    finally:
        dist.destroy_process_group()


def test_real_two_process_gloo_sync():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("fork").Manager().dict()
    mp.start_processes(_ddp_worker, args=(port, results), nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert results[rank] == (MME_EXPECTED, POPE_EXPECTED)


def test_totals_over_every_subtask_and_split_carry_the_benchmarks_names():
    from sparsezip_pl.benchmarks.mme import MME_SUBTASKS, MME_PERCEPTION
    from sparsezip_pl.benchmarks.pope import POPE_SPLITS

    mme = MMEScore()
    rows = [(f"{s}/x.jpg#{k}", s, "yes", "yes") for s in MME_SUBTASKS for k in (0, 1)]
    _update(mme, rows)
    result = _values(mme.compute())
    assert result["perception_total"] == 200.0 * len(MME_PERCEPTION) and result["cognition_total"] == 800.0
    assert not any("of" in key.split("_")[-1] for key in result if key.endswith("total"))
    pope = POPEScore()
    _update(pope, [(f"{s}/1", s, "yes", "yes") for s in POPE_SPLITS])
    assert _values(pope.compute())["avg/accuracy"] == 100.0

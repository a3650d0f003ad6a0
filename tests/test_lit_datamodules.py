"""DataModules: collate hand-off, skip counting through worker processes, DDP sampler injection,
an end-to-end Trainer run, and CLI documentation of the arguments."""

import copy
import gc
import pickle

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from data_fixtures import write_instruct, write_mme_folder, write_pope_files
from sparsezip_pl.data.common import DataError
from sparsezip_pl.lit.datamodules import EvalDataModule, InstructDataModule, MMEDataModule, POPEDataModule
from sparsezip_pl.data.loader import SkipCountingDataLoader
from sparsezip_pl.benchmarks import MMEScore, POPEScore


class WrapCollate:
    """A picklable collate like the LightningModule's: a dict batch."""

    def __call__(self, samples):
        return {"ids": [s["sample_id"] for s in samples], "samples": samples}


def _ids(loader):
    return [i for batch in loader for i in (batch["ids"] if isinstance(batch, dict) else
                                           [s["sample_id"] for s in batch])]


def test_default_and_custom_collate(tmp_path):
    dm = MMEDataModule(str(write_mme_folder(tmp_path)), batch_size=3)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert isinstance(batch, list) and len(batch) == 3 and batch[0]["sample_id"] == "existence/0000.jpg#0"
    dm.collate_fn = WrapCollate()
    loader = dm.test_dataloader()
    assert isinstance(loader, SkipCountingDataLoader)
    ids = _ids(loader)
    assert ids == [dm.dataset[i]["sample_id"] for i in range(8)]  # every sample once, in order
    assert ids == _ids(dm.val_dataloader()) == _ids(dm.predict_dataloader())


def test_lazy_skips_counted_once_through_workers(tmp_path, monkeypatch):
    root = write_mme_folder(tmp_path)
    (root / "existence" / "0001.jpg").write_bytes(b"not a jpeg")
    dm = MMEDataModule(str(root), batch_size=3, num_workers=1, on_error="skip")
    dm.setup("test")
    dm.collate_fn = WrapCollate()
    loader = dm.test_dataloader()
    assert loader.persistent_workers
    for _ in range(2):  # two epochs: the bad pair is counted once
        ids = _ids(loader)
        assert len(ids) == 6 and not any(i.startswith("existence/0001") for i in ids)
    assert dm.skipped == {"corrupt_image": 1}
    raising = MMEDataModule(str(root), batch_size=3, num_workers=1)
    raising.setup("test")
    loader = raising.test_dataloader()
    with pytest.raises(DataError, match="0001.jpg: cannot decode"):
        _ids(loader)
    # torch waits MP_STATUS_CHECK_INTERVAL (5 s) for a worker that raised; shorten it for the test
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    del loader
    gc.collect()


def test_all_skipped_batch_is_not_yielded(tmp_path):
    root = write_mme_folder(tmp_path)
    (root / "existence" / "0001.jpg").write_bytes(b"x")
    dm = MMEDataModule(str(root), batch_size=2, on_error="skip")
    dm.setup()
    batches = list(dm.test_dataloader())
    assert len(batches) == 3 and dm.skipped == {"corrupt_image": 1}


def test_distributed_sampler_injection_and_dedup(tmp_path):
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader

    folder, images = write_pope_files(tmp_path, splits=("random", "popular"), n=5)  # 10 samples
    folder2, _ = write_pope_files(tmp_path / "b", splits=("adversarial",), n=5)
    (folder / "coco_pope_adversarial.json").write_text((folder2 / "coco_pope_adversarial.json").read_text())
    dm = POPEDataModule(str(folder), image_dir=str(images), batch_size=4)
    dm.collate_fn = WrapCollate()
    dm.setup("test")
    with _replace_dunder_methods(DataLoader, "dataset"):  # what Lightning does around the hook
        loader = dm.test_dataloader()
    single = POPEScore()
    for batch in loader:
        single.update_from_samples(batch["samples"], ["yes"] * len(batch["ids"]))
    ranks = []
    for rank in (0, 1):  # 15 samples over 2 ranks: rank 1 gets one padded duplicate
        sampler = DistributedSampler(dm.dataset, num_replicas=2, rank=rank, shuffle=False)
        injected = _update_dataloader(loader, sampler)
        assert type(injected) is SkipCountingDataLoader and injected.skip_ledger is dm.skip_ledger
        metric = POPEScore()
        for batch in injected:
            metric.update_from_samples(batch["samples"], ["yes"] * len(batch["ids"]))
        ranks.append(metric)
    assert sum(len(torch.cat(m.sample_key)) for m in ranks) == 16
    ranks[0].merge_state(ranks[1])
    assert {k: float(v) for k, v in ranks[0].compute().items()} == {k: float(v) for k, v in single.compute().items()}


class EchoModel(pl.LightningModule):
    """Answers "yes" to everything; logs MME and POPE scores."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.mme, self.pope = MMEScore(), POPEScore()

    def setup(self, stage):
        self.trainer.datamodule.collate_fn = WrapCollate()

    def test_step(self, batch, batch_idx):
        answers = ["Yes, there is." for _ in batch["ids"]]
        self.mme.update_from_samples(batch["samples"], answers)
        self.pope.update_from_samples(batch["samples"], answers)

    def on_test_epoch_end(self):
        self.log_dict({f"mme/{k}": v for k, v in self.mme.compute().items()})
        self.log_dict({f"pope/{k}": v for k, v in self.pope.compute().items()})
        self.mme.reset()
        self.pope.reset()

    def training_step(self, batch, batch_idx):
        assert all(s["task"] == "instruct" for s in batch["samples"])
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_seen", float(len(batch["ids"])), reduce_fx="sum")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, **kwargs)


@pytest.mark.filterwarnings("ignore:`isinstance.treespec, LeafSpec.` is deprecated")
def test_trainer_eval_run_reports_both(tmp_path):
    root = write_mme_folder(tmp_path)
    (root / "code_reasoning" / "0001.png").write_bytes(b"broken")
    folder, images = write_pope_files(tmp_path)
    dm = EvalDataModule(mme_root=str(root), pope_source=str(folder), pope_image_dir=str(images),
                        batch_size=3, num_workers=1, on_error="skip")
    (result,) = _trainer().test(EchoModel(), datamodule=dm)
    assert result["mme/num_samples"] == 6 and result["pope/num_samples"] == 12
    assert result["mme/existence/acc"] == 50 and result["mme/perception_total_1of10"] == 50
    assert result["pope/avg/yes_ratio"] == 100 and result["pope/avg/recall"] == 100
    assert dm.skipped == {"corrupt_image": 1}
    _trainer().test(EchoModel(), datamodule=dm)
    assert dm.skipped == {"corrupt_image": 1}


@pytest.mark.filterwarnings("ignore:`isinstance.treespec, LeafSpec.` is deprecated")
def test_trainer_fit_instruct(tmp_path):
    path, images = write_instruct(tmp_path)
    dm = InstructDataModule(str(path), image_dir=str(images), batch_size=2)
    _trainer(max_steps=2).fit(EchoModel(), datamodule=dm)  # no val_source: no validation
    from lightning.pytorch.utilities.model_helpers import is_overridden

    assert not is_overridden("val_dataloader", pickle.loads(pickle.dumps(dm)))  # survives pickling
    assert not is_overridden("val_dataloader", copy.deepcopy(dm))
    dm = InstructDataModule(str(path), image_dir=str(images), val_source=str(path), batch_size=2)
    trainer = _trainer(max_epochs=1)
    trainer.fit(EchoModel(), datamodule=dm)
    assert trainer.callback_metrics["val_seen"] == 3


def test_instruct_module_validates_on_a_benchmark(tmp_path):
    path, images = write_instruct(tmp_path)
    benchmark = EvalDataModule(mme_root=str(write_mme_folder(tmp_path)), batch_size=4)
    with pytest.raises(ValueError, match="val_source or val_benchmark, not both"):
        InstructDataModule(str(path), image_dir=str(images), val_source=str(path), val_benchmark=benchmark)
    dm = InstructDataModule(str(path), image_dir=str(images), val_benchmark=benchmark, batch_size=2)
    benchmark.collate_fn = WrapCollate()
    ids = _ids(pickle.loads(pickle.dumps(dm)).val_dataloader())
    assert ids == [f"{task}/000{i}.{ext}#{q}" for task, ext in (("existence", "jpg"), ("code_reasoning", "png"))
                   for i in range(2) for q in range(2)]
    assert benchmark.skip_ledger is dm.skip_ledger  # one count of skips for the whole run


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        MMEDataModule("x", on_error="ignore")
    with pytest.raises(ValueError, match="needs at least one benchmark"):
        EvalDataModule()
    dm = MMEDataModule(str(write_mme_folder(tmp_path)), subtasks=["Existence"])
    with pytest.raises(ValueError, match="valid names"):
        dm.setup("test")


def test_cli_documents_arguments():
    from jsonargparse import ArgumentParser

    for cls, phrase in [(MMEDataModule, "question"), (POPEDataModule, "label_dir"),
                        (InstructDataModule, "train_source"), (EvalDataModule, "benchmarks")]:
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "data")
        text = parser.format_help()
        assert "--data.on_error" in text and "skip" in text and phrase in text
    from sparsezip_pl.benchmarks import MME

    parser = ArgumentParser()
    parser.add_class_arguments(MME, "mme")
    assert "first N images (question pairs)" in " ".join(parser.format_help().split())

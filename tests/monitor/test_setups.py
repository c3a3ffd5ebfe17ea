"""The monitor in the training set-ups people run (issue 17): every precision, several validation
dataloaders, a bad batch among good ones, validation schedules, ``trainer.test``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from _callback_fixtures import PooledClassifier, TinyClassifier, loaders, resized
from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.reporting.schema import validate_report

FAST = dict(enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
            enable_checkpointing=False)


def _monitor(root: Path, **kwargs) -> CounterfactualMonitor:
    kwargs.setdefault("max_samples", 6)
    return CounterfactualMonitor(log_images=0, report_html=False, report_dir=root, **kwargs)


def _trainer(tmp_path, monitor, max_epochs=1, logger=False, **kwargs) -> L.Trainer:
    kwargs.setdefault("num_sanity_val_steps", 1)
    return L.Trainer(max_epochs=max_epochs, callbacks=[monitor], logger=logger,
                     default_root_dir=tmp_path, **{**FAST, **kwargs})


def _reports(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/report.json"))}


# ---------------------------------------------------------------------------- precision
_CPU = ["32-true", "bf16-mixed", "bf16-true", "64-true"]
_GPU = ["16-mixed", "bf16-mixed", "16-true"]
_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
           "64-true": torch.float64, "16-mixed": torch.float16, "16-true": torch.float16}


def _precision_run(tmp_path, precision, head_precision, accelerator):
    L.seed_everything(0)
    train, val = loaders()
    monitor = _monitor(tmp_path / "r", head_precision=head_precision)
    with torch.autocast("cpu", enabled=False):
        _trainer(tmp_path, monitor, max_epochs=2, precision=precision,
                 accelerator=accelerator).fit(TinyClassifier(), train, val)
    return monitor


def _assert_explained_and_flipped(monitor, root, precision, head_precision):
    reports = _reports(root)
    assert list(reports) == ["epoch_000", "epoch_001"]
    for report in reports.values():
        validate_report(report)
        assert report["failures"] == [] and report["num_misclassified"] > 0
        assert report["num_explained"] > 0 and any(s["success"] for s in report["samples"])
    stores = monitor._session.collectors[0].stores
    assert stores.feature_dtype == _DTYPES[precision]         # captured in the dtype they have
    # Lightning sets torch's process-wide default dtype in every forward under *-true: no thread
    # of the monitor's runs beside it then
    sets_default_dtype = precision.endswith("-true") and precision != "32-true"
    assert (monitor.last_background_s is None) == sets_default_dtype
    assert (monitor._session.worker is None) or not sets_default_dtype
    assert stores.bank.dtype == torch.float32                 # the bank's is the user's choice
    copy = monitor._runner.frozen
    if head_precision == "float32" and precision.endswith("-true") and precision != "32-true":
        assert copy is not None and copy.dtype == torch.float32   # an upcast copy of the head
        assert all(p.dtype == torch.float32 for p in copy.module.parameters())
    elif copy is not None:
        assert {p.dtype for p in copy.module.parameters()} == {
            _DTYPES[precision] if precision.endswith("-true") else torch.float32}


@pytest.mark.parametrize("head_precision", ["model", "float32"])
@pytest.mark.parametrize("precision", _CPU)
def test_every_cpu_precision_explains_and_flips(tmp_path, precision, head_precision):
    monitor = _precision_run(tmp_path, precision, head_precision, "cpu")
    _assert_explained_and_flipped(monitor, tmp_path / "r", precision, head_precision)
    if precision == "bf16-mixed" and head_precision == "model":
        # the head ran under the model's autocast: the model's own bf16 logits equal head(F)
        assert monitor._session.capture.reuse_logits is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_precision", ["model", "float32"])
@pytest.mark.parametrize("precision", _GPU)
def test_every_gpu_precision_explains_and_flips(tmp_path, precision, head_precision):
    monitor = _precision_run(tmp_path, precision, head_precision, "gpu")
    _assert_explained_and_flipped(monitor, tmp_path / "r", precision, head_precision)
    bank = monitor._session.collectors[0].stores.bank
    assert bank.device.type == "cpu" and bank.pinned     # the default: pinned host memory


# ---------------------------------------------------------------------------- a bad batch
def test_a_batch_with_labels_out_of_range_costs_only_itself(tmp_path):
    L.seed_everything(0)
    train, val = loaders()                                    # 4 validation batches of 16
    third = next(b for i, b in enumerate(val) if i == 2)[0]

    def parser(batch):                                        # the 3rd batch: labels out of range
        return batch[0], batch[1] + (99 if torch.equal(batch[0], third) else 0)

    monitor = _monitor(tmp_path / "r", batch_parser=parser, max_samples=64)
    _trainer(tmp_path, monitor, max_epochs=2).fit(TinyClassifier(), train, val)
    for report in _reports(tmp_path / "r").values():
        assert report["failures"] == []
        assert report["skipped_batches"] == [{"dataloader_idx": 0, "batch_idx": 2, "reason":
                                              report["skipped_batches"][0]["reason"]}]
        assert "labels in [99, 102]" in report["skipped_batches"][0]["reason"]
        assert report["num_misclassified"] > 0
        assert {s["batch_idx"] for s in report["samples"]} == {0, 1, 3}   # all kept mistakes
    bank = monitor._session.collectors[0].stores.bank
    kept = torch.cat([bank.get(c)[1] for c in range(bank.num_classes)])
    assert set(kept[:, 1].tolist()) == {0, 1, 3}
    assert monitor.summaries[-1]["skipped_batches"] == 1


def test_a_batch_of_another_shape_is_skipped_with_its_reason(tmp_path):
    L.seed_everything(0)
    train, val = loaders()
    odd = [(x, y) for x, y in val]
    odd[1] = (torch.nn.functional.interpolate(odd[1][0], size=(32, 32)), odd[1][1])

    monitor = _monitor(tmp_path / "r")          # (the model takes any size; the stores one grid)
    _trainer(tmp_path, monitor, max_epochs=2).fit(PooledClassifier(), train,
                                                  DataLoader(odd, batch_size=None))
    report = _reports(tmp_path / "r")["epoch_001"]
    (skipped,) = report["skipped_batches"]
    assert skipped["batch_idx"] == 1 and "Expected feature maps of shape (B, 8, 4, 4)" in skipped["reason"]
    assert report["failures"] == [] and report["num_explained"] > 0
    assert 1 not in {s["batch_idx"] for s in report["samples"]}


# ---------------------------------------------------------------------------- several dataloaders
def test_several_validation_loaders_are_explained_each_with_their_own_stores(tmp_path):
    L.seed_everything(0)
    train, val = loaders(n_val=128)
    big = resized(val, 32)                                    # another image size: 8x8 maps
    logger = CSVLogger(tmp_path, name="csv")
    monitor = _monitor(tmp_path / "r", max_samples=64)
    _trainer(tmp_path, monitor, max_epochs=3, logger=logger).fit(PooledClassifier(lr=0.02), train,
                                                                 [val, big])
    reports = _reports(tmp_path / "r")
    assert list(reports) == [f"epoch_00{e}{s}" for e in range(3) for s in ("", "_dataloader_1")]
    explained = {0: 0, 1: 0}
    for name, report in reports.items():
        validate_report(report)
        loader = 1 if name.endswith("dataloader_1") else 0
        assert report["dataloader_idx"] == loader and report["failures"] == []
        assert report["feature_grid"] == ([8, 8] if loader else [4, 4])
        assert {s["dataloader_idx"] for s in report["samples"]} <= {loader}
        explained[loader] += report["num_explained"]
    assert explained[0] > 0 and explained[1] > 0
    collectors = monitor._session.collectors
    assert collectors[0].stores.bank.feature_shape == (8, 4, 4)
    assert collectors[1].stores.bank.feature_shape == (8, 8, 8)
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "fgvce/misclassified" in metrics and "fgvce/dataloader_1/misclassified" in metrics
    assert monitor.history.epochs == [0, 1, 2] and len(monitor.summaries) == 6


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("every_n_epochs, explained", [(1, ["epoch_001", "epoch_003"]),
                                                       (2, ["epoch_001"])])
def test_every_n_epochs_counts_validation_runs(tmp_path, every_n_epochs, explained):
    L.seed_everything(0)
    train, val = loaders()
    monitor = _monitor(tmp_path / "r", every_n_epochs=every_n_epochs)
    _trainer(tmp_path, monitor, max_epochs=4, check_val_every_n_epoch=2).fit(
        TinyClassifier(), train, val)                         # validation after epochs 1 and 3
    assert list(_reports(tmp_path / "r")) == explained
    assert [s["epoch"] for s in monitor.summaries] == [int(n[-3:]) for n in explained]
    assert monitor.state.validation_runs == 2


def test_each_mid_epoch_validation_gets_its_own_report_and_history_entry(tmp_path):
    L.seed_everything(0)
    train, val = loaders()                                    # 4 training batches an epoch
    monitor = _monitor(tmp_path / "r")
    _trainer(tmp_path, monitor, max_epochs=2, val_check_interval=0.5).fit(
        TinyClassifier(), train, val)
    names = list(_reports(tmp_path / "r"))
    assert names == ["epoch_000_step_0000002", "epoch_000_step_0000004",
                     "epoch_001_step_0000006", "epoch_001_step_0000008"]
    assert monitor.step_history.epochs == [2, 4, 6, 8]       # one entry per validation
    assert [s["global_step"] for s in monitor.summaries] == [2, 4, 6, 8]
    assert monitor.history.epochs == [0, 1]


# ---------------------------------------------------------------------------- trainer.test
def test_trainer_test_is_explained_into_test_dirs_when_asked(tmp_path, caplog):
    L.seed_everything(0)
    train, val = loaders(n_val=128)
    model = PooledClassifier(lr=0.02)
    quiet = _monitor(tmp_path / "quiet")
    _trainer(tmp_path, quiet).test(model, val)
    assert _reports(tmp_path / "quiet") == {} and quiet.summaries == []
    assert "explain_test=True" in caplog.text                 # says so, once
    monitor = _monitor(tmp_path / "r", explain_test=True, max_samples=64)
    trainer = _trainer(tmp_path, monitor, max_epochs=2)
    trainer.fit(model, train, val)
    trainer.test(model, [val, resized(val, 32)])
    reports = _reports(tmp_path / "r")
    assert list(reports) == ["epoch_000", "epoch_001", "test_002", "test_002_dataloader_1"]
    for name, loader in (("test_002", 0), ("test_002_dataloader_1", 1)):
        validate_report(reports[name])
        assert reports[name]["stage"] == "test" and reports[name]["dataloader_idx"] == loader
        assert reports[name]["num_misclassified"] > 0
    assert sum(reports[n]["num_explained"] for n in ("test_002", "test_002_dataloader_1")) > 0
    assert reports["epoch_001"]["stage"] == "fit"
    assert [s["stage"] for s in monitor.summaries] == ["fit", "fit", "test", "test"]
    assert monitor.history.epochs == [0, 1]                   # the test is not a validation


def test_annotated_parts_reach_the_search(tmp_path, monkeypatch):
    from _callback_fixtures import KeypointDataset
    from fgvce_lightning.engine import search as engine_search

    search, seen = engine_search.counterfactual_search, []

    def recording(head, queries, true, pred, bank, config, generator=None, **kwargs):
        seen.append(kwargs)
        return search(head, queries, true, pred, bank, config, generator, **kwargs)

    monkeypatch.setattr(engine_search, "counterfactual_search", recording)
    L.seed_everything(0)
    train = DataLoader(KeypointDataset(64, 1), batch_size=16, shuffle=True)
    val = DataLoader(KeypointDataset(64, 2), batch_size=16)
    _trainer(tmp_path, _monitor(tmp_path / "r")).fit(TinyClassifier(), train, val)
    assert seen
    for kwargs in seen:                       # (two keypoints: top and bottom, on the 4x4 grid)
        labels = kwargs["query_parts"]
        assert labels.dtype == torch.bool and labels.shape[1:] == (2, 4, 4)
        assert bool(labels[:, 0, 0, 2].all()) and bool(labels[:, 1, 3, 2].all())
    report = _reports(tmp_path / "r")["epoch_000"]
    refs = [tuple(e["reference"]["id"]) for s in report["samples"] for e in s["edits"]]
    assert refs and all(seen[0]["reference_parts"](r) is not None for r in refs)

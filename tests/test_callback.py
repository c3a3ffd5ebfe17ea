"""CounterfactualMonitor on real (tiny) Lightning runs: collection, explanation, state, cleanup."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from _callback_fixtures import (PART_NAMES, KeypointDataset, PlantedModel, TinyClassifier, loaders,
                                planted_data, planted_val)
from fgvce_lightning.callback import CounterfactualMonitor
from fgvce_lightning.monitor import Mechanisms, session as monitor_session
from fgvce_lightning.reporting.schema import validate_report

FAST = dict(enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
            num_sanity_val_steps=1)


def _monitor(**kwargs) -> CounterfactualMonitor:
    kwargs.setdefault("max_samples", 6)
    kwargs.setdefault("log_images", 0)
    kwargs.setdefault("report_html", False)
    return CounterfactualMonitor(**kwargs)


def _trainer(tmp_path, callbacks=(), logger=False, max_epochs=2, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, callbacks=list(callbacks), logger=logger,
                     default_root_dir=tmp_path, enable_checkpointing=False, **{**FAST, **kwargs})


def _no_forward_hooks(module: torch.nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in module.modules())


def _reports(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("epoch_*/report.json"))}


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "magic"}, r"one of \['fgvce', 'greedy'\]"),
    ({"part_source": "wings"}, r"one of \['auto', 'keypoints'"),
    ({"bank_dtype": "int8"}, r"one of \['float32', 'float16', 'bfloat16'\]"),
    ({"max_samples": 0}, "max_samples"),
    ({"every_n_epochs": -1}, "every_n_epochs"),
    ({"memory_budget_mb": 0}, "memory_budget_mb"),
    ({"time_budget_s": -1}, "time_budget_s"),
    ({"features": lambda x: x}, "`features` and `head`"),
    ({"window": 2}, "window"),
    ({"background": "yes"}, r"`background` to be 'auto', True or False"),
])
def test_invalid_configuration_fails_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CounterfactualMonitor(**kwargs)


def test_unknown_search_option_lists_valid_ones():
    with pytest.raises(TypeError, match=r"'window'.*unknown \['windw'\]"):
        CounterfactualMonitor(windw=3)


def test_unsplittable_model_fails_fast_in_setup(tmp_path):
    class Opaque(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)

        def training_step(self, batch, i):
            return self.b(self.a(batch[0].mean((2, 3)))).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train, val = loaders()
    with pytest.raises(ValueError, match="layer="):
        _trainer(tmp_path, [_monitor()]).fit(Opaque(), train, val)


def test_memory_budget_too_small_fails_before_training(tmp_path):
    train, val = loaders()
    model = TinyClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="memory_budget_mb"):
        _trainer(tmp_path, [_monitor(memory_budget_mb=0.01)]).fit(model, train, val)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # failed in sanity check
    assert _no_forward_hooks(model)


def test_unparseable_batch_asks_for_batch_parser(tmp_path):
    class Wrapped:
        def __init__(self, x, y):
            self.x, self.y = x, y

    x, y = planted_data(16, 0)
    val = DataLoader([Wrapped(x[i], y[i]) for i in range(16)], batch_size=8,
                     collate_fn=lambda items: Wrapped(torch.stack([i.x for i in items]),
                                                      torch.stack([i.y for i in items])))

    class Model(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            self(batch.x)

    with pytest.raises(TypeError, match="batch_parser"):
        _trainer(tmp_path, [_monitor()]).validate(Model(), val)
    monitor = _monitor(batch_parser=lambda b: (b.x, b.y), report_dir=tmp_path / "r")
    _trainer(tmp_path, [monitor]).validate(Model(), val)
    assert monitor.last_result.stats.num_misclassified > 0


# ---------------------------------------------------------------------------- training invariance
def _fit_state(tmp_path, with_monitor: bool):
    L.seed_everything(123)
    train, val = loaders()
    model = TinyClassifier(lr=0.02)
    monitor = _monitor(max_samples=4, report_dir=tmp_path / "r") if with_monitor else None
    trainer = _trainer(tmp_path, [monitor] if monitor else [])
    trainer.fit(model, train, val)
    opt = trainer.optimizers[0].state_dict()
    return model, opt, monitor, torch.get_rng_state()


def test_seeded_run_ends_with_identical_weights_and_optimizer_state(tmp_path):
    plain, plain_opt, _, plain_rng = _fit_state(tmp_path / "a", with_monitor=False)
    watched, watched_opt, monitor, watched_rng = _fit_state(tmp_path / "b", with_monitor=True)
    assert monitor.num_explained_epochs == 2
    assert all(s["num_explained"] > 0 for s in monitor.summaries), monitor.summaries
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name                              # weights and BN buffers
    for k, s in plain_opt["state"].items():
        assert torch.equal(s["momentum_buffer"], watched_opt["state"][k]["momentum_buffer"])
    assert torch.equal(plain_rng, watched_rng)
    assert all(m.training for m in watched.modules())               # flags as Lightning left them
    assert _no_forward_hooks(watched)


# ---------------------------------------------------------------------------- outputs
def test_tensorboard_scalars_images_text_layout_and_report(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    train, val = loaders()
    logger = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    monitor = _monitor(log_images=1, report_html=True)
    _trainer(tmp_path, [monitor], logger=[logger, csv]).fit(TinyClassifier(), train, val)

    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"fgvce/flip_rate", "fgvce/misclassified", "fgvce/explained"} <= set(tags["scalars"])
    assert any(t.startswith("fgvce/part_error_share/") for t in tags["scalars"])
    assert [e.step for e in acc.Scalars("fgvce/misclassified")] == [4, 8]   # one per epoch
    assert "fgvce/samples/0" in tags["images"]
    # discovered parts (no annotations here): one strip of typical patches per prototype
    strips = sorted(t for t in tags["images"] if t.startswith("fgvce/parts/"))
    assert len(strips) == monitor._ctx.prototypes.num_parts, strips
    strip = acc.Images(strips[0])[-1]
    assert strip.width > strip.height > 0                                   # a horizontal strip
    assert any(t.startswith("fgvce/summary") for t in tags["tensors"])      # text
    layout = [t for t in tags["tensors"] if "custom_scalars" in t]
    assert layout, tags["tensors"]
    metrics = (Path(csv.log_dir) / "metrics.csv").read_text()
    assert "fgvce/flip_rate" in metrics                                     # every logger got them

    root = Path(logger.log_dir) / "fgvce"                                   # default report_dir
    reports = _reports(root)
    assert list(reports) == ["epoch_000", "epoch_001"]
    for report in reports.values():
        validate_report(report)
        assert report["num_misclassified"] > 0 and report["feature_grid"] == [4, 4]
    assert (root / "epoch_001" / "report.html").is_file()
    assert str(monitor.last_report).endswith("epoch_001")
    # each piece of the last epoch's publishing timed, the shared pictures on their own
    timings = monitor._session.publisher.timings
    assert {"report.json", "sample panels", "encoding", "tensorboard", "report.html"} \
        <= set(timings), timings
    assert all(v >= 0 for v in timings.values())


def test_report_dir_without_logger_is_under_default_root_dir(tmp_path):
    L.seed_everything(0)
    train, val = loaders()
    _trainer(tmp_path, [_monitor()], max_epochs=1).fit(TinyClassifier(), train, val)
    assert (tmp_path / "fgvce" / "epoch_000" / "report.json").is_file()


def test_explanation_failure_is_warned_counted_and_training_continues(tmp_path, monkeypatch):
    import fgvce_lightning.engine.search as search

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(search, "counterfactual_search", broken)
    L.seed_everything(0)
    train, val = loaders()
    monitor = _monitor(report_dir=tmp_path / "r")
    trainer = _trainer(tmp_path, [monitor])
    with pytest.warns(RuntimeWarning, match="planted failure"):
        trainer.fit(TinyClassifier(), train, val)
    assert trainer.current_epoch == 2                                       # training finished
    reports = _reports(tmp_path / "r")
    assert len(reports) == 2
    for report in reports.values():
        assert len(report["failures"]) == 1 and "planted failure" in report["failures"][0]
        assert report["num_misclassified"] > 0 and report["num_explained"] == 0
    assert monitor.total_failures == 2


def test_every_n_epochs_and_sanity_check_are_skipped(tmp_path):
    L.seed_everything(0)
    train, val = loaders()
    monitor = _monitor(every_n_epochs=2, report_dir=tmp_path / "r")
    _trainer(tmp_path, [monitor], max_epochs=3, num_sanity_val_steps=2).fit(TinyClassifier(), train, val)
    assert list(_reports(tmp_path / "r")) == ["epoch_000", "epoch_002"]
    assert [s["epoch"] for s in monitor.summaries] == [0, 2]


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "collection-thread"])
def test_trainer_validate_under_inference_mode(tmp_path, monkeypatch, threaded):
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: threaded)
    L.seed_everything(0)
    _, val = loaders()
    model = TinyClassifier()
    monitor = _monitor(max_samples=4, report_dir=tmp_path / "r")
    trainer = _trainer(tmp_path, [monitor], inference_mode=True)
    for run in range(2):               # the second run's stores are re-planned in inference mode
        trainer.validate(model, val)
        assert (monitor._session.worker is not None) == threaded
        result = monitor.last_result
        assert result.stats.num_misclassified > 0 and result.stats.num_explained > 0, run
        assert not result.failures
        assert _no_forward_hooks(model)
    assert len(monitor.summaries) == 2 and monitor.summaries[0]["num_explained"] == \
        monitor.summaries[1]["num_explained"]


def test_keypoint_batches_give_named_annotated_parts(tmp_path):
    L.seed_everything(0)
    train = DataLoader(KeypointDataset(64, 1), batch_size=16, shuffle=True)
    val = DataLoader(KeypointDataset(64, 2), batch_size=16)
    monitor = _monitor(part_names=PART_NAMES, report_dir=tmp_path / "r")
    _trainer(tmp_path, [monitor], max_epochs=1).fit(TinyClassifier(), train, val)
    report = _reports(tmp_path / "r")["epoch_000"]
    names = [(p["name"], p["source"]) for p in report["parts"]]
    # the cells near no keypoint are background, a part of their own when an edit names it
    assert names[:2] == [("top", "keypoints"), ("bottom", "keypoints")]
    assert names[2:] in ([], [("background", "keypoints")])
    assert all(e["parts"] for s in report["samples"] for e in s["edits"])   # never unlabelled
    explained = [s for s in monitor.last_result.samples if not s.explanation.skipped]
    assert explained
    for s in explained:   # keypoints at (row 3, col 8) and (row 12, col 8) → cells (0, 2), (3, 2)
        assert s.cell_parts[0][2] == ("top",) and s.cell_parts[3][2] == ("bottom",)
        # 16-pixel images are kept at their own size (not enlarged to thumbnail_size=64)
        assert s.thumbnail.dtype == torch.uint8 and s.thumbnail.shape == (3, 16, 16)
        assert len(s.reference_thumbnails) == s.explanation.num_edits
        assert all(t is not None for t in s.reference_thumbnails)


def test_memory_is_bounded_and_nothing_holds_a_graph(tmp_path):
    L.seed_everything(0)
    train, val = loaders(n_val=128)
    monitor = _monitor(max_samples=8, memory_budget_mb=0.25, max_references_per_class=None,
                       report_dir=tmp_path / "r")
    sizes = []

    class Probe(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            sizes.append(monitor.memory_bytes)

    _trainer(tmp_path, [monitor, Probe()], max_epochs=3, inference_mode=False).fit(
        TinyClassifier(), train, val)
    store = monitor._session.collectors[0].stores
    assert sizes[1:] == [sizes[1]] * (len(sizes) - 1) and sizes[1] <= 2 ** 18
    assert store.mistakes.capacity == 8
    cap = store.bank.capacity_per_class
    assert 1 <= cap < 128 // 4                                 # the budget, not the data, bounds it
    feats = store.mistakes.get("features")
    assert not feats.requires_grad and feats.grad_fn is None
    assert not store.bank.get(0)[0].requires_grad


def test_resume_continues_history_and_epoch_numbering(tmp_path):
    L.seed_everything(0)
    train, val = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _monitor(report_dir=tmp_path / "r")
    L.Trainer(max_epochs=1, callbacks=[first, ckpt], logger=False, default_root_dir=tmp_path,
              **FAST).fit(TinyClassifier(), train, val)
    assert first.history.epochs == [0]

    second = _monitor(report_dir=tmp_path / "r")
    L.Trainer(max_epochs=2, callbacks=[second], logger=False, default_root_dir=tmp_path,
              enable_checkpointing=False, **FAST).fit(TinyClassifier(), train, val,
                                                      ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.history.epochs == [0, 1]
    assert second.num_explained_epochs == 2
    assert [s["epoch"] for s in second.summaries] == [0, 1]
    assert list(_reports(tmp_path / "r")) == ["epoch_000", "epoch_001"]
    state = second.state_dict()
    fresh = _monitor()
    fresh.load_state_dict(state)
    assert fresh.state_dict()["history"] == state["history"]
    fresh.load_state_dict({})                                  # old/empty checkpoints load
    assert fresh.num_explained_epochs == 0


def test_hooks_are_removed_when_validation_step_raises(tmp_path):
    class Exploding(TinyClassifier):
        def validation_step(self, batch, batch_idx):
            self(batch[0])
            raise RuntimeError("boom")

    _, val = loaders()
    model = Exploding()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [_monitor()]).validate(model, val)
    assert _no_forward_hooks(model)


def test_dict_batches_and_greedy_strategy(tmp_path):
    pytest.importorskip("fgvce_lightning.engine.greedy")
    dict_val = DataLoader([{"image": x, "label": y} for x, y in planted_val(32)], batch_size=16)

    class DictModel(PlantedModel):   # hand-set: right on 3/4 of the samples, so every class has references
        def validation_step(self, batch, batch_idx):
            self(batch["image"])

    monitor = _monitor(strategy="greedy", max_samples=3, report_dir=tmp_path / "r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no failure, no second-forward fallback
        _trainer(tmp_path, [monitor]).validate(DictModel(), dict_val)
    result = monitor.last_result
    assert result.method == "greedy" and result.stats.num_explained > 0
    assert {s.explanation.method for s in result.samples} == {"greedy"}


class _ScaledOutput(TinyClassifier):
    """Its forward returns temperature-scaled logits: not what the head computes."""

    def forward(self, x):
        return self.net(x) * 3.0


def _explained(monitor):
    return [(s.query_id, s.explanation.true, s.explanation.pred, s.explanation.edits)
            for s in monitor.last_result.samples]


def test_model_output_is_reused_as_logits_only_when_it_equals_the_head(tmp_path):
    L.seed_everything(0)
    _, val = loaders()
    model = TinyClassifier()
    reused = _monitor(max_samples=8, report_dir=tmp_path / "a")
    _trainer(tmp_path, [reused]).validate(model, val)
    assert reused._session.capture.reuse_logits is True    # the forward's logits equal head(F)
    recomputed = _monitor(max_samples=8, report_dir=tmp_path / "b",   # a head pass on every batch
                          _mechanisms=Mechanisms(reuse_logits=False))
    _trainer(tmp_path, [recomputed]).validate(model, val)
    assert recomputed.last_result.stats.num_misclassified == reused.last_result.stats.num_misclassified
    assert _explained(recomputed) == _explained(reused) and _explained(reused)

    scaled = _ScaledOutput()
    scaled.load_state_dict(model.state_dict())
    guarded = _monitor(max_samples=8, report_dir=tmp_path / "c")
    _trainer(tmp_path, [guarded]).validate(scaled, val)
    assert guarded._session.capture.reuse_logits is False   # mismatch detected: the head is used
    assert _explained(guarded) == _explained(reused)
    assert _no_forward_hooks(model) and _no_forward_hooks(scaled)


def test_forwards_outside_the_validation_step_are_not_captured(tmp_path):
    """The hooks stay on the model for the validation epoch (one set, not one per batch) but
    capture only inside a batch: another callback's forward after the monitor's batch end (here
    on blank images) changes nothing that is stored."""
    seen_hooks = []

    class Meddler(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                    dataloader_idx=0):
            seen_hooks.append(sum(len(m._forward_hooks) for m in pl_module.modules()))
            pl_module(torch.zeros_like(batch[0]))

    stores = {}
    for name, extra in (("plain", []), ("meddled", [Meddler()])):
        L.seed_everything(0)
        _, val = loaders()
        model = TinyClassifier()
        monitor = _monitor(max_samples=8, report_dir=tmp_path / name)
        _trainer(tmp_path / name, [monitor, *extra]).validate(model, val)
        stores[name] = monitor._session.collectors[0].stores
        assert _no_forward_hooks(model)
    # (the first batch locates the split point: no hook yet) tap, module, inner net
    assert seen_hooks == [0, 3, 3, 3]
    plain, meddled = stores["plain"], stores["meddled"]
    assert plain.mistakes.seen == meddled.mistakes.seen > 0
    for name in ("features", "true", "pred", "ids"):
        assert torch.equal(plain.mistakes.get(name), meddled.mistakes.get(name)), name
    assert torch.equal(plain.bank._storage, meddled.bank._storage)

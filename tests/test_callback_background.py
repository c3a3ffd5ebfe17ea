"""The monitor's background explanation: same results as the synchronous path, a frozen copy of the
model, no global RNG draws, fallbacks, and resuming from a checkpoint written mid-explanation."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from _callback_fixtures import TinyClassifier, loaders
from fgvce_lightning.callback import CounterfactualMonitor
from fgvce_lightning.engine._util import global_rng_left_alone
from fgvce_lightning.monitor import session as monitor_session, stores, threads
from fgvce_lightning.monitor.schedule import RunInfo
from fgvce_lightning.monitor.threads import BackgroundJob, FrozenModel, SerialWorker
from fgvce_lightning.engine.split import split_model

FAST = dict(enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
            num_sanity_val_steps=1, logger=False, enable_checkpointing=False)


def _fit(tmp_path, max_epochs=2, **kwargs):
    L.seed_everything(7)
    train, val = loaders()
    kwargs.setdefault("max_samples", 6)
    monitor = CounterfactualMonitor(log_images=0, report_html=False, report_dir=tmp_path / "r",
                                    **kwargs)
    model = TinyClassifier()
    L.Trainer(max_epochs=max_epochs, callbacks=[monitor], default_root_dir=tmp_path,
              **FAST).fit(model, train, val)
    return monitor, model


def _edits(root: Path) -> list:
    out = []
    for path in sorted(root.glob("epoch_*/report.json")):
        report = json.loads(path.read_text())
        out.append([((s["batch_idx"], s["position"]), s["edits"], s["success"], s["p_true_before"])
                    for s in report["samples"]])
    return out


def test_background_explains_the_same_as_synchronous(tmp_path):
    bg, bg_model = _fit(tmp_path / "bg")
    sync, sync_model = _fit(tmp_path / "sync", background=False)
    assert bg._runner.frozen is not None and bg.last_background_s is not None   # really in the background
    assert sync._runner.frozen is None and sync.last_background_s is None
    assert bg.num_explained_epochs == sync.num_explained_epochs == 2
    assert bg.history.epochs == sync.history.epochs == [0, 1]
    drop = ("elapsed_s",)
    assert [{k: v for k, v in s.items() if k not in drop} for s in bg.summaries] == \
        [{k: v for k, v in s.items() if k not in drop} for s in sync.summaries]
    assert _edits(tmp_path / "bg" / "r") == _edits(tmp_path / "sync" / "r")
    assert any(e for epoch in _edits(tmp_path / "bg" / "r") for e in epoch)
    for a, b in zip(bg_model.parameters(), sync_model.parameters()):   # training untouched
        assert torch.equal(a, b)


def test_background_path_draws_nothing_from_the_global_rng(tmp_path):
    monitor, model = _fit(tmp_path, max_epochs=1)
    assert monitor._session.collectors[0].stores.mistakes.size > 0
    run = RunInfo(current_epoch=5, global_step=9, global_rank=0, world_size=1, is_global_zero=True,
                  stage="fit")
    torch.manual_seed(3)
    before = torch.get_rng_state()
    frozen = monitor._runner.frozen
    with global_rng_left_alone():                  # as on the background thread, on this one
        outcome = monitor._explain(run, frozen.module, frozen.split, {})
    assert torch.equal(before, torch.get_rng_state())
    (result, report), = outcome.results
    assert result.stats.num_explained > 0 and report is not None


def test_frozen_model_is_a_copy_refreshed_in_place():
    L.seed_everything(0)
    live = TinyClassifier()
    split = split_model(live)
    handle = live.net.fc.register_forward_hook(lambda *a: (_ for _ in ()).throw(AssertionError))
    frozen = FrozenModel(live, {"layer": None, "features": None, "head": None}, split)
    handle.remove()
    feats = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        live.eval()
        expected = split.head(feats)
        assert torch.equal(frozen.split.head(feats), expected)         # the user's hook is not copied
        assert not any(p.requires_grad for p in frozen.module.parameters())
        assert frozen.nbytes == sum(t.numel() * 4 for t in live.state_dict().values()
                                    if t.dtype == torch.float32) + 8     # + BN's int64 counter
        for p in live.parameters():
            p.add_(1.0)                                                  # training goes on
        assert torch.equal(frozen.split.head(feats), expected)
        assert frozen.refresh()
        assert torch.equal(frozen.split.head(feats), split.head(feats))


def test_frozen_model_refuses_a_plain_callable_head():
    live = TinyClassifier()
    split = split_model(live, features=live.net.forward_features, head=live.net.forward_head)
    with pytest.raises(ValueError, match="not an nn.Module"):
        FrozenModel(live, {"features": live.net.forward_features, "head": live.net.forward_head},
                    split)


def test_callable_head_falls_back_to_synchronous_with_a_warning(tmp_path):
    # background=True asks for it, so not getting it is a warning (with 'auto' only an info line)
    L.seed_everything(7)
    train, val = loaders()
    model = TinyClassifier()
    monitor = CounterfactualMonitor(features=model.net.forward_features, head=model.net.forward_head,
                                    max_samples=4, log_images=0, report_html=False,
                                    report_dir=tmp_path / "r", background=True)
    with pytest.warns(RuntimeWarning, match="synchronously"):
        L.Trainer(max_epochs=2, callbacks=[monitor], default_root_dir=tmp_path,
                  **FAST).fit(model, train, val)
    assert monitor.num_explained_epochs == 2 and monitor._runner.frozen is None


def test_background_job_returns_result_or_exception():
    assert BackgroundJob(lambda stop: 41 + 1).wait() == 42
    err = BackgroundJob(lambda stop: 1 / 0).wait()
    assert isinstance(err, ZeroDivisionError)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are a Linux feature")
def test_background_job_runs_at_lower_priority_than_the_caller():
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    mine = nice()
    assert BackgroundJob(lambda stop: nice()).wait() == min(19, mine + 10)
    assert nice() == mine                                  # the training thread is untouched


def test_the_switch_interval_is_left_alone_unless_asked_for():
    default = sys.getswitchinterval()
    assert default > threads.SWITCH_INTERVAL_S
    assert BackgroundJob(lambda stop: sys.getswitchinterval()).wait() == default
    worker = SerialWorker(max_pending=2)
    seen: list = []
    worker.submit(lambda: seen.append(sys.getswitchinterval()))
    assert worker.drain(10) and seen == [default]
    # opt-in (CounterfactualMonitor(switch_interval_s=...)): short while they work, then put back
    short = threads.SWITCH_INTERVAL_S
    assert BackgroundJob(lambda stop: sys.getswitchinterval(),
                         switch_interval_s=short).wait() == pytest.approx(short)
    assert sys.getswitchinterval() == default
    worker = SerialWorker(max_pending=2, switch_interval_s=short)
    worker.submit(lambda: seen.append(sys.getswitchinterval()))
    assert worker.drain(10)
    assert seen == [default, pytest.approx(short)]
    assert sys.getswitchinterval() == default


def test_short_gil_turns_is_shared_across_threads_and_respects_the_users_setting():
    default = sys.getswitchinterval()
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with threads.short_gil_turns():
            inside.set()
            release.wait(10)
    other = threading.Thread(target=hold)
    other.start()
    assert inside.wait(10)
    with threads.short_gil_turns():
        assert sys.getswitchinterval() == pytest.approx(threads.SWITCH_INTERVAL_S)
    # the other thread still works: its short interval stays until it is done
    assert sys.getswitchinterval() == pytest.approx(threads.SWITCH_INTERVAL_S)
    release.set()
    other.join(10)
    assert sys.getswitchinterval() == default
    try:
        with threads.short_gil_turns():
            sys.setswitchinterval(0.01)                     # the user's own choice meanwhile
        assert sys.getswitchinterval() == pytest.approx(0.01)
        sys.setswitchinterval(1e-4)                         # already shorter than ours: left alone
        with threads.short_gil_turns():
            assert sys.getswitchinterval() == pytest.approx(1e-4)
        assert sys.getswitchinterval() == pytest.approx(1e-4)
    finally:
        sys.setswitchinterval(default)


def test_job_that_escapes_with_an_exception_is_counted_not_raised(tmp_path, monkeypatch):
    explain = CounterfactualMonitor._explain

    def boom(self, run, *args, **kwargs):
        if run.current_epoch == 0:
            raise RuntimeError("worker died")
        return explain(self, run, *args, **kwargs)
    monkeypatch.setattr(CounterfactualMonitor, "_explain", boom)
    with pytest.warns(RuntimeWarning, match="worker died"):
        monitor, _ = _fit(tmp_path)
    # epoch 0 died in the worker: counted, not in the history; training went on to epoch 1
    assert monitor.total_failures == 1 and 0 not in monitor.history.epochs
    assert [s["epoch"] for s in monitor.summaries] == [1]


def test_checkpoint_written_during_background_explanation_resumes_from_the_report(tmp_path):
    L.seed_everything(0)
    train, val = loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = CounterfactualMonitor(max_samples=6, log_images=0, report_html=False,
                                  report_dir=tmp_path / "r")
    L.Trainer(max_epochs=1, callbacks=[first, ckpt], default_root_dir=tmp_path,
              **{**FAST, "enable_checkpointing": True}).fit(TinyClassifier(), train, val)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if "CounterfactualMonitor" in k)
    # the checkpoint was written right after validation, while epoch 0 was being explained
    assert [p["epoch"] for p in state["pending"]] == [0] and state["history"]["records"] == {}

    resumed = CounterfactualMonitor()
    resumed.load_state_dict(state)
    assert resumed.history.epochs == [0] and resumed.num_explained_epochs == 1
    assert resumed.history.as_dict() == first.history.as_dict()
    want = {k: v for k, v in first.summaries[0].items() if k != "elapsed_s"}
    got = {k: v for k, v in resumed.summaries[0].items() if k != "elapsed_s"}
    assert got.keys() == want.keys()
    for k in want:
        same_nan = isinstance(want[k], float) and math.isnan(want[k]) and math.isnan(got[k])
        assert same_nan or got[k] == pytest.approx(want[k]), k

    for report in (tmp_path / "r").glob("epoch_*/report.json"):
        report.unlink()                                  # the report is gone: say so, keep going
    with pytest.warns(RuntimeWarning, match="no report of it"):
        lost = CounterfactualMonitor()
        lost.load_state_dict(state)
    assert lost.history.epochs == [] and lost.num_explained_epochs == 0


def test_serial_worker_runs_in_order_bounds_the_queue_and_records_errors():
    worker, done, gate = SerialWorker(max_pending=2), [], threading.Event()
    worker.submit(gate.wait)                       # holds the worker
    worker.submit(lambda: done.append(1))
    assert worker.pending == 2
    assert not worker.drain(timeout=0.05)          # blocked: reports it rather than hanging
    blocked = threading.Thread(target=lambda: worker.submit(lambda: done.append(2)))
    blocked.start()
    blocked.join(0.1)
    assert blocked.is_alive() and done == []       # a third task waits for room
    gate.set()
    blocked.join(5)
    worker.submit(lambda: 1 / 0)
    worker.submit(lambda: done.append(3))
    assert worker.drain(timeout=5) and worker.pending == 0
    assert done == [1, 2, 3]                       # in submission order, past the failure
    assert len(worker.errors) == 1 and isinstance(worker.errors[0], ZeroDivisionError)


@pytest.mark.parametrize("where", ["collection thread", "inline", "background job"])
def test_failure_while_storing_batches_is_counted_and_the_run_goes_on(tmp_path, monkeypatch, where):
    # one batch per set, stored on the collection thread as each set fills, inline (synchronous
    # explanation), or by the background explanation before it starts (the held sets)
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: where == "collection thread")
    monkeypatch.setattr(stores, "PENDING_MAX_BYTES", 1)
    L.seed_everything(7)
    train, val = loaders()                         # 4 validation batches
    add, failed = stores.Stores.add, []

    def planted(self, batch, pred, wrong):         # storing the set with batch 2 fails, once
        if 2 in batch.ids[:, 1].tolist() and not failed:
            failed.append(1)
            raise RuntimeError("planted storing failure")
        return add(self, batch, pred, wrong)

    monkeypatch.setattr(stores.Stores, "add", planted)
    monitor = CounterfactualMonitor(max_samples=6, log_images=0, report_html=False,
                                    report_dir=tmp_path / "r", background=where != "inline")
    trainer = L.Trainer(max_epochs=2, callbacks=[monitor], default_root_dir=tmp_path,
                        **{**FAST, "num_sanity_val_steps": 0})
    with pytest.warns(RuntimeWarning, match=r"collection failed( at batch \d)?: RuntimeError: planted storing failure"):
        trainer.fit(TinyClassifier(), train, val)
    assert (monitor._session.worker is not None) == (where == "collection thread")
    assert (monitor.last_background_s is not None) == (where != "inline")
    assert trainer.current_epoch == 2 and monitor.num_explained_epochs == 2
    first, second = monitor.summaries
    assert first["failures"] == 1 and second["failures"] == 0
    assert monitor.total_failures == 1
    report = json.loads((tmp_path / "r" / "epoch_000" / "report.json").read_text())
    assert any("planted storing failure" in f for f in report["failures"])
    # batches 0 and 1 were stored before the failure of batch 2, batch 3 not collected after it
    stored = {0, 1}
    assert report["samples"] and {s["batch_idx"] for s in report["samples"]} <= stored
    assert first["num_misclassified"] <= 16 * len(stored)
    bank = monitor._session.collectors[0].stores.bank                     # epoch 1 kept references from every batch
    kept = torch.cat([bank.get(c)[1] for c in range(bank.num_classes)])
    assert set(kept[:, 1].tolist()) == {0, 1, 2, 3}


def test_the_epochs_last_batches_are_stored_by_the_background_explanation(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: False)
    calls = []
    add = stores.Stores.add

    def recording(self, batch, pred, wrong):
        calls.append((threading.current_thread() is threading.main_thread(),
                      sorted(set(batch.ids[:, 1].tolist()))))
        return add(self, batch, pred, wrong)

    monkeypatch.setattr(stores.Stores, "add", recording)
    monitor, _ = _fit(tmp_path, max_epochs=2)        # 4 validation batches of 16
    # (the sanity check checked the configuration) every epoch's four batches wait together
    # and are stored on the background thread, none on the training thread
    assert calls == [(False, [0, 1, 2, 3]), (False, [0, 1, 2, 3])]
    assert monitor.num_explained_epochs == 2 and monitor.last_background_s is not None
    assert len(monitor._session.collectors[0].pending._free) == 1        # the buffers came back for reuse


@pytest.mark.parametrize("budget_mb, max_references", [(512, 64), (0.25, None)])
def test_full_sets_wait_for_the_background_explanation_as_the_budget_allows(tmp_path, monkeypatch,
                                                                          budget_mb, max_references):
    # no spare core: the sets that fill during the epoch are held for the background
    # explanation to store (before it explains) while the memory budget has room for them, then
    # stored on the validation loop, the held ones first; the stores see the batches in order
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: False)
    monkeypatch.setattr(stores, "PENDING_MAX_BYTES", 1)          # one batch per set
    calls, held_bytes, held_sets = [], [], []
    add = stores.Stores.add

    def recording(self, batch, pred, wrong):
        calls.append((threading.current_thread() is threading.main_thread(),
                      sorted(set(batch.ids[:, 1].tolist()))))
        return add(self, batch, pred, wrong)

    class Probe(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs):
            held_bytes.append(monitor.memory_bytes)
            held_sets.append(len(monitor._session.collectors[0].held))

    monkeypatch.setattr(stores.Stores, "add", recording)
    L.seed_everything(7)
    train, val = loaders()                                       # 4 validation batches
    options = dict(max_samples=6, log_images=0, report_html=False, memory_budget_mb=budget_mb,
                   max_references_per_class=max_references)
    monitor = CounterfactualMonitor(report_dir=tmp_path / "held" / "r", **options)
    L.Trainer(max_epochs=2, callbacks=[monitor, Probe()], default_root_dir=tmp_path / "held",
              **FAST).fit(TinyClassifier(), train, val)
    assert [ids for _, ids in calls] == [[0], [1], [2], [3]] * 2   # in batch order
    on_loop = [main for main, _ in calls]
    if budget_mb == 512:
        assert not any(on_loop)                     # all stored by the background explanation
        assert monitor._session.collectors[0].pending.keep == 6           # (four sets held) their buffers are reused
        assert len(monitor._session.collectors[0].pending._free) == 4
    else:   # the budget held the first set only: both stored when the second came, in order
        assert max(held_sets) == 1 and on_loop == [True] * 8
    assert max(held_bytes) <= budget_mb * 2 ** 20
    # the same explanations as explaining synchronously at the epoch's end
    calls.clear()
    L.seed_everything(7)
    sync = CounterfactualMonitor(report_dir=tmp_path / "sync" / "r", background=False, **options)
    L.Trainer(max_epochs=2, callbacks=[sync], default_root_dir=tmp_path / "sync",
              **FAST).fit(TinyClassifier(), train, val)
    assert all(main for main, _ in calls)
    assert _edits(tmp_path / "held" / "r") == _edits(tmp_path / "sync" / "r")
    assert any(e for epoch in _edits(tmp_path / "sync" / "r") for e in epoch)
    assert monitor.summaries[-1]["num_misclassified"] == sync.summaries[-1]["num_misclassified"]


def test_batches_are_stored_inline_when_torch_uses_every_core(tmp_path, monkeypatch):
    # one batch per set, so that sets are stored during the epoch (the last one is stored by
    # the background explanation)
    monkeypatch.setattr(stores, "PENDING_MAX_BYTES", 1)
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: False)
    inline, _ = _fit(tmp_path / "inline", max_epochs=1)
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: True)
    threaded, _ = _fit(tmp_path / "thread", max_epochs=1)
    assert inline._session.worker is None and threaded._session.worker is not None
    assert inline.summaries[0]["num_misclassified"] == threaded.summaries[0]["num_misclassified"] > 0
    assert _edits(tmp_path / "inline" / "r") == _edits(tmp_path / "thread" / "r")


def test_batches_wait_and_are_stored_together_up_to_the_budget_share(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: False)
    calls = []
    add = stores.Stores.add

    def recording(self, batch, pred, wrong):
        calls.append(sorted(set(batch.ids[:, 1].tolist())))
        return add(self, batch, pred, wrong)

    monkeypatch.setattr(stores.Stores, "add", recording)
    together, _ = _fit(tmp_path / "together", max_epochs=1)       # 4 validation batches of 16
    # the sanity check checked the configuration, so all four wait for the epoch's end
    assert calls == [[0, 1, 2, 3]]
    assert together._session.collectors[0].stores.pending_bytes == 512 * 2 ** 20 // 16
    calls.clear()
    monkeypatch.setattr(stores, "PENDING_MAX_BYTES", 1)          # no batch fits: one at a time
    alone, _ = _fit(tmp_path / "alone", max_epochs=1)
    assert calls == [[0], [1], [2], [3]]
    assert alone._session.collectors[0].pending.rows == 0 and len(alone._session.collectors[0].pending) == 0
    assert _edits(tmp_path / "together" / "r") == _edits(tmp_path / "alone" / "r")
    assert together.summaries[0]["num_misclassified"] == alone.summaries[0]["num_misclassified"]

"""Configuration checked once and early, the time budget, interrupts, and the monitor's mechanisms
(issues 17 and 18): nothing is accepted that fails later, nothing finished is lost silently."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from _callback_fixtures import TinyClassifier, loaders
from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.monitor import Mechanisms, callback as monitor_callback, session as monitor_session

FAST = dict(enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
            enable_checkpointing=False)


def _monitor(root, **kwargs) -> CounterfactualMonitor:
    kwargs.setdefault("max_samples", 6)
    kwargs.setdefault("report_html", False)
    return CounterfactualMonitor(log_images=0, report_dir=root, **kwargs)


def _fit(tmp_path, monitor, max_epochs=2, callbacks=(), logger=False, **kwargs):
    L.seed_everything(0)
    train, val = loaders()
    model = TinyClassifier()
    kwargs.setdefault("num_sanity_val_steps", 1)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[monitor, *callbacks], logger=logger,
                        default_root_dir=tmp_path, **{**FAST, **kwargs})
    trainer.fit(model, train, val)
    return trainer, model


def _reports(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/report.json"))}


# ---------------------------------------------------------------------------- at construction
@pytest.mark.parametrize("kwargs, error, match", [
    ({"report_dir": ""}, ValueError, r"`report_dir` to be a non-empty path"),
    ({"report_dir": 123}, TypeError, r"`report_dir` to be a path .* but got int 123"),
    ({"memory_budget_mb": math.inf}, ValueError, r"`memory_budget_mb` to be a positive, finite"),
    ({"time_budget_s": math.nan}, ValueError, r"`time_budget_s` to be a positive, finite"),
    ({"seed": 2 ** 70}, ValueError, r"`seed` to be an integer in \[0, 2\*\*63\)"),
    ({"report_html": "no"}, ValueError, r"`report_html` to be True or False, but got 'no'"),
    ({"explain_test": 1}, ValueError, r"`explain_test` to be True or False"),
    ({"head_precision": "half"}, ValueError, r"`head_precision` to be one of \['model', 'float32'\]"),
    ({"num_classes": 4, "class_names": ["a", "b"]}, ValueError, r"Expected 4 `class_names`"),
    ({"region_threshold": 1.5}, ValueError, r"`region_threshold` to be a number in \[0, 1\]"),
    ({"max_region_size": 0}, ValueError, r"`max_region_size` to be a positive integer or None"),
    ({"trim": "yes"}, ValueError, r"`trim` to be True or False"),
    ({"switch_interval_s": 0}, ValueError, r"`switch_interval_s` to be a positive"),
    ({"bank_device": "gpu"}, ValueError, r"`bank_device` to be one of \['host', 'model'\], but got 'gpu'"),
    ({"search_memory_mb": 0}, ValueError, r"`search_memory_mb` to be a positive, finite number"),
    ({"search_memory_mb": math.nan}, ValueError, r"`search_memory_mb` to be a positive, finite"),
])
def test_invalid_options_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CounterfactualMonitor(**kwargs)


def test_default_budget_never_takes_more_than_a_quarter_of_the_available_memory(monkeypatch):
    from fgvce_lightning.monitor import config as monitor_config
    assert CounterfactualMonitor().config.memory_budget_mb is None          # the default
    monkeypatch.setattr(monitor_config, "available_memory_bytes", lambda: 64 * 2 ** 30)
    assert CounterfactualMonitor().config.budget_mb == monitor_config.DEFAULT_MEMORY_BUDGET_MB
    monkeypatch.setattr(monitor_config, "available_memory_bytes", lambda: 2 * 2 ** 30)
    assert CounterfactualMonitor().config.budget_mb == 512.0                # a small machine
    monkeypatch.setattr(monitor_config, "available_memory_bytes", lambda: 2 ** 20)
    assert CounterfactualMonitor().config.budget_mb == 64.0                 # the floor
    monkeypatch.setattr(monitor_config, "available_memory_bytes", lambda: None)
    assert CounterfactualMonitor().config.budget_mb == monitor_config.DEFAULT_MEMORY_BUDGET_MB
    # an explicit budget is the user's: never cut
    assert CounterfactualMonitor(memory_budget_mb=8192).config.budget_mb == 8192.0


# ---------------------------------------------------------------------------- before training
@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 5}, r"`num_classes`=5 logits, but got 4"),
    ({"class_names": ["a", "b", "c"]}, r"Expected 4 `class_names`"),
    ({"protected_channels": 8}, r"`protected_channels` to be smaller than the feature maps' 8"),
    ({"memory_budget_mb": 0.05}, r"memory_budget_mb"),
])
@pytest.mark.parametrize("sanity_steps", [0, 1])
def test_configuration_errors_fail_before_any_training(tmp_path, kwargs, match, sanity_steps):
    seen = []

    class Steps(L.Callback):
        def on_train_batch_start(self, *args):
            seen.append(1)

    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, _monitor(tmp_path / "r", **kwargs), callbacks=[Steps()],
             num_sanity_val_steps=sanity_steps)
    assert seen == []                      # (without a sanity check: a dry forward found it)


def test_the_budget_message_names_the_waiting_batches_and_a_smaller_batch(tmp_path):
    with pytest.raises(ValueError) as info:
        _fit(tmp_path, _monitor(tmp_path / "r", memory_budget_mb=0.05), num_sanity_val_steps=0)
    message = str(info.value)
    assert "two sets of validation batches waiting to be stored" in message
    assert "at least one batch of 16 images" in message and "lower the validation batch size" in message
    assert "6 mistakes" in message and "one reference per class (4 classes" in message


def test_the_dry_forward_leaves_training_exactly_as_without_the_monitor(tmp_path):
    def final(monitor):
        trainer, model = _fit(tmp_path / str(monitor is None),
                              *(() if monitor is None else ()), monitor=monitor or L.Callback(),
                              num_sanity_val_steps=0)
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    plain_weights, plain_rng = final(None)
    watched_weights, watched_rng = final(_monitor(tmp_path / "r"))
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, watched_weights))
    assert torch.equal(plain_rng, watched_rng)


def test_a_configuration_problem_found_later_while_fitting_disables_the_monitor(tmp_path):
    # no sanity check and no validation before epoch 1 (nothing to dry-run on): the problem is
    # found at the first validation; training is never killed for it
    monitor = _monitor(tmp_path / "r", num_classes=5)
    with pytest.warns(RuntimeWarning, match=r"`num_classes`=5 .* The monitor is off"):
        trainer, _ = _fit(tmp_path, monitor, max_epochs=4, num_sanity_val_steps=0,
                          check_val_every_n_epoch=2)
    assert trainer.current_epoch == 4 and monitor.summaries == []
    assert _reports(tmp_path / "r") == {}


@pytest.mark.parametrize("case", ["file", "read-only"])
def test_report_dir_problems_are_found_in_setup(tmp_path, case):
    target = tmp_path / "reports"
    if case == "file":
        target.write_text("in the way")
    else:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            pytest.skip("root can write to a read-only directory")
        target.mkdir()
        target.chmod(0o555)
    with pytest.raises(ValueError, match=r"`report_dir` to be a directory the monitor can write"):
        _fit(tmp_path, _monitor(target))


def test_a_report_that_fails_to_write_later_is_counted_and_noted_in_the_next(tmp_path, monkeypatch):
    from fgvce_lightning.reporting import export

    write, calls = export.write_epoch_report, []

    def flaky(result, root, **kwargs):
        calls.append(result.epoch)
        if len(calls) == 1:
            raise OSError("disk full")
        return write(result, root, **kwargs)

    monkeypatch.setattr(export, "write_epoch_report", flaky)
    monitor = _monitor(tmp_path / "r", background=False)
    with pytest.warns(RuntimeWarning, match="disk full"):
        _fit(tmp_path, monitor)
    reports = _reports(tmp_path / "r")
    assert list(reports) == ["epoch_001"]
    assert any("epoch_000" in n and "disk full" in n for n in reports["epoch_001"]["notes"])
    assert monitor.total_failures == 1


# ---------------------------------------------------------------------------- the time budget
def test_the_time_budget_covers_parts_and_drawing(tmp_path, monkeypatch):
    from fgvce_lightning.engine import search as engine_search

    search = engine_search.counterfactual_search

    def slow(*args, **kwargs):                 # the first chunk alone spends the budget
        time.sleep(0.3)
        return search(*args, **kwargs)

    monkeypatch.setattr(engine_search, "counterfactual_search", slow)
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = CounterfactualMonitor(max_samples=6, explain_batch_size=2, time_budget_s=0.2,
                                    report_html=True, log_images=4, report_dir=tmp_path / "r")
    _fit(tmp_path, monitor, max_epochs=1, logger=logger)
    root = tmp_path / "r" / "epoch_000"
    report = json.loads((root / "report.json").read_text())
    assert 0 < len(report["samples"]) < 6                 # the search stopped after a chunk
    assert not (root / "report.html").exists()            # drawing too: the budget was spent
    notes = " | ".join(report["notes"])
    assert "not every kept mistake was explained" in notes
    assert "report.html not written: time budget (0.2 s) spent" in notes
    assert "sample panels drawn to TensorBoard" in notes and "part strips" in notes


# ---------------------------------------------------------------------------- interrupts
class _Interrupt(L.Callback):
    """Ctrl+C at the second training epoch's first batch (epoch 0's explanation still runs)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


@pytest.fixture
def sigint_restored():
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)     # Lightning ignores SIGINT while shutting down


def test_ctrl_c_stops_the_background_explanation_and_writes_what_it_finished(
        tmp_path, monkeypatch, sigint_restored):
    from fgvce_lightning.engine import search as engine_search

    search = engine_search.counterfactual_search

    def slow(*args, **kwargs):                 # 6 chunks of 0.4 s: still searching at Ctrl+C
        time.sleep(0.4)
        return search(*args, **kwargs)

    monkeypatch.setattr(engine_search, "counterfactual_search", slow)
    monkeypatch.setattr(monitor_callback, "INTERRUPT_WAIT_S", 20.0)
    monitor = _monitor(tmp_path / "r", explain_batch_size=1, report_html=True)
    start = time.perf_counter()
    with pytest.raises(SystemExit):
        _fit(tmp_path, monitor, callbacks=[_Interrupt()])
    assert time.perf_counter() - start < 15          # it did not wait for the whole search
    report = json.loads((tmp_path / "r" / "epoch_000" / "report.json").read_text())
    assert 1 <= len(report["samples"]) < 6
    assert any("interrupted" in n for n in report["notes"])
    assert not (tmp_path / "r" / "epoch_000" / "report.html").exists()
    assert monitor.summaries and monitor.summaries[0]["epoch"] == 0


def test_an_explanation_the_interrupt_cut_off_is_noted_in_the_next_report(
        tmp_path, monkeypatch, sigint_restored):
    from fgvce_lightning.engine import search as engine_search

    search, release = engine_search.counterfactual_search, threading.Event()

    def stuck(*args, **kwargs):                # one chunk that takes longer than the wait
        release.wait(60)
        return search(*args, **kwargs)

    monkeypatch.setattr(engine_search, "counterfactual_search", stuck)
    monkeypatch.setattr(monitor_callback, "INTERRUPT_WAIT_S", 0.5)
    first = _monitor(tmp_path / "r", explain_batch_size=64)
    with pytest.warns(RuntimeWarning, match=r"explanation of epoch 0 \(global step 4\) was lost"), \
            pytest.raises(SystemExit):
        _fit(tmp_path, first, callbacks=[_Interrupt()])
    lost = json.loads((tmp_path / "r" / "lost.json").read_text())["lost"]
    assert [e["name"] for e in lost] == ["epoch_000"]
    assert first.total_failures == 1
    monkeypatch.setattr(engine_search, "counterfactual_search", search)
    second = _monitor(tmp_path / "r", background=False)
    _fit(tmp_path, second, max_epochs=1)
    report = json.loads((tmp_path / "r" / "epoch_000" / "report.json").read_text())
    assert any("epoch 0 (global step 4) was lost: interrupted (KeyboardInterrupt)" in n
               for n in report["notes"])
    assert not (tmp_path / "r" / "lost.json").exists()
    release.set()


# ---------------------------------------------------------------------------- mechanisms
def _edits(root: Path) -> list:
    return [[((s["batch_idx"], s["position"]), s["edits"], s["success"]) for s in r["samples"]]
            for r in _reports(root).values()]


@pytest.mark.parametrize("spare_core", [False, True], ids=["no-spare-core", "spare-core"])
def test_every_mechanism_can_be_switched_off_without_changing_the_explanations(
        tmp_path, monkeypatch, spare_core):
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: spare_core)
    default = sys.getswitchinterval()
    seen = []

    class Interval(L.Callback):                # while the background explanation runs
        def on_train_batch_start(self, *args):
            seen.append(sys.getswitchinterval())

    base = _monitor(tmp_path / "base")
    _, base_model = _fit(tmp_path, base, callbacks=[Interval()])
    assert set(seen) == {default}              # never changed behind the user's back
    want = _edits(tmp_path / "base")
    assert any(e for epoch in want for e in epoch)
    for name in ("waiting_sets", "held_sets", "collection_thread", "low_priority", "reuse_logits"):
        monitor = _monitor(tmp_path / name, _mechanisms=Mechanisms(**{name: False}))
        _, model = _fit(tmp_path, monitor)
        assert _edits(tmp_path / name) == want, name
        assert all(torch.equal(a, b) for a, b in zip(base_model.parameters(), model.parameters()))


def test_each_switch_changes_where_the_work_happens(tmp_path, monkeypatch):
    from fgvce_lightning.monitor import stores

    add, calls = stores.Stores.add, []

    def recording(self, batch, pred, wrong):
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if hasattr(os, "getpriority") else 0
        calls.append((threading.current_thread() is threading.main_thread(), nice,
                      sorted(set(batch.ids[:, 1].tolist()))))
        return add(self, batch, pred, wrong)

    monkeypatch.setattr(stores.Stores, "add", recording)
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: False)
    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if hasattr(os, "getpriority") else 0

    def run(name, **switches):
        calls.clear()
        monitor = _monitor(tmp_path / name, _mechanisms=Mechanisms(**switches))
        _fit(tmp_path / name, monitor, max_epochs=1)   # 4 validation batches of 16
        return monitor, list(calls)

    _, default = run("default")                 # all four together, by the background job
    assert [(main, ids) for main, _, ids in default] == [(False, [0, 1, 2, 3])]
    _, alone = run("waiting_sets", waiting_sets=False)
    assert [ids for _, _, ids in alone] == [[0], [1], [2], [3]]
    assert not any(main for main, _, _ in alone)        # held for the job, one set each
    _, inline = run("held_sets", waiting_sets=False, held_sets=False)
    assert [main for main, _, _ in inline] == [True] * 4      # stored on the loop as they fill
    if hasattr(os, "getpriority"):
        _, normal = run("low_priority", low_priority=False)
        assert default[0][1] == min(19, here + 10) and normal[0][1] == here
    monitor, _ = run("reuse_logits", reuse_logits=False)
    assert monitor._session.capture.reuse_logits is False
    monkeypatch.setattr(monitor_session.threads, "spare_cpu", lambda: True)
    monitor, _ = run("collection_thread", collection_thread=False)
    assert monitor._session.worker is None
    monitor, _ = run("thread")
    assert monitor._session.worker is not None
    # the collection thread ends with the run: no thread of ours is left when fit returns
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fgvce")]


def test_serial_worker_close_runs_what_was_submitted_then_ends_the_thread():
    from fgvce_lightning.monitor.threads import SerialWorker
    worker, done, gate = SerialWorker(max_pending=2), [], threading.Event()
    worker.submit(gate.wait)
    worker.submit(lambda: done.append(1))
    assert not worker.close(timeout=0.05)          # still busy: says so rather than hanging
    gate.set()
    assert worker.close(timeout=5) and done == [1]
    worker.submit(lambda: done.append(2))          # a later task starts a new thread
    assert worker.drain(5) and done == [1, 2]
    assert worker.close(timeout=5)

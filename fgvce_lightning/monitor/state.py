"""What the monitor keeps from run to run: histories, summaries, counters, and what was lost.

:class:`MonitorState` records every explained result (:meth:`MonitorState.record`) and is what
goes into checkpoints. An explanation still running in the background when a checkpoint is
written is read back from its report when the checkpoint is loaded. An explanation that an
interrupt cut off before it was written out is marked in ``<report_dir>/lost.json``
(:func:`mark_lost`); the next report, in this process or the next, says so (:func:`take_lost`).
"""

from __future__ import annotations

import glob
import json
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..parts import PartHistory
from ..reporting.epoch import EpochResult
from .schedule import RunInfo

if TYPE_CHECKING:
    from .publish import Publisher
    from .runner import Outcome

__all__ = ["MonitorState", "summary", "mark_lost", "unmark_lost", "take_lost", "STATE_VERSION"]

STATE_VERSION = 2
_LOST = "lost.json"
_lost_lock = threading.Lock()


def summary(result: EpochResult) -> dict[str, Any]:
    """A small, checkpointable summary of one explained run and dataloader."""
    s = result.stats
    return {"epoch": result.epoch, "global_step": result.global_step, "stage": result.stage,
            "dataloader_idx": result.dataloader_idx,
            "num_misclassified": s.num_misclassified, "num_explained": s.num_explained,
            "num_skipped": s.num_skipped, "flip_rate": s.flip_rate, "mean_edits": s.mean_edits,
            "failures": len(result.failures), "skipped_batches": len(result.skipped_batches),
            "elapsed_s": result.elapsed_s,
            "part_error_share": {p.part: p.error_share for p in s.part_stats}}


class MonitorState:
    """The monitor's checkpointed state.

    Attributes:
        history: part statistics of the first validation dataloader by epoch (the last
            explained validation of an epoch).
        step_history: the same by global step: one entry per explained validation (several per
            epoch with ``val_check_interval`` < 1).
        summaries: one :func:`summary` per explained run and dataloader (test runs included).
        num_explained_epochs: explained runs (first dataloader).
        total_failures: failures counted over the whole run (explaining, writing, lost work).
        validation_runs: validations while fitting so far (``every_n_epochs`` counts them).
        notes: what the next report is to say (lost explanations, reports that failed to write).
    """

    def __init__(self) -> None:
        self.history = PartHistory()
        self.step_history = PartHistory()
        self.summaries: list[dict[str, Any]] = []
        self.num_explained_epochs = 0
        self.total_failures = 0
        self.validation_runs = 0
        self.notes: list[str] = []
        self.last_result: Optional[EpochResult] = None

    def record(self, result: EpochResult) -> None:
        """Add one explained dataloader's result."""
        if result.dataloader_idx == 0:
            self.last_result = result
            self.num_explained_epochs += 1
            if result.stage != "test":
                self.history.update(result.epoch, result.stats)
                self.step_history.update(result.global_step, result.stats)
        self.summaries.append(summary(result))
        self.total_failures += len(result.failures)

    def record_outcome(self, outcome: "Outcome", prefix: str,
                       publisher: Optional["Publisher"] = None) -> Optional[Path]:
        """Add an explained run; on rank 0 log its scalars (training thread: loggers are not
        thread-safe) and count the reports that failed to write (noted in the next report).
        Returns the first dataloader's report directory, if written."""
        from .publish import log_scalars

        run, first = outcome.run, None
        for result, path in outcome.results:
            self.record(result)
            if run.is_global_zero:
                log_scalars(result, run, prefix)
                if path is not None and result.dataloader_idx == 0:
                    first = path
        if publisher is not None and publisher.failures:
            self.total_failures += len(publisher.failures)
            self.notes.extend(publisher.failures)
            publisher.failures = []
        return first

    def record_unfinished(self, run: RunInfo, error: Optional[BaseException], root: Optional[str],
                          reason: str) -> None:
        """A background explanation that failed (``error``) or was given up on (``None``: marked
        lost under ``root`` for the next report); counted, warned about."""
        if error is not None:
            message = (f"the background explanation of {run.describe()} failed: "
                       f"{type(error).__name__}: {error} (training continues)")
        elif root is not None:
            message = mark_lost(root, run, reason) + "; the next report says so"
        else:
            message = f"the explanation of {run.describe()} was lost: {reason}"
        warnings.warn(f"CounterfactualMonitor: {message}.", RuntimeWarning, stacklevel=4)
        self.total_failures += 1

    def state_dict(self, prototypes: Mapping[str, Any], pending: list[dict[str, Any]]) -> dict[str, Any]:
        return {"version": STATE_VERSION, "num_explained_epochs": self.num_explained_epochs,
                "total_failures": self.total_failures, "validation_runs": self.validation_runs,
                "history": self.history.state_dict(), "step_history": self.step_history.state_dict(),
                "summaries": [dict(s) for s in self.summaries], "notes": list(self.notes),
                "prototypes": prototypes, "pending": pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys keep their defaults: old checkpoints load);
        runs still being explained when it was written are read back from their reports."""
        self.num_explained_epochs = int(state.get("num_explained_epochs", 0))
        self.total_failures = int(state.get("total_failures", 0))
        self.validation_runs = int(state.get("validation_runs", state.get("num_explained_epochs", 0)))
        self.history.load_state_dict(state.get("history", {}))
        self.step_history.load_state_dict(state.get("step_history", {}))
        self.summaries = [dict(s) for s in state.get("summaries", [])]
        self.notes = [str(n) for n in state.get("notes", [])]
        for pending in state.get("pending", []):
            self._recover(pending)

    def _recover(self, pending: Mapping[str, Any]) -> None:
        """Add a run that was still being explained when the checkpoint was written, from the
        report it wrote; warn (and note it for the next report) when there is none."""
        epoch, step = int(pending["epoch"]), int(pending["global_step"])
        name = str(pending.get("name", f"epoch_{epoch:03d}"))
        report = None
        for path in sorted(glob.glob(os.path.join(glob.escape(str(pending["report_root"])),
                                                  f"{glob.escape(name)}*", "report.json"))):
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, ValueError):
                continue
            if int(data.get("epoch", -1)) == epoch and int(data.get("global_step", -1)) == step \
                    and int(data.get("dataloader_idx", 0)) == 0:
                report = data
        if report is None:
            message = (f"epoch {epoch} (global step {step}) was still being explained when the "
                       f"checkpoint was written and no report of it is in "
                       f"{pending['report_root']}: it is lost")
            warnings.warn(f"CounterfactualMonitor: {message}; the resumed history skips it.",
                          RuntimeWarning, stacklevel=4)
            self.notes.append(message)
            return
        nan = float("nan")
        parts = {p["part"]: p for p in report.get("part_stats", [])}
        self.history.set_record(epoch, parts)
        self.step_history.set_record(step, parts)
        self.summaries.append({
            "epoch": epoch, "global_step": step, "stage": str(report.get("stage", "fit")),
            "dataloader_idx": 0,
            "num_misclassified": int(report.get("num_misclassified", 0)),
            "num_explained": int(report.get("num_explained", 0)),
            "num_skipped": int(report.get("num_skipped", 0)),
            "flip_rate": nan if report.get("flip_rate") is None else float(report["flip_rate"]),
            "mean_edits": nan if report.get("mean_edits") is None else float(report["mean_edits"]),
            "failures": len(report.get("failures", [])),
            "skipped_batches": len(report.get("skipped_batches", [])),
            "elapsed_s": float(report.get("elapsed_s", 0.0)),
            "part_error_share": {n: float(p["error_share"]) for n, p in parts.items()}})
        self.summaries.sort(key=lambda s: (s["global_step"], s["epoch"]))
        self.num_explained_epochs += 1
        self.total_failures += len(report.get("failures", []))


def _lost_path(root: str) -> str:
    return os.path.join(root, _LOST)


def _read(root: str) -> list[dict[str, Any]]:
    try:
        with open(_lost_path(root), encoding="utf-8") as fh:
            return list(json.load(fh).get("lost", []))
    except (OSError, ValueError):
        return []


def _write(root: str, entries: list[dict[str, Any]]) -> None:
    path = _lost_path(root)
    if not entries:
        if os.path.exists(path):
            os.remove(path)
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"lost": entries}, fh, indent=1)
    os.replace(tmp, path)


def mark_lost(root: str, run: RunInfo, reason: str) -> str:
    """Record in ``<root>/lost.json`` that ``run``'s explanation was not written out, and why;
    the message (also for the warning)."""
    message = f"the explanation of {run.describe()} was lost: {reason}"
    with _lost_lock:
        entries = [e for e in _read(root) if e.get("name") != run.report_name()]
        entries.append({"name": run.report_name(), "epoch": run.current_epoch,
                        "global_step": run.global_step, "stage": run.stage, "message": message})
        try:
            os.makedirs(root, exist_ok=True)
            _write(root, entries)
        except OSError:
            pass
    return message


def unmark_lost(root: str, name: str) -> None:
    """The run ``name`` was written out after all: forget its entry."""
    with _lost_lock:
        entries = _read(root)
        kept = [e for e in entries if e.get("name") != name]
        if len(kept) != len(entries):
            try:
                _write(root, kept)
            except OSError:
                pass


def take_lost(root: Optional[str]) -> list[str]:
    """The messages of ``<root>/lost.json`` (for the next report), forgetting them."""
    if root is None:
        return []
    with _lost_lock:
        entries = _read(root)
        if entries:
            try:
                _write(root, [])
            except OSError:
                pass
    return [str(e.get("message", e.get("name"))) for e in entries]

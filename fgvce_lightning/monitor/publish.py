"""Rank 0 publishes an explained run: the report on disk, TensorBoard panels, scalars.

:meth:`Publisher.publish` writes ``report.json`` and ``edits.csv`` first (atomically; the finished
search is on disk as soon as it is done), then, while the time budget lasts, the TensorBoard
panels, the strips of the discovered parts and ``report.html``; what was cut is noted in the
report. It is safe on the background thread (TensorBoard's ``SummaryWriter`` queues its events,
reports go to fresh files). :func:`log_scalars` runs on the training thread (loggers are not
thread-safe). :func:`probe_report_dir` finds report-directory problems before training starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ..reporting.epoch import EpochResult
from .batches import pictures
from .collector import Collector
from .explain import ExplainContext, part_channels
from .schedule import Deadline, RunInfo

__all__ = ["Publisher", "log_scalars", "probe_report_dir"]


def probe_report_dir(root: str) -> None:
    """Create ``root`` and write and remove a probe file in it.

    Raises:
        ValueError: when that fails (a file in the way, a read-only directory, ...), saying what
            to do.
    """
    probe = os.path.join(root, f".fgvce-probe-{uuid.uuid4().hex}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("probe")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"Expected `report_dir` to be a directory the monitor can write reports "
                         f"to, but {root!r} is not ({type(err).__name__}: {err}). Pass another "
                         "`report_dir` (or None: the logger's directory).") from err


def _warn(message: str) -> None:
    warnings.warn(f"CounterfactualMonitor: {message}", RuntimeWarning, stacklevel=3)


def log_scalars(result: EpochResult, run: RunInfo, prefix: str) -> None:
    """Rank 0: the run's scalars (``run.prefix(prefix, dataloader)``) to every logger. Never raises."""
    from ..reporting.scalars import epoch_scalars

    scalars = epoch_scalars(result, run.prefix(prefix, result.dataloader_idx))
    for logger in run.loggers:
        try:
            logger.log_metrics(scalars, step=int(result.global_step))
        except Exception as err:  # noqa: BLE001
            _warn(f"logging to {type(logger).__name__} failed: {type(err).__name__}: {err}")


class Publisher:
    """Writes reports under ``root`` and TensorBoard panels; remembers what failed.

    Args:
        root: the report directory.
        prefix: the scalars' and panels' tag prefix.
        log_images: most sample panels drawn per run and dataloader.
        html: also write ``report.html``.
    """

    def __init__(self, root: str, prefix: str, log_images: int, html: bool) -> None:
        self.root = root
        self.prefix = prefix
        self.log_images = log_images
        self.html = html
        self.failures: list[str] = []        # writing failures, for the next report and the count
        self._reporters: dict[tuple, Any] = {}
        self._images: Any = None                # the EpochImages being published
        #: seconds each piece of the last run's publishing took (all dataloaders together; the
        #: pieces do not overlap): ``report.json``; drawing the two ``figures`` and the
        #: ``sample panels`` and their PNG / JPEG ``encoding`` (done once, for TensorBoard and
        #: ``report.html`` alike); ``tensorboard`` (the rest: writing the events, the text);
        #: ``strips`` (the part strips); ``report.html`` (the rest: the page)
        self.timings: dict[str, float] = {}
        self._run_key: Any = None

    def _timed(self, piece: str, start: float, drawn: Optional[dict[str, float]] = None) -> None:
        """Add the time since ``start`` to ``piece``, less the drawing and encoding the epoch's
        pictures recorded meanwhile (``drawn``: their :attr:`EpochImages.timings` at ``start``),
        which go to their own pieces."""
        elapsed = time.perf_counter() - start
        if drawn is not None:
            for name, seconds in self._images.timings.items():
                spent = seconds - drawn.get(name, 0.0)
                self.timings[name] = self.timings.get(name, 0.0) + spent
                elapsed -= spent
        self.timings[piece] = self.timings.get(piece, 0.0) + max(elapsed, 0.0)

    def _drawing(self, result: EpochResult) -> dict[str, float]:
        """The epoch's pictures' drawing and encoding times so far (the pictures TensorBoard and
        ``report.html`` share)."""
        from ..reporting.rendered import epoch_images

        self._images = epoch_images(result)
        return dict(self._images.timings)

    def publish(self, result: EpochResult, run: RunInfo, ctx: ExplainContext,
                collector: Optional[Collector], deadline: Deadline,
                strips: bool = False) -> tuple[EpochResult, Optional[Path]]:
        """Write one dataloader's report and panels (``strips``: and the part strips); the
        result with the notes of what was cut, and the report's directory (``None`` when
        writing it failed: counted in :attr:`failures`). Never raises."""
        from ..reporting.export import write_epoch_report

        name = run.report_name(result.dataloader_idx)
        key = (run.stage, run.current_epoch, run.global_step)
        if key != self._run_key:
            self._run_key, self.timings = key, {}
        start = time.perf_counter()
        try:
            path = write_epoch_report(result, self.root, html=False, name=name)
        except Exception as err:  # noqa: BLE001
            self._failed(f"writing the report {name} to {self.root}", err)
            return result, None
        self._timed("report.json", start)
        notes = list(result.notes)
        self._panels(result, run, ctx, collector if strips else None, deadline, notes)
        if self.html:
            if deadline.expired():
                notes.append(f"report.html not written: {deadline.why()}")
            else:
                start, drawn = time.perf_counter(), self._drawing(result)
                self._write_html(result, path)
                self._timed("report.html", start, drawn)
        if len(notes) > len(result.notes):
            result = dataclasses.replace(result, notes=tuple(notes))
            self._rewrite_json(result, path)
        return result, path

    def _failed(self, what: str, err: BaseException) -> None:
        message = f"{what} failed: {type(err).__name__}: {err}"
        _warn(message + " (training continues; counted, and noted in the next report).")
        self.failures.append(message)

    def _panels(self, result: EpochResult, run: RunInfo, ctx: ExplainContext,
                collector: Optional[Collector], deadline: Deadline, notes: list[str]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        from ..reporting.tensorboard import TensorBoardReporter

        prefix = run.prefix(self.prefix, result.dataloader_idx)
        for logger in run.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            try:
                key = (id(logger), prefix)
                reporter = self._reporters.get(key)
                if reporter is None:
                    reporter = TensorBoardReporter(logger.experiment, prefix=prefix,
                                                   max_images=self.log_images)
                    self._reporters[key] = reporter
                start, before = time.perf_counter(), self._drawing(result)
                drawn = reporter.log_epoch(result, int(result.global_step), scalars=False,
                                           should_stop=deadline.expired)
                self._timed("tensorboard", start, before)
                shown = min(self.log_images, sum(not s.explanation.skipped for s in result.samples))
                if drawn < shown:
                    notes.append(f"{drawn} of {shown} sample panels drawn to TensorBoard: "
                                 f"{deadline.why()}")
                if collector is not None:
                    start = time.perf_counter()
                    self._strips(ctx, collector, logger.experiment, result, prefix, deadline, notes)
                    self._timed("strips", start)
            except Exception as err:  # noqa: BLE001
                _warn(f"logging to {type(logger).__name__} failed: {type(err).__name__}: {err}")

    @staticmethod
    def _strips(ctx: ExplainContext, collector: Collector, writer: Any, result: EpochResult,
                prefix: str, deadline: Deadline, notes: list[str]) -> None:
        """Each discovered part as a strip of its most typical bank patches, so a person can name
        it (``P/parts/<id>_<name>``; names from ``part_names`` or ``PartPrototypes.set_names``):
        all strips from one pass (:meth:`PartPrototypes.patch_strips`), written while the budget
        lasts."""
        store, protos = collector.stores, ctx.prototypes
        if store.part_source != "prototypes" or not protos.fitted:
            return
        maps, thumbs = [], []
        for k in range(store.bank.num_classes):          # the references with their thumbnails
            feats, ids = store.bank.get(k)
            kept, found = store.extras.rows_of("thumb", k, ids)
            if kept is not None and bool(found.any()):
                maps.append(feats[found.to(feats.device)])
                thumbs.append(kept[found])
        if not maps or deadline.expired():
            if maps:
                notes.append(f"no part strips drawn: {deadline.why()}")
            return
        feats = part_channels(ctx.search, torch.cat(maps))
        with ctx.lock:
            parts = protos.parts()
            images = protos.patch_strips(feats, pictures(torch.cat(thumbs)), k=8)
        for n, part in enumerate(parts):
            if deadline.expired():
                notes.append(f"{n} of {len(parts)} part strips drawn to TensorBoard: {deadline.why()}")
                break
            tag = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in part.name)
            writer.add_image(f"{prefix}/parts/{part.id}_{tag}", images[n], int(result.global_step))

    def _write_html(self, result: EpochResult, path: Path) -> None:
        from ..reporting.html import render_html
        from ..reporting.report import report_dict

        try:
            _replace(path / "report.html", render_html(result, report_dict(result)))
        except Exception as err:  # noqa: BLE001
            self._failed(f"writing {path / 'report.html'}", err)

    def _rewrite_json(self, result: EpochResult, path: Path) -> None:
        from ..reporting.report import report_dict

        try:
            text = json.dumps(report_dict(result), indent=1, allow_nan=False, ensure_ascii=False)
            _replace(path / "report.json", text)
        except Exception as err:  # noqa: BLE001
            self._failed(f"adding the notes to {path / 'report.json'}", err)


def _replace(target: Path, text: str) -> None:
    """Write ``target`` through a temporary file and a rename (readers never see half of it)."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise

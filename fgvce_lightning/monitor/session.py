"""One model's monitoring inside a ``trainer.fit`` / ``validate`` / ``test``: the per-epoch flow.

:class:`Session` owns what :meth:`CounterfactualMonitor.setup
<fgvce_lightning.monitor.callback.CounterfactualMonitor.setup>` builds for a model: the capture
hooks, one :class:`~fgvce_lightning.monitor.collector.Collector` per evaluation dataloader (built
from its first batch, which is checked against the configuration), the collection thread, the
report directory and the precision. Per evaluation epoch: :meth:`Session.start_epoch`, then
:meth:`Session.batch_start` / :meth:`Session.batch_end` per batch, then :meth:`Session.end_epoch`,
which hands the run to the :class:`~fgvce_lightning.monitor.runner.Runner`.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..engine.split import ModelSplit
from .batches import parse_batch
from .capture import Capture, HeadPrecision
from .checks import build_stores
from .collector import Collector
from .config import MonitorConfig
from .publish import Publisher, probe_report_dir
from .schedule import RunInfo
from . import threads
from .threads import SerialWorker

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["Session"]


class Session:
    """The monitoring of one model (see the module docstring).

    Args:
        config: the monitor's options.
        split: the model's split.
        owner: the model.
    """

    def __init__(self, config: MonitorConfig, split: ModelSplit, owner: torch.nn.Module) -> None:
        self.config = config
        self.owner = owner
        self.capture = Capture(split, reuse_logits=config.mechanisms.reuse_logits)
        self.collectors: dict[int, Collector] = {}
        self.kind: Optional[str] = None           # "val" or "test": whose dataloaders these are
        self.num_loaders = 1
        self.worker: Optional[SerialWorker] = None
        self.publisher: Optional[Publisher] = None
        self.root: Optional[str] = None
        self.precision = HeadPrecision()          # the model's (for the collection)
        self.search_precision = HeadPrecision()   # ``head_precision`` (for the search)
        self.stage: Optional[str] = None          # this epoch's: "fit", "validate" or "test"
        self.active = False
        self.sanity = False
        self.checked: set[tuple[str, int]] = set()    # dataloaders whose first batch was checked
        self.disabled: Optional[str] = None
        self._epoch: tuple[int, Optional[SerialWorker], bool] = (0, None, False)

    @property
    def split(self) -> ModelSplit:
        return self.capture.split

    def open(self, trainer: "pl.Trainer") -> None:
        """Attach to a trainer: its precision, and the report directory (``report_dir``, or
        ``<trainer.log_dir>/fgvce``), created and probed by rank 0; a problem with it raises on
        every rank."""
        # `trainer.log_dir` broadcasts under DDP: every rank must call it, here, together
        log_dir = trainer.log_dir
        root = self.config.report_dir or os.path.join(
            log_dir if log_dir is not None else trainer.default_root_dir, "fgvce")
        problem = None
        if trainer.is_global_zero:
            try:
                probe_report_dir(root)
            except ValueError as err:
                problem = str(err)
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem is not None:
            raise ValueError(problem)
        self.root = root
        self.publisher = Publisher(root, self.config.prefix, self.config.log_images,
                                   self.config.report_html)
        self.precision = HeadPrecision.of(trainer, "model")
        self.search_precision = HeadPrecision.of(trainer, self.config.head_precision)
        self.disabled = None

    def disable(self, err: BaseException) -> None:
        """A configuration problem found while fitting: warn once, monitor nothing more this run."""
        self.disabled = f"{type(err).__name__}: {err}"
        self.active = False
        self.capture.remove()
        warnings.warn(f"CounterfactualMonitor: {self.disabled}. The monitor is off for the rest of "
                      "this run (training goes on); fix the configuration to explain mistakes.",
                      RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ the epoch
    def start_epoch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", kind: str,
                    stage: str, explain: bool, hold: bool) -> None:
        """Start an evaluation epoch of dataloaders ``kind`` (``"val"``/``"test"``); collect when
        ``explain`` (or, in a sanity check, to check dataloaders not checked yet); ``hold``: full
        sets wait for the background explanation."""
        self.sanity, self.stage = bool(trainer.sanity_checking), stage
        counts = (trainer.num_sanity_val_batches if self.sanity else
                  trainer.num_test_batches if kind == "test" else trainer.num_val_batches)
        num_loaders = max(1, len(counts))
        if kind != self.kind or num_loaders != self.num_loaders:
            self.release()
            self.collectors, self.kind, self.num_loaders = {}, kind, num_loaders
        unchecked = any((kind, dl) not in self.checked for dl in range(num_loaders))
        self.active = self.disabled is None and (explain or (self.sanity and unchecked))
        m = self.config.mechanisms
        # the bookkeeping goes to the collection thread where it has a core of its own: on a GPU,
        # or on a CPU whose cores torch's threads do not all use (on a CPU it slows the forward
        # when they do: benchmarks/bench_callback.py)
        # (not beside a precision that sets torch's process-wide default dtype in every forward)
        threaded = (m.collection_thread and self.config.background is not False and not self.sanity
                    and self.precision.global_dtype is None
                    and (pl_module.device.type != "cpu" or threads.spare_cpu()))
        if threaded and self.worker is None:
            self.worker = SerialWorker(max_pending=1, switch_interval_s=self.config.switch_interval_s)
        self._epoch = (int(trainer.current_epoch), self.worker if threaded else None,
                       hold and m.held_sets)
        self.capture.new_epoch()
        if self.active and not self.sanity:
            for collector in self.collectors.values():
                collector.start_epoch(*self._epoch)

    def batch_start(self, pl_module: torch.nn.Module, dataloader_idx: int) -> None:
        if not self.active or (self.sanity and (self.kind, dataloader_idx) in self.checked):
            return
        collector = self.collectors.get(dataloader_idx)
        self.capture.arm(pl_module, collector.slot if collector is not None else None)

    def batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                  batch_idx: int, dataloader_idx: int, search_config: Any) -> None:
        """Collect one batch. A problem with a dataloader's first batch is a configuration
        error: it raises, except while fitting past the sanity check (then the monitor is
        disabled, with a warning); a later batch that fails is skipped and reported."""
        captured, logits = self.capture.disarm()
        key = (self.kind, dataloader_idx)
        if not self.active or (self.sanity and key in self.checked):
            return
        collector = self.collectors.get(dataloader_idx)
        try:
            with torch.inference_mode(False), torch.no_grad():
                parsed = parse_batch(batch, self.config.batch_parser)
                feats = self.capture.features(parsed, captured, pl_module, self.precision)
                logits = self.capture.logits(feats, logits, pl_module, self.precision)
                if collector is None:
                    stores = build_stores(
                        self.config, search_config, parsed, feats, logits, device=pl_module.device,
                        world_size=int(getattr(trainer, "world_size", 1) or 1),
                        num_loaders=self.num_loaders, defer_thumbnails=self.worker is not None)
                    collector = self.collectors[dataloader_idx] = Collector(stores, dataloader_idx)
                    self.checked.add(key)
                    if self.sanity:
                        return             # the sanity check checks; nothing is kept
                    collector.start_epoch(*self._epoch)
                collector.add(feats, logits, parsed, batch_idx)
        except Exception as err:  # noqa: BLE001 - configuration errors raise, later ones are counted
            if key not in self.checked or collector is None:
                if self.sanity or self.stage != "fit":
                    raise
                self.disable(err)
                return
            collector.skip(batch_idx, f"{type(err).__name__}: {err}")

    def end_epoch(self, trainer: "pl.Trainer", background: bool) -> Optional[tuple[RunInfo, dict]]:
        """End the epoch's collection: the run to explain and, per dataloader, the sets left for
        the ``background`` explanation to store (in order); ``None`` when nothing is explained."""
        self.capture.remove()                   # (registered again at the next epoch's start)
        if not self.active:
            return None
        self.active = False
        if self.sanity:
            return None
        run = RunInfo.of(trainer, self.stage, self.num_loaders)
        held = {dl: c.finish(for_job=background) for dl, c in self.collectors.items()}
        return run, held

    # ------------------------------------------------------------------ helpers
    def probe(self, held: dict) -> Optional[torch.Tensor]:
        """Two feature maps to check a copy of the model on: kept mistakes, or waiting samples."""
        for dl, collector in sorted(self.collectors.items()):
            store = collector.stores
            if store.mistakes.size:
                return store.mistakes.get("features")[:2].to(store.feature_dtype)
            if held.get(dl):
                return held[dl][0].feats[:2]
        return None

    def has_work(self, held: dict) -> bool:
        """Whether there is anything to explain (kept mistakes, or sets still to store)."""
        return any(c.stores.mistakes.size or held.get(dl) for dl, c in self.collectors.items())

    def release(self, timeout: Optional[float] = None) -> None:
        """Stop collecting: hooks removed, waiting sets given back, the thread drained."""
        self.capture.remove()
        self.active = False
        for collector in self.collectors.values():
            collector.release()
            collector.drain(timeout)
        if self.worker is not None:        # no thread of ours outlives the run
            self.worker.close(timeout)

    @property
    def memory_bytes(self) -> int:
        return sum(c.memory_bytes for c in self.collectors.values())

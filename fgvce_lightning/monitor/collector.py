"""One dataloader's collection during one validation epoch: from captured batches to the stores.

Batches wait in reusable buffers (:class:`~fgvce_lightning.monitor.pending.PendingBatches`) and
are stored a set at a time, always in batch order, in one of three places:

* inline, on the validation loop, as each set fills;
* on the collection thread (:class:`~fgvce_lightning.monitor.threads.SerialWorker`), where it has
  a core of its own;
* by the background explanation, before it explains: the epoch's last set, and (``hold``, with
  no collection thread) the sets that fill during the epoch, while the memory budget has room.

A batch whose shapes or labels are wrong is left out and reported (:attr:`Collector.skipped`);
an unexpected failure while storing is warned about, counted (:attr:`Collector.failures`) and
stops the collection of that dataloader for the epoch. Nothing here raises into the training.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from .batches import ParsedBatch
from .pending import BatchSet, PendingBatches
from .stores import Stores
from .threads import SerialWorker

__all__ = ["Collector"]


class Collector:
    """What one dataloader's batches go through in a validation epoch.

    Args:
        stores: the dataloader's stores (sized for it).
        dataloader_idx: the dataloader.
    """

    def __init__(self, stores: Stores, dataloader_idx: int = 0) -> None:
        self.stores = stores
        self.dataloader_idx = int(dataloader_idx)
        self.pending = PendingBatches(stores.pending_bytes, stores.thumbnail_size)
        self.held: list[BatchSet] = []        # full sets held for the background explanation
        self.job_sets: list[BatchSet] = []    # the sets handed to it, until it has stored them
        self.hold = False
        self.worker: Optional[SerialWorker] = None
        self.active = False
        self.num_misclassified = 0
        self.failures: list[str] = []
        self.skipped: list[tuple[int, int, str]] = []     # (dataloader_idx, batch_idx, reason)
        self._thread_errors: list[BaseException] = []    # failures on the collection thread
        self._halted = False           # a set failed on the thread: store nothing more

    def start_epoch(self, reseed: int, worker: Optional[SerialWorker], hold: bool) -> None:
        """Empty the stores and counters; store on ``worker`` (``None``: inline), holding full
        sets for the background explanation when ``hold``."""
        self.release()
        self.stores.reset(reseed)
        self.worker, self.hold, self.active = worker, hold and worker is None, True
        self.num_misclassified, self.failures, self.skipped = 0, [], []
        self._thread_errors, self._halted = [], False

    # ------------------------------------------------------------------ during the epoch
    def slot(self, feats: torch.Tensor) -> Optional[torch.Tensor]:
        """The rows the next batch's feature maps are to be written into (or ``None``)."""
        return self.pending.slot(feats) if self.active else None

    def add(self, feats: torch.Tensor, logits: torch.Tensor, parsed: ParsedBatch,
            batch_idx: int) -> None:
        """Queue a batch (copied into the waiting buffers) and store the waiting ones when full.

        Raises:
            ValueError: when the batch does not match the stores (it is not queued; the caller
                skips it).
        """
        if self._thread_errors:
            self.drain()               # an earlier set failed on the thread: stop this epoch
        if not self.active:
            return
        self.stores.check_shapes(feats, logits, parsed)
        parsed = self.stores.needed(parsed)
        defer = self.worker is not None          # the thread casts the thumbnails
        try:
            if not self.pending.fits(feats, logits, parsed, defer):
                self._flush()
            if self.active:
                self.pending.push(feats, logits, parsed, self.dataloader_idx, batch_idx, defer)
                if self.pending.full:
                    self._flush()
        except Exception as err:  # noqa: BLE001 - counted, never raised into the training
            self.stop(err, batch_idx)

    def skip(self, batch_idx: int, reason: str) -> None:
        """Record a batch left out (its reason goes to the report)."""
        self.skipped.append((self.dataloader_idx, int(batch_idx), reason))

    def _take(self) -> Optional[BatchSet]:
        with torch.inference_mode(False), torch.no_grad():
            return self.pending.take()

    def _flush(self) -> None:
        """Store the waiting batches: hold them for the background explanation, or on the
        collection thread, or here (a failure propagates to the caller)."""
        taken = self._take()
        if taken is None:
            return
        if self.hold:
            if self._room_to_hold(taken):
                self.held.append(taken)
                self.pending.keep = max(self.pending.keep, len(self.held) + PendingBatches._KEEP)
                return
            # no room for more: the sets are stored here from now on, the held ones first (the
            # stores must see the batches in order)
            self.hold = False
            held, self.held = self.held, []
            self._store_all([*held, taken])
        elif self.worker is not None:
            self.worker.submit(lambda: self._store_on_thread(taken))
        else:
            self._store(taken)

    def _room_to_hold(self, taken: BatchSet) -> bool:
        """Whether the budget holds ``taken`` and the sets held before it until the epoch's end,
        and buffers as large for the next set: in the two sets' share of the budget and what the
        bank leaves over (:func:`~fgvce_lightning.monitor.stores.plan_stores`)."""
        size = taken.slab.nbytes if taken.slab is not None else 0
        return (len(self.held) + 2) * size <= 2 * self.stores.pending_bytes + self.stores.spare_bytes

    # ------------------------------------------------------------------ storing
    def _store(self, taken: BatchSet) -> None:
        """Store a set and give its buffers back (a failure propagates)."""
        try:
            if self._halted:
                return                 # an earlier set failed on the thread: store nothing more
            with torch.inference_mode(False), torch.no_grad():
                self.pending.cast_thumbnails(taken)
                pred = taken.logits.argmax(1)
                wrong = pred != taken.labels.to(pred.device)
                num_wrong, skipped = self.stores.add(taken, pred, wrong)
            self.num_misclassified += num_wrong
            self.skipped.extend(skipped)
        finally:
            self.pending.release(taken)

    def _store_on_thread(self, taken: BatchSet) -> None:
        try:
            self._store(taken)
        except Exception as err:  # noqa: BLE001 - reported on the training thread (`drain`)
            self._halted = True
            self._thread_errors.append(err)

    def _store_all(self, sets: Sequence[BatchSet]) -> None:
        """Store sets in order; on a failure the sets after it are given back unstored and the
        failure propagates."""
        for i, taken in enumerate(sets):
            try:
                self._store(taken)
            except BaseException:
                for rest in sets[i + 1:]:
                    self.pending.release(rest)
                raise

    def store_sets(self, sets: Sequence[BatchSet]) -> None:
        """Store the sets held for the background explanation, in order (there, or here when
        explaining here); a failure is counted and the sets after it are left out."""
        try:
            self._store_all(sets)
        except Exception as err:  # noqa: BLE001 - counted like any failed collection
            self.stop(err)
        finally:
            self.job_sets = []

    # ------------------------------------------------------------------ the epoch's end
    def finish(self, for_job: bool) -> list[BatchSet]:
        """End the epoch's collection: every batch is stored, except the sets returned (in
        order), which the background explanation is to store first (``for_job``)."""
        held, self.held = self.held, []
        if self.active:
            try:
                if self.worker is not None and not for_job:
                    self._flush()      # (after the others, on the collection thread)
                else:
                    last = self._take()
                    if last is not None:
                        held.append(last)
            except Exception as err:  # noqa: BLE001 - counted like any failed collection
                self.stop(err)
        self.pending.clear()
        self.active = False
        failures = len(self.failures)
        self.drain()
        if len(self.failures) > failures:          # failed on the thread: stop there
            for taken in held:
                self.pending.release(taken)
            held = []
        if not for_job:
            self.store_sets(held)
            return []
        self.job_sets = list(held)
        return held

    def stop(self, err: BaseException, batch_idx: Optional[int] = None) -> None:
        """Warn about a failed collection, count it and stop collecting this epoch."""
        where = f" at batch {batch_idx}" if batch_idx is not None else ""
        loader = f" of dataloader {self.dataloader_idx}" if self.dataloader_idx else ""
        message = f"collection{loader} failed{where}: {type(err).__name__}: {err}"
        warnings.warn(f"CounterfactualMonitor: {message}; no more samples are collected this "
                      "epoch.", RuntimeWarning, stacklevel=3)
        self.failures.append(message)
        self.pending.clear()
        self.active = False

    def drain(self, timeout: Optional[float] = None) -> None:
        """Wait for the sets queued on the collection thread; report their failures. Never raises."""
        if self.worker is not None and not self.worker.drain(timeout):
            warnings.warn(f"CounterfactualMonitor: the collection thread did not finish in "
                          f"{timeout:.0f} s.", RuntimeWarning, stacklevel=3)
        errors, self._thread_errors = self._thread_errors, []
        for err in errors:
            self.stop(err)

    def release(self) -> None:
        """Give the waiting and held sets' buffers back without storing them."""
        held, self.held = self.held, []
        for taken in held:
            self.pending.release(taken)
        self.pending.clear()

    @property
    def memory_bytes(self) -> int:
        """The stores and the buffers batches wait in (held and handed over included)."""
        return self.stores.memory_bytes + self.pending.bytes_with(*self.held, *self.job_sets)

"""The steps behind :class:`~fgvce_lightning.callback.CounterfactualMonitor`.

* :class:`Stores`: the reference bank, the mistake reservoir and the references' thumbnails/part
  labels, sized once from the memory budget.
* :func:`search_local` → :func:`sync_prototypes` → :func:`make_samples` → :func:`gather` →
  :func:`build_result` → :func:`publish`: one explained validation epoch.

Under DDP exactly two collectives run per explained epoch on every rank (one broadcast of the part
prototypes, one ``all_gather_object`` of the explained samples), whatever happened locally: local
failures are caught and recorded before them, so ranks never wait on each other forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from .collection import MistakeBuffer, ParsedBatch, ReferenceExtras, pictures, small_images
from .engine._util import finite_rows, preserved_rng_state, preserved_training_flags
from .engine.bank import ReferenceBank
from .engine.results import Explanation
from .parts import (PartInfo, assign_parts, compute_epoch_stats,
                    keypoints_to_cell_parts, masks_to_cell_parts)
from .reporting.epoch import EpochResult, ExplainedSample

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from .callback import CounterfactualMonitor

__all__ = ["Stores", "BatchSet", "PendingBatches", "RunInfo", "search_local", "sync_prototypes",
           "make_samples", "gather", "build_result", "publish", "publish_panels", "log_scalars",
           "summary"]

_PROTOTYPE_CELLS = 8192   # most bank feature maps' cells the part prototypes are fitted on per epoch
_PENDING_MAX_BYTES = 32 * 2 ** 20   # most bytes of validation batches waiting to be stored together


@dataclass(frozen=True)
class BatchSet:
    """Validation batches taken together (:meth:`PendingBatches.take`), as :meth:`Stores.add`
    keeps them: the images are already thumbnails.

    Attributes:
        feats: ``(B, C, H, W)`` feature maps.
        logits: ``(B, K)`` logits.
        labels: ``(B,)`` true classes.
        keypoints: ``(B, P, 3)`` keypoints when the stores use them, else ``None``.
        masks: ``(B, P, h, w)`` masks when the stores use them, else ``None``.
        thumbs: ``(B, 3, T, T)`` float16 thumbnails on the images' device (:func:`small_images`;
            drawn with :func:`pictures`).
        ids: ``(B, 3)`` sample ids ``(dataloader_idx, batch_idx, index in the batch)``.
        slab: the :class:`PendingBatches` buffers the tensors are views of, if any.
    """

    feats: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    keypoints: Optional[torch.Tensor]
    masks: Optional[torch.Tensor]
    thumbs: torch.Tensor
    ids: torch.Tensor
    slab: Any = field(default=None, repr=False, compare=False)


@dataclass
class Stores:
    """Everything kept during one validation epoch; sized once, never grows."""

    bank: ReferenceBank
    extras: ReferenceExtras
    mistakes: MistakeBuffer
    input_size: tuple[int, int]
    feature_dtype: torch.dtype
    part_source: str
    num_annotated: int
    thumbnail_size: int
    pending_bytes: int = 0     # batches are stored together until they hold this much
    spare_bytes: int = 0       # of the budget, left over by the bank and the two sets' buffers

    @classmethod
    def build(cls, *, num_classes: int, feature_shape: tuple[int, int, int],
              input_size: tuple[int, int], device: torch.device, dtype: torch.dtype,
              feature_dtype: torch.dtype, mistakes: int, budget_bytes: int,
              max_per_class: Optional[int], thumbnail_size: int, part_source: str,
              num_annotated: int, seed: int, batch_bytes: int = 0) -> "Stores":
        """Size the stores from ``budget_bytes``: mistakes first, then the batches waiting to be
        stored (:class:`PendingBatches`: 1/16 of the budget, at most 32 MiB, at least one batch
        of ``batch_bytes`` as they wait; held twice over: one set being filled, one being
        stored), the rest to the bank.

        Raises:
            ValueError: when the budget does not hold the mistakes and one reference per class.
        """
        c, h, w = feature_shape
        element = torch.empty((), dtype=dtype).element_size()
        feat = c * h * w * element
        # float16 thumbnail, part labels, id
        extras = 3 * thumbnail_size ** 2 * 2 + num_annotated * h * w + 3 * 8
        per_mistake = feat + extras + 2 * 8
        per_reference = feat + 3 * 8 + extras
        mistake_bytes = mistakes * per_mistake
        pending = max(min(_PENDING_MAX_BYTES, budget_bytes // 16), int(batch_bytes))
        fixed = mistake_bytes + 2 * pending + extras     # (+ the extras' spare row)
        capacity = (budget_bytes - fixed) // (num_classes * per_reference)
        if capacity < 1:
            need = fixed + num_classes * per_reference
            raise ValueError(
                f"Expected `memory_budget_mb` to hold {mistakes} mistakes and at least one reference "
                f"per class ({num_classes} classes, feature maps {tuple(feature_shape)} in {dtype}: "
                f"{need / 2 ** 20:.1f} MB), but got {budget_bytes / 2 ** 20:.1f} MB. Raise "
                "`memory_budget_mb`, use bank_dtype='bfloat16', lower `max_samples` or "
                "`thumbnail_size`, or split the model where the feature maps are smaller.")
        if max_per_class is not None:
            capacity = min(capacity, max_per_class)
        spare = budget_bytes - fixed - capacity * num_classes * per_reference
        return cls(bank=ReferenceBank(num_classes, int(capacity), tuple(feature_shape), device=device,
                                      dtype=dtype),
                   extras=ReferenceExtras(num_classes, int(capacity)),
                   mistakes=MistakeBuffer(mistakes, seed=seed), input_size=tuple(input_size),
                   feature_dtype=feature_dtype, part_source=part_source,
                   num_annotated=num_annotated, thumbnail_size=thumbnail_size,
                   pending_bytes=int(pending), spare_bytes=int(spare))

    def reset(self, reseed: int = 0) -> None:
        """Start a new epoch: empty the bank, the extras and the reservoir (memory kept)."""
        self.bank.reset()
        self.extras.reset()
        self.mistakes.reset(reseed)

    def check_shapes(self, feats: torch.Tensor, logits: torch.Tensor,
                     parsed: ParsedBatch | BatchSet) -> None:
        """Raise if a batch's shapes do not match the stores (no tensor work, no device sync)."""
        if tuple(feats.shape[1:]) != self.bank.feature_shape:
            raise ValueError(f"Expected feature maps of shape (B, {self.bank.feature_shape}) as in the "
                             f"first batch, but got {tuple(feats.shape)}. Use a fixed input size.")
        if logits.shape[1] != self.bank.num_classes:
            raise ValueError(f"Expected {self.bank.num_classes} logits as in the first batch, but got "
                             f"{logits.shape[1]}.")
        if self.part_source in ("keypoints", "masks"):
            annotation = getattr(parsed, self.part_source)
            if annotation is None:
                raise ValueError(f"Expected every validation batch to carry `{self.part_source}`, "
                                 "but this one has none.")
            if annotation.shape[1] != self.num_annotated:
                raise ValueError(f"Expected {self.num_annotated} parts in the batch's "
                                 f"`{self.part_source}` as in the first batch, but got "
                                 f"{annotation.shape[1]}.")

    def needed(self, parsed: ParsedBatch) -> ParsedBatch:
        """The parts of a batch the stores use (the other annotation is not held while waiting)."""
        return self.needed_for(parsed, self.part_source)

    @staticmethod
    def needed_for(parsed: ParsedBatch, part_source: str) -> ParsedBatch:
        """:meth:`needed` for stores whose part labels come from ``part_source``."""
        return ParsedBatch(parsed.images, parsed.labels,
                           parsed.keypoints if part_source == "keypoints" else None,
                           parsed.masks if part_source == "masks" else None)

    def check(self, feats: torch.Tensor, logits: torch.Tensor, parsed: ParsedBatch | BatchSet) -> None:
        """Raise if a batch does not match the stores (feature shape, classes, labels)."""
        self.check_shapes(feats, logits, parsed)
        if int(parsed.labels.min()) < 0 or int(parsed.labels.max()) >= self.bank.num_classes:
            raise ValueError(f"Expected labels in [0, {self.bank.num_classes}), but got "
                             f"[{int(parsed.labels.min())}, {int(parsed.labels.max())}].")

    def cell_parts(self, parsed: ParsedBatch | BatchSet) -> Optional[torch.Tensor]:
        """``(B, P, H, W)`` bool part labels of the batch's cells from its annotations, or ``None``."""
        grid = self.bank.feature_shape[1:]
        if self.part_source == "keypoints" and parsed.keypoints is not None:
            return keypoints_to_cell_parts(parsed.keypoints, self.input_size, grid).cpu()
        if self.part_source == "masks" and parsed.masks is not None:
            return masks_to_cell_parts(parsed.masks, grid).cpu()
        return None

    def add(self, batch: BatchSet, pred: torch.Tensor, wrong: torch.Tensor) -> None:
        """Correct samples go to the bank, mistakes to the reservoir, with thumbnails and parts.

        Runs on every set of validation batches (:class:`PendingBatches`): the references are
        placed once and copied straight from the set into the bank and the extras (no gather
        first), and the mistakes' maps, labels and thumbnails are gathered only for the rows the
        reservoir keeps (index lists, not boolean masks).
        """
        feats, thumbs = batch.feats, batch.thumbs.cpu()
        labels = batch.labels.to(pred.device)
        parts = self.cell_parts(batch)
        wrong_cpu, ids = wrong.cpu(), batch.ids.cpu()
        right = (~wrong_cpu).nonzero().squeeze(1)
        if right.numel():
            # cast once; maps that are not finite in the bank's dtype are left out (of the
            # extras too, or the two ring buffers drift apart)
            cast = feats.to(device=self.bank.device, dtype=self.bank.dtype)
            right = right[finite_rows(cast).cpu()[right]]
        if right.numel():
            # checked here (`check`, finite rows), so inserted without the bank's checks; the
            # extras go where the bank placed the maps, both copied straight from the set. The
            # bank is emptied at every validation epoch's start and keeps the first references
            # of each class (`replace=False`): the model does not change during the epoch, so
            # the first are as good as the last, and a full class's later correct samples cost
            # no copy (on the demo, about 870 correct samples an epoch for 8 x 64 places).
            device = self.bank.device
            kept, slots, per_class = self.bank._insert(
                cast, labels.to(device).long(), ids.to(device).long(), right.to(device),
                replace=False)
            if kept.numel():
                extra = {"thumb": thumbs} if parts is None else {"thumb": thumbs, "parts": parts}
                self.extras.put(kept, slots, per_class, ids, **extra)
        wrong_idx = wrong_cpu.nonzero().squeeze(1)
        if wrong_idx.numel():
            def kept(values: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
                return lambda rows: values.index_select(0, wrong_idx[rows].to(values.device))

            dtype = self.bank.dtype
            extra = {"features": lambda rows: kept(feats)(rows).to(dtype),
                     "true": lambda rows: kept(labels)(rows).cpu(),
                     "pred": lambda rows: kept(pred)(rows).cpu(), "ids": kept(ids),
                     "thumb": kept(thumbs)}
            if parts is not None:
                extra["parts"] = kept(parts)
            self.mistakes.add(int(wrong_idx.numel()), **extra)

    @property
    def memory_bytes(self) -> int:
        return self.bank.memory_bytes + self.extras.memory_bytes + self.mistakes.memory_bytes


class _Slab:
    """Buffers that one set of waiting batches is copied into, row after row, and that are reused
    once the set is stored (rows ``[0, n)`` are filled)."""

    def __init__(self, key: tuple, rows: int, feats: torch.Tensor, logits: torch.Tensor,
                 parsed: ParsedBatch, thumbnail_size: int) -> None:
        def like(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, shape: Optional[tuple] = None
                 ) -> Optional[torch.Tensor]:
            if t is None:
                return None
            return torch.empty((rows, *(t.shape[1:] if shape is None else shape)),
                               dtype=dtype or t.dtype, device=device or t.device)

        self.key, self.rows, self.n = key, rows, 0
        self.feats, self.logits = like(feats), like(logits)
        self.labels, self.keypoints, self.masks = (like(parsed.labels), like(parsed.keypoints),
                                                   like(parsed.masks))
        self.thumbs = like(parsed.images, torch.float16, shape=(3, thumbnail_size, thumbnail_size))
        self.where: list[tuple[int, int, int]] = []    # (dataloader_idx, batch_idx, size)
        self.row_bytes = self.nbytes // rows
        self.deferred: list[tuple[int, torch.Tensor]] = []   # (first row, images) not yet cast
        self.deferred_bytes = 0

    @property
    def used_bytes(self) -> int:
        """Bytes of the filled rows and of the images held until they are cast."""
        return self.n * self.row_bytes + self.deferred_bytes

    def reset(self) -> None:
        self.n, self.where, self.deferred, self.deferred_bytes = 0, [], [], 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.feats, self.logits, self.labels, self.keypoints, self.masks, self.thumbs)
            if t is not None)


class PendingBatches:
    """Validation batches waiting to be stored together.

    Storing a batch is some hundred small tensor operations whatever its size (gathers, scatters,
    the reservoir draw, part labels), so storing several batches in one call costs little more
    than storing one: on the demo model (2 CPU threads) 16 batches of 32 took 22 ms one by one
    and 8 ms together. Each batch is copied, as it comes, into the next rows of buffers that are
    reused from set to set (no concatenation, no fresh allocation): its logits, labels and
    annotations, its images cast to float16 thumbnails (:func:`small_images`; the images are not
    held), and its feature maps unless the monitor's hook already wrote them there
    (:meth:`slot`). Batches are kept in order, so the bank and the reservoir end up exactly as if
    they had been stored one by one.

    A set holds at most ``max_bytes`` (at least one batch). :meth:`take` hands the filled rows
    out as a :class:`BatchSet` of views; :meth:`release` gives its buffers back once it is
    stored. At most :attr:`keep` sets' buffers are kept for reuse: two (one being filled, one
    being stored), more while the monitor holds sets for the background explanation.

    Args:
        max_bytes: most bytes of one set (``0``: every batch is a set of its own).
        thumbnail_size: side of the thumbnails.
    """

    _KEEP = 2      # buffers kept for reuse (at least)

    def __init__(self, max_bytes: int = 0, thumbnail_size: int = 64) -> None:
        self.max_bytes = int(max_bytes)
        self.thumbnail_size = int(thumbnail_size)
        self.keep = self._KEEP        # buffers kept for reuse (more while sets are held)
        self._slab: Optional[_Slab] = None        # being filled
        self._free: list[_Slab] = []              # stored, ready for reuse
        self._slot: Optional[torch.Tensor] = None  # rows handed to the hook for the next batch

    def __len__(self) -> int:
        """Batches waiting."""
        return 0 if self._slab is None else len(self._slab.where)

    @property
    def rows(self) -> int:
        """Samples waiting."""
        return 0 if self._slab is None else self._slab.n

    @property
    def memory_bytes(self) -> int:
        """Bytes of the buffers held here (being filled or ready for reuse)."""
        return self.bytes_with()

    def bytes_with(self, *taken: BatchSet) -> int:
        """Bytes of the buffers held here and of those of the sets ``taken`` out (each counted
        once, also when it is back here)."""
        slabs = [self._slab, *self._free, *(t.slab for t in taken)]
        return sum(s.nbytes for s in {id(s): s for s in slabs if s is not None}.values())

    @staticmethod
    def _key(feats: torch.Tensor, logits: torch.Tensor, parsed: ParsedBatch) -> tuple:
        """What batches of one set share: every tensor's shape but the first, dtype and device
        (the images' dtype aside: they are cast)."""
        def sig(t: Optional[torch.Tensor], dtype: bool = True) -> Optional[tuple]:
            return None if t is None else (tuple(t.shape[1:]), t.dtype if dtype else None, t.device)

        return (sig(feats), sig(logits), sig(parsed.labels), sig(parsed.keypoints),
                sig(parsed.masks), sig(parsed.images, dtype=False))

    def fits(self, feats: torch.Tensor, logits: torch.Tensor, parsed: ParsedBatch,
             defer_thumbnails: bool = False) -> bool:
        """Whether the batch can join the waiting ones: the same shapes but the first, dtypes
        and devices, and room for it (always true when none wait). Images held until their
        thumbnails are cast (``defer_thumbnails``) take room too."""
        slab = self._slab
        if slab is None or slab.n == 0:
            return True
        b = feats.shape[0]
        held = parsed.images.numel() * parsed.images.element_size() if defer_thumbnails else 0
        return (slab.key == self._key(feats, logits, parsed) and slab.n + b <= slab.rows
                and (not held or slab.used_bytes + b * slab.row_bytes + held <= self.max_bytes))

    @property
    def full(self) -> bool:
        """Whether the set being filled has no room left."""
        slab = self._slab
        return slab is not None and slab.n > 0 and (
            slab.n >= slab.rows or (slab.deferred_bytes > 0 and slab.used_bytes >= self.max_bytes))

    @staticmethod
    def row_bytes(feats: torch.Tensor, logits: torch.Tensor, parsed: ParsedBatch,
                  thumbnail_size: int, defer_thumbnails: bool = False) -> int:
        """Bytes one sample of the batch takes while it waits: its row of the buffers, and its
        image when that is held until the thumbnails are cast (``defer_thumbnails``)."""
        per_row = sum(t[:1].numel() * t.element_size() for t in (
            feats, logits, parsed.labels, parsed.keypoints, parsed.masks) if t is not None)
        per_row += 3 * thumbnail_size ** 2 * 2
        if defer_thumbnails:
            per_row += parsed.images[:1].numel() * parsed.images.element_size()
        return per_row

    def _rows_for(self, feats: torch.Tensor, logits: torch.Tensor, parsed: ParsedBatch,
                  defer_thumbnails: bool) -> int:
        """Rows of new buffers: as many as ``max_bytes`` holds (with the images held beside
        them when their thumbnails are cast later), at least the batch."""
        per_row = self.row_bytes(feats, logits, parsed, self.thumbnail_size, defer_thumbnails)
        return max(int(feats.shape[0]), self.max_bytes // max(1, per_row))

    def _reuse(self, accept: Callable[[_Slab], bool]) -> Optional[_Slab]:
        while self._free:
            slab = self._free.pop()
            if accept(slab):
                return slab
        return None

    def slot(self, feats: torch.Tensor) -> Optional[torch.Tensor]:
        """The rows where the next batch's feature maps will go, for the monitor's hook to write
        them into directly (saving a copy); ``None`` when there is no room for them, or no
        buffers of their shape, dtype and device. :meth:`push` then skips their copy."""
        self._slot = None
        b = feats.shape[0]

        def room(slab: _Slab) -> bool:
            return (slab.feats.shape[1:] == feats.shape[1:] and slab.feats.dtype == feats.dtype
                    and slab.feats.device == feats.device and slab.n + b <= slab.rows)

        if self._slab is None:
            self._slab = self._reuse(room)
        if self._slab is None or not room(self._slab):
            return None
        self._slot = self._slab.feats[self._slab.n:self._slab.n + b]
        return self._slot

    def push(self, feats: torch.Tensor, logits: torch.Tensor, parsed: ParsedBatch,
             dataloader_idx: int, batch_idx: int, defer_thumbnails: bool = False) -> None:
        """Copy a batch into the next rows (call :meth:`fits` first). With ``defer_thumbnails``
        its images are held, not cast, until :meth:`cast_thumbnails` (on the collection thread,
        off the validation loop)."""
        key = self._key(feats, logits, parsed)
        slab = self._slab
        if slab is not None and slab.n == 0 and (
                slab.key != key or slab.rows < feats.shape[0]):
            self._slab, slab = None, None               # (a reused buffer of another shape)
        if slab is None:
            need = feats.shape[0]
            slab = self._reuse(lambda s: s.key == key and s.rows >= need)
            if slab is None:
                slab = _Slab(key, self._rows_for(feats, logits, parsed, defer_thumbnails), feats,
                             logits, parsed, self.thumbnail_size)
            self._slab = slab
        elif slab.key != key or slab.n + feats.shape[0] > slab.rows:
            raise ValueError("Expected a batch that fits the waiting ones; call `fits` first and "
                             "`take` the waiting ones when it does not.")
        start, end = slab.n, slab.n + feats.shape[0]
        slot, self._slot = self._slot, None
        if not (slot is not None and slot.data_ptr() == feats.data_ptr()
                and slot.shape == feats.shape and slot.data_ptr() == slab.feats[start].data_ptr()):
            slab.feats[start:end].copy_(feats)
        slab.logits[start:end].copy_(logits)
        slab.labels[start:end].copy_(parsed.labels)
        for name in ("keypoints", "masks"):
            if getattr(slab, name) is not None:
                getattr(slab, name)[start:end].copy_(getattr(parsed, name))
        if defer_thumbnails:
            slab.deferred.append((start, parsed.images))
            slab.deferred_bytes += parsed.images.numel() * parsed.images.element_size()
        else:
            small_images(parsed.images, self.thumbnail_size, out=slab.thumbs[start:end])
        slab.where.append((int(dataloader_idx), int(batch_idx), end - start))
        slab.n = end

    def clear(self) -> None:
        """Drop the waiting batches (the buffers are kept)."""
        self._slot = None
        if self._slab is not None:
            self._slab.reset()

    def cast_thumbnails(self, batch: Optional[BatchSet]) -> None:
        """Cast the images a taken set still holds (``defer_thumbnails``) into its thumbnails."""
        slab = None if batch is None else batch.slab
        if slab is None:
            return
        for start, images in slab.deferred:
            small_images(images, self.thumbnail_size,
                         out=slab.thumbs[start:start + images.shape[0]])
        slab.deferred, slab.deferred_bytes = [], 0

    def take(self) -> Optional[BatchSet]:
        """The waiting batches as one set (views of the buffers: :meth:`release` it once it is
        stored); ``None`` when none wait. Empties the queue."""
        slab, self._slab, self._slot = self._slab, None, None
        if slab is None or slab.n == 0:
            if slab is not None and len(self._free) < self.keep:
                self._free.append(slab)
            return None
        n = slab.n
        sizes = torch.tensor([w[2] for w in slab.where])
        where = torch.tensor([w[:2] for w in slab.where])                   # (K, 2)
        starts = torch.cumsum(sizes, 0) - sizes
        within = torch.arange(n) - torch.repeat_interleave(starts, sizes)
        ids = torch.cat([torch.repeat_interleave(where, sizes, dim=0), within[:, None]], 1)

        def rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[:n]

        return BatchSet(slab.feats[:n], slab.logits[:n], slab.labels[:n], rows(slab.keypoints),
                        rows(slab.masks), slab.thumbs[:n], ids, slab=slab)

    def release(self, batch: Optional[BatchSet]) -> None:
        """Give a taken set's buffers back for reuse (thread-safe; call once it is stored)."""
        slab = None if batch is None else batch.slab
        if slab is None:
            return
        slab.reset()
        if len(self._free) < self.keep:
            self._free.append(slab)


@dataclass(frozen=True)
class RunInfo:
    """What the steps read from the trainer, frozen at the end of a validation epoch: a background
    explanation must not see the epoch and step counters move on under it. It has the trainer's
    attribute names, so the steps take either."""

    current_epoch: int
    global_step: int
    global_rank: int
    world_size: int
    is_global_zero: bool
    loggers: tuple = ()
    strategy: Any = None

    @classmethod
    def of(cls, trainer: "pl.Trainer | RunInfo") -> "RunInfo":
        return cls(current_epoch=int(trainer.current_epoch), global_step=int(trainer.global_step),
                   global_rank=int(trainer.global_rank), world_size=_world(trainer),
                   is_global_zero=bool(trainer.is_global_zero), loggers=tuple(trainer.loggers),
                   strategy=trainer.strategy)


@dataclass
class LocalResult:
    """What one rank found: explanations of its kept mistakes (search order) and its failures."""

    explanations: list[Explanation] = field(default_factory=list)
    num_misclassified: int = 0
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    budget_hit: bool = False


def _warn_failure(failures: list[str], what: str, err: BaseException) -> None:
    message = f"{what} failed: {type(err).__name__}: {err}"
    warnings.warn(f"CounterfactualMonitor: {message} (training continues; counted in the report).",
                  RuntimeWarning, stacklevel=3)
    failures.append(message)


def _search_fn(strategy: str):
    if strategy == "greedy":
        from .engine.greedy import greedy_search
        return greedy_search
    from .engine.search import counterfactual_search
    return counterfactual_search


def search_local(monitor: "CounterfactualMonitor", trainer: "pl.Trainer | RunInfo",
                 module: torch.nn.Module, head: Any) -> LocalResult:
    """Explain this rank's kept mistakes in chunks, stopping at the time budget. Never raises.

    ``head`` is the split's head and ``module`` the model it belongs to (its training flags and
    gradients are restored afterwards).
    """
    out = LocalResult(num_misclassified=monitor._num_misclassified,
                      failures=list(monitor._collect_failures))
    store = monitor._store
    if store is None or store.mistakes.size == 0:
        return out
    start = time.perf_counter()
    try:
        device = store.bank.device
        queries = store.mistakes.get("features")
        true, pred = store.mistakes.get("true"), store.mistakes.get("pred")
        generator = torch.Generator(device=device).manual_seed(monitor.seed + trainer.current_epoch)
        search = _search_fn(monitor.strategy)
        n, step = queries.shape[0], monitor.explain_batch_size
        with preserved_training_flags(module), preserved_rng_state([device]), \
                _preserved_grads(module), torch.no_grad():
            for offset in range(0, n, step):
                if (monitor.time_budget_s is not None and offset > 0
                        and time.perf_counter() - start > monitor.time_budget_s):
                    out.budget_hit = True
                    break
                q = queries[offset:offset + step].to(store.feature_dtype)
                t, p = true[offset:offset + step].to(device), pred[offset:offset + step].to(device)
                kwargs = {"generator": generator, "modules": (module,)}
                explanations = search(head, q, t, p, store.bank, monitor.search_config, **kwargs)
                out.explanations.extend(dataclasses.replace(e, query_index=offset + e.query_index)
                                        for e in explanations)
    except Exception as err:  # noqa: BLE001 - an explanation failure never stops training
        _warn_failure(out.failures, f"explaining {store.mistakes.size} mistakes", err)
        out.explanations = []
    out.elapsed_s = time.perf_counter() - start
    return out


@contextlib.contextmanager
def _preserved_grads(module: torch.nn.Module) -> Iterator[None]:
    """Restore every parameter's ``.grad`` object (and ``requires_grad``) afterwards."""
    saved = [(p, p.grad, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, grad, requires in saved:
            p.grad = grad
            p.requires_grad_(requires)


def _world(trainer: "pl.Trainer | RunInfo") -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def _part_channels(monitor: "CounterfactualMonitor", maps: torch.Tensor) -> torch.Tensor:
    """The channels that describe a cell: without a transformer's prefix (class-token) channels,
    which are the same in every cell of an image and would make prototypes cluster by image."""
    protected = monitor.search_config.protected_channels
    return (maps[:, :maps.shape[1] - protected] if protected else maps).float()


def _prototype_cells(monitor: "CounterfactualMonitor", bank: ReferenceBank) -> torch.Tensor:
    """A class-balanced sample of the bank's feature maps for fitting the prototypes."""
    c, h, w = bank.feature_shape
    per_class = max(1, math.ceil(_PROTOTYPE_CELLS / (h * w) / bank.num_classes))
    maps = [bank.get(k)[0][:per_class] for k in range(bank.num_classes)]
    return _part_channels(monitor, torch.cat(maps))


def sync_prototypes(monitor: "CounterfactualMonitor", trainer: "pl.Trainer | RunInfo",
                    failures: list[str]) -> None:
    """Rank 0 refits the part prototypes on its bank; all ranks then share rank 0's prototypes.

    Runs the broadcast on every rank under DDP whatever the part source, so the number of
    collectives never depends on local state.
    """
    store = monitor._store
    protos = monitor._prototypes
    if trainer.is_global_zero and store is not None and store.part_source == "prototypes":
        try:
            with preserved_rng_state([store.bank.device]):
                protos.update(_prototype_cells(monitor, store.bank))
        except Exception as err:  # noqa: BLE001
            _warn_failure(failures, "fitting the part prototypes", err)
    if _world(trainer) > 1:
        state = protos.state_dict() if trainer.is_global_zero else None
        state = trainer.strategy.broadcast(state, src=0)
        if not trainer.is_global_zero and state is not None:
            try:
                protos.load_state_dict(state)
            except Exception as err:  # noqa: BLE001
                _warn_failure(failures, "loading rank 0's part prototypes", err)


def _parts_of(monitor: "CounterfactualMonitor", store: Stores) -> tuple[PartInfo, ...]:
    if store.part_source in ("keypoints", "masks"):
        names = monitor.part_names or [f"part {k}" for k in range(store.num_annotated)]
        return tuple(PartInfo(id=k, name=n, source=store.part_source) for k, n in enumerate(names))
    if store.part_source == "prototypes" and monitor._prototypes.fitted:
        return monitor._prototypes.parts()
    return ()


def _picture(thumb: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A kept float16 thumbnail as the ``uint8`` picture the reports draw (``None`` stays)."""
    return None if thumb is None else pictures(thumb)


def make_samples(monitor: "CounterfactualMonitor", trainer: "pl.Trainer | RunInfo", local: LocalResult
                 ) -> tuple[list[ExplainedSample], tuple[PartInfo, ...]]:
    """Attach query ids, thumbnails, reference thumbnails and part names. Never raises."""
    store = monitor._store
    if store is None or not local.explanations:
        return [], (() if store is None else _parts_of(monitor, store))
    exps = local.explanations
    ids = store.mistakes.get("ids")
    thumbs = store.mistakes.get("thumb")
    parts: tuple[PartInfo, ...] = ()
    assignments = None
    try:
        parts = _parts_of(monitor, store)
        names = [p.name for p in parts]
        if parts and store.part_source == "prototypes":
            query_labels = monitor._prototypes.assign(
                _part_channels(monitor, store.mistakes.get("features"))).cpu()
            reference_labels = _prototype_reference_labels(monitor, store, exps)
        elif parts:
            query_labels = store.mistakes.get("parts")
            reference_labels = lambda key: store.extras.lookup_id("parts", key)  # noqa: E731
        if parts:
            assignments = assign_parts(exps, names, query_labels, reference_labels)
    except Exception as err:  # noqa: BLE001
        _warn_failure(local.failures, "labelling the edited cells with parts", err)
        assignments, parts = None, ()
    samples = []
    for k, exp in enumerate(exps):
        refs = tuple(_picture(store.extras.lookup_id("thumb", e.reference_id)) for e in exp.edits)
        a = assignments[k] if assignments is not None else None
        samples.append(ExplainedSample(
            explanation=exp, query_id=tuple(int(v) for v in ids[exp.query_index].tolist()),
            thumbnail=_picture(thumbs[exp.query_index]) if thumbs is not None else None,
            reference_thumbnails=refs,
            edit_parts=a.edit_parts if a is not None else (),
            reference_parts=a.reference_parts if a is not None else (),
            cell_parts=a.cell_parts if a is not None else None,
            consistent_cells=a.consistent_cells if a is not None else (),
            judged_cells=a.judged_cells if a is not None else (),
            rank=int(trainer.global_rank)))
    return samples, parts


def _prototype_reference_labels(monitor: "CounterfactualMonitor", store: Stores,
                                exps: list[Explanation]) -> dict[tuple, torch.Tensor]:
    """Part-id maps of every reference an edit used, keyed by reference id."""
    out: dict[tuple, torch.Tensor] = {}
    by_class: dict[int, torch.Tensor] = {}
    for exp in exps:
        for e in exp.edits:
            if e.reference_slot < 0 or tuple(e.reference_id) in out:
                continue
            if exp.true not in by_class:
                by_class[exp.true] = store.bank.get(exp.true)[0]
            maps = by_class[exp.true]
            if e.reference_slot < maps.shape[0]:
                out[tuple(e.reference_id)] = monitor._prototypes.assign(_part_channels(
                    monitor, maps[e.reference_slot:e.reference_slot + 1]))[0].cpu()
    return out


def gather(trainer: "pl.Trainer | RunInfo", payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's payload (one ``all_gather_object`` under DDP; ``[payload]`` otherwise)."""
    if _world(trainer) <= 1 or not torch.distributed.is_available() \
            or not torch.distributed.is_initialized():
        return [payload]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, payload)
    return [p for p in out if p is not None]


def build_result(monitor: "CounterfactualMonitor", trainer: "pl.Trainer | RunInfo",
                 payloads: list[dict[str, Any]], epoch: int) -> EpochResult:
    """Merge the ranks' payloads into the epoch's :class:`EpochResult` (statistics included)."""
    samples = [s for p in payloads for s in p["samples"]]
    failures = [f"rank {p['rank']}: {f}" if len(payloads) > 1 else f
                for p in payloads for f in p["failures"]]
    parts = next((p["parts"] for p in payloads if p["parts"]), ())
    num_misclassified = sum(int(p["num_misclassified"]) for p in payloads)
    try:
        stats = compute_epoch_stats(samples, parts, num_misclassified)
    except Exception as err:  # noqa: BLE001
        _warn_failure(failures, "computing the part statistics", err)
        stats = compute_epoch_stats(samples, (), num_misclassified)
    store = monitor._store
    grid = tuple(store.bank.feature_shape[1:]) if store is not None else (0, 0)
    input_size = tuple(store.input_size) if store is not None else (0, 0)
    for p in payloads:   # a rank may have seen no batch: take the shapes from one that did
        if store is None and p.get("grid"):
            grid, input_size = tuple(p["grid"]), tuple(p["input_size"])
    return EpochResult(epoch=int(epoch), global_step=int(trainer.global_step), feature_grid=grid,
                       input_size=input_size, samples=tuple(samples), stats=stats,
                       class_names=monitor.class_names, failures=tuple(failures),
                       elapsed_s=max((float(p["elapsed_s"]) for p in payloads), default=0.0),
                       method=monitor.strategy)


def payload_of(monitor: "CounterfactualMonitor", trainer: "pl.Trainer | RunInfo", local: LocalResult,
               samples: list[ExplainedSample], parts: tuple[PartInfo, ...]) -> dict[str, Any]:
    """The picklable per-rank record that :func:`gather` exchanges."""
    store = monitor._store
    return {"rank": int(trainer.global_rank), "samples": samples, "parts": parts,
            "num_misclassified": local.num_misclassified, "failures": list(local.failures),
            "elapsed_s": local.elapsed_s, "budget_hit": local.budget_hit,
            "grid": None if store is None else tuple(store.bank.feature_shape[1:]),
            "input_size": None if store is None else tuple(store.input_size)}


def summary(result: EpochResult) -> dict[str, Any]:
    """A small, checkpointable summary of one explained epoch."""
    s = result.stats
    return {"epoch": result.epoch, "global_step": result.global_step,
            "num_misclassified": s.num_misclassified, "num_explained": s.num_explained,
            "num_skipped": s.num_skipped, "flip_rate": s.flip_rate, "mean_edits": s.mean_edits,
            "failures": len(result.failures), "elapsed_s": result.elapsed_s,
            "part_error_share": {p.part: p.error_share for p in s.part_stats}}


def _log_prototype_strips(monitor: "CounterfactualMonitor", writer: Any, step: int) -> None:
    """Each discovered part as a strip of its most typical bank patches, so a person can name it
    (``P/parts/<id>_<name>``; names come from ``part_names`` or ``PartPrototypes.set_names``)."""
    store, protos = monitor._store, monitor._prototypes
    if store is None or store.part_source != "prototypes" or not protos.fitted:
        return
    maps, ids = [], []
    for k in range(store.bank.num_classes):
        feats, kid = store.bank.get(k)
        maps.append(feats)
        ids.append(kid)
    maps_t, ids_t = torch.cat(maps), torch.cat(ids)
    if maps_t.shape[0] == 0:
        return
    thumbs = [store.extras.lookup_id("thumb", tuple(i)) for i in ids_t.tolist()]
    keep = [i for i, t in enumerate(thumbs) if t is not None]
    if not keep:
        return
    rows = torch.tensor(keep)
    feats = _part_channels(monitor, maps_t[rows.to(maps_t.device)])
    images = pictures(torch.stack([thumbs[i] for i in keep]))
    for part in protos.parts():
        strip = protos.patch_strip(part.id, feats, images, k=8)
        tag = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in part.name)
        writer.add_image(f"{monitor.prefix}/parts/{part.id}_{tag}", strip, step)


def log_scalars(monitor: "CounterfactualMonitor", trainer: "pl.Trainer | RunInfo",
                result: EpochResult) -> None:
    """Rank 0: the epoch's scalars to every logger (on the training thread: loggers are not
    thread-safe). Never raises."""
    from .reporting.scalars import epoch_scalars

    scalars = epoch_scalars(result, monitor.prefix)
    for logger in trainer.loggers:
        try:
            logger.log_metrics(scalars, step=int(result.global_step))
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"CounterfactualMonitor: logging to {type(logger).__name__} failed: "
                          f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)


def publish_panels(monitor: "CounterfactualMonitor", trainer: "pl.Trainer | RunInfo",
                   result: EpochResult) -> Optional[str]:
    """Rank 0: TensorBoard images, figures, text and prototype strips, then the epoch report; the
    report's path (``None`` when writing it failed). Safe on a background thread: TensorBoard's
    ``SummaryWriter`` queues its events, and the report is written to fresh files. Never raises."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from .reporting.export import write_epoch_report
    from .reporting.tensorboard import TensorBoardReporter

    step = int(result.global_step)
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        try:
            reporter = monitor._reporters.get(id(logger))
            if reporter is None:
                reporter = TensorBoardReporter(logger.experiment, prefix=monitor.prefix,
                                               max_images=monitor.log_images)
                monitor._reporters[id(logger)] = reporter
            reporter.log_epoch(result, step, scalars=False)
            _log_prototype_strips(monitor, logger.experiment, step)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"CounterfactualMonitor: logging to {type(logger).__name__} failed: "
                          f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
    try:
        return write_epoch_report(result, monitor._report_root, html=monitor.report_html)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"CounterfactualMonitor: writing the epoch report to {monitor._report_root} "
                      f"failed: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
        return None


def publish(monitor: "CounterfactualMonitor", trainer: "pl.Trainer | RunInfo",
            result: EpochResult) -> None:
    """Rank 0: scalars to every logger, TensorBoard panels, the epoch report. Never raises."""
    log_scalars(monitor, trainer, result)
    report = publish_panels(monitor, trainer, result)
    if report is not None:
        monitor.last_report = report

"""Validation batches waiting, in reusable buffers, to be stored several at a time.

Storing a batch in the monitor's stores is some hundred small tensor operations whatever its
size, so storing several batches in one call costs little more than storing one. Each batch is
copied as it comes into the next rows of buffers (:class:`PendingBatches`) that are reused from
set to set; :meth:`PendingBatches.take` hands the filled rows out as one :class:`BatchSet`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .batches import ParsedBatch, small_images

__all__ = ["BatchSet", "PendingBatches"]


@dataclass(frozen=True)
class BatchSet:
    """Validation batches taken together (:meth:`PendingBatches.take`), as the stores keep them
    (:mod:`.stores`): the images are already thumbnails.

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

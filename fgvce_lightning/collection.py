"""Bounded, batched stores the callback fills during validation.

* :func:`parse_batch` turns a validation batch (tuple ``(x, y, ...)``, dict or anything a
  user-supplied parser understands) into images, labels and optional part annotations.
* :func:`small_images` keeps a small float16 copy of every kept image (one cheap pass over the
  images); :func:`pictures` makes the few that are drawn ``uint8``.
* :class:`MistakeBuffer` is a reservoir sample (Algorithm R, batched) of the epoch's mistakes: every
  mistake seen has the same chance to be kept, so late batches are not favoured.
* :class:`ReferenceExtras` keeps, per class, the thumbnails (and extra per-sample tensors such as
  part annotations) of the most recent references, looked up by sample id at explanation time.

Everything here has a fixed size decided at construction; nothing grows with the length of the
training run, and nothing keeps a reference to an autograd graph (tensors are detached copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from .engine._util import copy_kept_rows, copy_rows
from .engine.bank import ring_slots

__all__ = ["ParsedBatch", "parse_batch", "small_images", "pictures", "MistakeBuffer", "ReferenceExtras"]

_IMAGE_KEYS = ("image", "images", "x", "input", "inputs", "img", "pixel_values")
_LABEL_KEYS = ("label", "labels", "y", "target", "targets")


@dataclass(frozen=True)
class ParsedBatch:
    """The parts of a validation batch the callback uses.

    Attributes:
        images: ``(B, 3, H, W)`` (or ``(B, C, H, W)``) input images.
        labels: ``(B,)`` int64 true classes.
        keypoints: ``(B, P, 3)`` part keypoints ``(x, y, visible)`` in pixels, or ``None``.
        masks: ``(B, P, H, W)`` bool part masks, or ``None``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    keypoints: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None


def _first_key(batch: Mapping, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    return None


def parse_batch(batch: Any, batch_parser: Optional[Callable[[Any], Any]] = None) -> ParsedBatch:
    """Extract images, labels and optional annotations from a validation batch.

    Args:
        batch: a tuple/list ``(x, y, ...)``, a dict with an image key (one of ``image``, ``images``,
            ``x``, ``input``, ``inputs``, ``img``, ``pixel_values``) and a label key (``label``,
            ``labels``, ``y``, ``target``, ``targets``) plus optional ``keypoints``/``masks``, or
            anything ``batch_parser`` understands.
        batch_parser: optional user function ``batch -> (x, y)`` or ``batch -> dict`` (same keys as
            above) or ``batch -> ParsedBatch``.

    Returns:
        The parsed batch.

    Raises:
        TypeError: when the batch has no recognisable images and labels.
    """
    if batch_parser is not None:
        batch = batch_parser(batch)
        if isinstance(batch, ParsedBatch):
            return batch
    keypoints = masks = None
    if isinstance(batch, Mapping):
        images, labels = _first_key(batch, _IMAGE_KEYS), _first_key(batch, _LABEL_KEYS)
        keypoints, masks = batch.get("keypoints"), batch.get("masks")
        where = f"a dict with keys {sorted(map(str, batch.keys()))}"
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
        where = f"a {type(batch).__name__} of length {len(batch)}"
    else:
        images = labels = None
        where = f"a {type(batch).__name__}"
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise TypeError(
            f"Expected the validation batch to hold images of shape (B, C, H, W) as a tuple (x, y) or "
            f"a dict with one of the keys {list(_IMAGE_KEYS)}, but got {where}. Pass "
            "`batch_parser=lambda batch: (x, y)` to CounterfactualMonitor.")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(
            f"Expected the validation batch to hold integer class labels of shape ({images.shape[0]},) "
            f"(dict keys {list(_LABEL_KEYS)}), but got {got} in {where}. Pass "
            "`batch_parser=lambda batch: (x, y)` to CounterfactualMonitor.")
    if not isinstance(keypoints, torch.Tensor) or keypoints.dim() != 3:
        keypoints = None
    if not isinstance(masks, torch.Tensor) or masks.dim() != 4:
        masks = None
    return ParsedBatch(images, labels.long(), keypoints, masks)


def small_images(images: torch.Tensor, size: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The images as the monitor keeps them until they are drawn: RGB, ``size`` x ``size``, float16.

    When the images already have that size this is one pass over them (a cast), against six for
    min-max normalised ``uint8`` pictures: on the demo model (2 CPU threads) it took the
    monitor's thumbnails from 13-16 to 3-5 ms per validation epoch of 1000 images (six
    alternating runs). :func:`pictures` makes the few that are drawn ``uint8``. float16 keeps
    11 significant bits, a thousandth of an image's largest magnitude: far below one of a
    picture's 256 levels unless the image is a small variation on a large offset. Values beyond
    float16's range (65504) saturate.

    Args:
        images: ``(B, C, H, W)`` images (any normalisation); 1-channel images are repeated to
            RGB, only the first 3 channels of others are kept.
        size: side of the square image kept (resized bilinearly, antialiased when shrinking).
        out: optional ``(B, 3, size, size)`` float16 tensor to write them into (e.g. a slice of
            the thumbnails of several batches: the cast then writes them where they go).

    Returns:
        ``(B, 3, size, size)`` float16 tensor on the images' device (``out`` when given;
        ``images`` itself is never modified).
    """
    with torch.no_grad():
        x = images.detach()[:, :3]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (size, size):
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > size)
        if out is None:
            return x.to(torch.float16)
        if out.shape != (x.shape[0], 3, size, size) or out.dtype != torch.float16:
            raise ValueError(f"Expected `out` to be a float16 tensor of shape "
                             f"{(x.shape[0], 3, size, size)}, but got {out.dtype} {tuple(out.shape)}.")
        return out.copy_(x)


def pictures(small: torch.Tensor) -> torch.Tensor:
    """``uint8`` CPU pictures of kept images (:func:`small_images`), each min-max normalised.

    Args:
        small: ``(B, 3, h, w)`` images or one ``(3, h, w)`` image, any float dtype.

    Returns:
        The same shape in ``uint8``: each image's minimum is 0, its maximum 255; NaN counts as 0
        and infinities as float16's extremes.
    """
    with torch.no_grad():
        x = small.detach().float()
        one = x.dim() == 3
        x = torch.nan_to_num(x[None] if one else x, nan=0.0, posinf=65504.0, neginf=-65504.0)
        flat = x.flatten(1)
        lo, hi = flat.amin(1), flat.amax(1)
        scale = 255.0 / (hi - lo).clamp_min(1e-8)
        # (x - lo) * scale rounded, as the truncation of values in [0.5, 255.5] (through int16:
        # several times faster than straight to uint8 on the CPU)
        offset = (0.5 - lo * scale).view(-1, 1, 1, 1)
        x = x.mul_(scale.view(-1, 1, 1, 1)).add_(offset).to(torch.int16).to(torch.uint8).cpu()
        return x[0] if one else x


def _dedupe_last(slots: torch.Tensor, rows: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, for every slot written more than once in a batch, only the last write."""
    order = torch.arange(slots.numel(), device=slots.device)
    winner = torch.full((capacity,), -1, dtype=torch.long, device=slots.device)
    winner.scatter_reduce_(0, slots, order, reduce="amax")
    keep = winner[slots] == order
    return slots[keep], rows[keep]


class MistakeBuffer:
    """A fixed-size reservoir sample of misclassified validation samples.

    Every mistake seen since :meth:`reset` has the same probability ``capacity / seen`` of being
    in the buffer (Algorithm R, processed one batch at a time without a Python loop over
    samples), drawn with the buffer's own :class:`torch.Generator` so the global RNG is untouched.

    Args:
        capacity: most mistakes kept.
        seed: seed of the buffer's generator (re-seeded with ``seed + reseed`` by :meth:`reset`).
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"Expected `capacity` to be a positive integer, but got {capacity}.")
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.seen = 0
        self.size = 0
        self._store: dict[str, torch.Tensor] = {}

    def reset(self, reseed: int = 0) -> None:
        """Forget the kept mistakes (the allocated storage is reused)."""
        self.seen = 0
        self.size = 0
        self.generator.manual_seed(self.seed + int(reseed))

    def _slots(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reservoir slots for the next ``n`` mistakes: (rows of the batch kept, their slots).

        One draw per mistake beyond the first ``capacity`` (those are all kept), so offering
        two batches one after the other or concatenated gives the same slots.
        """
        free = min(n, max(0, self.capacity - self.seen))      # kept while the buffer fills
        index = torch.arange(self.seen, self.seen + n)
        if free == n:
            return torch.arange(n), index
        draws = (torch.rand(n - free, generator=self.generator, dtype=torch.float64)
                 * (index[free:] + 1)).long()
        slots = torch.cat([index[:free], draws])
        kept = slots < self.capacity
        slots, rows = _dedupe_last(slots[kept], torch.arange(n)[kept], self.capacity)
        return rows, slots

    def add(self, num: int, **tensors: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Offer a batch of ``num`` mistakes; all tensors share the leading batch dimension.

        A value may also be a function ``rows -> tensor`` computing only the kept rows (e.g.
        thumbnails). Storage for each name is allocated on the first call (same dtype/device as
        given) and fixed from then on.
        """
        n = int(num)
        if n == 0:
            return
        rows, slots = self._slots(n)
        self.seen += n
        self.size = min(self.seen, self.capacity)
        if rows.numel() == 0:
            return
        for name, value in tensors.items():
            lazy = callable(value)
            if lazy:
                value = value(rows)                # computes the kept rows only
            expected = rows.numel() if lazy else n
            if value.shape[0] != expected:
                raise ValueError(f"Expected `{name}` to have {expected} rows, but got {value.shape[0]}.")
            if not lazy and rows.numel() < n:      # (rows are increasing: all n = every row)
                value = value.index_select(0, rows.to(value.device))
            store = self._store.get(name)
            if store is None or store.shape[1:] != value.shape[1:]:
                store = torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype,
                                    device=value.device)
                self._store[name] = store
            copy_rows(store, slots, value)

    def get(self, name: str) -> Optional[torch.Tensor]:
        """The kept rows of ``name`` (``(size, ...)``), or ``None`` if never given."""
        store = self._store.get(name)
        return None if store is None else store[:self.size]

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the buffer's storage."""
        return sum(t.numel() * t.element_size() for t in self._store.values())


class ReferenceExtras:
    """Per-class ring buffers of per-sample extras (thumbnails, annotations) keyed by sample id.

    It mirrors the :class:`~fgvce_lightning.engine.bank.ReferenceBank` (same capacity per class;
    :meth:`put` writes where the bank placed the maps, :meth:`add` places like the bank's ring
    buffers) so the extras of any reference the search used can be found by id.

    Args:
        num_classes: number of classes.
        capacity_per_class: entries kept per class.
        id_width: length of a sample id.
    """

    def __init__(self, num_classes: int, capacity_per_class: int, id_width: int = 3) -> None:
        self.num_classes = int(num_classes)
        self.capacity = int(capacity_per_class)
        self.ids = torch.full((self.num_classes, self.capacity, id_width), -1, dtype=torch.long)
        self.count = torch.zeros(self.num_classes, dtype=torch.long)
        self._store: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget all entries (storage kept)."""
        self.ids.fill_(-1)
        self.count.zero_()

    def add(self, labels: torch.Tensor, ids: torch.Tensor, rows: Optional[torch.Tensor] = None,
            **tensors: torch.Tensor) -> None:
        """Add a batch: ``labels (B,)``, ``ids (B, id_width)`` and extras with leading dim ``B``.

        ``rows`` (increasing indices) adds only those samples of the batch; when they are most of
        it, their extras are copied straight from the batch's tensors without gathering them
        first (:func:`~fgvce_lightning.engine._util.copy_kept_rows`: the rows left out go to a
        spare row past the ring buffers).
        """
        labels, ids = labels.long().cpu(), ids.long().cpu()
        n = labels.shape[0]
        chosen = torch.arange(n) if rows is None else rows.long().cpu()
        if chosen.numel() == 0:
            return
        # the same ring-buffer placement as the ReferenceBank, so both keep the same samples
        keep, slot_in_class, per_class = ring_slots(labels[chosen], self.count % self.capacity,
                                                    self.capacity)
        kept = chosen[keep]
        self.put(kept, labels[kept] * self.capacity + slot_in_class, per_class, ids, **tensors)

    def put(self, kept: torch.Tensor, slots: torch.Tensor, per_class: torch.Tensor,
            ids: torch.Tensor, **tensors: torch.Tensor) -> None:
        """Write the batch rows ``kept`` (increasing) to the flat slots ``class * capacity +
        slot`` that the bank placed them in (:meth:`ReferenceBank._insert
        <fgvce_lightning.engine.bank.ReferenceBank._insert>` returns both, and ``per_class``, the
        count offered per class), so the two need not place them twice."""
        kept, slots, ids = kept.cpu(), slots.cpu(), ids.long().cpu()
        self.count += per_class.cpu()
        self.ids.view(-1, self.ids.shape[-1])[slots] = ids[kept]
        for name, value in tensors.items():
            store = self._store.get(name)
            if store is None or store.shape[1:] != value.shape[1:]:        # (+ the spare row)
                store = torch.zeros((self.num_classes * self.capacity + 1, *value.shape[1:]),
                                    dtype=value.dtype)
                self._store[name] = store
            copy_kept_rows(store, slots, value.detach().cpu(), kept)

    def _rings(self, name: str) -> Optional[torch.Tensor]:
        """The stored extras ``name`` as ``(num_classes, capacity, ...)`` (without the spare row)."""
        store = self._store.get(name)
        return None if store is None else store[:-1].view(self.num_classes, self.capacity,
                                                           *store.shape[1:])

    def lookup(self, name: str, classes: torch.Tensor, ids: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """The extras ``name`` of the samples ``ids (M, id_width)`` of ``classes (M,)`` (``None`` if gone)."""
        store = self._rings(name)
        if store is None or classes.numel() == 0:
            return [None] * int(classes.numel())
        classes, ids = classes.long().cpu(), ids.long().cpu()
        valid = (classes >= 0) & (classes < self.num_classes)
        safe = classes.clamp(0, self.num_classes - 1)
        match = (self.ids[safe] == ids[:, None, :]).all(-1) & valid[:, None]  # (M, cap)
        found, slot = match.any(1), match.float().argmax(1)
        rows = store[safe, slot]
        return [rows[i].clone() if bool(found[i]) else None for i in range(classes.shape[0])]

    def lookup_id(self, name: str, key: tuple) -> Optional[torch.Tensor]:
        """The extras ``name`` of the sample with id ``key`` (any class), or ``None`` if gone."""
        store = self._rings(name)
        if store is None:
            return None
        key_t = torch.as_tensor(tuple(key), dtype=torch.long)
        if key_t.shape != self.ids.shape[-1:]:
            return None
        match = (self.ids == key_t).all(-1)   # (num_classes, capacity)
        hits = match.nonzero()
        if hits.shape[0] == 0:
            return None
        cls, slot = hits[0].tolist()
        return store[cls, slot].clone()

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the ids and extras."""
        return self.ids.numel() * 8 + sum(t.numel() * t.element_size() for t in self._store.values())

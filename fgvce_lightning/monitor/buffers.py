"""Fixed-size stores of per-sample tensors that the monitor fills during validation.

* :class:`MistakeBuffer` is a reservoir sample (Algorithm R, batched) of the epoch's mistakes: every
  mistake seen has the same chance to be kept, so late batches are not favoured.
* :class:`ReferenceExtras` keeps, per class, the thumbnails (and extra per-sample tensors such as
  part annotations) of the references in the bank, looked up by sample id at explanation time.

Both have a fixed size decided at construction; nothing grows with the length of the training run,
and nothing keeps a reference to an autograd graph (tensors are detached copies).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..engine._util import copy_kept_rows, copy_rows
from ..engine.rings import RowTable, ring_slots

__all__ = ["MistakeBuffer", "ReferenceExtras"]


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

    It mirrors the :class:`~fgvce_lightning.engine.bank.ReferenceBank` (same capacity per class,
    same rings: pass the bank's ``rows``; :meth:`put` writes where the bank placed the maps,
    :meth:`add` places like the bank's ring buffers) so the extras of any reference the search
    used can be found by id.

    Args:
        num_classes: number of classes.
        capacity_per_class: entries kept per class.
        id_width: length of a sample id.
        rows: the bank's :class:`~fgvce_lightning.engine.bank.RowTable` (default: one ring per
            class, of its own).
    """

    def __init__(self, num_classes: int, capacity_per_class: int, id_width: int = 3,
                 rows: Optional[RowTable] = None) -> None:
        self.num_classes = int(num_classes)
        self.capacity = int(capacity_per_class)
        self._own_rows = rows is None        # (else the bank hands out the rings and resets them)
        self.rows = rows if rows is not None else RowTable(num_classes, num_classes,
                                                           torch.device("cpu"))
        self.slots = self.rows.num_rows * self.capacity
        self.ids = torch.full((self.rows.num_rows, self.capacity, id_width), -1, dtype=torch.long)
        self.count = torch.zeros(self.num_classes, dtype=torch.long)
        self._store: dict[str, torch.Tensor] = {}

    def reset(self, capacity_per_class: Optional[int] = None) -> None:
        """Forget all entries (storage kept); ``capacity_per_class``: the bank's new capacity
        (call after the bank's :meth:`~fgvce_lightning.engine.bank.ReferenceBank.reset`)."""
        if capacity_per_class is not None and int(capacity_per_class) != self.capacity:
            self.capacity = int(capacity_per_class)
            self.ids = torch.full((self.slots // self.capacity, self.capacity, self.ids.shape[-1]),
                                  -1, dtype=torch.long)
        if self._own_rows:
            self.rows.reset(self.ids.shape[0])
        self.ids.fill_(-1)
        self.count.zero_()

    def _row_of(self, classes: torch.Tensor) -> torch.Tensor:
        """The rings of ``classes`` (CPU; ``-1``: none)."""
        return self.rows.row_of.cpu()[classes]

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
        if self._own_rows:                             # hand out the rings here
            placed = self.rows.assign(labels[chosen]) >= 0
            chosen = chosen[placed]
        keep, slot_in_class, per_class = ring_slots(labels[chosen], self.count % self.capacity,
                                                    self.capacity)
        kept = chosen[keep]
        self.put(kept, self._row_of(labels[kept]) * self.capacity + slot_in_class, per_class,
                 ids, **tensors)

    def put(self, kept: torch.Tensor, slots: torch.Tensor, per_class: torch.Tensor,
            ids: torch.Tensor, **tensors: torch.Tensor) -> None:
        """Write the batch rows ``kept`` (increasing) to the flat slots ``row * capacity +
        slot`` that the bank placed them in (:meth:`ReferenceBank._insert
        <fgvce_lightning.engine.bank.ReferenceBank._insert>` returns both, and ``per_class``, the
        count offered per class), so the two need not place them twice."""
        kept, slots, ids = kept.cpu(), slots.cpu(), ids.long().cpu()
        self.count += per_class.cpu()
        self.ids.view(-1, self.ids.shape[-1])[slots] = ids[kept]
        for name, value in tensors.items():
            store = self._store.get(name)
            if store is None or store.shape[1:] != value.shape[1:]:        # (+ the spare row)
                store = torch.zeros((self.slots + 1, *value.shape[1:]), dtype=value.dtype)
                self._store[name] = store
            copy_kept_rows(store, slots, value.detach().cpu(), kept)

    def _rings(self, name: str) -> Optional[torch.Tensor]:
        """The stored extras ``name`` as ``(rings, capacity, ...)`` (without the spare row)."""
        store = self._store.get(name)
        rings = self.ids.shape[0]
        return None if store is None else store[:rings * self.capacity].view(
            rings, self.capacity, *store.shape[1:])

    def lookup(self, name: str, classes: torch.Tensor, ids: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """The extras ``name`` of the samples ``ids (M, id_width)`` of ``classes (M,)`` (``None`` if gone)."""
        store = self._rings(name)
        if store is None or classes.numel() == 0:
            return [None] * int(classes.numel())
        classes, ids = classes.long().cpu(), ids.long().cpu()
        valid = (classes >= 0) & (classes < self.num_classes)
        rows = self._row_of(classes.clamp(0, self.num_classes - 1))
        valid &= rows >= 0
        safe = rows.clamp(min=0)
        match = (self.ids[safe] == ids[:, None, :]).all(-1) & valid[:, None]  # (M, cap)
        found, slot = match.any(1), match.float().argmax(1)
        rows = store[safe, slot]
        return [rows[i].clone() if bool(found[i]) else None for i in range(classes.shape[0])]

    def rows_of(self, name: str, cls: int, ids: torch.Tensor
                ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """The extras ``name`` of the first ``n`` slots of class ``cls`` (the bank's slot order,
        as :meth:`ReferenceBank.get <fgvce_lightning.engine.bank.ReferenceBank.get>` returns
        them) and ``(n,)`` bool: where their ids are ``ids (n, id_width)``. One comparison, no
        search by id."""
        store = self._rings(name)
        n, row = int(ids.shape[0]), int(self._row_of(torch.tensor([int(cls)]))[0])
        if row < 0:
            return (None if store is None else store[0, :0]), torch.zeros(0, dtype=torch.bool)
        found = (self.ids[row, :n] == ids.long().cpu()).all(-1)
        return (None if store is None else store[row, :n]), found

    def lookup_id(self, name: str, key: tuple) -> Optional[torch.Tensor]:
        """The extras ``name`` of the sample with id ``key`` (any class), or ``None`` if gone."""
        store = self._rings(name)
        if store is None:
            return None
        key_t = torch.as_tensor(tuple(key), dtype=torch.long)
        if key_t.shape != self.ids.shape[-1:]:
            return None
        match = (self.ids == key_t).all(-1)   # (rings, capacity)
        hits = match.nonzero()
        if hits.shape[0] == 0:
            return None
        cls, slot = hits[0].tolist()
        return store[cls, slot].clone()

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the ids and extras."""
        return self.ids.numel() * 8 + sum(t.numel() * t.element_size() for t in self._store.values())

"""Where a bank's maps go: per-class ring positions and the rings (rows) handed to classes.

:func:`ring_slots` places a batch in per-class ring buffers as if its samples were added one by
one; :class:`RowTable` says which ring each class writes to when there are fewer rings than
classes. Used by :class:`~fgvce_lightning.engine.bank.ReferenceBank` and by the monitor's
reference extras, which must place every sample exactly where the bank does.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["class_ranks", "ring_slots", "RowTable"]


def class_ranks(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` ``(num_classes,)`` counts of ``labels (B,)`` and every sample's ``rank``
    ``(B,)`` among the samples of its class (0 for the first, in batch order)."""
    per_class = torch.bincount(labels, minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(per_class, 0) - per_class
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
    return per_class, rank


def ring_slots(labels: torch.Tensor, write: torch.Tensor, capacity: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a batch goes in per-class ring buffers, as if its samples were added one by one.

    Sample ``r`` of class ``c`` in the batch (stable order) goes to slot ``(write[c] + r) %
    capacity``; only the last ``capacity`` samples of a class survive, on distinct slots.

    Args:
        labels: ``(B,)`` int64 classes.
        write: ``(num_classes,)`` int64 next write position of every class.
        capacity: slots per class.

    Returns:
        ``keep`` ``(B,)`` bool (the samples that survive), ``slots`` (one per kept sample) and
        ``per_class`` ``(num_classes,)`` counts of the batch (advance ``write`` by them).
    """
    per_class, rank = class_ranks(labels, write.numel())
    keep = rank >= per_class[labels] - capacity
    slots = (write[labels[keep]] + rank[keep]) % capacity
    return keep, slots, per_class


class RowTable:
    """Which ring (row of a bank's storage) each class writes to.

    With at least as many rows as classes, class ``c`` owns row ``c``. With fewer, a class is
    handed the next free row on its first map and keeps it until :meth:`reset`; once every row is
    taken, a new class gets none (its maps are not stored).
    """

    def __init__(self, num_classes: int, num_rows: int, device: torch.device) -> None:
        self.num_classes, self.num_rows = int(num_classes), int(num_rows)
        self.row_of = torch.full((self.num_classes,), -1, dtype=torch.int64, device=device)
        self.reset()

    def reset(self, num_rows: Optional[int] = None) -> None:
        """Forget the assignment (``num_rows``: the new number of rows)."""
        if num_rows is not None:
            self.num_rows = int(num_rows)
        if self.num_rows >= self.num_classes:
            self.row_of.copy_(torch.arange(self.num_classes, device=self.row_of.device))
            self.used = self.num_classes
        else:
            self.row_of.fill_(-1)
            self.used = 0

    def assign(self, labels: torch.Tensor) -> torch.Tensor:
        """The row of every label ``(B,)``, handing rows to the classes that have none (in class
        order); ``-1`` where none was left. One device sync when a batch brings a new class."""
        rows = self.row_of[labels]
        if self.used >= self.num_rows or self.used >= self.num_classes:
            return rows
        new = labels[rows < 0].unique()
        if new.numel():
            take = min(int(new.numel()), self.num_rows - self.used)
            self.row_of[new[:take]] = torch.arange(self.used, self.used + take,
                                                   device=self.row_of.device)
            self.used += take
            rows = self.row_of[labels]
        return rows

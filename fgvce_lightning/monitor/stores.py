"""What the monitor keeps of one validation epoch and dataloader: the reference bank, the mistake
reservoir and the references' thumbnails and part labels, sized once from the memory budget.

:func:`plan_stores` sizes them (and says, part by part, what does not fit); :class:`Stores` holds
them and stores sets of validation batches (:class:`~fgvce_lightning.monitor.pending.BatchSet`):
correct samples go to the bank, mistakes to the reservoir. A batch whose labels are out of range
is left out of its set and reported, the rest of the set is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..engine._util import finite_rows
from ..engine.bank import ReferenceBank
from ..parts import keypoints_to_cell_parts, masks_to_cell_parts
from .batches import ParsedBatch
from .buffers import MistakeBuffer, ReferenceExtras
from .pending import BatchSet

__all__ = ["StorePlan", "plan_stores", "Stores", "PENDING_MAX_BYTES"]

#: most bytes of validation batches waiting to be stored together (a set), per dataloader
PENDING_MAX_BYTES = 32 * 2 ** 20
_MB = 2 ** 20


@dataclass(frozen=True)
class StorePlan:
    """How a memory budget is shared (:func:`plan_stores`).

    Attributes:
        capacity: references kept per class while every class may occur (the first epoch).
        pending_bytes: bytes of one set of waiting batches.
        spare_bytes: what the bank and the two sets' buffers leave of the budget.
        slots: references the bank holds in all: ``capacity`` for every class at first, shared
            by the classes that occur from the next epoch on (:meth:`Stores.reset`).
    """

    capacity: int
    pending_bytes: int
    spare_bytes: int
    slots: int = 0


def plan_stores(*, num_classes: int, feature_shape: tuple[int, int, int], dtype: torch.dtype,
                mistakes: int, budget_bytes: int, max_per_class: Optional[int],
                thumbnail_size: int, num_annotated: int, batch_bytes: int = 0,
                batch_size: int = 0, pending_max_bytes: Optional[int] = None) -> StorePlan:
    """Share ``budget_bytes``: the mistakes first, then two sets of batches waiting to be stored
    (one being filled, one being stored: 1/16 of the budget each, at most
    ``pending_max_bytes``, at least one batch of ``batch_bytes``), the rest to the bank.

    Args:
        num_classes: classes of the head.
        feature_shape: ``(C, H, W)`` of the feature maps.
        dtype: the bank's dtype.
        mistakes: mistakes kept.
        budget_bytes: the memory budget.
        max_per_class: cap on the references per class (``None``: as many as fit).
        thumbnail_size: side of the kept thumbnails.
        num_annotated: annotated parts per sample (their cell labels are kept).
        batch_bytes: bytes one validation batch takes while it waits; ``batch_size`` its images.
        pending_max_bytes: cap on a set (default :data:`PENDING_MAX_BYTES`).

    Raises:
        ValueError: when the budget does not hold the mistakes, the waiting sets and one
            reference per class; the message gives each part's size and what to change.
    """
    c, h, w = feature_shape
    feat = c * h * w * torch.empty((), dtype=dtype).element_size()
    extras = 3 * thumbnail_size ** 2 * 2 + num_annotated * h * w + 3 * 8   # thumbnail, labels, id
    per_mistake = feat + extras + 2 * 8
    per_reference = feat + 3 * 8 + extras
    mistake_bytes = mistakes * per_mistake
    cap = PENDING_MAX_BYTES if pending_max_bytes is None else pending_max_bytes
    pending = max(min(cap, budget_bytes // 16), int(batch_bytes))
    fixed = mistake_bytes + 2 * pending + extras       # (+ the extras' spare row)
    capacity = (budget_bytes - fixed) // (num_classes * per_reference)
    if capacity < 1:
        references = num_classes * per_reference
        parts = sorted([
            (mistake_bytes, f"{mistakes} mistakes: {mistake_bytes / _MB:.1f} MB", "lower `max_samples`"),
            (references, f"one reference per class ({num_classes} classes, feature maps "
                         f"{tuple(feature_shape)} in {dtype}): {references / _MB:.1f} MB",
             "use bank_dtype='bfloat16' or split the model where the feature maps are smaller"),
            (2 * pending, f"two sets of validation batches waiting to be stored: "
                          f"{2 * pending / _MB:.1f} MB (each 1/16 of the budget, at least one batch"
                          + (f" of {batch_size} images: {batch_bytes / _MB:.1f} MB" if batch_size else "")
                          + ")", "lower the validation batch size")], key=lambda p: -p[0])
        need = fixed + references
        raise ValueError(
            f"Expected `memory_budget_mb` to hold the monitor's stores ({need / _MB:.1f} MB: "
            + "; ".join(p[1] for p in parts) + f"), but got {budget_bytes / _MB:.1f} MB. Raise "
            "`memory_budget_mb`, or " + ", or ".join(p[2] for p in parts)
            + f" (`thumbnail_size` also counts: {extras} bytes a sample).")
    slots = (budget_bytes - fixed) // per_reference
    if max_per_class is not None:
        capacity = min(capacity, max_per_class)
        slots = min(slots, num_classes * max_per_class)
    slots = slots // capacity * capacity                  # whole rings
    spare = budget_bytes - fixed - slots * per_reference
    return StorePlan(int(capacity), int(pending), int(spare), int(slots))


@dataclass
class Stores:
    """Everything kept of one dataloader during one validation epoch; sized once, never grows."""

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
    max_per_class: Optional[int] = None
    occurred: Optional[torch.Tensor] = None    # (num_classes,) bool: offered to the bank so far

    @classmethod
    def build(cls, *, num_classes: int, feature_shape: tuple[int, int, int],
              input_size: tuple[int, int], device: torch.device, dtype: torch.dtype,
              feature_dtype: torch.dtype, mistakes: int, budget_bytes: int,
              max_per_class: Optional[int], thumbnail_size: int, part_source: str,
              num_annotated: int, seed: int, batch_bytes: int = 0, batch_size: int = 0,
              pending_max_bytes: Optional[int] = None, bank_device: Optional[torch.device] = None
              ) -> "Stores":
        """Allocate stores sized by :func:`plan_stores` (same arguments; ``device`` and
        ``feature_dtype`` are where the maps live and the dtype the head takes them in;
        ``bank_device``: where the bank lives instead; host memory is pinned when the model is
        on a GPU)."""
        plan = plan_stores(num_classes=num_classes, feature_shape=feature_shape, dtype=dtype,
                           mistakes=mistakes, budget_bytes=budget_bytes,
                           max_per_class=max_per_class, thumbnail_size=thumbnail_size,
                           num_annotated=num_annotated, batch_bytes=batch_bytes,
                           batch_size=batch_size, pending_max_bytes=pending_max_bytes)
        bank = ReferenceBank(num_classes, plan.capacity, tuple(feature_shape),
                             device=device if bank_device is None else bank_device, dtype=dtype,
                             num_rows=plan.slots // plan.capacity,
                             pin_memory=torch.device(device).type == "cuda")   # (only for a GPU model)
        return cls(bank=bank, extras=ReferenceExtras(num_classes, plan.capacity, rows=bank.rows),
                   mistakes=MistakeBuffer(mistakes, seed=seed), input_size=tuple(input_size),
                   feature_dtype=feature_dtype, part_source=part_source,
                   num_annotated=num_annotated, thumbnail_size=thumbnail_size,
                   pending_bytes=plan.pending_bytes, spare_bytes=plan.spare_bytes,
                   max_per_class=max_per_class,
                   occurred=torch.zeros(num_classes, dtype=torch.bool))

    def reset(self, reseed: int = 0) -> None:
        """Start a new epoch: empty the bank, the extras and the reservoir (memory kept). The
        bank's slots go to the classes that have occurred in the epochs so far (offered to the
        bank at least once): ``slots // occurred`` references each, at most ``max_per_class``
        (the validation set's classes rarely change; a class that occurs for the first time
        gets a ring while free ones are left, and counts from the next epoch on)."""
        with torch.inference_mode(False):    # (called in the validation loop's inference mode:
            self._reset(reseed)               # new buffers must be normal tensors, stored into later)

    def _reset(self, reseed: int) -> None:
        cap = None
        if self.occurred is not None:
            self.occurred |= self.bank.seen().cpu() > 0
            occurred = int(self.occurred.sum())
            if occurred:
                cap = self.bank.num_slots // occurred
                if self.max_per_class is not None:
                    cap = min(cap, self.max_per_class)
                cap = max(1, cap)
        self.bank.reset(None if cap == self.bank.capacity_per_class else cap)
        self.extras.reset(self.bank.capacity_per_class)
        self.mistakes.reset(reseed)

    def check_shapes(self, feats: torch.Tensor, logits: torch.Tensor,
                     parsed: ParsedBatch | BatchSet) -> None:
        """Raise if a batch's shapes do not match the stores (no tensor work, no device sync)."""
        if tuple(feats.shape[1:]) != self.bank.feature_shape:
            raise ValueError(f"Expected feature maps of shape (B, {', '.join(map(str, self.bank.feature_shape))}) "
                             f"as in the first batch, but got {tuple(feats.shape)}. Use a fixed "
                             "input size within a dataloader.")
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
        labels = parsed.labels
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.bank.num_classes):
            raise ValueError(f"Expected labels in [0, {self.bank.num_classes}), but got "
                             f"[{int(labels.min())}, {int(labels.max())}].")

    def cell_parts(self, parsed: ParsedBatch | BatchSet) -> Optional[torch.Tensor]:
        """``(B, P, H, W)`` bool part labels of the batch's cells from its annotations, or ``None``."""
        grid = self.bank.feature_shape[1:]
        if self.part_source == "keypoints" and parsed.keypoints is not None:
            return keypoints_to_cell_parts(parsed.keypoints, self.input_size, grid).cpu()
        if self.part_source == "masks" and parsed.masks is not None:
            return masks_to_cell_parts(parsed.masks, grid).cpu()
        return None

    def _bad_batches(self, labels: torch.Tensor, ids: torch.Tensor
                     ) -> tuple[Optional[torch.Tensor], list[tuple[int, int, str]]]:
        """Rows of the batches of a set whose labels are out of range: ``(B,)`` bool rows to keep
        (``None``: all) and the batches left out ``(dataloader_idx, batch_idx, reason)``."""
        k = self.bank.num_classes
        bad = (labels < 0) | (labels >= k)
        if not bool(bad.any()):                       # (one device sync per set)
            return None, []
        labels, bad, ids = labels.cpu(), bad.cpu(), ids.cpu()
        batches = ids[bad][:, :2].unique(dim=0)                                    # (b, 2)
        member = (ids[:, None, :2] == batches[None]).all(-1)                       # (B, b)
        skipped = []
        for j, (dl, batch) in enumerate(batches.tolist()):
            got = labels[member[:, j]]
            skipped.append((dl, batch, f"labels in [{int(got.min())}, {int(got.max())}], "
                                       f"expected them in [0, {k}) (the head's classes)"))
        return ~member.any(1), skipped

    def add(self, batch: BatchSet, pred: torch.Tensor, wrong: torch.Tensor
            ) -> tuple[int, list[tuple[int, int, str]]]:
        """Correct samples go to the bank, mistakes to the reservoir, with thumbnails and parts.

        Runs on every set of validation batches: the references are placed once and copied
        straight from the set into the bank and the extras (no gather first), and the mistakes'
        maps, labels and thumbnails are gathered only for the rows the reservoir keeps (index
        lists, not boolean masks). A batch with labels out of range is left out (only it).

        Args:
            batch: the set, ``B`` samples.
            pred: ``(B,)`` predicted classes; ``wrong``: ``(B,)`` bool, ``pred != labels``.

        Returns:
            The number of mistakes stored or offered to the reservoir, and the batches left out
            as ``(dataloader_idx, batch_idx, reason)``.
        """
        feats, thumbs = batch.feats, batch.thumbs.cpu()
        labels = batch.labels.to(pred.device)
        ids = batch.ids.cpu()
        ok, skipped = self._bad_batches(labels, ids)
        parts = self.cell_parts(batch)
        wrong_cpu = wrong.cpu()
        right_mask, wrong_mask = ~wrong_cpu, wrong_cpu
        if ok is not None:
            right_mask, wrong_mask = right_mask & ok, wrong_mask & ok
        right = right_mask.nonzero().squeeze(1)
        if right.numel():
            # cast once; maps that are not finite in the bank's dtype are left out (of the
            # extras too, or the two ring buffers drift apart)
            cast = feats.to(device=self.bank.device, dtype=self.bank.dtype)
            right = right[finite_rows(cast).cpu()[right]]
        if right.numel():
            # checked here, so inserted without the bank's checks; the extras go where the bank
            # placed the maps. The bank is emptied at every validation epoch's start and keeps
            # the first references of each class (`replace=False`): the model does not change
            # during the epoch, so the first are as good as the last, and a full class's later
            # correct samples cost no copy.
            device = self.bank.device
            kept, slots, per_class = self.bank._insert(
                cast, labels.to(device).long(), ids.to(device).long(), right.to(device),
                replace=False)
            if kept.numel():
                extra = {"thumb": thumbs} if parts is None else {"thumb": thumbs, "parts": parts}
                self.extras.put(kept, slots, per_class, ids, **extra)
        wrong_idx = wrong_mask.nonzero().squeeze(1)
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
        return int(wrong_idx.numel()), skipped

    @property
    def memory_bytes(self) -> int:
        return self.bank.memory_bytes + self.extras.memory_bytes + self.mistakes.memory_bytes

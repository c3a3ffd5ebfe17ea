"""A fixed-size bank of correctly classified feature maps, one ring buffer per class.

The counterfactual search draws its reference cells from feature maps of the true class that the
model classified correctly. :class:`ReferenceBank` keeps the most recent ``capacity_per_class`` of
them for every class (or the first ones, ``add(replace=False)``) in one preallocated tensor, so its
memory is known up front and never grows. With ``num_rows`` smaller than ``num_classes`` a class
gets its ring on its first map (:class:`RowTable`), so the memory goes to the classes that occur;
:meth:`ReferenceBank.reset` can trade rings for capacity within the same memory.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ._util import copy_kept_rows, finite_rows
from .rings import RowTable, class_ranks, ring_slots

__all__ = ["ReferenceBank", "RowTable"]

_ALLOWED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
    return value


def _check_feature_shape(feature_shape: Any) -> tuple[int, int, int]:
    shape = tuple(feature_shape) if isinstance(feature_shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"Expected `feature_shape` to be a tuple (C, H, W) of positive integers, "
                         f"but got {feature_shape!r}.")
    return shape  # type: ignore[return-value]


class ReferenceBank:
    """Per-class ring buffers of reference feature maps, preallocated on one device and dtype.

    Slot ``i`` of class ``c`` holds the ``i``-th entry returned by :meth:`get`; once a class holds
    ``capacity_per_class`` maps, every new one overwrites the oldest.

    Args:
        num_classes: number of classes of the classifier.
        capacity_per_class: most feature maps kept per class.
        feature_shape: ``(C, H, W)`` of one feature map.
        device: where the buffers live.
        dtype: storage dtype (``float32``, ``float16`` or ``bfloat16`` to halve the memory; the
            search computes in float32 anyway).
        id_width: length of the integer id stored with every map (e.g. ``(dataloader_idx,
            batch_idx, position)``).
        num_rows: rings allocated (default ``num_classes``: one per class); fewer are handed
            to the classes as their first maps arrive (:class:`RowTable`).
        pin_memory: allocate a CPU bank in pinned memory (when CUDA is available), so the
            search's copies of the references to the GPU are fast.

    Example:
        >>> bank = ReferenceBank(10, 4, (8, 7, 7))
        >>> bank.add(torch.randn(3, 8, 7, 7), torch.tensor([1, 1, 2]), torch.zeros(3, 3).long())
        0
        >>> bank.counts()[:3].tolist()
        [0, 2, 1]
    """

    def __init__(self, num_classes: int, capacity_per_class: int,
                 feature_shape: tuple[int, int, int], device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, id_width: int = 3, *,
                 num_rows: Optional[int] = None, pin_memory: bool = False) -> None:
        self._num_classes = _check_positive_int(num_classes, "num_classes")
        self._capacity = _check_positive_int(capacity_per_class, "capacity_per_class")
        self._feature_shape = _check_feature_shape(feature_shape)
        self._id_width = _check_positive_int(id_width, "id_width")
        rows = self._num_classes if num_rows is None else _check_positive_int(num_rows, "num_rows")
        if dtype not in _ALLOWED_DTYPES:
            raise ValueError(f"Expected `dtype` to be one of {list(_ALLOWED_DTYPES)}, but got {dtype}.")
        self._device = torch.device(device)
        self._dtype = dtype
        self._slots = rows * self._capacity
        pin = bool(pin_memory) and self._device.type == "cpu" and torch.cuda.is_available()
        # the rings, plus one spare row past them: `add(rows=)` writes the rows it leaves out there
        # instead of gathering the others first
        self._storage = torch.zeros(self._slots + 1, *self._feature_shape, device=self._device,
                                    dtype=dtype, pin_memory=pin)
        self.rows = RowTable(self._num_classes, rows, self._device)
        self._layout()
        self._counts = torch.zeros(self._num_classes, device=self._device, dtype=torch.int64)
        self._write = torch.zeros(self._num_classes, device=self._device, dtype=torch.int64)
        self._seen = torch.zeros(self._num_classes, device=self._device, dtype=torch.int64)

    def _layout(self) -> None:
        """View the storage as ``(rows, capacity, C, H, W)`` rings (and their ids)."""
        rows = self._slots // self._capacity
        self._features = self._storage[:rows * self._capacity].view(rows, self._capacity,
                                                                    *self._feature_shape)
        self._ids = torch.full((rows, self._capacity, self._id_width), -1, device=self._device,
                               dtype=torch.int64)
        self.rows.reset(rows)

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def capacity_per_class(self) -> int:
        return self._capacity

    @property
    def num_slots(self) -> int:
        """Maps the storage holds: rings × capacity (fixed at construction)."""
        return self._slots

    @property
    def num_rows(self) -> int:
        """Rings: one per class that can hold maps at a time."""
        return self.rows.num_rows

    @property
    def pinned(self) -> bool:
        return bool(self._storage.is_pinned()) if self._device.type == "cpu" else False

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return self._feature_shape

    @property
    def id_width(self) -> int:
        return self._id_width

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the buffers; fixed at construction."""
        tensors = (self._storage, self._ids, self._counts, self._write, self._seen,
                   self.rows.row_of)
        return sum(t.numel() * t.element_size() for t in tensors)

    def counts(self) -> torch.Tensor:
        """Number of stored maps per class, ``(num_classes,)`` int64."""
        return self._counts.clone()

    def seen(self) -> torch.Tensor:
        """Number of maps ever offered per class (overwritten ones, and those left out by
        ``add(replace=False)``, included), ``(num_classes,)``."""
        return self._seen.clone()

    def __len__(self) -> int:
        return int(self._counts.sum())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self._num_classes}, capacity_per_class="
                f"{self._capacity}, num_rows={self.num_rows}, feature_shape={self._feature_shape}, "
                f"device={self._device}, dtype={self._dtype}, stored={len(self)})")

    # ------------------------------------------------------------------ writing
    def add(self, features: torch.Tensor, labels: torch.Tensor,
            ids: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None,
            replace: bool = True) -> int:
        """Add a batch of feature maps to their classes' ring buffers.

        Non-finite feature maps (NaN/inf, also after the cast to the bank's dtype) are not added.
        When a batch holds more maps of one class than the capacity, the last ones are kept
        (with ``replace=False``: the first ones that fit).

        Args:
            features: ``(B, C, H, W)`` feature maps (any device and float dtype).
            labels: ``(B,)`` integer classes in ``[0, num_classes)``.
            ids: ``(B, id_width)`` integer ids, or ``None`` (stored as ``-1``).
            rows: optional increasing indices of the samples of the batch to add (the others
                are left out): the same as adding ``features[rows]`` etc., but the maps are
                copied straight from ``features`` when most of the batch is added.
            replace: once a class holds ``capacity_per_class`` maps, a new one replaces its
                oldest (``True``) or is left out (``False``: the bank keeps the first maps it was
                given, e.g. of a validation epoch, whose model does not change, and those left
                out cost no copy).

        Returns:
            The number of feature maps rejected because they were not finite.

        Raises:
            TypeError: when an argument is not a tensor of the right kind.
            ValueError: on a shape mismatch or a label out of range.
        """
        expected = f"(B, {', '.join(map(str, self._feature_shape))})"
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            got = str(features.dtype) if isinstance(features, torch.Tensor) else \
                type(features).__name__
            raise TypeError(f"Expected `features` to be a floating point tensor of shape "
                            f"{expected}, but got {got}.")
        if features.dim() != 4 or tuple(features.shape[1:]) != self._feature_shape:
            raise ValueError(f"Expected `features` to have shape {expected}, but got "
                             f"{tuple(features.shape)}. The bank was built for feature maps of "
                             "that shape; use the same split point for all samples.")
        batch = features.shape[0]
        labels = self._check_index_tensor(labels, "labels", (batch,))
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self._num_classes):
            raise ValueError(f"Expected `labels` to lie in [0, {self._num_classes}), but got values "
                             f"in [{int(labels.min())}, {int(labels.max())}]. Check `num_classes`.")
        if ids is None:
            ids = torch.full((batch, self._id_width), -1, dtype=torch.int64, device=self._device)
        ids = self._check_index_tensor(ids, "ids", (batch, self._id_width))
        chosen = None
        if rows is not None:
            if not isinstance(rows, torch.Tensor) or rows.dim() != 1:
                raise ValueError(f"Expected `rows` to be a 1-D integer tensor of indices into the "
                                 f"batch, but got {getattr(rows, 'shape', type(rows).__name__)}.")
            chosen = self._check_index_tensor(rows, "rows", (rows.shape[0],))
            if chosen.numel() and (int(chosen[0]) < 0 or int(chosen[-1]) >= batch
                                   or not bool((chosen[1:] > chosen[:-1]).all())):
                raise ValueError(f"Expected `rows` to be increasing indices in [0, {batch}), but "
                                 f"got {chosen.numel()} indices from {int(chosen[0])} to "
                                 f"{int(chosen[-1])} that are not. Sort them (without repeats).")
        if batch == 0 or (chosen is not None and chosen.numel() == 0):
            return 0

        feats = features.detach().to(device=self._device, dtype=self._dtype)
        finite = finite_rows(feats)
        if chosen is None:
            chosen = torch.arange(batch, device=self._device)
        ok = finite[chosen]
        rejected = chosen.numel() - int(ok.sum())
        if rejected:
            chosen = chosen[ok]
        if chosen.numel() == 0:
            return rejected
        self._insert(feats, labels, ids, chosen, replace=replace)
        return rejected

    def _insert(self, feats: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                chosen: torch.Tensor, replace: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the rows ``chosen`` of a batch that :meth:`add` checked (or its caller did:
        finite maps in the bank's dtype and device, labels in range, int64 ids and increasing
        ``chosen`` on the bank's device). Returns where they went: the batch rows kept, their flat
        slots ``row * capacity + slot`` (``row``: the class's ring) and the count written per
        class (advancing the ring positions: with ``replace=False`` the rows left out are not
        counted). Maps of a class that got no ring are offered (:meth:`seen`), not stored."""
        if self.rows.num_rows < self._num_classes:     # (else every class owns its ring)
            placed = self.rows.assign(labels[chosen]) >= 0
            if not bool(placed.all()):
                self._seen += torch.bincount(labels[chosen][~placed], minlength=self._num_classes)
                chosen = chosen[placed]
        if not replace:
            offered, rank = class_ranks(labels[chosen], self._num_classes)
            room = self._capacity - self._counts
            chosen = chosen[rank < room[labels[chosen]]]
            if chosen.numel() == 0:                  # every class offered is full
                self._seen += offered
                return chosen, chosen.clone(), torch.zeros_like(self._counts)
        keep, slots, per_class = ring_slots(labels[chosen], self._write, self._capacity)
        kept = chosen[keep]
        flat = self.rows.row_of[labels[kept]] * self._capacity + slots
        copy_kept_rows(self._storage, flat, feats, kept)
        self._ids.view(-1, self._id_width)[flat] = ids[kept]
        self._write = (self._write + per_class) % self._capacity
        self._counts = torch.clamp(self._counts + per_class, max=self._capacity)
        self._seen += per_class if replace else offered
        return kept, flat, per_class

    def _check_index_tensor(self, value: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool:
            raise TypeError(f"Expected `{name}` to be an integer tensor of shape {shape}, but got "
                            f"{type(value).__name__}"
                            f"{' ' + str(value.dtype) if isinstance(value, torch.Tensor) else ''}.")
        if tuple(value.shape) != shape:
            raise ValueError(f"Expected `{name}` to have shape {shape}, but got {tuple(value.shape)}.")
        return value.to(device=self._device, dtype=torch.int64)

    def reset(self, capacity_per_class: Optional[int] = None) -> None:
        """Forget every stored map (the memory stays allocated). ``capacity_per_class``: lay the
        same storage out anew, as ``num_slots // capacity_per_class`` rings of that capacity."""
        if capacity_per_class is not None:
            cap = _check_positive_int(capacity_per_class, "capacity_per_class")
            if cap > self._slots:
                raise ValueError(f"Expected `capacity_per_class` to be at most the bank's "
                                 f"{self._slots} slots, but got {cap}.")
            self._capacity = cap
            self._layout()
        self._features.zero_()
        self._ids.fill_(-1)
        self.rows.reset()
        self._counts.zero_()
        self._write.zero_()
        self._seen.zero_()

    # ------------------------------------------------------------------ reading
    def _check_class(self, cls: Any) -> int:
        if isinstance(cls, torch.Tensor) and cls.numel() == 1:
            cls = int(cls)
        if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < self._num_classes:
            raise ValueError(f"Expected `cls` to be a class index in [0, {self._num_classes}), but "
                             f"got {cls!r}.")
        return cls

    def get(self, cls: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored maps of one class, in slot order.

        Returns:
            ``features`` ``(n, C, H, W)`` (bank dtype and device) and ``ids`` ``(n, id_width)``;
            ``n`` may be 0.
        """
        cls = self._check_class(cls)
        n, row = int(self._counts[cls]), int(self.rows.row_of[cls])
        return self._features[max(row, 0), :n].clone(), self._ids[max(row, 0), :n].clone()

    def gather(self, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The maps of each query's class, padded to the largest count among them.

        Args:
            classes: ``(N,)`` integer classes.

        Returns:
            ``features`` ``(N, K, C, H, W)`` (zeros where padded), ``ids`` ``(N, K, id_width)``
            (``-1`` where padded) and ``valid`` ``(N, K)`` bool, with ``K`` the largest number of
            maps stored for any of the classes (slot ``k`` is the ``k``-th map of :meth:`get`).
        """
        if not isinstance(classes, torch.Tensor):
            classes = torch.as_tensor(classes)
        if classes.dim() != 1:
            raise ValueError(f"Expected `classes` to have shape (N,), but got {tuple(classes.shape)}.")
        classes = self._check_index_tensor(classes, "classes", tuple(classes.shape))
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self._num_classes):
            raise ValueError(f"Expected `classes` to lie in [0, {self._num_classes}), but got values "
                             f"in [{int(classes.min())}, {int(classes.max())}].")
        counts = self._counts[classes]
        k = int(counts.max()) if counts.numel() else 0
        valid = torch.arange(k, device=self._device)[None, :] < counts[:, None]
        rows = self.rows.row_of[classes].clamp(min=0)      # a class without a ring has count 0
        feats = self._features[rows, :k]
        ids = self._ids[rows, :k]
        feats.masked_fill_(~valid[:, :, None, None, None], 0)
        ids.masked_fill_(~valid[:, :, None], -1)
        return feats, ids, valid

    # ------------------------------------------------------------------ sizing
    @staticmethod
    def capacity_for_budget(budget_bytes: int, num_classes: int,
                            feature_shape: tuple[int, int, int],
                            dtype: torch.dtype = torch.float32, id_width: int = 3) -> int:
        """Largest ``capacity_per_class`` whose buffers fit in ``budget_bytes``.

        Raises:
            ValueError: when not even one map per class fits.
        """
        _check_positive_int(num_classes, "num_classes")
        c, h, w = _check_feature_shape(feature_shape)
        element = torch.empty((), dtype=dtype).element_size()
        per_entry = c * h * w * element + id_width * 8
        fixed = 3 * num_classes * 8
        capacity = (int(budget_bytes) - fixed) // (num_classes * per_entry)
        if capacity < 1:
            raise ValueError(f"Expected `budget_bytes` to hold at least one feature map per class "
                             f"({fixed + num_classes * per_entry} bytes for {num_classes} classes of "
                             f"{(c, h, w)} {dtype}), but got {budget_bytes}. Raise the budget or "
                             "store a smaller dtype (bfloat16/float16).")
        return int(capacity)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The bank's content as CPU tensors plus its configuration."""
        return {
            "num_classes": self._num_classes, "capacity_per_class": self._capacity,
            "num_slots": self._slots, "row_of": self.rows.row_of.cpu().clone(),
            "feature_shape": list(self._feature_shape), "id_width": self._id_width,
            "dtype": str(self._dtype).replace("torch.", ""),
            "features": self._features.cpu().clone(), "ids": self._ids.cpu().clone(),
            "counts": self._counts.cpu().clone(), "write": self._write.cpu().clone(),
            "seen": self._seen.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into this bank (converted to its device and dtype).

        Raises:
            ValueError: when the saved bank was built for another configuration.
        """
        if not isinstance(state, dict) or "features" not in state:
            raise ValueError("Expected `state` to be a dict returned by `ReferenceBank.state_dict()`, "
                             f"but got {type(state).__name__} without 'features'.")
        saved = (state.get("num_classes"), state.get("capacity_per_class"),
                 tuple(state.get("feature_shape", ())), state.get("id_width", 3),
                 state.get("num_slots", self._num_classes * state.get("capacity_per_class", 0)))
        mine = (self._num_classes, self._capacity, self._feature_shape, self._id_width, self._slots)
        if saved != mine:
            raise ValueError(f"Expected a bank state with (num_classes, capacity_per_class, "
                             f"feature_shape, id_width, num_slots) = {mine}, but got {saved}. "
                             "Build the bank with the saved configuration or start with an "
                             "empty bank.")
        row_of = state.get("row_of")
        if row_of is not None:
            self.rows.row_of.copy_(row_of.to(self._device))
            self.rows.used = int((self.rows.row_of >= 0).sum())
        self._features.copy_(state["features"].to(device=self._device, dtype=self._dtype))
        self._ids.copy_(state["ids"].to(device=self._device, dtype=torch.int64))
        self._counts.copy_(state["counts"].to(self._device))
        self._write.copy_(state["write"].to(self._device))
        seen = state.get("seen", state["counts"])
        self._seen.copy_(seen.to(self._device))

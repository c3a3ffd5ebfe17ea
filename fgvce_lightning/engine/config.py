"""``SearchConfig``: the parameters of the counterfactual search, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["SearchConfig", "REGION_ORDERS", "METHOD_NAMES"]

REGION_ORDERS = ("contribution", "gradcam", "random")
METHOD_NAMES = {"contribution": "fgvce", "gradcam": "gradcam", "random": "random"}
"""``Explanation.method`` for each ``SearchConfig.region_order``."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SearchConfig:
    """Parameters of the counterfactual search.

    Attributes:
        window: odd size of the local Shapley window (players of each cell's game).
        num_samples: Monte Carlo permutations per cell (at most ``2 · H · W · num_samples``
            head evaluations: each distinct coalition is evaluated once). One by default: on
            bench_parts' three seeds two (an antithetic pair) gave the same known answers within
            one standard error (first edit on a separating part 301 against 299 of 538
            mistakes, on the known cause 201 against 193 of 328) at twice the cost.
        antithetic: pair every permutation with its reverse.
        max_edits: most region edits per query (for ``greedy_search``: see its ``max_cells``).
        minimality: drop edits that the flip does not need after the search.
        chunk_size: most feature maps per head call.
        search_memory_mb: the search's own peak memory on its device, in MB (``None``: not
            planned; ``chunk_size`` alone bounds the head calls). The queries are searched in
            groups, and the head called in chunks, sized from the feature map, the references
            per query and the head's activation memory
            (:func:`~fgvce_lightning.engine.memory.plan_search`) so that the search's buffers
            stay within it.
        seed: seed of the engine's own generator (the global RNG is never used).
        num_classes: number of classes of the head (default: the bank's).
        region_threshold: ``threshold`` of :func:`grow_regions`, in ``[0, 1]``.
        max_region_size: ``max_region_size`` of :func:`grow_regions` (``None``: its default).
        max_shift: the correspondence's spatial prior: a query and a reference are aligned by a
            shift of at most this many cells (``None``: any shift that fits the grid), see
            :func:`~fgvce_lightning.engine.correspondence.correspond`.
        mirror: also align mirrored poses (the object facing the other way).
        num_references: the search uses the ``P`` references of the true class that align
            best with the query (highest alignment score): the best-aligned one is the Shapley
            baseline, and at every edit step the region's swap from each of the ``P`` is
            evaluated in one batched call, keeping the one that moves the prediction furthest
            towards ``true``. The best-aligned references are the ones whose pose is most likely
            right (on the demo, the mirror relation of the 8 best is right for 0.88 of them,
            against 0.63 over all references), so a small ``P`` keeps swaps on corresponding
            parts; costs ``P`` evaluations per step.
        protected_channels: number of trailing channels that are never matched or swapped (a
            vision transformer's class/register tokens carried with the map, see
            :attr:`ModelSplit.prefix_channels`); each query keeps its own.
        region_order: how the regions to swap are ranked: ``"contribution"`` (local Shapley,
            FG-VCE), or the evaluation baselines ``"gradcam"`` (Grad-CAM of ``pred`` over
            ``true`` at the feature map) and ``"random"`` (random cell scores).
        trim: after the search (and the minimality pass), refine the flipped queries' edits cell
            by cell: rank the edited cells by their contributions and keep the smallest prefix of
            that ranking that still flips (one batched call over all prefixes).
    """

    window: int = 3
    num_samples: int = 1
    antithetic: bool = True
    max_edits: int = 8
    minimality: bool = True
    chunk_size: int = 1024
    search_memory_mb: Optional[float] = 1024.0
    seed: int = 0
    num_classes: Optional[int] = None
    region_threshold: float = 0.5
    max_region_size: Optional[int] = 4
    max_shift: Optional[int] = 2
    mirror: bool = True
    num_references: int = 8
    protected_channels: int = 0
    region_order: str = "contribution"
    trim: bool = True

    def __post_init__(self) -> None:
        for name in ("window", "num_samples", "max_edits", "chunk_size", "num_references"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        if not _is_int(self.protected_channels) or self.protected_channels < 0:
            raise ValueError(f"Expected `protected_channels` to be a non-negative integer, but got "
                             f"{self.protected_channels!r}.")
        budget = self.search_memory_mb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget <= 0):
            raise ValueError(f"Expected `search_memory_mb` to be a positive, finite number of MB "
                             f"or None, but got {budget!r}.")
        if self.window % 2 == 0:
            raise ValueError(f"Expected `window` to be odd (a k×k window centred on the cell), but "
                             f"got {self.window}.")
        if self.max_shift is not None and (not _is_int(self.max_shift) or self.max_shift < 0):
            raise ValueError(f"Expected `max_shift` to be a non-negative integer or None, but got "
                             f"{self.max_shift!r}.")
        if self.max_region_size is not None and (not _is_int(self.max_region_size)
                                                 or self.max_region_size < 1):
            raise ValueError(f"Expected `max_region_size` to be a positive integer or None, but "
                             f"got {self.max_region_size!r}.")
        threshold = self.region_threshold
        if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                or not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"Expected `region_threshold` to be a number in [0, 1], but got "
                             f"{threshold!r}.")
        for name in ("antithetic", "minimality", "trim", "mirror"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Expected `{name}` to be True or False, but got "
                                 f"{getattr(self, name)!r}.")
        if self.region_order not in REGION_ORDERS:
            raise ValueError(f"Expected `region_order` to be one of {REGION_ORDERS}, but got "
                             f"{self.region_order!r}.")
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 2):
            raise ValueError(f"Expected `num_classes` to be an integer >= 2 or None, but got "
                             f"{self.num_classes!r}.")
        if not _is_int(self.seed) or not -2 ** 63 <= self.seed < 2 ** 64:
            raise ValueError(f"Expected `seed` to be an integer in [-2**63, 2**64), but got "
                             f"{self.seed!r}.")

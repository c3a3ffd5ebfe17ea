"""Result types for part labels and per-part error statistics (shared by parts, reporting, callback)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["BACKGROUND", "PartInfo", "PartStat", "PairStat", "EpochStats"]

BACKGROUND = "background"
"""The part name of a cell that no annotated part (and no prototype but the background one) covers."""


@dataclass(frozen=True)
class PartInfo:
    """A part the statistics talk about.

    Attributes:
        id: integer id (index into the part list).
        name: human-readable name (``"beak"``, or ``"part 3"`` for a discovered prototype not yet named).
        source: ``"keypoints"``, ``"masks"`` or ``"prototypes"``.
    """

    id: int
    name: str
    source: str


@dataclass(frozen=True)
class PartStat:
    """Per-part statistics over the explained mistakes of one epoch.

    Attributes:
        part: part name.
        error_share: share of explained mistakes whose (minimal) edit set touches the part.
        count: number of explained mistakes whose edit set touches the part.
        contribution_share: share of the positive contribution mass (over all explained mistakes)
            that falls on cells of this part.
        edit_cells: number of edited cells labelled with this part.
        interval: 95% Wilson score interval of ``error_share`` (``count`` of the explained
            mistakes); ``(0, 1)`` when nothing was explained.
    """

    part: str
    error_share: float
    count: int
    contribution_share: float = 0.0
    edit_cells: int = 0
    interval: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class PairStat:
    """Statistics of one confusion pair (true → predicted).

    Attributes:
        true: true class.
        pred: predicted class.
        count: explained mistakes of this pair.
        part_counts: part name → number of this pair's explained mistakes whose edits touch it.
        dominant_parts: part names sorted by ``part_counts`` (most frequent first, ties by name).
        example_indices: indices (into the epoch's samples list) of up to a few examples.
        dominant_share: share of the pair's mistakes whose edits touch its dominant part.
        dominant_interval: 95% Wilson score interval of ``dominant_share``.
        enough: whether the pair has at least ``EpochStats.min_pair_count`` explained mistakes;
            a pair with fewer is shown, but marked as too few to say which part dominates.
    """

    true: int
    pred: int
    count: int
    part_counts: dict[str, int] = field(default_factory=dict)
    dominant_parts: tuple[str, ...] = ()
    example_indices: tuple[int, ...] = ()
    dominant_share: float = 0.0
    dominant_interval: tuple[float, float] = (0.0, 1.0)
    enough: bool = False


@dataclass(frozen=True)
class EpochStats:
    """Aggregated statistics of one explained validation epoch.

    Attributes:
        num_misclassified: mistakes seen in the epoch (all ranks).
        num_explained: mistakes the search ran on (skipped ones excluded).
        num_skipped: mistakes that were selected but skipped (with a reason).
        flip_rate: share of explained mistakes whose edits flip the prediction to the true class.
        mean_edits: mean number of edits over successful explanations (``nan`` if none).
        parts: the parts known this epoch.
        part_stats: one entry per part, sorted by ``error_share`` descending.
        pair_stats: one entry per confusion pair, sorted by ``count`` descending.
        semantic_consistency: share of edited cells whose query and reference cells carry the same
            part label (``None`` when no part labels are available).
        consistency_cells: the edited cells that ``semantic_consistency`` judged.
        min_pair_count: the fewest explained mistakes a confusion pair needs for its dominant part
            to count (``PairStat.enough``).
    """

    num_misclassified: int
    num_explained: int
    num_skipped: int
    flip_rate: float
    mean_edits: float
    parts: tuple[PartInfo, ...] = ()
    part_stats: tuple[PartStat, ...] = ()
    pair_stats: tuple[PairStat, ...] = ()
    semantic_consistency: Optional[float] = None
    consistency_cells: int = 0
    min_pair_count: int = 5

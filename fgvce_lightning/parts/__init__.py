"""Parts: annotations → cell part labels, discovered part prototypes, per-part statistics.

Lightning-free; depends on torch and the engine's result types only.
"""

from .annotations import (cell_part_names, keypoints_to_cell_parts, masks_to_cell_parts, near_cells,
                          part_ids_to_cell_parts)
from .assign import PartAssignment, as_cell_parts, assign_parts
from .prototypes import PartPrototypes
from .stats import PartHistory, compute_epoch_stats
from .types import BACKGROUND, EpochStats, PairStat, PartInfo, PartStat

__all__ = [
    "keypoints_to_cell_parts", "masks_to_cell_parts", "part_ids_to_cell_parts", "near_cells",
    "cell_part_names", "PartAssignment", "assign_parts", "as_cell_parts", "PartPrototypes",
    "compute_epoch_stats", "PartHistory", "BACKGROUND", "PartInfo", "PartStat", "PairStat", "EpochStats",
]

"""What the callback hands to the reporters for one explained validation epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..engine.results import Explanation
from ..parts.types import EpochStats

__all__ = ["ExplainedSample", "EpochResult"]


@dataclass(frozen=True)
class ExplainedSample:
    """One explained (or skipped) validation mistake with everything needed to show it.

    Attributes:
        explanation: the engine's result.
        query_id: ``(dataloader_idx, batch_idx, position)`` of the validation sample.
        thumbnail: ``(3, h, w)`` uint8 CPU image of the query, or ``None``.
        reference_thumbnails: per edit, ``(3, h, w)`` uint8 image of that edit's reference sample
            (``None`` where not kept).
        edit_parts: per edit, the part names of its query cells (deduplicated, sorted).
        reference_parts: per edit, the part names of its reference cells.
        cell_parts: ``(H, W)`` list-of-lists of part-name tuples for the query's cells, or ``None``.
        rank: the process that explained it.
        consistent_cells: per edit, its cells whose query and reference labels share a part
            (:attr:`PartAssignment.consistent_cells`); ``()`` when unknown.
        judged_cells: per edit, its cells where either side carries a part
            (:attr:`PartAssignment.judged_cells`).
    """

    explanation: Explanation
    query_id: tuple[int, int, int]
    thumbnail: Optional[torch.Tensor] = None
    reference_thumbnails: tuple[Optional[torch.Tensor], ...] = ()
    edit_parts: tuple[tuple[str, ...], ...] = ()
    reference_parts: tuple[tuple[str, ...], ...] = ()
    cell_parts: Optional[list] = None
    rank: int = 0
    consistent_cells: tuple[int, ...] = ()
    judged_cells: tuple[int, ...] = ()


@dataclass(frozen=True)
class EpochResult:
    """Everything reported for one validation epoch.

    Attributes:
        epoch: current epoch (0-based, as Lightning counts).
        global_step: trainer global step.
        feature_grid: ``(H, W)`` of the feature maps.
        input_size: ``(H, W)`` of the input images.
        samples: the explained (and skipped) mistakes.
        stats: aggregated statistics.
        class_names: optional class names (index → name).
        failures: explanation failures of this epoch, as messages.
        elapsed_s: seconds spent explaining.
        method: search strategy name.
        stage: ``"fit"`` (a validation while fitting), ``"validate"`` or ``"test"``.
        dataloader_idx: the evaluation dataloader explained.
        skipped_batches: batches left out of the collection, as ``(dataloader_idx, batch_idx,
            reason)``.
        notes: what else a reader should know (work cut by the time budget or an interrupt,
            earlier explanations that were lost).
    """

    epoch: int
    global_step: int
    feature_grid: tuple[int, int]
    input_size: tuple[int, int]
    samples: tuple[ExplainedSample, ...]
    stats: EpochStats
    class_names: Optional[tuple[str, ...]] = None
    failures: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    method: str = "fgvce"
    stage: str = "validate"
    dataloader_idx: int = 0
    skipped_batches: tuple[tuple[int, int, str], ...] = ()
    notes: tuple[str, ...] = ()

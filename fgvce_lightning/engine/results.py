"""Frozen result types returned by the counterfactual search.

Everything a report, a TensorBoard panel or a metric needs about one explanation lives here, on
the CPU, detached from any autograd graph, so results can be kept, pickled and gathered freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["Cell", "Edit", "Explanation"]

Cell = tuple[int, int]
"""A feature-grid cell as ``(row, col)``."""


@dataclass(frozen=True)
class Edit:
    """One region swap of a counterfactual.

    Attributes:
        query_cells: cells of the query feature map that were replaced, ``(row, col)`` each.
        reference_slot: slot of the reference in the bank's class ``true`` (what
            :meth:`ReferenceBank.get` returned at search time), or ``-1`` when unknown.
        reference_id: the bank id of the reference sample (e.g. ``(dataloader_idx, batch_idx,
            position)``), so the sample can be found again.
        reference_cells: for every query cell, the reference cell whose features replaced it
            (same order and length as ``query_cells``).
        similarity: mean cosine similarity between the replaced query cells and their matches.
        contribution: summed contribution (local Shapley value, evidence for the wrong class)
            of the region's cells; ``nan`` for strategies without contributions.
        p_true_after: softmax probability of the true class after this edit (edits applied in
            order, this one included).
        p_pred_after: softmax probability of the originally predicted class after this edit.
    """

    query_cells: tuple[Cell, ...]
    reference_slot: int
    reference_id: tuple[int, ...]
    reference_cells: tuple[Cell, ...]
    similarity: float
    contribution: float
    p_true_after: float
    p_pred_after: float


@dataclass(frozen=True)
class Explanation:
    """The counterfactual explanation of one misclassified query.

    Attributes:
        query_index: position of the query in the batch given to the search.
        true: true class ``y``.
        pred: predicted (wrong) class ``p``.
        success: whether the edits turn the prediction into ``true``.
        final_pred: ``argmax`` of the head after all edits.
        edits: the (minimal) edits, in the order they are applied.
        p_true_before: probability of ``true`` on the unedited query.
        p_pred_before: probability of ``pred`` on the unedited query.
        contributions: ``(H, W)`` float32 CPU tensor, per-cell contribution (evidence for ``pred``
            over ``true``; positive cells support the mistake), or ``None``.
        regions: ``(H, W)`` int64 CPU tensor of region ids ``0..R-1`` in search order (region 0 is
            tried first), or ``None``.
        head_evaluations: number of feature maps passed through the head for this query
            (contributions, search and minimality pass together).
        method: name of the strategy (``"fgvce"`` or ``"greedy"``).
        skipped_reason: why the query was not explained (e.g. non-finite features, empty bank for
            the true class), ``None`` when it was.
    """

    query_index: int
    true: int
    pred: int
    success: bool
    final_pred: int
    edits: tuple[Edit, ...]
    p_true_before: float
    p_pred_before: float
    contributions: Optional[torch.Tensor] = field(default=None, compare=False)
    regions: Optional[torch.Tensor] = field(default=None, compare=False)
    head_evaluations: int = 0
    method: str = "fgvce"
    skipped_reason: Optional[str] = None

    @property
    def skipped(self) -> bool:
        """Whether the query was skipped (see ``skipped_reason``)."""
        return self.skipped_reason is not None

    @property
    def num_edits(self) -> int:
        """Number of region edits in the explanation."""
        return len(self.edits)

    @property
    def edited_cells(self) -> tuple[Cell, ...]:
        """All query cells touched by the edits, in edit order."""
        return tuple(c for e in self.edits for c in e.query_cells)

    @property
    def trajectory_true(self) -> tuple[float, ...]:
        """``p(true)`` before any edit and after each edit (length ``num_edits + 1``)."""
        return (self.p_true_before, *(e.p_true_after for e in self.edits))

    @property
    def trajectory_pred(self) -> tuple[float, ...]:
        """``p(pred)`` before any edit and after each edit (length ``num_edits + 1``)."""
        return (self.p_pred_before, *(e.p_pred_after for e in self.edits))

    @classmethod
    def skipped_query(cls, query_index: int, true: int, pred: int, reason: str,
                      method: str = "fgvce") -> "Explanation":
        """An explanation record for a query that could not be explained."""
        nan = float("nan")
        return cls(query_index=query_index, true=int(true), pred=int(pred), success=False,
                   final_pred=int(pred), edits=(), p_true_before=nan, p_pred_before=nan,
                   method=method, skipped_reason=reason)

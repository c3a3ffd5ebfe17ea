"""Part labels of the cells each counterfactual edit touches.

Given the engine's explanations and per-cell part labels — boolean ``(P, H, W)`` labels from
annotations (:mod:`fgvce_lightning.parts.annotations`) or ``(H, W)`` part-id maps from
:class:`~fgvce_lightning.parts.prototypes.PartPrototypes` — returns, per explanation, the part
names of every edit's query cells and reference cells, plus the query's whole cell-part map. These
fill ``ExplainedSample.edit_parts`` / ``reference_parts`` / ``cell_parts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from ..engine.results import Explanation
from .annotations import cell_part_names, part_ids_to_cell_parts
from .types import BACKGROUND

__all__ = ["PartAssignment", "assign_parts", "as_cell_parts"]

ReferenceLabels = Union[Mapping[tuple, torch.Tensor], Callable[[tuple], Optional[torch.Tensor]]]


@dataclass(frozen=True)
class PartAssignment:
    """Part names for one explanation.

    Attributes:
        edit_parts: per edit, the sorted, deduplicated part names of its query cells; an edit
            none of whose cells carries a part is ``(BACKGROUND,)``, so every edit has a name
            (cells of the background beside a part do not add ``BACKGROUND``: the edit is about
            the part).
        reference_parts: per edit, the part names of its reference cells; ``()`` (length 0, not
            one entry per edit) when the reference labels are unknown for any of its edits.
        cell_parts: ``H×W`` lists of part-name tuples of the query's cells (``None`` for a
            skipped explanation).
        consistent_cells: per edit, how many of its judged cells carry a part in common with
            the reference cell that replaced them; ``()`` when the reference labels are unknown,
            like ``reference_parts``.
        judged_cells: per edit, its cells where the query cell or the reference cell carries a
            part (background replaced by background is left out: it says nothing about parts,
            and counting it would reward edits on the background).
    """

    edit_parts: tuple[tuple[str, ...], ...]
    reference_parts: tuple[tuple[str, ...], ...]
    cell_parts: Optional[list]
    consistent_cells: tuple[int, ...] = ()
    judged_cells: tuple[int, ...] = ()


def as_cell_parts(labels: torch.Tensor, num_parts: int, name: str = "labels") -> torch.Tensor:
    """Normalise labels to boolean ``(..., P, H, W)``.

    Accepts boolean ``(..., P, H, W)`` cell-part labels, or integer ``(..., H, W)`` part-id maps
    (negative = no part), which are one-hot encoded.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(labels).__name__}.")
    if labels.dtype == torch.bool:
        if labels.dim() < 3 or labels.shape[-3] != num_parts:
            raise ValueError(f"Expected boolean `{name}` of shape (..., P={num_parts}, H, W), but got "
                             f"{tuple(labels.shape)}. The number of part names must match P.")
        return labels
    if labels.is_floating_point():
        raise TypeError(f"Expected `{name}` to be bool (..., P, H, W) cell-part labels or integer "
                        f"(..., H, W) part ids, but got dtype {labels.dtype}.")
    return part_ids_to_cell_parts(labels, num_parts)


def _names_at(labels: torch.Tensor, cells: Sequence[tuple[int, int]], names: Sequence[str]) -> tuple[str, ...]:
    """Sorted part names carried by ``cells`` in ``labels`` (P, H, W) bool."""
    if not cells:
        return ()
    idx = torch.as_tensor(cells, dtype=torch.long)
    carried = labels[:, idx[:, 0], idx[:, 1]]                             # (P, cells)
    found = {names[p] for p in carried.any(dim=1).nonzero().flatten().tolist()}
    # an edit that touches the object is named by its parts; one that touches none of them lies
    # on the background and is named so (never left unnamed)
    return tuple(sorted(found)) if found else (BACKGROUND,)


def _consistent(query: torch.Tensor, reference: torch.Tensor, query_cells,
                reference_cells) -> tuple[int, int]:
    """``(consistent, judged)`` cells of an edit: judged where either cell carries a part,
    consistent where both carry one in common."""
    if not query_cells:
        return 0, 0
    q = torch.as_tensor(query_cells, dtype=torch.long)
    r = torch.as_tensor(reference_cells, dtype=torch.long)
    qa = query[:, q[:, 0], q[:, 1]]
    ra = reference[:, r[:, 0], r[:, 1]]
    return int((qa & ra).any(0).sum()), int((qa.any(0) | ra.any(0)).sum())


def _lookup(reference_labels: ReferenceLabels, key: tuple) -> Optional[torch.Tensor]:
    if callable(reference_labels) and not isinstance(reference_labels, Mapping):
        return reference_labels(key)
    return reference_labels.get(tuple(key))


def assign_parts(explanations: Sequence[Explanation], part_names: Sequence[str],
                 query_labels: torch.Tensor,
                 reference_labels: Optional[ReferenceLabels] = None) -> list[PartAssignment]:
    """Part names of the query and reference cells of every edit.

    Args:
        explanations: the engine's explanations (skipped ones get empty assignments).
        part_names: ``P`` part names, by part id.
        query_labels: the queries' labels, indexed by ``Explanation.query_index``: bool
            ``(N, P, H, W)`` or int part ids ``(N, H, W)`` (``-1`` = none).
        reference_labels: the references' labels keyed by ``Edit.reference_id``: a mapping (or a
            callable returning ``None`` when unknown) to bool ``(P, H, W)`` or int ``(H, W)``.

    Returns:
        one :class:`PartAssignment` per explanation, in order.
    """
    names = list(part_names)
    if len(set(names)) != len(names):
        raise ValueError(f"Expected distinct part names, but got {names}.")
    labels = as_cell_parts(query_labels, len(names), "query_labels").detach().cpu()
    if labels.dim() != 4:
        raise ValueError(f"Expected `query_labels` for a batch of queries, (N, P, H, W) or (N, H, W), "
                         f"but got {tuple(query_labels.shape)}.")
    n = labels.shape[0]
    out: list[PartAssignment] = []
    for exp in explanations:
        if exp.skipped:
            out.append(PartAssignment((), (), None))
            continue
        if not 0 <= exp.query_index < n:
            raise ValueError(f"Expected `query_index` in [0, {n}) to index `query_labels`, but got "
                             f"{exp.query_index}. Pass the labels of the same query batch.")
        q = labels[exp.query_index]
        edit_parts = tuple(_names_at(q, e.query_cells, names) for e in exp.edits)
        ref_parts: tuple[tuple[str, ...], ...] = ()
        consistent: tuple[int, ...] = ()
        judged: tuple[int, ...] = ()
        if reference_labels is not None:
            collected, same = [], []
            for e in exp.edits:
                r = _lookup(reference_labels, tuple(e.reference_id))
                if r is None:
                    collected = None
                    break
                r = as_cell_parts(r, len(names), "reference_labels").detach().cpu()
                collected.append(_names_at(r, e.reference_cells, names))
                same.append(_consistent(q, r, e.query_cells, e.reference_cells))
            if collected is not None:
                ref_parts = tuple(collected)
                consistent, judged = tuple(c for c, _ in same), tuple(j for _, j in same)
        out.append(PartAssignment(edit_parts, ref_parts, cell_part_names(q, names), consistent,
                                  judged))
    return out

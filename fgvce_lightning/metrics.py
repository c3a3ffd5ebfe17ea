"""Evaluation metrics for counterfactual explanations.

* :func:`near_part_hit_rate` / :func:`same_part_hit_rate` — the Near-KP / Same-KP metrics of
  Goyal et al. (2019) as computed by Vandenhende et al. (2022, "Making Heads or Tails", reference
  code ``counterfactuals/explainer/eval.py``), generalised from CUB keypoints to any cell-part
  labels (keypoints, masks or discovered prototypes) and to multi-cell edits.
* :func:`deletion_insertion_auc` — cell-level deletion / insertion curves of a contribution
  ranking, in the feature space.
* :func:`edits_to_flip`, :func:`flip_rate`.

Units. The paper's unit is one *cell replacement*: a query cell and the reference cell that
replaces it. An :class:`~fgvce_lightning.engine.results.Edit` of this package swaps a region, i.e.
``len(edit.query_cells)`` replacements (``query_cells[k]`` ← ``reference_cells[k]``); the hit rates
average over all replacements of all explained (non-skipped) queries (the paper's "all edits"
numbers), or over the replacements of each query's first edit with ``first_edit_only=True`` (its
"single edit" numbers when edits are single cells).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .engine._util import Head, check_feature_map, evaluate_head
from .engine.results import Explanation
from .parts.annotations import near_cells
from .parts.assign import ReferenceLabels, _lookup, as_cell_parts

__all__ = ["near_part_hit_rate", "same_part_hit_rate", "deletion_insertion_auc", "edits_to_flip",
           "flip_rate"]


def _query_labels(query_cell_parts: torch.Tensor, num_parts: Optional[int]) -> torch.Tensor:
    if not isinstance(query_cell_parts, torch.Tensor):
        raise TypeError("Expected `query_cell_parts` to be a tensor (N, P, H, W) bool or (N, H, W) "
                        f"part ids, but got {type(query_cell_parts).__name__}.")
    if query_cell_parts.dtype != torch.bool:
        if num_parts is None:
            raise ValueError("Expected `num_parts` when `query_cell_parts` holds integer part ids.")
        query_cell_parts = as_cell_parts(query_cell_parts, num_parts, "query_cell_parts")
    if query_cell_parts.dim() != 4:
        raise ValueError("Expected `query_cell_parts` of shape (N, P, H, W), but got "
                         f"{tuple(query_cell_parts.shape)}.")
    return query_cell_parts.detach().cpu()


def _scored_replacements(explanations: Sequence[Explanation], query_cell_parts: torch.Tensor,
                         num_parts: Optional[int], first_edit_only: bool,
                         distinguishing: Optional[torch.Tensor]):
    """What Near- and Same-part scoring share: the query labels ``(N, P, H, W)``, the
    replacements, their query index and cell ``(R,)`` / ``(R, 2)``, and the distinguishing-part mask
    ``(R, P)`` (or ``None``); ``None`` when there is no replacement to score."""
    labels = _query_labels(query_cell_parts, num_parts)
    n, p = labels.shape[:2]
    rows = _replacements(explanations, first_edit_only, n)
    if not rows:
        return None
    qidx = torch.tensor([r[0] for r in rows])
    qcell = torch.tensor([r[1] for r in rows])
    return labels, rows, qidx, qcell, _distinguishing_mask(distinguishing, qidx, n, p)


def _replacements(explanations: Sequence[Explanation], first_edit_only: bool, n: int):
    """Flatten explanations into replacement index lists: query index, query cell, edit, ref cell."""
    rows = []
    for exp in explanations:
        if exp.skipped:
            continue
        if not 0 <= exp.query_index < n:
            raise ValueError(f"Expected `query_index` in [0, {n}) to index the query labels, but got "
                             f"{exp.query_index}.")
        edits = exp.edits[:1] if first_edit_only else exp.edits
        for edit in edits:
            for q, r in zip(edit.query_cells, edit.reference_cells):
                rows.append((exp.query_index, q, edit, r))
    return rows


def _reference_vectors(rows, reference_cell_parts: ReferenceLabels, num_parts: int) -> torch.Tensor:
    """``(R, P)`` part labels of each replacement's reference cell (reference looked up by id)."""
    cache: dict[tuple, torch.Tensor] = {}
    out = torch.zeros(len(rows), num_parts, dtype=torch.bool)
    for k, (_, _, edit, (ri, rj)) in enumerate(rows):
        key = tuple(edit.reference_id)
        if key not in cache:
            labels = _lookup(reference_cell_parts, key)
            if labels is None:
                raise ValueError(f"Expected part labels for reference {key} in `reference_cell_parts`, "
                                 "but found none. Provide the labels of every reference used, or "
                                 "pass `reference_cell_parts=None` to score query cells only.")
            cache[key] = as_cell_parts(labels, num_parts, "reference_cell_parts").detach().cpu()
        out[k] = cache[key][:, ri, rj]
    return out


def _distinguishing_mask(distinguishing: Optional[torch.Tensor], qidx: torch.Tensor, n: int,
                         num_parts: int) -> Optional[torch.Tensor]:
    if distinguishing is None:
        return None
    if not isinstance(distinguishing, torch.Tensor) or distinguishing.shape != (n, num_parts):
        raise ValueError(f"Expected `distinguishing` to be a bool tensor (N={n}, P={num_parts}) "
                         "marking, per query, the parts that distinguish its true from its predicted "
                         f"class, but got {tuple(getattr(distinguishing, 'shape', ()))}.")
    return distinguishing.bool().cpu()[qidx]


def near_part_hit_rate(explanations: Sequence[Explanation], query_cell_parts: torch.Tensor,
                       reference_cell_parts: Optional[ReferenceLabels] = None, radius: int = 0,
                       distinguishing: Optional[torch.Tensor] = None, first_edit_only: bool = False,
                       num_parts: Optional[int] = None) -> float:
    """Near-part hit rate (Near-KP): how often the replaced cells lie on annotated parts.

    For one replacement (query cell ``u`` ← reference cell ``v``), let ``near(u)`` be 1 when a
    cell within Chebyshev distance ``radius`` of ``u`` carries a part of the query (``radius=0``:
    ``u`` itself, as in the reference evaluation), else 0; ``near(v)`` likewise on the reference.
    The replacement scores ``(near(u) + near(v)) / 2`` when reference labels are given (the
    paper's definition) and ``near(u)`` when not. The result is the mean score over replacements.

    Args:
        explanations: explanations; skipped ones are ignored.
        query_cell_parts: labels of the queries, indexed by ``Explanation.query_index``: bool
            ``(N, P, H, W)`` (visible parts only) or int part ids ``(N, H, W)`` (``num_parts`` needed).
        reference_cell_parts: reference labels keyed by ``Edit.reference_id`` (mapping or callable),
            bool ``(P, H, W)`` or int ``(H, W)``; every reference used must be there.
        radius: neighbourhood radius in cells.
        distinguishing: optional ``(N, P)`` bool: per query, the parts that count (e.g. the
            parts whose attributes differ between its true and predicted class, Goyal et al.'s
            discriminative keypoints); other parts are ignored.
        first_edit_only: score only the replacements of each query's first edit.
        num_parts: ``P`` when labels are integer part ids.

    Returns:
        the hit rate in ``[0, 1]``, ``nan`` when there is no replacement to score.
    """
    scored = _scored_replacements(explanations, query_cell_parts, num_parts, first_edit_only,
                                  distinguishing)
    if scored is None:
        return math.nan
    labels, rows, qidx, qcell, mask = scored
    p = labels.shape[1]
    near_q_maps = near_cells(labels, radius)                          # (N, P, H, W)
    q_vec = near_q_maps[qidx, :, qcell[:, 0], qcell[:, 1]]             # (R, P)
    if mask is not None:
        q_vec = q_vec & mask
    score = q_vec.any(dim=1).double()
    if reference_cell_parts is not None:
        if radius > 0:
            # Dilate the references' maps once each; _reference_vectors reads the dilated labels.
            dilated: dict[tuple, torch.Tensor] = {}

            def near_ref(key: tuple) -> Optional[torch.Tensor]:
                if key not in dilated:
                    raw = _lookup(reference_cell_parts, key)
                    dilated[key] = None if raw is None else near_cells(
                        as_cell_parts(raw, p, "reference_cell_parts"), radius)
                return dilated[key]
            r_vec = _reference_vectors(rows, near_ref, p)
        else:
            r_vec = _reference_vectors(rows, reference_cell_parts, p)
        if mask is not None:
            r_vec = r_vec & mask
        score = 0.5 * (score + r_vec.any(dim=1).double())
    return float(score.mean())


def same_part_hit_rate(explanations: Sequence[Explanation], query_cell_parts: torch.Tensor,
                       reference_cell_parts: ReferenceLabels,
                       distinguishing: Optional[torch.Tensor] = None, first_edit_only: bool = False,
                       num_parts: Optional[int] = None) -> float:
    """Same-part hit rate (Same-KP): how often a cell is replaced by a cell of the same part.

    A replacement (query cell ``u`` ← reference cell ``v``) is a hit when some part ``p`` is
    carried both by ``u`` in the query and by ``v`` in the reference. Replacements where neither
    cell carries a part are misses (as in the reference evaluation). The result is the share of
    hits over all replacements. Arguments as in :func:`near_part_hit_rate`.

    Returns:
        the hit rate in ``[0, 1]``, ``nan`` when there is no replacement to score.
    """
    if reference_cell_parts is None:
        raise ValueError("Expected `reference_cell_parts` (labels of the references, keyed by "
                         "`Edit.reference_id`): Same-part compares query and reference cells.")
    scored = _scored_replacements(explanations, query_cell_parts, num_parts, first_edit_only,
                                  distinguishing)
    if scored is None:
        return math.nan
    labels, rows, qidx, qcell, mask = scored
    hit = labels[qidx, :, qcell[:, 0], qcell[:, 1]] & _reference_vectors(rows, reference_cell_parts,
                                                                         labels.shape[1])
    if mask is not None:
        hit = hit & mask
    return float(hit.any(dim=1).double().mean())


def _trapezoid(curve: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Area under ``curve`` (N, T+1) over abscissae ``x`` (T+1,) in [0, 1]."""
    dx = x[1:] - x[:-1]
    return ((curve[:, 1:] + curve[:, :-1]) * 0.5 * dx).sum(dim=1)


@torch.no_grad()
def deletion_insertion_auc(head: Head, query: torch.Tensor, absent: torch.Tensor,
                           contributions: torch.Tensor, true: torch.Tensor, pred: torch.Tensor,
                           steps: Optional[int] = None, chunk_size: int = 1024
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-level deletion and insertion AUC of a contribution ranking, tracking ``p(pred)``.

    Cells are ranked by decreasing contribution (evidence for the mistake). *Deletion*: starting
    from the query, replace the top-ranked cells by ``absent`` (e.g. their best-matching reference
    cells), ``p(pred)`` after each step; a good ranking makes it fall fast (low AUC is better).
    *Insertion*: starting from all cells absent, put the query cells back in the same order; a good
    ranking makes ``p(pred)`` rise fast (high AUC is better). Step ``s`` of ``T`` has the top
    ``round(s·HW/T)`` cells changed; the area is the trapezoid rule over the changed fraction
    ``[0, 1]``, so both AUCs are in ``[0, 1]``. All ``(T+1)`` maps of all queries are evaluated in
    chunked batched head calls. ``true`` is only validated (kept for symmetry with the engine).

    Args:
        head: the classifier head.
        query: ``(N, C, H, W)`` query feature maps.
        absent: ``(N, C, H, W)`` what each cell becomes when removed.
        contributions: ``(N, H, W)`` per-cell contributions (higher = removed first).
        true: ``(N,)`` true classes.
        pred: ``(N,)`` predicted classes (whose probability is tracked).
        steps: number of steps ``T`` (``None`` = one cell per step, ``T = H·W``).
        chunk_size: most feature maps per head call.

    Returns:
        ``(deletion_auc, insertion_auc)``, each ``(N,)`` float32 on the CPU.
    """
    query = check_feature_map(query, "query")
    if absent.shape != query.shape:
        raise ValueError(f"Expected `absent` of shape {tuple(query.shape)} (as `query`), but got "
                         f"{tuple(absent.shape)}.")
    n, c, gh, gw = query.shape
    if contributions.shape != (n, gh, gw):
        raise ValueError(f"Expected `contributions` of shape ({n}, {gh}, {gw}), but got "
                         f"{tuple(contributions.shape)}.")
    if true.shape != (n,) or pred.shape != (n,):
        raise ValueError(f"Expected `true` and `pred` of shape ({n},), but got {tuple(true.shape)} "
                         f"and {tuple(pred.shape)}.")
    cells = gh * gw
    steps = cells if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected `steps` to be a positive integer or None, but got {steps!r}.")
    device = query.device
    order = contributions.to(device).reshape(n, cells).float().argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(cells, device=device).expand(n, -1))
    changed = torch.round(torch.arange(steps + 1, device=device) * cells / steps).long()   # (T+1,)
    x = changed.float() / cells
    pred = pred.to(device).long()
    total = n * (steps + 1)
    curves = {}
    for mode in ("deletion", "insertion"):
        probs = []
        for start in range(0, total, chunk_size):
            flat = torch.arange(start, min(start + chunk_size, total), device=device)
            qi, si = flat // (steps + 1), flat % (steps + 1)
            mask = (rank[qi] < changed[si, None]).view(-1, 1, gh, gw)   # cells changed at this step
            if mode == "deletion":
                maps = torch.where(mask, absent[qi], query[qi])
            else:
                maps = torch.where(mask, query[qi], absent[qi])
            logits = evaluate_head(head, maps, chunk_size=chunk_size)
            probs.append(logits.softmax(dim=1).gather(1, pred[qi, None]).squeeze(1))
        curves[mode] = torch.cat(probs).view(n, steps + 1)
    return (_trapezoid(curves["deletion"], x).float().cpu(),
            _trapezoid(curves["insertion"], x).float().cpu())


def edits_to_flip(explanations: Sequence[Explanation], unit: str = "edits") -> float:
    """Mean number of edits (or edited cells, ``unit="cells"``) of the explanations that flip the
    prediction to the true class; ``nan`` when none does."""
    if unit not in ("edits", "cells"):
        raise ValueError(f"Expected `unit` to be 'edits' or 'cells', but got {unit!r}.")
    sizes = [e.num_edits if unit == "edits" else len(e.edited_cells)
             for e in explanations if not e.skipped and e.success]
    return sum(sizes) / len(sizes) if sizes else math.nan


def flip_rate(explanations: Sequence[Explanation]) -> float:
    """Share of explained (non-skipped) queries whose edits flip the prediction to the true class;
    ``nan`` when none was explained."""
    done = [e for e in explanations if not e.skipped]
    return sum(e.success for e in done) / len(done) if done else math.nan

"""After the search: the minimality pass, the cell-level trim and the replay of the trajectory.

All three work on the flipped queries of a batch at once: every variant (an edit reverted, a cell
restored, a prefix of the ranked cells) of every query goes into one chunked head call per pass
iteration.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ._util import Head
from .config import SearchConfig
from .queries import QueryBatch, evaluate_variants

__all__ = ["region_nonempty", "trim_pass", "minimality_pass", "replay"]

Edited = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``edited(queries (A,), cell_mask (A, H*W)) -> (A, C, H, W)``: the queries with those cells swapped."""


def region_nonempty(cell_keep: torch.Tensor, regions: torch.Tensor, r_max: int) -> torch.Tensor:
    """``(M, R)`` bool: whether region ``r`` still has a kept cell."""
    out = torch.zeros(regions.shape[0], r_max, dtype=torch.long, device=regions.device)
    out.scatter_add_(1, regions, cell_keep.long())
    return out > 0


def trim_pass(head: Head, b: QueryBatch, config: SearchConfig, kept: torch.Tensor,
              success: torch.Tensor, regions: torch.Tensor, edited: Edited,
              scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-level refinement of the flipped queries' edits (one batched head call).

    The edited cells of every flipped query are ranked by ``scores`` ``(M, HW)`` (the
    contributions: most evidence for the mistake first) and every proper prefix of that ranking
    is evaluated; the shortest that still predicts ``true`` is kept (all cells when none does).
    Ranking by the saliency partition's own scores keeps the cells that carry the evidence; a
    ranking by the margin lost when each cell alone is restored (measured in the README's Parts
    section) kept a neighbouring cell instead more often: through the receptive field it moves
    the margin as much, but it lies off the part.

    Returns ``cell_keep`` ``(M, HW)`` bool (the edited cells to keep; for queries that are not
    trimmed, all cells of their kept regions) and which queries lost cells ``(M,)``.
    """
    m, hw = regions.shape
    device = regions.device
    cells = kept.gather(1, regions)                                       # (M, HW) edited cells
    n_cells = cells.sum(1)
    trimmed = torch.zeros(m, dtype=torch.bool, device=device)
    open_ = success & (n_cells >= 2)
    if not bool(open_.any()):
        return cells, trimmed
    restored = torch.where(cells, -scores.float(), torch.full_like(scores, float("inf"),
                                                                   dtype=torch.float32))
    order = restored.argsort(dim=1, stable=True)   # most evidence first; unedited cells last
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(hw, device=device).expand(m, hw))
    # 2. every proper prefix (1 .. n - 1 cells) of every open query
    rows = open_.nonzero().squeeze(1)
    sizes = n_cells[rows] - 1                                             # prefixes per query
    pq = rows.repeat_interleave(sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    k = torch.arange(pq.numel(), device=device) - starts.repeat_interleave(sizes) + 1
    prefix = rank[pq] < k[:, None]
    _, _, am, _ = evaluate_variants(head, edited(pq, prefix), b.true[pq], b.pred[pq], config,
                            b.num_classes)
    b.evals += torch.bincount(pq, minlength=m)
    shortest = n_cells.clone()
    flipped = am == b.true[pq]
    shortest.scatter_reduce_(0, pq[flipped], k[flipped], reduce="amin")
    trimmed = shortest < n_cells
    cell_keep = cells & ((rank < shortest[:, None]) | ~open_[:, None])
    return cell_keep, trimmed


def minimality_pass(head: Head, b: QueryBatch, config: SearchConfig, kept: torch.Tensor,
                     success: torch.Tensor, regions: torch.Tensor, edited: Edited,
                     cell_keep: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeatedly drop the kept edit whose single revert keeps the flip with the largest margin.

    All single-revert variants of all successful queries are evaluated in one batched call per
    iteration; an edit applies only its cells in ``cell_keep`` ``(M, HW)`` when given. Returns
    the new ``kept`` mask ``(M, R)`` and which queries changed ``(M,)``.
    """
    m, r_max = kept.shape
    kept = kept.clone()
    changed = torch.zeros(m, dtype=torch.bool, device=kept.device)
    open_ = success & (kept.sum(1) >= 2)
    while bool(open_.any()):
        q, r = (kept & open_[:, None]).nonzero(as_tuple=True)            # one variant per edit
        variant = kept[q].clone()
        variant[torch.arange(q.numel(), device=q.device), r] = False
        cell_mask = variant.gather(1, regions[q])
        if cell_keep is not None:
            cell_mask = cell_mask & cell_keep[q]
        _, _, am, tm = evaluate_variants(head, edited(q, cell_mask), b.true[q], b.pred[q], config,
                                b.num_classes)
        b.evals += torch.bincount(q, minlength=m)
        score = torch.full((m, r_max), float("-inf"), device=kept.device)
        score[q, r] = torch.where(am == b.true[q], tm, torch.full_like(tm, float("-inf")))
        best = score.max(1)
        drop = best.values > float("-inf")
        kept[drop.nonzero().squeeze(1), best.indices[drop]] = False
        changed |= drop
        open_ = drop & (kept.sum(1) >= 2)
    return kept, changed


def replay(head: Head, b: QueryBatch, config: SearchConfig, kept: torch.Tensor,
            changed: torch.Tensor, regions: torch.Tensor, edited: Edited, traj_t: torch.Tensor,
            traj_p: torch.Tensor, final: torch.Tensor, cell_keep: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute the trajectory of the kept edits (in order) for the queries that changed; an
    edit applies only its cells in ``cell_keep`` ``(M, HW)`` when given."""
    traj_t, traj_p, final = traj_t.clone(), traj_p.clone(), final.clone()
    traj_t[changed] = float("nan")
    traj_p[changed] = float("nan")
    order = torch.cumsum(kept.long(), 1) - 1                              # rank among kept
    order = torch.where(kept, order, torch.full_like(order, kept.shape[1]))
    cell_rank = order.gather(1, regions)                                  # (M, HW)
    if cell_keep is not None:
        cell_rank = cell_rank.masked_fill(~cell_keep, kept.shape[1])
    num_kept = kept.sum(1)
    for s in range(int(num_kept[changed].max())):
        idx = (changed & (num_kept > s)).nonzero().squeeze(1)
        pt, pp, am, _ = evaluate_variants(head, edited(idx, cell_rank[idx] <= s), b.true[idx],
                                  b.pred[idx], config, b.num_classes)
        traj_t[idx, s], traj_p[idx, s], final[idx] = pt, pp, am
        b.evals[idx] += 1
    return traj_t, traj_p, final

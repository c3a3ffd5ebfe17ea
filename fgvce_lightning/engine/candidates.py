"""Reference candidate cells and cosine matching (FG-VCE steps 2 and 4).

The reference cells that may replace query cells are the ones carrying the most evidence for the
true class ``y`` over the predicted class ``p``. Evidence is gradient × input of
``s = logit_y - logit_p`` at the reference map (the exact per-cell contribution for a GAP + linear
head). Query cells are matched to candidates by cosine similarity of their feature vectors.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._util import Head

__all__ = [
    "reference_cell_scores",
    "select_candidates",
    "match_cells",
    "assign_region_references",
    "region_reference_scores",
    "gradcam_scores",
    "margin_gradient",
    "rigid_region_scores",
    "cell_similarity",
]


def reference_cell_scores(head: Head, references: torch.Tensor, valid: torch.Tensor,
                          true: torch.Tensor, pred: torch.Tensor, *, chunk_size: int = 1024,
                          channels: Optional[int] = None) -> Optional[torch.Tensor]:
    """Evidence of every reference cell for ``true`` over ``pred``: gradient × input of ``s``.

    Gradients are taken with :func:`torch.autograd.grad` with respect to a clone of the input only
    (parameters' ``.grad`` are never touched), with autograd re-enabled even inside
    ``torch.inference_mode()`` / ``torch.no_grad()`` (Lightning validates under inference mode).

    Args:
        head: maps ``(B, C, H, W)`` to logits ``(B, num_classes)``.
        references: ``(N, K, C, H, W)`` reference maps per query.
        valid: ``(N, K)`` bool, which references exist.
        true: ``(N,)`` true classes.
        pred: ``(N,)`` predicted classes.
        chunk_size: most reference maps per head call.
        channels: only the first ``channels`` channels count (``None``: all), e.g. to leave out
            a transformer's class-token channels.

    Returns:
        ``(N, K, H, W)`` float32 scores (0 where not valid), or ``None`` when the head is not
        differentiable (autograd fails, or gives non-finite or all-zero gradients).
    """
    n, k, c, h, w = references.shape
    device = references.device
    scores = torch.zeros(n, k, h, w, dtype=torch.float32, device=device)
    if n == 0:
        return scores
    # Queries with the same (true, pred) pair share their references (the bank's class `true`) and
    # their scores: compute each pair once.
    pairs = true.long() * (int(pred.max()) + 1) + pred.long()
    _, first = _first_occurrence(pairs)
    uniq = first.unique()
    sub = _scores_once(head, references[uniq], valid[uniq], true[uniq], pred[uniq],
                       chunk_size=chunk_size, channels=channels)
    if sub is None:
        return None
    inverse = torch.searchsorted(uniq, first)
    return sub[inverse]


def _first_occurrence(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every element, the index of the first element with the same key."""
    n = keys.numel()
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    starts = torch.ones(n, dtype=torch.bool, device=keys.device)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group = torch.cumsum(starts.long(), 0) - 1
    first_in_group = order[starts]
    first = torch.empty(n, dtype=torch.long, device=keys.device)
    first[order] = first_in_group[group]
    return group, first


def _scores_once(head: Head, references: torch.Tensor, valid: torch.Tensor, true: torch.Tensor,
                 pred: torch.Tensor, *, chunk_size: int, channels: Optional[int]
                 ) -> Optional[torch.Tensor]:
    n, k, c, h, w = references.shape
    device = references.device
    q_idx, k_idx = valid.nonzero(as_tuple=True)
    scores = torch.zeros(n, k, h, w, dtype=torch.float32, device=device)
    if q_idx.numel() == 0:
        return scores
    chunks = []
    with torch.inference_mode(False), torch.enable_grad():
        # tensors made under inference mode can't be saved for backward: work on clones
        true, pred = true.clone(), pred.clone()
        for start in range(0, q_idx.numel(), chunk_size):
            qi, ki = q_idx[start:start + chunk_size], k_idx[start:start + chunk_size]
            x = references[qi, ki].float().clone().requires_grad_(True)
            logits = head(x)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                return None
            s = logits.gather(1, true[qi, None]) - logits.gather(1, pred[qi, None])
            try:
                (grad,) = torch.autograd.grad(s.sum(), (x,))
            except RuntimeError:  # not differentiable (e.g. the head detaches its output)
                return None
            chunks.append((grad.detach() * x.detach())[:, :channels].sum(1).float())
    flat = torch.cat(chunks)
    if not bool(torch.isfinite(flat).all()) or not bool((flat != 0).any()):
        return None
    scores[q_idx, k_idx] = flat
    return scores


def select_candidates(scores: Optional[torch.Tensor], valid: torch.Tensor, fraction: float,
                      grid: tuple[int, int]) -> torch.Tensor:
    """Keep the top ``fraction`` of each query's reference cells (over all its references).

    Args:
        scores: ``(N, K, H, W)`` evidence per reference cell, or ``None`` to keep every cell.
        valid: ``(N, K)`` bool.
        fraction: in ``(0, 1]``; at least one cell is kept per query with a reference.
        grid: ``(H, W)``.

    Returns:
        ``(N, K, H*W)`` bool candidate mask (never set on invalid references).
    """
    n, k = valid.shape
    hw = grid[0] * grid[1]
    cell_valid = valid[:, :, None].expand(n, k, hw)
    if scores is None or fraction >= 1.0:
        return cell_valid.clone()
    flat = scores.reshape(n, k * hw).masked_fill(~cell_valid.reshape(n, k * hw), -math.inf)
    keep = torch.ceil(valid.sum(1).float() * hw * fraction).long().clamp(min=1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranked = torch.arange(k * hw, device=valid.device)[None, :] < keep[:, None]
    cand = torch.zeros(n, k * hw, dtype=torch.bool, device=valid.device)
    cand.scatter_(1, order, ranked)
    return cand.view(n, k, hw) & cell_valid


def cell_similarity(query: torch.Tensor, references: torch.Tensor, *, normalized: bool = False
                    ) -> torch.Tensor:
    """Cosine similarity of every query cell with every cell of each of its references.

    Args:
        query: ``(N, C, H, W)``.
        references: ``(N, K, C, H, W)``.
        normalized: the cell vectors already have unit norm along the channels.

    Returns:
        ``(N, H*W, K, H*W)`` float32: ``[n, u, k, v]`` = cos(query cell ``u``, reference ``k`` cell ``v``).
    """
    n, k, c, h, w = references.shape
    hw = h * w
    qn = query.float().reshape(n, c, hw)                                       # (N, C, HW)
    rn = references.float().reshape(n, k, c, hw)                               # (N, K, C, HW)
    if not normalized:
        qn, rn = F.normalize(qn, dim=1), F.normalize(rn, dim=2)
    rn = rn.permute(0, 2, 1, 3).reshape(n, c, k * hw)
    return torch.bmm(qn.transpose(1, 2), rn).view(n, hw, k, hw)


def match_cells(query: torch.Tensor, references: torch.Tensor, candidates: torch.Tensor,
                max_offset: Optional[int] = None, *, normalized: bool = False,
                similarity: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match of every query cell among each reference's candidate cells.

    Args:
        query: ``(N, C, H, W)``.
        references: ``(N, K, C, H, W)``.
        candidates: ``(N, K, H*W)`` bool.
        max_offset: when given, a query cell only matches reference cells at most this many rows
            and columns away (a spatial prior for roughly aligned objects); a cell with no
            candidate in reach may take any reference cell in reach.
        normalized: the cell vectors of ``query`` and ``references`` already have unit norm
            along the channels (skips normalising them again).
        similarity: the :func:`cell_similarity` of ``query`` and ``references`` when already
            computed (it is not modified).

    Returns:
        ``best_sim`` ``(N, H*W, K)`` float32 (``-inf`` for a reference without candidates) and
        ``best_cell`` ``(N, H*W, K)`` int64 index of the matched reference cell.
    """
    n, k, c, h, w = references.shape
    hw = h * w
    if similarity is None:
        similarity = cell_similarity(query, references, normalized=normalized)
    allowed = candidates[:, None]                                             # (N, 1, K, HW)
    if max_offset is not None:
        rows = torch.arange(hw, device=query.device) // w
        cols = torch.arange(hw, device=query.device) % w
        near = (((rows[:, None] - rows[None]).abs() <= max_offset)
                & ((cols[:, None] - cols[None]).abs() <= max_offset))[None, :, None, :]
        allowed = allowed & near                                              # (N, HW, K, HW)
        stranded = ~allowed.flatten(2).any(2)                                 # (N, HW)
        usable = candidates.any(2)[:, None, :, None]                          # refs with candidates
        allowed = allowed | (stranded[:, :, None, None] & near & usable)
    best_sim, best_cell = similarity.masked_fill(~allowed, -math.inf).max(dim=3)
    return best_sim, best_cell


def assign_region_references(best_sim: torch.Tensor, best_cell: torch.Tensor,
                             regions: torch.Tensor, num_regions: int,
                             scores: Optional[torch.Tensor] = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose one reference per region and the matched reference cell of every query cell.

    The reference of region ``r`` maximises the summed best-match similarity over the region's
    cells; each cell then takes its best candidate cell within that reference.

    Args:
        best_sim: ``(N, HW, K)`` from :func:`match_cells`.
        best_cell: ``(N, HW, K)`` from :func:`match_cells`.
        regions: ``(N, HW)`` int64 region id of every cell.
        num_regions: upper bound on region ids (``regions.max() + 1``).

    Returns:
        ``region_ref`` ``(N, R)`` chosen reference per region, and per cell ``cell_ref`` ``(N, HW)``,
        ``cell_match`` ``(N, HW)`` (reference cell index) and ``cell_sim`` ``(N, HW)``.
    """
    if scores is None:
        scores = region_reference_scores(best_sim, regions, num_regions)
    region_ref = scores.argmax(dim=2)                                         # (N, R)
    cell_ref = region_ref.gather(1, regions)                                  # (N, HW)
    cell_match = best_cell.gather(2, cell_ref[:, :, None]).squeeze(2)
    cell_sim = best_sim.gather(2, cell_ref[:, :, None]).squeeze(2)
    return region_ref, cell_ref, cell_match, cell_sim


def region_reference_scores(best_sim: torch.Tensor, regions: torch.Tensor, num_regions: int
                            ) -> torch.Tensor:
    """Summed best-match similarity of every region's cells to every reference.

    Args:
        best_sim: ``(N, HW, K)`` from :func:`match_cells` (``-inf`` for unusable references).
        regions: ``(N, HW)`` int64 region ids.
        num_regions: upper bound on region ids.

    Returns:
        ``(N, R, K)`` float32 (``-inf`` where the reference is unusable).
    """
    n, hw, k = best_sim.shape
    totals = torch.zeros(n, num_regions, k, dtype=best_sim.dtype, device=best_sim.device)
    totals.scatter_add_(1, regions[:, :, None].expand(n, hw, k), best_sim)
    return totals


def gradcam_scores(head: Head, query: torch.Tensor, true: torch.Tensor, pred: torch.Tensor, *,
                   chunk_size: int = 1024, channels: Optional[int] = None) -> torch.Tensor:
    """Grad-CAM of the mistake at the feature map: ``ReLU(sum_c mean_hw(∂s/∂F_c) · F_c)``.

    ``s = logit_pred - logit_true``; used to rank regions for the Grad-CAM-ordered baseline.

    Args:
        head: the classifier head.
        query: ``(N, C, H, W)`` feature maps.
        true: ``(N,)`` true classes.
        pred: ``(N,)`` predicted classes.
        chunk_size: most maps per head call.
        channels: only the first ``channels`` channels count (``None``: all).

    Returns:
        ``(N, H, W)`` float32 (zeros where the head is not differentiable).
    """
    grad = margin_gradient(head, query, true, pred, chunk_size=chunk_size)
    if grad is None:
        return torch.zeros(query.shape[0], *query.shape[2:], device=query.device)
    # Grad-CAM explains the mistake: the gradient of logit_pred - logit_true, i.e. -grad
    weights = -grad[:, :channels].mean((2, 3), keepdim=True)
    return torch.relu((weights * query.detach().float()[:, :channels]).sum(1)).float()


def margin_gradient(head: Head, x: torch.Tensor, true: torch.Tensor, pred: torch.Tensor, *,
                    chunk_size: int = 1024) -> Optional[torch.Tensor]:
    """Gradient of ``logit_true - logit_pred`` with respect to the feature maps ``x (N, C, H, W)``.

    Taken in chunks of ``chunk_size`` maps with :func:`torch.autograd.grad` on a float32 clone of
    the input (parameters' ``.grad`` untouched), with autograd re-enabled even under
    ``torch.inference_mode()``.

    Returns:
        ``(N, C, H, W)`` float32, or ``None`` when the head is not differentiable.
    """
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        true, pred = true.clone(), pred.clone()
        for start in range(0, x.shape[0], chunk_size):
            xi = x[start:start + chunk_size].float().clone().requires_grad_(True)
            t, p = true[start:start + chunk_size], pred[start:start + chunk_size]
            logits = head(xi)
            s = logits.gather(1, t[:, None]) - logits.gather(1, p[:, None])
            try:
                (g,) = torch.autograd.grad(s.sum(), (xi,))
            except RuntimeError:  # not differentiable (e.g. the head detaches its output)
                return None
            out.append(g.detach().float())
    return torch.cat(out) if out else torch.zeros_like(x, dtype=torch.float32)


def rigid_region_scores(query: torch.Tensor, references: torch.Tensor, valid: torch.Tensor,
                        regions: torch.Tensor, num_regions: int, max_shift: Optional[int], *,
                        normalized: bool = False, similarity: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every region against every reference region of the same shape, shifted rigidly.

    Cell-wise cosine matching may map several query cells to one reference cell and scramble the
    part's layout, which a spatial head notices. A rigid match copies the reference's cells at
    ``(row + dy, col + dx)`` for all the region's cells together, so the part keeps its shape.

    Args:
        query: ``(N, C, H, W)`` (only the channels to match).
        references: ``(N, K, C, H, W)`` (same channels).
        valid: ``(N, K)`` bool.
        regions: ``(N, HW)`` int64 region ids.
        num_regions: upper bound on region ids.
        max_shift: largest ``|dy|`` and ``|dx|`` (``None``: any shift that fits the grid).
        normalized: the cell vectors already have unit norm along the channels.
        similarity: the :func:`cell_similarity` of ``query`` and ``references`` when already
            computed.

    Returns:
        ``scores`` ``(N, R, K * O)`` summed cosine similarity of region ``r`` with reference ``k``
        shifted by offset ``o`` (index ``k * O + o``; ``-inf`` when a cell leaves the grid or the
        reference is missing), ``source`` ``(O, HW)`` the reference cell copied into each query
        cell under offset ``o`` (clamped; only meaningful where the score is finite), and
        ``cell_sim`` ``(N, O, K, HW)`` the per-cell cosine similarities.
    """
    n, k, c, h, w = references.shape
    hw, device = h * w, query.device
    reach_h = h - 1 if max_shift is None else min(max_shift, h - 1)
    reach_w = w - 1 if max_shift is None else min(max_shift, w - 1)
    dy, dx = torch.meshgrid(torch.arange(-reach_h, reach_h + 1, device=device),
                            torch.arange(-reach_w, reach_w + 1, device=device), indexing="ij")
    dy, dx = dy.reshape(-1), dx.reshape(-1)                                   # (O,)
    rows = torch.arange(hw, device=device) // w
    cols = torch.arange(hw, device=device) % w
    tr, tc = rows[None] + dy[:, None], cols[None] + dx[:, None]               # (O, HW)
    inside = (tr >= 0) & (tr < h) & (tc >= 0) & (tc < w)
    source = tr.clamp(0, h - 1) * w + tc.clamp(0, w - 1)                      # (O, HW)
    if similarity is None:
        similarity = cell_similarity(query, references, normalized=normalized)  # (N,HW,K,HW)
    o = dy.numel()
    idx = source.T[None, :, None, :].expand(n, hw, k, o)                      # [n,u,k,o]=src
    cell_sim = similarity.gather(3, idx).permute(0, 3, 2, 1)                  # (N, O, K, HW)
    bad = ~inside[None, :, None, :] | ~valid[:, None, :, None]
    cell_sim = cell_sim.masked_fill(bad, -math.inf)
    totals = torch.zeros(n, o, k, num_regions, device=device)
    totals.scatter_add_(3, regions[:, None, None, :].expand(n, o, k, hw), cell_sim)
    scores = totals.permute(0, 3, 2, 1).reshape(n, num_regions, k * o)        # index k * O + o
    return scores, source, cell_sim

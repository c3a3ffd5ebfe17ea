"""Saliency partition: split a contribution map into disjoint, connected regions.

Regions are grown one after the other from the strongest cell not yet assigned (best-first, like
Prim's algorithm): a region repeatedly takes its strongest unassigned neighbour whose contribution
qualifies, until no neighbour qualifies or the region reaches ``max_region_size``. So the size of
a region follows the map (a large uniform blob gives a large region, an isolated peak a single
cell) instead of one fixed kernel.

A neighbour qualifies when its contribution is at least ``threshold × s`` for a positive seed value
``s`` (cells of comparable strength), and at least ``s / threshold`` for a non-positive seed (cells
at most ``1 / threshold`` times as negative; zero-contribution cells group together).

Every query of the batch is processed in lock-step: the loops run over regions and growth steps
(both bounded by the number of cells), never over cells or queries; a region's neighbours come
from one product with the grid's adjacency matrix.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["grow_regions", "default_max_region_size"]


def default_max_region_size(height: int, width: int) -> int:
    """Default cap on a region's size: ``ceil(H · W / 8)`` cells (7 on a 7×7 grid), at least 1."""
    return max(1, math.ceil(height * width / 8))


def _adjacency(h: int, w: int, connectivity: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """``(H·W, H·W)`` 0/1 matrix: ``[u, v] = 1`` when cells ``u`` and ``v`` are neighbours."""
    cells = torch.arange(h * w, device=device)
    di = (cells // w)[:, None] - (cells // w)[None]
    dj = (cells % w)[:, None] - (cells % w)[None]
    near = (di.abs() + dj.abs() == 1) if connectivity == 4 else \
        ((di.abs() <= 1) & (dj.abs() <= 1) & (cells[:, None] != cells[None]))
    return near.to(dtype)


def grow_regions(contributions: torch.Tensor, *, max_region_size: Optional[int] = None,
                 threshold: float = 0.5, connectivity: int = 4) -> torch.Tensor:
    """Partition each contribution map into disjoint connected regions, strongest first.

    Args:
        contributions: ``(N, H, W)`` per-cell contributions (positive = supports the mistake).
        max_region_size: most cells per region (default :func:`default_max_region_size`).
        threshold: in ``[0, 1]``; a neighbour joins a region grown from seed value ``s > 0`` when
            its contribution is ``>= threshold · s``, and one grown from ``s <= 0`` when it is
            ``>= s / threshold`` (any value when ``threshold == 0``).
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).

    Returns:
        ``(N, H, W)`` int64 region ids ``0 .. R_n - 1`` (dense per query). Every region is
        connected; region 0 has the largest total positive contribution (ties: larger total
        contribution, then earlier grown). Seeds and growth break ties by the lower row-major
        cell index, so the result is deterministic.

    Raises:
        TypeError, ValueError: for a non-tensor, a tensor that is not ``(N, H, W)`` floating point
            and finite, or invalid parameters.
    """
    if not isinstance(contributions, torch.Tensor):
        raise TypeError(f"Expected `contributions` to be a torch.Tensor of shape (N, H, W), but got "
                        f"{type(contributions).__name__}.")
    if contributions.dim() != 3:
        raise ValueError(f"Expected `contributions` to have shape (N, H, W), but got "
                         f"{tuple(contributions.shape)}. Add a batch dimension for a single map.")
    if not torch.isfinite(contributions).all():
        raise ValueError("Expected `contributions` to be finite, but it contains NaN or inf. Skip "
                         "queries with non-finite features before partitioning.")
    if connectivity not in (4, 8):
        raise ValueError(f"Expected `connectivity` to be 4 or 8, but got {connectivity!r}.")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"Expected `threshold` to be in [0, 1], but got {threshold!r}.")
    n, h, w = contributions.shape
    if max_region_size is None:
        max_region_size = default_max_region_size(h, w)
    if isinstance(max_region_size, bool) or not isinstance(max_region_size, int) \
            or max_region_size < 1:
        raise ValueError(f"Expected `max_region_size` to be a positive integer or None, but got "
                         f"{max_region_size!r}.")
    device = contributions.device
    values = contributions.detach().double()
    flat = values.view(n, h * w)
    regions = torch.full((n, h, w), -1, dtype=torch.long, device=device)
    if n == 0 or h * w == 0:
        return regions
    neg_inf = torch.tensor(float("-inf"), dtype=values.dtype, device=device)
    # neighbourhoods as one matrix product per growth step (a member-count per cell), not as
    # shifted masks: a handful of tensor ops per step for the whole batch
    adjacency = _adjacency(h, w, connectivity, device, torch.float32)    # (H·W)² · 4 bytes
    cells = torch.arange(h * w, device=device)
    regions = regions.view(n, h * w)
    region = 0
    while True:
        free = regions < 0                                            # (N, HW)
        active = free.any(dim=1)                                      # queries still partitioning
        if not bool(active.any()):
            break
        # seed: strongest free cell (argmax returns the first maximum: lowest index on ties)
        seed_idx = torch.where(free, flat, neg_inf).argmax(dim=1)
        seed_val = flat.gather(1, seed_idx[:, None]).squeeze(1)
        lower = torch.where(seed_val > 0, seed_val * threshold,
                            seed_val / threshold if threshold > 0 else neg_inf.expand(n))
        qualifies = free & (flat >= lower[:, None]) & active[:, None]
        member = (cells[None] == seed_idx[:, None]) & active[:, None]
        for _ in range(max_region_size - 1):
            frontier = ((member.float() @ adjacency) > 0) & qualifies & ~member
            grow = frontier.any(dim=1)                                # size < max by the loop
            if not bool(grow.any()):
                break
            best = torch.where(frontier, flat, neg_inf).argmax(dim=1)
            member = member | ((cells[None] == best[:, None]) & grow[:, None])
        regions[member] = region
        region += 1
    regions = regions.view(n, h, w)

    # order: total positive contribution desc, then total desc, then creation order (stable sorts)
    num = region
    ids = regions.view(n, -1)
    pos_total = torch.zeros(n, num, dtype=values.dtype, device=device)
    pos_total.scatter_add_(1, ids, flat.clamp(min=0))
    total = torch.zeros(n, num, dtype=values.dtype, device=device)
    total.scatter_add_(1, ids, flat)
    exists = torch.zeros(n, num, dtype=torch.bool, device=device)
    exists.scatter_(1, ids, True)
    pos_total = torch.where(exists, pos_total, neg_inf)  # missing regions sort last
    total = torch.where(exists, total, neg_inf)
    order = torch.arange(num, device=device).expand(n, num)
    order = order.gather(1, total.gather(1, order).argsort(dim=1, descending=True, stable=True))
    order = order.gather(1, pos_total.gather(1, order).argsort(dim=1, descending=True,
                                                                 stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num, device=device).expand(n, num))
    return rank.gather(1, ids).view(n, h, w)

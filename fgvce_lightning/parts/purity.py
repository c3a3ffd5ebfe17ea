"""Discovered parts against ground truth: purity, and per-part precision / recall of the clusters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PurityResult", "cell_majority_parts", "prototype_purity"]


@dataclass(frozen=True)
class PurityResult:
    """How well clusters (discovered part prototypes) match ground-truth parts.

    Attributes:
        purity: ``Σ_clusters max_part count(cluster, part) / N`` over all ``N`` cells.
        majority_baseline: share of the most frequent ground-truth label (the purity of a single
            cluster holding every cell).
        part_names: ground-truth label names (the last one is ``"background"`` when present).
        precision: per label, ``count(c*, p) / |c*|`` for its best cluster ``c*`` (highest F1).
        recall: per label, ``count(c*, p) / |p|``.
        best_cluster: per label, ``c*`` (``-1`` when the label has no cell).
        counts: ``(num_clusters, num_labels)`` contingency table.
    """

    purity: float
    majority_baseline: float
    part_names: tuple[str, ...]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    best_cluster: tuple[int, ...]
    counts: torch.Tensor = field(repr=False, compare=False)


def cell_majority_parts(masks: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Ground-truth part of every feature-grid cell: the label covering most of the cell.

    Args:
        masks: ``(N, P, S, S)`` bool (disjoint) part masks.
        grid: ``(H, W)``.

    Returns:
        ``(N, H, W)`` int64 in ``[0, P]``: the part (or background, id ``P``: the pixels no part
        covers) with the largest coverage of the cell.
    """
    if not isinstance(masks, torch.Tensor) or masks.dim() != 4:
        raise ValueError(f"Expected `masks` of shape (N, P, S, S), but got "
                         f"{tuple(getattr(masks, 'shape', ())) or type(masks).__name__}.")
    n, p = masks.shape[:2]
    cover = F.adaptive_avg_pool2d(masks.float().flatten(0, 1)[:, None], tuple(grid))
    cover = cover.view(n, p, *grid)
    background = (1.0 - cover.sum(1, keepdim=True)).clamp_min(0.0)
    return torch.cat([cover, background], 1).argmax(1)


def prototype_purity(cluster_ids: torch.Tensor, part_ids: torch.Tensor, num_clusters: int,
                     part_names: Sequence[str]) -> PurityResult:
    """Purity and per-part best-cluster precision / recall of a clustering of cells.

    Args:
        cluster_ids: ``(...)`` int64 cluster of every cell (e.g. :meth:`PartPrototypes.assign`).
        part_ids: ``(...)`` int64 ground-truth label of every cell, in ``[0, len(part_names))``
            (e.g. :func:`cell_majority_parts`, with ``"background"`` as the last name).
        num_clusters: number of clusters.
        part_names: label names.

    Returns:
        The :class:`PurityResult`.
    """
    if not isinstance(cluster_ids, torch.Tensor) or not isinstance(part_ids, torch.Tensor) \
            or cluster_ids.shape != part_ids.shape:
        raise ValueError(f"Expected `cluster_ids` and `part_ids` tensors of the same shape, but got "
                         f"{tuple(getattr(cluster_ids, 'shape', ()))} and "
                         f"{tuple(getattr(part_ids, 'shape', ()))}.")
    k, p = int(num_clusters), len(part_names)
    c, t = cluster_ids.flatten().long().cpu(), part_ids.flatten().long().cpu()
    if c.numel() == 0:
        raise ValueError("Expected at least one cell to score, but got none.")
    if int(c.min()) < 0 or int(c.max()) >= k or int(t.min()) < 0 or int(t.max()) >= p:
        raise ValueError(f"Expected cluster ids in [0, {k}) and part ids in [0, {p}), but got "
                         f"[{int(c.min())}, {int(c.max())}] and [{int(t.min())}, {int(t.max())}].")
    counts = torch.bincount(c * p + t, minlength=k * p).view(k, p).double()
    n = float(c.numel())
    size_c, size_p = counts.sum(1, keepdim=True), counts.sum(0, keepdim=True)
    precision = counts / size_c.clamp_min(1)
    recall = counts / size_p.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    best = f1.argmax(0)
    cols = torch.arange(p)
    has = size_p[0] > 0
    return PurityResult(
        purity=float(counts.max(1).values.sum() / n),
        majority_baseline=float(size_p.max() / n), part_names=tuple(part_names),
        precision=tuple(float(x) for x in precision[best, cols]),
        recall=tuple(float(x) for x in recall[best, cols]),
        best_cluster=tuple(int(b) if h else -1 for b, h in zip(best.tolist(), has.tolist())),
        counts=counts.long())

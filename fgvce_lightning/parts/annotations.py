"""Part annotations (keypoints or masks in input pixels) → part labels on the feature grid.

A feature-grid cell ``(i, j)`` of an ``H×W`` grid covers the input pixels
``[i·H_in/H, (i+1)·H_in/H) × [j·W_in/W, (j+1)·W_in/W)``. A cell carries part ``p`` when the
part's keypoint falls inside it or is the nearest keypoint within a radius of it (keypoints), or
when the part's mask covers enough of it (masks). A cell that carries no part is background:
:func:`cell_part_names` names it so, never leaves it empty.

Everything here is batched: no Python loop over samples, parts or cells.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .types import BACKGROUND

__all__ = [
    "keypoints_to_cell_parts",
    "masks_to_cell_parts",
    "part_ids_to_cell_parts",
    "near_cells",
    "cell_part_names",
]


def _check_size(value: object, name: str) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list, torch.Size)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"Expected `{name}` to be a pair of positive integers (H, W), but got "
                         f"{value!r}.")
    return int(value[0]), int(value[1])


def keypoints_to_cell_parts(keypoints: torch.Tensor, input_size: Sequence[int],
                            grid: Sequence[int], radius: float = 1.0) -> torch.Tensor:
    """Label feature-grid cells with the parts of nearby keypoints (the Near-KP convention).

    A keypoint is a point, but the part it marks covers more than the one cell it falls in. A cell
    carries part ``p`` when

    * ``p``'s visible keypoint lies inside the cell, or
    * ``p``'s keypoint is the visible keypoint nearest to the cell's centre and lies within
      ``radius`` cells of it (distance measured in cell units, rows and columns scaled to the
      cell's height and width).

    Cells that carry no part are background (:data:`~fgvce_lightning.parts.types.BACKGROUND` in
    the names that :func:`cell_part_names` returns).

    Args:
        keypoints: ``(N, P, 3)`` as ``(x, y, visible)`` in input pixels (x = column, y = row, the
            image spans ``[0, W_in) × [0, H_in)``). A keypoint counts when ``visible > 0`` (CUB's
            0/1 flag; with COCO's 0/1/2 flags pass ``visible == 2`` yourself if "labelled but
            occluded" should not count).
        input_size: ``(H_in, W_in)`` of the input images the keypoints refer to.
        grid: ``(H, W)`` of the feature maps.
        radius: how far, in cells, the nearest keypoint may be from a cell's centre to label it
            (``0``: only the cell a keypoint falls in; default ``1.0``: about one cell).

    Returns:
        ``(N, P, H, W)`` bool on ``keypoints.device``.

    Keypoints outside the image (after cropping augmentations this is common) or with non-finite
    coordinates are treated as invisible, silently: the annotation exists but the part is not in
    the picture, which is not an error of the caller. This follows the reference evaluation of
    Vandenhende et al. (2022), which drops keypoints outside the image before mapping them to
    cells.

    Raises:
        TypeError: when ``keypoints`` is not a tensor.
        ValueError: on a wrong shape or size, or a negative radius.
    """
    if not isinstance(keypoints, torch.Tensor):
        raise TypeError(f"Expected `keypoints` to be a torch.Tensor of shape (N, P, 3), but got "
                        f"{type(keypoints).__name__}.")
    if keypoints.dim() != 3 or keypoints.shape[-1] != 3:
        hint = " For a single image use `keypoints.unsqueeze(0)`." if keypoints.dim() == 2 else ""
        raise ValueError(f"Expected `keypoints` to have shape (N, P, 3) as (x, y, visible), but got "
                         f"{tuple(keypoints.shape)}.{hint}")
    if (isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius >= 0
            or not math.isfinite(radius)):
        raise ValueError(f"Expected `radius` to be a non-negative number of cells, but got "
                         f"{radius!r}.")
    h_in, w_in = _check_size(tuple(input_size), "input_size")
    gh, gw = _check_size(tuple(grid), "grid")
    n, p, _ = keypoints.shape
    kp = keypoints.float()
    x, y, vis = kp[..., 0], kp[..., 1], kp[..., 2]
    valid = (vis > 0) & torch.isfinite(x) & torch.isfinite(y)
    valid &= (x >= 0) & (x < w_in) & (y >= 0) & (y < h_in)
    # keypoints in cell units; pixel (i, j) spans [j, j + 1) x [i, i + 1) of the image plane
    cy = torch.nan_to_num(y) * gh / h_in                                      # (N, P)
    cx = torch.nan_to_num(x) * gw / w_in
    rows = torch.arange(gh, device=keypoints.device, dtype=torch.float32)
    cols = torch.arange(gw, device=keypoints.device, dtype=torch.float32)
    inside = ((cy.floor().clamp(0, gh - 1)[..., None, None] == rows[:, None])
              & (cx.floor().clamp(0, gw - 1)[..., None, None] == cols[None, :]))   # (N,P,H,W)
    dist2 = ((cy[..., None, None] - (rows[:, None] + 0.5)) ** 2
             + (cx[..., None, None] - (cols[None, :] + 0.5)) ** 2)
    dist2 = dist2.masked_fill(~valid[..., None, None], math.inf)
    nearest = dist2.argmin(1, keepdim=True)                                   # (N, 1, H, W)
    near = torch.zeros_like(inside).scatter_(1, nearest, True)
    near &= dist2 <= float(radius) ** 2
    return (inside | near) & valid[..., None, None]


def masks_to_cell_parts(masks: torch.Tensor, grid: Sequence[int],
                        min_coverage: float = 0.2) -> torch.Tensor:
    """Label the cells that a part's mask covers.

    A cell carries part ``p`` when ``p``'s mask covers at least ``min_coverage`` of the cell, or
    when the cell holds more of ``p``'s mask than any other cell (so that a part smaller than a
    cell, a beak or an eye, still labels the cell it lies in). Cells that carry no part are
    background.

    Args:
        masks: ``(N, P, Hm, Wm)`` bool or float in ``[0, 1]`` (soft masks allowed), at any
            resolution (usually the input's).
        grid: ``(H, W)`` of the feature maps.
        min_coverage: a cell carries the part when the mask's mean over the cell (adaptive average
            pooling) is at least this, in ``(0, 1]``.

    Returns:
        ``(N, P, H, W)`` bool on ``masks.device``.

    Raises:
        TypeError: when ``masks`` is not a tensor.
        ValueError: on a wrong shape or ``min_coverage`` outside ``(0, 1]``.
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"Expected `masks` to be a torch.Tensor of shape (N, P, Hm, Wm), but got "
                        f"{type(masks).__name__}.")
    if masks.dim() != 4:
        hint = " For a single image use `masks.unsqueeze(0)`." if masks.dim() == 3 else ""
        raise ValueError(f"Expected `masks` to have shape (N, P, Hm, Wm), but got "
                         f"{tuple(masks.shape)}.{hint}")
    if not (isinstance(min_coverage, (int, float)) and 0.0 < float(min_coverage) <= 1.0):
        raise ValueError(f"Expected `min_coverage` to be in (0, 1], but got {min_coverage!r}. "
                         "Use e.g. 0.2 (a fifth of the cell covered).")
    gh, gw = _check_size(tuple(grid), "grid")
    n, p, hm, wm = masks.shape
    if hm < 1 or wm < 1:
        raise ValueError(f"Expected `masks` to have a non-empty spatial size, but got {hm}×{wm}.")
    coverage = F.adaptive_avg_pool2d(masks.float().reshape(n * p, 1, hm, wm), (gh, gw))
    coverage = coverage.view(n, p, gh * gw)
    labels = coverage >= float(min_coverage) - 1e-6
    most = coverage.argmax(2, keepdim=True)
    present = coverage.gather(2, most) > 0
    labels.scatter_(2, most, present | labels.gather(2, most))
    return labels.view(n, p, gh, gw)


def part_ids_to_cell_parts(part_ids: torch.Tensor, num_parts: int) -> torch.Tensor:
    """One-hot part-id maps (from :class:`PartPrototypes`) as boolean cell-part labels.

    Args:
        part_ids: ``(..., H, W)`` int64 part ids; ``-1`` (or any negative id) means "no part".
        num_parts: ``P``; ids must be ``< P``.

    Returns:
        ``(..., P, H, W)`` bool.
    """
    if not isinstance(part_ids, torch.Tensor) or part_ids.is_floating_point() or part_ids.dim() < 2:
        raise ValueError("Expected `part_ids` to be an integer tensor of shape (..., H, W), but got "
                         f"{getattr(part_ids, 'dtype', type(part_ids).__name__)} "
                         f"{tuple(getattr(part_ids, 'shape', ()))}.")
    if part_ids.numel() and int(part_ids.max()) >= num_parts:
        raise ValueError(f"Expected part ids below `num_parts`={num_parts}, but got "
                         f"{int(part_ids.max())}. Pass the number of parts of the prototypes.")
    ids = part_ids.long()
    classes = torch.arange(num_parts, device=ids.device).view(num_parts, 1, 1)
    return ids.unsqueeze(-3) == classes


def near_cells(cell_parts: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Dilate cell-part labels: a cell is "near" a part if a part cell lies within ``radius``.

    Distance is the Chebyshev (chessboard) distance on the grid, so ``radius=1`` is the 3×3
    neighbourhood and ``radius=0`` returns the labels unchanged.

    Args:
        cell_parts: ``(..., H, W)`` bool.
        radius: non-negative integer.

    Returns:
        ``(..., H, W)`` bool, same shape.
    """
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"Expected `radius` to be a non-negative integer, but got {radius!r}.")
    if not isinstance(cell_parts, torch.Tensor) or cell_parts.dim() < 2:
        raise ValueError("Expected `cell_parts` to be a tensor of shape (..., H, W), but got "
                         f"{tuple(getattr(cell_parts, 'shape', ())) or type(cell_parts).__name__}.")
    if radius == 0:
        return cell_parts.bool().clone()
    shape = cell_parts.shape
    flat = cell_parts.float().reshape(-1, 1, shape[-2], shape[-1])
    dilated = F.max_pool2d(flat, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return dilated.reshape(shape) > 0.5


def cell_part_names(cell_parts: torch.Tensor, names: Sequence[str]) -> list[list[tuple[str, ...]]]:
    """Turn one sample's ``(P, H, W)`` bool labels into ``H×W`` lists of sorted part-name tuples.

    This is the ``ExplainedSample.cell_parts`` format. A cell without any part is
    ``(BACKGROUND,)``, never empty.
    """
    if cell_parts.dim() != 3 or cell_parts.shape[0] != len(names):
        raise ValueError(f"Expected `cell_parts` of shape (P={len(names)}, H, W), but got "
                         f"{tuple(cell_parts.shape)}.")
    labels = cell_parts.bool().cpu()
    _, gh, gw = labels.shape
    out: list[list[tuple[str, ...]]] = [[() for _ in range(gw)] for _ in range(gh)]
    p_idx, rows, cols = labels.nonzero(as_tuple=True)
    for p, i, j in zip(p_idx.tolist(), rows.tolist(), cols.tolist()):
        out[i][j] = out[i][j] + (names[p],)
    return [[tuple(sorted(set(c))) if c else (BACKGROUND,) for c in row] for row in out]

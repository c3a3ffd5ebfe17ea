"""Image panels of one explained mistake: swapped regions, contribution map, references, trajectory.

All panels are ``(3, h, w)`` uint8 CPU tensors (what ``SummaryWriter.add_image`` and
the report's PNG encoder take). A panel that cannot be drawn (no thumbnail kept, no
contributions, a skipped query) is ``None`` and :func:`sample_panel` leaves it out.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from ..engine.results import Cell, Edit, Explanation
from .epoch import ExplainedSample
from .regions import EDIT_COLORS, check_grid, draw_regions

__all__ = [
    "EDIT_COLORS", "cell_mask", "query_panel", "contribution_panel", "reference_panel",
    "trajectory_figure", "trajectory_image", "sample_panel",
]




def _as_image(image: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a tensor, but got {type(image).__name__}.")
    if image.dim() != 3 or image.shape[0] not in (1, 3) or min(image.shape[1:]) < 1:
        raise ValueError(f"Expected `{name}` to have shape (3, h, w) or (1, h, w), but got "
                         f"{tuple(image.shape)}.")
    image = image.detach().cpu()
    if image.dtype.is_floating_point:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise TypeError(f"Expected `{name}` to be uint8 (or float in [0, 1]), but got {image.dtype}.")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.contiguous()


def _resize(image: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """Scale so that the longer side is ``size`` (unchanged when ``size`` is None)."""
    if size is None:
        return image
    h, w = image.shape[1:]
    scale = size / max(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if new == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=new, mode="bilinear", align_corners=False,
                        antialias=scale < 1)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def cell_mask(cells: Sequence[Cell], feature_grid: Sequence[int],
              image_size: Sequence[int]) -> torch.Tensor:
    """Pixel mask of feature-grid cells (cell ``(r, c)`` covers the pixels that map to it).

    Args:
        cells: ``(row, col)`` cells on the feature grid.
        feature_grid: ``(H, W)`` of the feature map.
        image_size: ``(h, w)`` of the image.

    Returns:
        ``(h, w)`` bool mask.
    """
    gh, gw = check_grid(feature_grid)
    grid = torch.zeros(gh, gw)
    for r, c in cells:
        if not (0 <= r < gh and 0 <= c < gw):
            raise ValueError(f"Expected cells within the feature grid {(gh, gw)}, but got "
                             f"{(r, c)}. Pass the feature grid the explanation was computed on.")
        grid[r, c] = 1.0
    h, w = int(image_size[0]), int(image_size[1])
    return F.interpolate(grid[None, None], size=(h, w), mode="nearest")[0, 0] > 0.5


def query_panel(thumbnail: Optional[torch.Tensor], explanation: Explanation,
                feature_grid: Sequence[int], *, size: Optional[int] = None) -> Optional[torch.Tensor]:
    """The query with every edit's swapped cells outlined and numbered in edit order.

    Args:
        thumbnail: ``(3, h, w)`` uint8 query image, or ``None``.
        explanation: its explanation (a skipped one gives the plain thumbnail).
        feature_grid: ``(H, W)`` of the feature map.
        size: longer side of the panel in pixels (``None``: the thumbnail's size).

    Returns:
        ``(3, h', w')`` uint8, or ``None`` without a thumbnail.
    """
    if thumbnail is None:
        return None
    image = _resize(_as_image(thumbnail, "thumbnail"), size)
    edits = explanation.edits
    return draw_regions(image, [e.query_cells for e in edits], range(1, len(edits) + 1),
                         feature_grid)


def contribution_panel(thumbnail: Optional[torch.Tensor], contributions: Optional[torch.Tensor], *,
                       size: Optional[int] = None, cmap: str = "RdBu_r",
                       alpha: float = 0.7) -> Optional[torch.Tensor]:
    """The contribution map as a heat overlay (diverging colours, 0 = neutral = image unchanged).

    Red cells carry evidence for the wrong class, blue ones for the true class; the colour scale
    is symmetric around 0 and the overlay strength grows with ``|contribution|``.

    Args:
        thumbnail: ``(3, h, w)`` uint8 image, or ``None`` (then the bare heat map is drawn).
        contributions: ``(H, W)`` per-cell contributions, or ``None``.
        size: longer side of the panel in pixels (``None``: the thumbnail's size, or 16 px a cell).
        cmap: a diverging matplotlib colormap name.
        alpha: overlay opacity of the strongest cell.

    Returns:
        ``(3, h', w')`` uint8, or ``None`` without contributions.
    """
    if contributions is None:
        return None
    if not isinstance(contributions, torch.Tensor) or contributions.dim() != 2:
        raise ValueError(f"Expected `contributions` to be an (H, W) tensor, but got "
                         f"{getattr(contributions, 'shape', type(contributions).__name__)}.")
    values = torch.nan_to_num(contributions.detach().cpu().double(), nan=0.0, posinf=0.0, neginf=0.0)
    scale = float(values.abs().max())
    norm = values / scale if scale > 0 else torch.zeros_like(values)
    rgb = matplotlib.colormaps[cmap](0.5 + 0.5 * norm.numpy())[..., :3]
    heat = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() * 255
    if thumbnail is None:
        gh, gw = values.shape
        target = size if size is not None else 16 * max(gh, gw)
        out = F.interpolate(heat[None], size=(round(target * gh / max(gh, gw)),
                                              round(target * gw / max(gh, gw))), mode="nearest")[0]
        return out.round().clamp(0, 255).to(torch.uint8)
    image = _resize(_as_image(thumbnail, "thumbnail"), size)
    hw = image.shape[1:]
    heat = F.interpolate(heat[None], size=hw, mode="nearest")[0]
    weight = F.interpolate((alpha * norm.abs()).float()[None, None], size=hw, mode="nearest")[0]
    out = image.float() * (1 - weight) + heat * weight
    return out.round().clamp(0, 255).to(torch.uint8)


def reference_panel(ref_thumbnail: Optional[torch.Tensor], edit: Union[Edit, Sequence[Edit]],
                    feature_grid: Sequence[int], *, numbers: Optional[Sequence[int]] = None,
                    size: Optional[int] = None) -> Optional[torch.Tensor]:
    """A reference image with the cells that replaced the query's cells outlined.

    Args:
        ref_thumbnail: ``(3, h, w)`` uint8 reference image, or ``None``.
        edit: one edit, or several edits that used this same reference.
        feature_grid: ``(H, W)`` of the feature map.
        numbers: the edits' 1-based numbers (default ``1..n``), so colours and numbers match the
            query panel.
        size: longer side of the panel in pixels.

    Returns:
        ``(3, h', w')`` uint8, or ``None`` without a thumbnail.
    """
    if ref_thumbnail is None:
        return None
    edits = [edit] if isinstance(edit, Edit) else list(edit)
    numbers = list(numbers) if numbers is not None else list(range(1, len(edits) + 1))
    if len(numbers) != len(edits):
        raise ValueError(f"Expected one number per edit ({len(edits)}), but got {len(numbers)}.")
    image = _resize(_as_image(ref_thumbnail, "ref_thumbnail"), size)
    return draw_regions(image, [e.reference_cells for e in edits], numbers, feature_grid)


def _edits(n: int) -> str:
    return f"{n} edit" if n == 1 else f"{n} edits"


def trajectory_figure(explanation: Explanation, *, dpi: int = 80) -> Optional[Figure]:
    """``p(true)`` and ``p(pred)`` before any edit and after each edit.

    Args:
        explanation: the explanation (skipped ones, without a trajectory, give ``None``).
        dpi: resolution (the figure is 2.5×2.5 inches).

    Returns:
        A matplotlib figure, or ``None``.
    """
    p_true, p_pred = explanation.trajectory_true, explanation.trajectory_pred
    if explanation.skipped or not any(math.isfinite(v) for v in p_true + p_pred):
        return None
    figure = Figure(figsize=(2.5, 2.5), dpi=dpi, layout="constrained")
    ax = figure.add_subplot(1, 1, 1)
    ax.tick_params(labelsize=8)
    steps = list(range(len(p_true)))
    ax.plot(steps, p_true, "o-", color="#2ca02c", label=f"p(true={explanation.true})")
    ax.plot(steps, p_pred, "s--", color="#d62728", label=f"p(pred={explanation.pred})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(steps)
    ax.set_xlabel("edits applied", fontsize=8)
    verdict = "flipped" if explanation.success else f"not flipped (→ {explanation.final_pred})"
    ax.set_title(f"{_edits(explanation.num_edits)}: {verdict}", fontsize=9)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    ax.grid(alpha=0.3)
    return figure


def trajectory_image(explanation: Explanation, *, size: int = 160) -> Optional[torch.Tensor]:
    """``p(true)`` and ``p(pred)`` over the edits as a ``(3, size, size)`` uint8 chart (or ``None``).

    Drawn directly with PIL (a few milliseconds) rather than through matplotlib (about 100 ms a
    figure), because every explained sample of every epoch gets one; :func:`trajectory_figure`
    gives the matplotlib version for notebooks.
    """
    p_true, p_pred = explanation.trajectory_true, explanation.trajectory_pred
    if explanation.skipped or not any(math.isfinite(v) for v in p_true + p_pred):
        return None
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 22, size - 8, 18, size - 34
    draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
    for p in (0.25, 0.5, 0.75):
        y = bottom - p * (bottom - top)
        draw.line((left, y, right, y), fill=(225, 225, 225))
    draw.text((2, top - 4), "1", fill=(90, 90, 90))
    draw.text((2, bottom - 6), "0", fill=(90, 90, 90))
    steps = max(len(p_true) - 1, 1)

    def xy(i: int, p: float) -> tuple[float, float]:
        return (left + i * (right - left) / steps,
                bottom - min(max(p, 0.0), 1.0) * (bottom - top))

    for values, colour in ((p_pred, (214, 39, 40)), (p_true, (44, 160, 44))):
        points = [xy(i, v) for i, v in enumerate(values) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    verdict = "flipped" if explanation.success else f"not flipped (-> {explanation.final_pred})"
    draw.text((left, 3), f"{_edits(explanation.num_edits)}: {verdict}", fill=(0, 0, 0))
    draw.text((left, bottom + 4), "edits applied", fill=(90, 90, 90))
    draw.text((4, size - 15), f"p(true={explanation.true})", fill=(44, 160, 44))
    draw.text((size // 2 + 4, size - 15), f"p(pred={explanation.pred})", fill=(214, 39, 40))
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return array.view(size, size, 3).permute(2, 0, 1).contiguous()


def _fit(panel: torch.Tensor, size: int) -> torch.Tensor:
    """Scale into a ``size``×``size`` box and pad with white to exactly that box."""
    panel = _resize(panel, size)
    h, w = panel.shape[1:]
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(panel, (left, size - w - left, top, size - h - top), value=255)


def _infer_grid(sample: ExplainedSample) -> Optional[tuple[int, int]]:
    exp = sample.explanation
    for t in (exp.contributions, exp.regions):
        if isinstance(t, torch.Tensor) and t.dim() == 2:
            return int(t.shape[0]), int(t.shape[1])
    if sample.cell_parts is not None:
        return len(sample.cell_parts), len(sample.cell_parts[0])
    return None


def sample_panels(sample: ExplainedSample, feature_grid: Optional[Sequence[int]] = None, *,
                  size: int = 160, max_references: int = 3) -> dict[str, torch.Tensor]:
    """The individual panels of one sample, each fitted into a ``size``×``size`` box.

    Args:
        sample: the explained sample.
        feature_grid: ``(H, W)`` (default: inferred from the contributions / regions / cell parts).
        size: panel side in pixels.
        max_references: at most this many distinct reference images (edits sharing a reference
            are drawn on the same panel).

    Returns:
        ``{"query", "contributions", "reference_0", …, "trajectory"}``, whichever could be drawn.
    """
    exp = sample.explanation
    grid = tuple(feature_grid) if feature_grid is not None else _infer_grid(sample)
    if grid is None and exp.edits:
        raise ValueError("Expected `feature_grid` (H, W) to draw the edited cells, but it could "
                         "not be inferred from the sample; pass feature_grid=result.feature_grid.")
    panels: dict[str, Optional[torch.Tensor]] = {
        "query": query_panel(sample.thumbnail, exp, grid or (1, 1), size=size),
        "contributions": contribution_panel(sample.thumbnail, exp.contributions, size=size),
    }
    by_reference: dict[tuple, list[int]] = {}
    for k, edit in enumerate(exp.edits):
        key = tuple(edit.reference_id) if edit.reference_id else ("slot", edit.reference_slot, k)
        by_reference.setdefault(key, []).append(k)
    for j, ks in enumerate(list(by_reference.values())[:max_references]):
        thumb = next((sample.reference_thumbnails[k] for k in ks
                      if k < len(sample.reference_thumbnails)
                      and sample.reference_thumbnails[k] is not None), None)
        panels[f"reference_{j}"] = reference_panel(
            thumb, [exp.edits[k] for k in ks], grid, numbers=[k + 1 for k in ks], size=size)
    panels["trajectory"] = trajectory_image(exp)
    return {name: _fit(p, size) for name, p in panels.items() if p is not None}


def sample_panel(sample: ExplainedSample, feature_grid: Optional[Sequence[int]] = None, *,
                 size: int = 160, max_references: int = 3) -> Optional[torch.Tensor]:
    """All panels of one sample side by side: query, contributions, references, trajectory.

    Args:
        sample: the explained sample.
        feature_grid: ``(H, W)`` (default: inferred, see :func:`sample_panels`).
        size: panel side in pixels.
        max_references: at most this many distinct reference images.

    Returns:
        ``(3, size + 4, n * (size + 2) + 2)`` uint8 for ``n`` drawable panels, or ``None`` when
        nothing could be drawn.
    """
    panels = sample_panels(sample, feature_grid, size=size, max_references=max_references)
    if not panels:
        return None
    return make_grid(list(panels.values()), nrow=len(panels), padding=2, pad_value=255)

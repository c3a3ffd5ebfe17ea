"""Matplotlib figures of the per-part error statistics.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas, never through
``pyplot``: no global figure registry, no backend switch, nothing leaks into the user's session.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..parts.types import EpochStats, PairStat

if TYPE_CHECKING:
    from .epoch import EpochResult

__all__ = ["figure_to_image", "part_error_figure", "confusion_part_heatmap", "class_label",
           "epoch_figure_images"]

_rendered: list = [None, {}]
"""The last epoch result whose figures were rendered, and its images (TensorBoard and the HTML
report show the same figures of the same epoch: draw them once)."""


def class_label(index: int, class_names: Optional[Sequence[str]] = None) -> str:
    """``"12 (Laysan Albatross)"`` when a name is known, else ``"12"``."""
    if class_names is not None and 0 <= int(index) < len(class_names):
        return f"{int(index)} ({class_names[int(index)]})"
    return str(int(index))


def figure_to_image(figure: Figure) -> torch.Tensor:
    """Render a figure to an image tensor.

    Args:
        figure: a matplotlib figure (any canvas; it is rendered with Agg).

    Returns:
        ``(3, H, W)`` uint8 RGB tensor.
    """
    if not isinstance(figure, Figure):
        raise TypeError(f"Expected `figure` to be a matplotlib Figure, but got {type(figure).__name__}.")
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).contiguous()


def _empty(figure: Figure, message: str) -> Figure:
    ax = figure.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return figure


def part_error_figure(stats: EpochStats, *, max_parts: int = 30, dpi: int = 80) -> Figure:
    """Horizontal bars of each part's error share (and contribution share).

    Args:
        stats: the epoch statistics; parts are shown in ``stats.part_stats`` order
            (largest error share first, at the top).
        max_parts: at most this many parts are shown (the first of ``stats.part_stats``: with
            hundreds of discovered parts a bar each would be unreadable, and slow to draw).
        dpi: resolution of the figure.

    Returns:
        A :class:`~matplotlib.figure.Figure` (a "no part statistics" note when there are none).
    """
    part_stats = list(stats.part_stats)[:max_parts]
    height = max(2.4, 0.45 * len(part_stats) + 1.2)
    figure = Figure(figsize=(6.0, height), dpi=dpi, layout="constrained")
    if not part_stats:
        return _empty(figure, "no part statistics this epoch")
    ax = figure.add_subplot(1, 1, 1)
    y = np.arange(len(part_stats))
    err = [ps.error_share for ps in part_stats]
    con = [ps.contribution_share for ps in part_stats]
    lo = [max(0.0, ps.error_share - ps.interval[0]) for ps in part_stats]
    hi = [max(0.0, ps.interval[1] - ps.error_share) for ps in part_stats]
    ax.barh(y - 0.2, err, height=0.4, color="#d62728", label="error share (95% interval)",
            xerr=[lo, hi], error_kw={"elinewidth": 1, "capsize": 2, "ecolor": "#555555"})
    ax.barh(y + 0.2, con, height=0.4, color="#1f77b4", label="contribution share")
    for yi, ps in zip(y, part_stats):
        ax.text(ps.interval[1], yi - 0.2, f" {ps.count}", va="center", fontsize=8)
    ax.set_yticks(y, [ps.part for ps in part_stats])
    ax.invert_yaxis()
    top = max([1.0] + [v for v in err + con if math.isfinite(v)])
    ax.set_xlim(0.0, top * 1.08)
    ax.set_xlabel("share of explained mistakes (error) / of positive contribution")
    shown = ("" if len(part_stats) == len(stats.part_stats) else
             f"; the first {len(part_stats)} of {len(stats.part_stats)} parts")
    ax.set_title(f"Parts behind the mistakes ({stats.num_explained} explained{shown})")
    ax.legend(loc="lower right", fontsize=8)
    return figure


def _pair_rows(pair_stats: Sequence[PairStat], parts: Sequence[str]) -> np.ndarray:
    rows = np.zeros((len(pair_stats), len(parts)), dtype=np.float64)
    for i, pair in enumerate(pair_stats):
        for j, part in enumerate(parts):
            rows[i, j] = pair.part_counts.get(part, 0) / max(pair.count, 1)
    return rows


def confusion_part_heatmap(stats: EpochStats, class_names: Optional[Sequence[str]] = None, *,
                           max_pairs: int = 12, max_parts: int = 30, dpi: int = 80) -> Figure:
    """Heat map: confusion pairs (rows) × parts (columns).

    A cell is the share of that pair's explained mistakes whose edits touch the part; a pair with
    fewer than ``stats.min_pair_count`` mistakes is labelled "too few".

    Args:
        stats: the epoch statistics (``pair_stats`` sorted by count, ``part_stats`` by share).
        class_names: optional class names for the row labels.
        max_pairs: at most this many (most frequent) pairs are shown.
        max_parts: at most this many parts (the first of ``stats.part_stats``) are shown.
        dpi: resolution of the figure.

    Returns:
        A :class:`~matplotlib.figure.Figure` (a note when there is nothing to show).
    """
    if max_pairs < 1:
        raise ValueError(f"Expected `max_pairs` to be >= 1, but got {max_pairs}.")
    pairs = list(stats.pair_stats)[:max_pairs]
    parts = ([ps.part for ps in stats.part_stats] or sorted(
        {p for pair in pairs for p in pair.part_counts}))[:max_parts]
    labels = [f"{class_label(p.true, class_names)} → {class_label(p.pred, class_names)} (n={p.count}"
              f"{'' if p.enough else ', too few'})" for p in pairs]
    width = max(5.0, 0.6 * len(parts) + 0.075 * max([0] + [len(t) for t in labels]) + 2.0)
    height = max(2.4, 0.4 * len(pairs) + 1.6)
    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    if not pairs or not parts:
        return _empty(figure, "no confusion pairs with part labels this epoch")
    values = _pair_rows(pairs, parts)
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(np.arange(len(parts)), parts, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(pairs)), labels)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if values[i, j] > 0:
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] > 0.6 else "black")
    ax.set_title("Confusion pair × part\n(share of the pair's mistakes)", fontsize=10)
    figure.colorbar(image, ax=ax, fraction=0.05)
    return figure


def epoch_figure_images(result: "EpochResult") -> dict[str, torch.Tensor]:
    """The epoch's figures as ``(3, H, W)`` uint8 images: ``"part_errors"`` and
    ``"confusion_parts"`` (each only when its statistics exist).

    Rendered once per epoch result: a second call with the same result object (e.g. the HTML
    report after the TensorBoard panels) returns the same images without drawing again.
    """
    if _rendered[0] is result:
        return _rendered[1]
    images: dict[str, torch.Tensor] = {}
    if result.stats.part_stats:
        images["part_errors"] = figure_to_image(part_error_figure(result.stats))
        if result.stats.pair_stats:
            images["confusion_parts"] = figure_to_image(
                confusion_part_heatmap(result.stats, result.class_names))
    _rendered[0], _rendered[1] = result, images
    return images

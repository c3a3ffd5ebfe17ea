"""Matplotlib figures of the per-part error statistics.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas, never through
``pyplot``: no global figure registry, no backend switch, nothing leaks into the user's session.
Their margins are fixed from the measured size of their labels, not found by a layout engine
(matplotlib's constrained layout measured every artist again: a third of a figure's time).
"""

from __future__ import annotations

import functools
import math
import threading
from typing import TYPE_CHECKING, Any, Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from ..parts.types import EpochStats, PairStat

if TYPE_CHECKING:
    from .epoch import EpochResult

__all__ = ["figure_to_image", "part_error_figure", "confusion_part_heatmap", "class_label",
           "epoch_figure_images"]

_measure_lock = threading.Lock()
"""The shared renderer of :func:`_text_pixels` (FreeType fonts are not thread-safe)."""

_rendered: list = [None, {}]
"""The last epoch result whose figures were rendered, and its images (TensorBoard and the HTML
report show the same figures of the same epoch: draw them once)."""

_kept: dict[str, Figure] = {}
"""The figures :func:`epoch_figure_images` drew last, drawn into again for the next epoch."""
_kept_lock = threading.Lock()


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
        ``(3, H, W)`` uint8 RGB tensor (a channels-first view of an ``(H, W, 3)`` array: the PNG
        encoder takes that layout back without a copy).
    """
    if not isinstance(figure, Figure):
        raise TypeError(f"Expected `figure` to be a matplotlib Figure, but got {type(figure).__name__}.")
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)


@functools.lru_cache(maxsize=4096)
def _text_pixels(text: str, prop: FontProperties, dpi: float) -> tuple[float, float]:
    """Width and height of one line of text in pixels (the same on every Agg canvas at ``dpi``;
    labels repeat from epoch to epoch)."""
    w, h, _ = _renderer(dpi).get_text_width_height_descent(text or " ", prop, ismath=False)
    return w, h


@functools.lru_cache(maxsize=8)
def _renderer(dpi: float) -> RendererAgg:
    return RendererAgg(1, 1, dpi)


def _text_inches(figure: Figure, texts: Sequence[str], size: object) -> tuple[float, float]:
    """Width of the widest of ``texts`` and the height of one line, in inches, at font ``size``
    (points or a matplotlib size name), measured with the Agg renderer."""
    prop, dpi = FontProperties(size=size), float(figure.dpi)
    width = height = 0.0
    with _measure_lock:
        for text in list(texts) or ["0"]:
            w, h = _text_pixels(str(text), prop, dpi)
            width, height = max(width, w), max(height, h)
    return width / dpi, height / dpi


def _set_margins(figure: Figure, left: float, right: float, bottom: float, top: float) -> None:
    """Fixed margins in inches (the figure is sized to hold them and its axes)."""
    width, height = figure.get_size_inches()
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                           top=1 - top / height)


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
    return _part_errors(stats, max_parts, dpi, None)


def _part_errors(stats: EpochStats, max_parts: int, dpi: int, reuse: Optional[Figure]) -> Figure:
    """:func:`part_error_figure`, drawn into ``reuse`` (a figure this function made before,
    emptied first) when that is possible."""
    part_stats = list(stats.part_stats)[:max_parts]
    height = max(2.4, 0.45 * len(part_stats) + 1.2)
    if not part_stats:
        return _empty(Figure(figsize=(6.0, height), dpi=dpi), "no part statistics this epoch")
    figure, ax = _reused(reuse, dpi, 1)
    rc = matplotlib.rcParams
    label_w, _ = _text_inches(figure, [ps.part for ps in part_stats], rc["ytick.labelsize"])
    _, tick_h = _text_inches(figure, ["0.8"], rc["xtick.labelsize"])
    _, title_h = _text_inches(figure, ["P"], rc["axes.titlesize"])
    left = label_w + 0.2
    figure.set_size_inches(max(6.0, left + 3.5 + 0.2), height)   # the bars keep >= 3.5 in
    _set_margins(figure, left=left, right=0.2, bottom=2.3 * tick_h + 0.25, top=title_h + 0.2)
    ax = ax or figure.add_subplot(1, 1, 1)
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
    ax.yaxis.set_inverted(True)                                   # the largest share on top
    top = max([1.0] + [v for v in err + con if math.isfinite(v)])
    ax.set_xlim(0.0, top * 1.08)
    ax.set_xlabel("share of explained mistakes (error) / of positive contribution")
    shown = ("" if len(part_stats) == len(stats.part_stats) else
             f"; the first {len(part_stats)} of {len(stats.part_stats)} parts")
    ax.set_title(f"Parts behind the mistakes ({stats.num_explained} explained{shown})")
    ax.legend(loc="lower right", fontsize=8)
    return figure


def _reused(reuse: Optional[Figure], dpi: int, num_axes: int) -> tuple[Figure, Any]:
    """``(figure, its first axes emptied of data)`` from ``reuse`` when it has ``dpi`` and
    ``num_axes`` axes with their axis lines on (a plot, not a note), else ``(new figure, None)``.

    An emptied axes keeps its ticks and spines (made once: a third of building a figure) and its
    canvas keeps its text-layout cache; the artists of the last plot are removed and the data
    limits forgotten, so the figure draws as a new one would.
    """
    if reuse is None or reuse.dpi != dpi or len(reuse.axes) != num_axes \
            or not reuse.axes[0].axison:
        return Figure(figsize=(6.0, 2.4), dpi=dpi), None
    ax = reuse.axes[0]
    for container in list(ax.containers):
        container.remove()
    for artist in [*ax.patches, *ax.texts, *ax.lines, *ax.collections]:
        artist.remove()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.ignore_existing_data_limits = True
    ax.set_autoscaley_on(True)
    ax.set_autoscalex_on(True)
    return reuse, ax


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
    return _heatmap(stats, class_names, max_pairs, max_parts, dpi, None)


def _heatmap(stats: EpochStats, class_names: Optional[Sequence[str]], max_pairs: int,
             max_parts: int, dpi: int, reuse: Optional[Figure]) -> Figure:
    """:func:`confusion_part_heatmap`, drawn into ``reuse`` (a heat map this function made
    before: its image and colour bar are kept, the colours are fixed to 0..1) when possible."""
    pairs = list(stats.pair_stats)[:max_pairs]
    parts = ([ps.part for ps in stats.part_stats] or sorted(
        {p for pair in pairs for p in pair.part_counts}))[:max_parts]
    labels = [f"{class_label(p.true, class_names)} → {class_label(p.pred, class_names)} (n={p.count}"
              f"{'' if p.enough else ', too few'})" for p in pairs]
    if not pairs or not parts:
        return _empty(Figure(figsize=(5.0, 2.4), dpi=dpi),
                      "no confusion pairs with part labels this epoch")
    figure, ax = _reused(reuse, dpi, 2)
    rc = matplotlib.rcParams
    label_w, label_h = _text_inches(figure, labels, rc["ytick.labelsize"])
    part_w, part_h = _text_inches(figure, parts, rc["xtick.labelsize"])
    bar_w, _ = _text_inches(figure, ["0.00"], rc["ytick.labelsize"])
    _, title_h = _text_inches(figure, ["P"], 10)
    # the cells 0.6 × 0.4 in; the colour bar beside them takes 10 % of the axes' width
    left, right = label_w + 0.2, bar_w + 0.3
    bottom, top = 0.7071 * (part_w + part_h) + 0.2, 2.4 * title_h + 0.2
    figure.set_size_inches(max(5.0, left + max(0.6 * len(parts), 1.5) / 0.9 + right),
                           max(2.4, bottom + 0.4 * len(pairs) + top))
    _set_margins(figure, left=left, right=right, bottom=bottom, top=top)
    values = _pair_rows(pairs, parts)
    if ax is None:
        ax = figure.add_subplot(1, 1, 1)
        image = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
        figure.colorbar(image, ax=ax, fraction=0.05)
    else:
        image = ax.images[0]
        image.set_data(values)
        image.set_extent((-0.5, len(parts) - 0.5, len(pairs) - 0.5, -0.5))
    ax.set_xticks(np.arange(len(parts)), parts, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(pairs)), labels)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if values[i, j] > 0:
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] > 0.6 else "black")
    ax.set_title("Confusion pair × part\n(share of the pair's mistakes)", fontsize=10)
    return figure


def epoch_figure_images(result: "EpochResult") -> dict[str, torch.Tensor]:
    """The epoch's figures as ``(3, H, W)`` uint8 images: ``"part_errors"`` and
    ``"confusion_parts"`` (each only when its statistics exist).

    Rendered once per epoch result: a second call with the same result object (e.g. the HTML
    report after the TensorBoard panels) returns the same images without drawing again. Each
    epoch draws into the figures of the epoch before (emptied: the same pixels as new figures,
    without building axes, ticks and colour bar again); the figures of :func:`part_error_figure`
    and :func:`confusion_part_heatmap` are always new.
    """
    with _kept_lock:
        if _rendered[0] is result:
            return _rendered[1]
        images: dict[str, torch.Tensor] = {}
        if result.stats.part_stats:
            figure = _kept["part_errors"] = _part_errors(result.stats, 30, 80,
                                                         _kept.get("part_errors"))
            images["part_errors"] = figure_to_image(figure)
            if result.stats.pair_stats:
                figure = _kept["confusion_parts"] = _heatmap(
                    result.stats, result.class_names, 12, 30, 80, _kept.get("confusion_parts"))
                images["confusion_parts"] = figure_to_image(figure)
        _rendered[0], _rendered[1] = result, images
        return images

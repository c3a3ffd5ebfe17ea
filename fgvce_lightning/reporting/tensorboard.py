"""TensorBoard panels of an explained epoch: scalars, part-error layout, sample images, figures, text.

The reporter is duck-typed on the writer (``torch.utils.tensorboard.SummaryWriter``, a tensorboardX
writer, or Lightning's ``TensorBoardLogger`` whose ``.experiment`` is a ``SummaryWriter``); it never
imports Lightning or TensorBoard itself. Whatever the writer lacks (``add_custom_scalars``,
``add_image``, ``add_text``) is skipped.
"""

from __future__ import annotations

import html
import math
from typing import Any, Callable, Iterable, Optional

from torchvision.utils import make_grid

from .epoch import EpochResult
from .figures import class_label, epoch_figure_images
from .images import sample_panels
from .scalars import custom_scalars_layout, epoch_scalars

__all__ = ["TensorBoardReporter", "markdown_summary", "select_samples"]


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _md(text: Any) -> str:
    """Text made safe inside a markdown table cell (HTML escaped, pipes and newlines removed)."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _sample_id(result: EpochResult, index: int) -> str:
    if 0 <= index < len(result.samples):
        dl, batch, pos = result.samples[index].query_id
        return f"{dl}/{batch}/{pos}"
    return f"#{index}"


def markdown_summary(result: EpochResult, *, max_pairs: int = 10) -> str:
    """A markdown summary of the epoch: overall numbers, top confusion pairs, part statistics.

    Args:
        result: the epoch result.
        max_pairs: at most this many confusion pairs (the most frequent).

    Returns:
        Markdown text (tables render in TensorBoard's text tab). Example ids are
        ``dataloader_idx/batch_idx/position``.
    """
    stats = result.stats
    lines = [
        f"**Epoch {result.epoch}** (step {result.global_step}, method `{_md(result.method)}`): "
        f"{stats.num_explained} of {stats.num_misclassified} mistakes explained "
        f"({stats.num_skipped} skipped, {len(result.failures)} failures, "
        f"{_fmt(result.elapsed_s, 1)} s).",
        "",
        "| flip rate | mean edits | semantic consistency |",
        "|---|---|---|",
        f"| {_fmt(stats.flip_rate)} | {_fmt(stats.mean_edits, 2)} | "
        f"{_fmt(stats.semantic_consistency)} |",
        "",
    ]
    pairs = list(stats.pair_stats)[:max_pairs]
    if pairs:
        lines += ["**Top confusion pairs** (share of the pair's mistakes that touch its dominant "
                  "part, 95% Wilson interval)", "",
                  "| true → predicted | count | dominant part | parts touched | examples |",
                  "|---|---|---|---|---|"]
        for pair in pairs:
            parts = ", ".join(f"{p} ({pair.part_counts.get(p, 0)})" for p in pair.dominant_parts[:3])
            examples = ", ".join(_sample_id(result, i) for i in pair.example_indices)
            dominant = "—"
            if pair.dominant_parts:
                lo, hi = pair.dominant_interval
                dominant = (f"{pair.dominant_parts[0]} {_fmt(pair.dominant_share)} "
                            f"({lo:.2f}–{hi:.2f})")
                if not pair.enough:
                    dominant += f", too few to tell (n < {stats.min_pair_count})"
            lines.append(f"| {_md(class_label(pair.true, result.class_names))} → "
                         f"{_md(class_label(pair.pred, result.class_names))} | {pair.count} | "
                         f"{_md(dominant)} | {_md(parts or '—')} | {_md(examples or '—')} |")
        lines.append("")
    if stats.part_stats:
        lines += ["**Parts**", "",
                  "| part | error share | 95% interval | count | contribution share |",
                  "|---|---|---|---|---|"]
        for ps in stats.part_stats:
            lo, hi = ps.interval
            lines.append(f"| {_md(ps.part)} | {_fmt(ps.error_share)} | {lo:.2f}–{hi:.2f} | "
                         f"{ps.count} | {_fmt(ps.contribution_share)} |")
        lines.append("")
    if result.failures:
        lines += ["**Failures**", ""] + [f"- {_md(f)}" for f in result.failures[:10]] + [""]
    return "\n".join(lines)


def select_samples(result: EpochResult, max_images: int) -> list[int]:
    """Indices of the samples worth showing: explained ones, successful first, in order."""
    explained = [i for i, s in enumerate(result.samples) if not s.explanation.skipped]
    ranked = sorted(explained, key=lambda i: not result.samples[i].explanation.success)
    return ranked[:max_images]


class TensorBoardReporter:
    """Writes an explained epoch to TensorBoard.

    Logged under ``prefix`` (``P``):

    - scalars of :func:`~fgvce_lightning.reporting.scalars.epoch_scalars` (optional, since the
      callback may send them through every logger's ``log_metrics`` instead);
    - the custom-scalars layout "part-error panels" (once, on the first call);
    - ``P/samples/<i>``: query | contributions | references | trajectory side by side, and the
      single panels ``P/query/<i>``, ``P/contributions/<i>``, ``P/reference/<i>`` (first
      reference) and ``P/trajectory/<i>`` for the ``i``-th shown sample, ``i < max_images``;
    - ``P/figures/part_errors`` and ``P/figures/confusion_parts`` (rendered figures);
    - ``P/summary``: the :func:`markdown_summary` text.

    Args:
        writer_or_experiment: a ``SummaryWriter``-like object, or a logger with an ``experiment``
            attribute that is one.
        prefix: tag prefix.
        max_images: at most this many samples get images per epoch.
        panel_size: side of each image panel in pixels.
    """

    def __init__(self, writer_or_experiment: Any, prefix: str = "fgvce", max_images: int = 8,
                 panel_size: int = 160) -> None:
        writer = writer_or_experiment
        if not _is_writer(writer) and _is_writer(getattr(writer, "experiment", None)):
            writer = writer.experiment
        if not _is_writer(writer):
            raise TypeError(
                "Expected `writer_or_experiment` to be a SummaryWriter-like object (with add_scalar, "
                "add_image or add_text), or a logger whose `.experiment` is one, but got "
                f"{type(writer_or_experiment).__name__}. Pass "
                "torch.utils.tensorboard.SummaryWriter(log_dir) or TensorBoardLogger.experiment.")
        if not isinstance(max_images, int) or max_images < 0:
            raise ValueError(f"Expected `max_images` to be an int >= 0, but got {max_images!r}.")
        if not isinstance(panel_size, int) or panel_size < 32:
            raise ValueError(f"Expected `panel_size` to be an int >= 32, but got {panel_size!r}.")
        custom_scalars_layout((), prefix)  # validates the prefix now, not at the first epoch
        self.writer = writer
        self.prefix = prefix
        self.max_images = max_images
        self.panel_size = panel_size
        self.layout_written = False

    def log_layout(self, part_names: Iterable[str] = ()) -> bool:
        """Write the custom-scalars layout if not written yet; returns whether it was written."""
        if self.layout_written or not hasattr(self.writer, "add_custom_scalars"):
            return False
        self.writer.add_custom_scalars(custom_scalars_layout(part_names, self.prefix))
        self.layout_written = True
        return True

    def log_epoch(self, result: EpochResult, step: Optional[int] = None, *,
                  scalars: bool = True, should_stop: Optional[Callable[[], bool]] = None) -> int:
        """Write one epoch.

        Args:
            result: the epoch result.
            step: global step for the events (default ``result.global_step``).
            scalars: also write the scalars with ``add_scalar`` (set ``False`` when they already
                went through the logger's ``log_metrics``, to avoid writing them twice).
            should_stop: asked before each sample panel and the figures; once it returns
                ``True`` nothing more is drawn (e.g. a time budget).

        Returns:
            The number of sample panels drawn.
        """
        stop = should_stop or (lambda: False)
        drawn = 0
        if not isinstance(result, EpochResult):
            raise TypeError(f"Expected `result` to be an EpochResult, but got {type(result).__name__}.")
        step = result.global_step if step is None else int(step)
        w, p = self.writer, self.prefix
        names = [part.name for part in result.stats.parts] or [ps.part for ps in result.stats.part_stats]
        self.log_layout(names)
        if scalars and hasattr(w, "add_scalar"):
            for tag, value in epoch_scalars(result, p).items():
                w.add_scalar(tag, value, step)
        if hasattr(w, "add_image"):
            for slot, index in enumerate(select_samples(result, self.max_images)):
                if stop():
                    break
                self._log_sample(result, index, slot, step)
                drawn += 1
            if not stop():
                for name, image in epoch_figure_images(result).items():
                    w.add_image(f"{p}/figures/{name}", image, step, dataformats="CHW")
        if hasattr(w, "add_text"):
            w.add_text(f"{p}/summary", markdown_summary(result), step)
        if hasattr(w, "flush"):
            w.flush()
        return drawn

    def _log_sample(self, result: EpochResult, index: int, slot: int, step: int) -> None:
        panels = sample_panels(result.samples[index], result.feature_grid, size=self.panel_size)
        if not panels:
            return
        # one image per sample, its panels side by side (each panel also as an image of its own
        # cost four more PNG encodings per sample: 0.37 of the 1.10 s of an 8-sample epoch)
        grid = make_grid(list(panels.values()), nrow=len(panels), padding=2, pad_value=255)
        self.writer.add_image(f"{self.prefix}/samples/{slot}", grid, step, dataformats="CHW")


def _is_writer(obj: Any) -> bool:
    return obj is not None and any(
        callable(getattr(obj, name, None)) for name in ("add_scalar", "add_image", "add_text"))

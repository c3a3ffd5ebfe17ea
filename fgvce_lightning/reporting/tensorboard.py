"""TensorBoard panels of an explained epoch: scalars, part-error layout, sample images, figures, text.

The reporter is duck-typed on the writer (``torch.utils.tensorboard.SummaryWriter``, a tensorboardX
writer, or Lightning's ``TensorBoardLogger`` whose ``.experiment`` is a ``SummaryWriter``); it never
imports Lightning or TensorBoard itself. Whatever the writer lacks (``add_custom_scalars``,
``add_image``, ``add_text``) is skipped.

Images are encoded once per epoch (:mod:`~fgvce_lightning.reporting.rendered`, shared with
``report.html``). Given a ``torch.utils.tensorboard.SummaryWriter`` whose ``add_image`` is torch's
own, the reporter writes those bytes as the image summary directly (``add_image`` would encode
again, as PNG with zlib's slowest usual setting): the figures as PNG, the sample panels as JPEG
(``sample_format="jpeg"``, the default: the bytes ``report.html`` embeds) or PNG. Any other writer
gets ``add_image`` with the tensor.
"""

from __future__ import annotations

import html
import math
import sys
from typing import Any, Callable, Iterable, Optional

from .epoch import EpochResult
from .figures import class_label
from .rendered import EpochImages, epoch_images
from .scalars import custom_scalars_layout, epoch_scalars

__all__ = ["TensorBoardReporter", "markdown_summary", "select_samples", "image_summary"]


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
    - ``P/samples/<i>``: query | contributions | references | trajectory side by side, one image
      for the ``i``-th shown sample, ``i < max_images``;
    - ``P/figures/part_errors`` and ``P/figures/confusion_parts`` (rendered figures);
    - ``P/summary``: the :func:`markdown_summary` text.

    Args:
        writer_or_experiment: a ``SummaryWriter``-like object, or a logger with an ``experiment``
            attribute that is one.
        prefix: tag prefix.
        max_images: at most this many samples get images per epoch.
        panel_size: side of each image panel in pixels.
        sample_format: ``"jpeg"`` (quality 88, 4:4:4; a third of the PNG's bytes, a tenth of its
            encoding time) or ``"png"`` (lossless) for the sample panels written directly to a
            torch ``SummaryWriter``; figures are always PNG.
    """

    def __init__(self, writer_or_experiment: Any, prefix: str = "fgvce", max_images: int = 8,
                 panel_size: int = 160, sample_format: str = "jpeg") -> None:
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
        if sample_format not in ("jpeg", "png"):
            raise ValueError(f"Expected `sample_format` to be 'jpeg' or 'png', but got "
                             f"{sample_format!r}.")
        custom_scalars_layout((), prefix)  # validates the prefix now, not at the first epoch
        self.writer = writer
        self.prefix = prefix
        self.max_images = max_images
        self.panel_size = panel_size
        self.sample_format = sample_format
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
            images = epoch_images(result, self.panel_size)
            for slot, index in enumerate(select_samples(result, self.max_images)):
                if stop():
                    break
                # one image per sample, its panels side by side (each panel also as an image of
                # its own cost four more PNG encodings per sample)
                self._add_image(f"{p}/samples/{slot}", images, ("panel", index), step)
                drawn += 1
            if not stop():
                for name in images.figures():
                    self._add_image(f"{p}/figures/{name}", images, ("figure", name), step)
        if hasattr(w, "add_text"):
            w.add_text(f"{p}/summary", markdown_summary(result), step)
        if hasattr(w, "flush"):
            w.flush()
        return drawn

    def _add_image(self, tag: str, images: EpochImages, which: tuple, step: int) -> None:
        """Write a sample panel (``("panel", index)``) or a figure (``("figure", name)``)."""
        kind, key = which
        image = images.panel(key) if kind == "panel" else images.figures()[key]
        if image is None:
            return
        direct = _png_file_writer(self.writer)
        if direct is None:
            self.writer.add_image(tag, image, step, dataformats="CHW")
            return
        file_writer, summary_cls = direct
        if kind == "figure":
            data = images.figure_png(key)
        else:
            data = images.panel_jpeg(key) if self.sample_format == "jpeg" else images.panel_png(key)
        file_writer.add_summary(image_summary(tag, data, image.shape[1], image.shape[2],
                                              summary_cls), step)


def image_summary(tag: str, data: bytes, height: int, width: int, summary_cls: Any) -> Any:
    """A TensorBoard ``Summary`` with one RGB image given as encoded PNG or JPEG bytes (what
    ``SummaryWriter.add_image`` writes, without encoding again).

    Args:
        tag: the image's tag.
        data: the PNG or JPEG file's bytes.
        height, width: the image's size in pixels.
        summary_cls: TensorBoard's ``Summary`` protocol buffer class.

    Raises:
        ValueError: when ``data`` is neither PNG nor JPEG or the size is not positive.
    """
    head = bytes(data[:8]) if isinstance(data, (bytes, bytearray)) else None
    if head is None or not (head == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff"):
        raise ValueError(f"Expected `data` to be PNG- or JPEG-encoded bytes, but got "
                         f"{type(data).__name__} starting {head!r}.")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"Expected a positive image size, but got {height}×{width}.")
    image = summary_cls.Image(height=int(height), width=int(width), colorspace=3,
                              encoded_image_string=bytes(data))
    return summary_cls(value=[summary_cls.Value(tag=tag, image=image)])


def _png_file_writer(writer: Any) -> Optional[tuple[Any, Any]]:
    """``(event file writer, Summary class)`` of a ``torch.utils.tensorboard.SummaryWriter``
    whose ``add_image`` is torch's own (so encoded PNG bytes can be written as they are), else
    ``None``. Imports nothing: such a writer's modules are loaded already."""
    module = sys.modules.get("torch.utils.tensorboard.writer")
    cls = getattr(module, "SummaryWriter", None)
    summary_cls = getattr(sys.modules.get("torch.utils.tensorboard.summary"), "Summary", None)
    if cls is None or summary_cls is None or not isinstance(writer, cls) \
            or type(writer).add_image is not cls.add_image:
        return None
    get = getattr(writer, "_get_file_writer", None)
    return (get(), summary_cls) if callable(get) else None


def _is_writer(obj: Any) -> bool:
    return obj is not None and any(
        callable(getattr(obj, name, None)) for name in ("add_scalar", "add_image", "add_text"))

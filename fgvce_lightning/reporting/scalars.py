"""Epoch scalars and the TensorBoard custom-scalars layout that groups them into part-error panels.

The scalars are a flat ``{tag: float}`` dict so any logger can take them through
``log_metrics``; the layout is what ``SummaryWriter.add_custom_scalars`` expects, so a TensorBoard
user sees the part-error panels under the "Custom Scalars" tab without configuring anything.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

from .epoch import EpochResult

__all__ = ["epoch_scalars", "custom_scalars_layout", "part_tag"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def part_tag(name: str) -> str:
    """A part name made safe for a metric tag (``"left wing"`` → ``"left_wing"``).

    Args:
        name: part name.

    Returns:
        The name with every run of characters outside ``[A-Za-z0-9_.-]`` replaced by ``_``.
    """
    tag = _UNSAFE.sub("_", str(name)).strip("_")
    return tag or "unnamed"


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix or prefix.strip("/") != prefix:
        raise ValueError(
            f"Expected `prefix` to be a non-empty string without leading/trailing '/', but got "
            f"{prefix!r}. Use e.g. prefix='fgvce'.")
    return prefix


def epoch_scalars(result: EpochResult, prefix: str = "fgvce") -> dict[str, float]:
    """The scalars of one explained epoch, ready for ``logger.log_metrics``.

    Keys (``P`` is ``prefix``): ``P/flip_rate``, ``P/mean_edits``, ``P/explained``,
    ``P/misclassified``, ``P/skipped``, ``P/explained_fraction`` (explained / misclassified),
    ``P/semantic_consistency`` (when part labels exist), ``P/failures``, ``P/skipped_batches``
    (batches left out of the collection), ``P/explain_time_s``,
    ``P/part_error_share/<part>`` with its 95% Wilson interval ``P/part_error_share_low/<part>``
    and ``P/part_error_share_high/<part>``, and ``P/part_contribution_share/<part>`` for every
    part (names made tag-safe with :func:`part_tag`). Values that are not finite (e.g. ``mean_edits`` of an
    epoch where nothing flipped) are left out rather than logged as ``nan``.

    Args:
        result: the epoch result.
        prefix: tag prefix.

    Returns:
        A flat ``{tag: float}`` dict.
    """
    if not isinstance(result, EpochResult):
        raise TypeError(f"Expected `result` to be an EpochResult, but got {type(result).__name__}.")
    prefix = _check_prefix(prefix)
    stats = result.stats
    values: dict[str, float] = {
        "flip_rate": stats.flip_rate,
        "mean_edits": stats.mean_edits,
        "explained": stats.num_explained,
        "misclassified": stats.num_misclassified,
        "skipped": stats.num_skipped,
        "failures": len(result.failures),
        "skipped_batches": len(result.skipped_batches),
        "explain_time_s": result.elapsed_s,
    }
    if stats.num_misclassified > 0:
        values["explained_fraction"] = stats.num_explained / stats.num_misclassified
    if stats.semantic_consistency is not None:
        values["semantic_consistency"] = stats.semantic_consistency
    for ps in stats.part_stats:
        tag = part_tag(ps.part)
        values[f"part_error_share/{tag}"] = ps.error_share
        values[f"part_error_share_low/{tag}"] = ps.interval[0]
        values[f"part_error_share_high/{tag}"] = ps.interval[1]
        values[f"part_contribution_share/{tag}"] = ps.contribution_share
    out = {}
    for key, value in values.items():
        value = float(value)
        if math.isfinite(value):
            out[f"{prefix}/{key}"] = value
    return out


def _exact(tag: str) -> str:
    return f"^{re.escape(tag)}$"


def custom_scalars_layout(part_names: Iterable[str] = (), prefix: str = "fgvce") -> dict:
    """The custom-scalars layout of the part-error panels.

    One category (``"part-error panels"``, suffixed with the prefix when it is not the default)
    holding multiline charts: all part error shares, all part contribution shares (both matched by
    a regex, so parts that appear later still show up), an overview (flip rate, mean edits),
    explained vs misclassified, semantic consistency, failures and skipped batches, and one
    margin chart per known part: its error share with the 95% interval as a band.

    Args:
        part_names: the parts known now (for the per-part charts).
        prefix: the tag prefix used by :func:`epoch_scalars`.

    Returns:
        ``{category: {chart: ["Multiline", [tag regexes]] or ["Margin", [value, lower, upper
        tags]]}}`` as ``SummaryWriter.add_custom_scalars`` expects.
    """
    prefix = _check_prefix(prefix)
    p = re.escape(prefix)
    charts: dict[str, list] = {
        "part error share (all parts)": ["Multiline", [rf"^{p}/part_error_share/.*"]],
        "part contribution share (all parts)": ["Multiline", [rf"^{p}/part_contribution_share/.*"]],
        "overview: flip rate, mean edits": [
            "Multiline", [_exact(f"{prefix}/flip_rate"), _exact(f"{prefix}/mean_edits")]],
        "explained vs misclassified": [
            "Multiline", [_exact(f"{prefix}/explained"), _exact(f"{prefix}/misclassified"),
                          _exact(f"{prefix}/skipped")]],
        "semantic consistency": ["Multiline", [_exact(f"{prefix}/semantic_consistency")]],
        "failures, skipped batches": [
            "Multiline", [_exact(f"{prefix}/failures"), _exact(f"{prefix}/skipped_batches")]],
    }
    seen = set()
    for name in part_names:
        tag = part_tag(name)
        if tag in seen:
            continue
        seen.add(tag)
        charts[f"part: {name}"] = ["Margin", [
            f"{prefix}/part_error_share/{tag}", f"{prefix}/part_error_share_low/{tag}",
            f"{prefix}/part_error_share_high/{tag}"]]
    category = "part-error panels" if prefix == "fgvce" else f"part-error panels ({prefix})"
    return {category: charts}

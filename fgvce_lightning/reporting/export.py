"""The epoch report on disk: ``<report_dir>/epoch_<NNN>/{report.json, report.html, edits.csv}``.

``report.json`` (schema version 1, see :func:`~fgvce_lightning.reporting.schema.report_schema`)::

    schema_version, epoch, global_step, feature_grid [H, W], input_size [H, W],
    num_misclassified, num_explained, num_skipped, flip_rate, mean_edits,
    semantic_consistency, consistency_cells, min_pair_count, method, elapsed_s,
    failures [str], class_names [str] | null, stage ("fit" | "validate" | "test"),
    dataloader_idx, skipped_batches [{dataloader_idx, batch_idx, reason}], notes [str],
    parts       [{id, name, source}]           ("background" for cells that carry no part)
    part_stats  [{part, error_share, interval [lo, hi], count, contribution_share, edit_cells}]
    pair_stats  [{true, pred, true_name, pred_name, count, part_counts {part: n},
                  dominant_parts [str], dominant_share, dominant_interval [lo, hi],
                  enough, examples [index into samples]}]
    samples     [{dataloader_idx, batch_idx, position, true, pred, true_name, pred_name,
                  success, final_pred, skipped_reason, p_true_before, p_pred_before, num_edits,
                  head_evaluations, method, rank, contributions [[float]] | null,
                  regions [[int]] | null,
                  edits [{query_cells [[row, col]], parts [str], similarity, contribution,
                          p_true_after, p_pred_after, consistent_cells | null,
                          judged_cells | null (cells where either side carries a part),
                          cell_parts [[str]] | null (the part names of each query cell),
                          reference {dataloader_idx, batch_idx, position, id [int], slot,
                                     cells [[row, col]], parts [str]}}]}]

Intervals are 95% Wilson score intervals; a pair with ``enough: false`` has fewer than
``min_pair_count`` explained mistakes, too few to say which part dominates. Numbers that are not
finite (``nan``: no contribution, no successful flip …) are ``null``.
``edits.csv`` has one row per edit. The directory is written to a hidden temporary directory
next to the target and renamed into place, so a crash never leaves a half report, and an
existing ``epoch_<NNN>`` is never overwritten (``epoch_<NNN>_1``, ``_2`` … are used instead).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union


from .epoch import EpochResult
from .html import render_html
from .report import report_dict
from .schema import SCHEMA_VERSION, report_schema, validate_report

__all__ = ["report_dict", "report_schema", "validate_report", "write_epoch_report",
           "edits_csv", "SCHEMA_VERSION"]


CSV_COLUMNS = (
    "dataloader_idx", "batch_idx", "position", "true", "pred", "true_name", "pred_name", "success",
    "final_pred", "edit_index", "query_cells", "reference_dataloader_idx", "reference_batch_idx",
    "reference_position", "reference_cells", "parts", "reference_parts", "similarity",
    "contribution", "p_true_after", "p_pred_after",
)


def edits_csv(report: dict) -> str:
    """``edits.csv`` text: one row per edit of every sample (cells as JSON ``[[row, col], …]``,
    part names joined with ``|``, empty fields for ``null``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    blank = lambda v: "" if v is None else v  # noqa: E731
    for sample in report["samples"]:
        for k, edit in enumerate(sample["edits"]):
            ref = edit["reference"]
            writer.writerow([blank(v) for v in (
                sample["dataloader_idx"], sample["batch_idx"], sample["position"], sample["true"],
                sample["pred"], sample.get("true_name"), sample.get("pred_name"),
                sample["success"], sample["final_pred"], k, json.dumps(edit["query_cells"]),
                ref.get("dataloader_idx"), ref.get("batch_idx"), ref.get("position"),
                json.dumps(ref["cells"]), "|".join(edit["parts"]), "|".join(ref.get("parts", [])),
                edit["similarity"], edit.get("contribution"), edit["p_true_after"],
                edit.get("p_pred_after"))])
    return buffer.getvalue()


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _publish(tmp: Path, report_dir: Path, base: str) -> Path:
    """Rename ``tmp`` to the first free ``base``, ``base_1``, ``base_2`` … (never overwriting)."""
    suffix = 0
    while True:
        target = report_dir / (base if suffix == 0 else f"{base}_{suffix}")
        suffix += 1
        if target.exists():
            continue
        try:
            os.rename(tmp, target)
        except OSError:
            if target.exists():  # another writer took this name in between: try the next one
                continue
            raise
        return target


def write_epoch_report(result: EpochResult, report_dir: Union[str, os.PathLike], *,
                       html: bool = True, csv: bool = True, name: Optional[str] = None) -> Path:
    """Write ``report.json`` (and ``report.html``, ``edits.csv``) for one epoch, atomically.

    Everything is written into a hidden temporary directory inside ``report_dir`` and renamed to
    ``epoch_<NNN>`` in one step; on any error the temporary directory is removed and the error
    re-raised, so readers only ever see complete reports. An existing ``epoch_<NNN>`` (an earlier
    run) is kept: the new report goes to ``epoch_<NNN>_1`` (``_2`` …).

    Args:
        result: the epoch result.
        report_dir: the directory holding the epoch directories (created if missing).
        html: also write the self-contained ``report.html``.
        csv: also write ``edits.csv``.
        name: the directory's name (default ``epoch_<NNN>``, from ``result.epoch``).

    Returns:
        The epoch directory written.

    Raises:
        ValueError: when the report fails :func:`validate_report` (nothing is written then).
    """
    report = report_dict(result)
    validate_report(report)
    text = json.dumps(report, indent=1, allow_nan=False, ensure_ascii=False)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    base = name or f"epoch_{int(result.epoch):03d}"
    tmp = report_dir / f".{base}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        _write(tmp / "report.json", text)
        if csv:
            _write(tmp / "edits.csv", edits_csv(report))
        if html:
            _write(tmp / "report.html", render_html(result, report))
        return _publish(tmp, report_dir, base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""The epoch report on disk: ``<report_dir>/epoch_<NNN>/{report.json, report.html, edits.csv}``.

``report.json`` (schema version 1, see :func:`~fgvce_lightning.reporting.schema.report_schema`)::

    schema_version, epoch, global_step, feature_grid [H, W], input_size [H, W],
    num_misclassified, num_explained, num_skipped, flip_rate, mean_edits,
    semantic_consistency, consistency_cells, min_pair_count, method, elapsed_s,
    failures [str], class_names [str] | null,
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
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..engine.results import Edit
from .epoch import EpochResult, ExplainedSample
from .html import render_html
from .schema import SCHEMA_VERSION, report_schema, validate_report

__all__ = ["report_dict", "report_schema", "validate_report", "write_epoch_report",
           "edits_csv", "SCHEMA_VERSION"]


def _num(value: Any) -> Optional[float]:
    """A JSON-safe float (``None`` for ``None``/nan/inf)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _name(index: int, class_names: Optional[Sequence[str]]) -> Optional[str]:
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return None


def _cells(cells) -> list[list[int]]:
    return [[int(r), int(c)] for r, c in cells]


def _grid(t: Optional[torch.Tensor], integer: bool = False) -> Optional[list]:
    if t is None:
        return None
    rows = t.detach().cpu().tolist()
    if integer:
        return [[int(v) for v in row] for row in rows]
    return [[_num(round(v, 6)) if math.isfinite(v) else None for v in row] for row in rows]


def _reference(edit: Edit, parts: Sequence[str]) -> dict:
    rid = [int(v) for v in edit.reference_id]
    if len(rid) >= 3:
        dl, batch, pos = rid[-3], rid[-2], rid[-1]
    elif len(rid) == 2:
        dl, (batch, pos) = 0, rid
    else:
        dl = batch = pos = None
    return {"dataloader_idx": dl, "batch_idx": batch, "position": pos, "id": rid,
            "slot": int(edit.reference_slot), "cells": _cells(edit.reference_cells),
            "parts": [str(p) for p in parts]}


def _sample(sample: ExplainedSample, class_names: Optional[Sequence[str]]) -> dict:
    exp = sample.explanation
    edits = []
    for k, edit in enumerate(exp.edits):
        parts = sample.edit_parts[k] if k < len(sample.edit_parts) else ()
        ref_parts = sample.reference_parts[k] if k < len(sample.reference_parts) else ()
        same = sample.consistent_cells[k] if k < len(sample.consistent_cells) else None
        judged = sample.judged_cells[k] if k < len(sample.judged_cells) else None
        per_cell = None
        if sample.cell_parts is not None:
            per_cell = [[str(n) for n in sample.cell_parts[r][c]] for r, c in edit.query_cells]
        edits.append({
            "query_cells": _cells(edit.query_cells), "reference": _reference(edit, ref_parts),
            "parts": [str(p) for p in parts], "similarity": _num(edit.similarity),
            "contribution": _num(edit.contribution), "p_true_after": _num(edit.p_true_after),
            "p_pred_after": _num(edit.p_pred_after),
            "consistent_cells": None if same is None else int(same),
            "judged_cells": None if judged is None else int(judged), "cell_parts": per_cell})
    dl, batch, pos = (int(v) for v in sample.query_id)
    return {
        "dataloader_idx": dl, "batch_idx": batch, "position": pos,
        "true": int(exp.true), "pred": int(exp.pred),
        "true_name": _name(exp.true, class_names), "pred_name": _name(exp.pred, class_names),
        "success": bool(exp.success), "final_pred": int(exp.final_pred),
        "skipped_reason": exp.skipped_reason,
        "p_true_before": _num(exp.p_true_before), "p_pred_before": _num(exp.p_pred_before),
        "num_edits": exp.num_edits, "head_evaluations": int(exp.head_evaluations),
        "method": exp.method, "rank": int(sample.rank),
        "contributions": _grid(exp.contributions), "regions": _grid(exp.regions, integer=True),
        "edits": edits,
    }


def report_dict(result: EpochResult) -> dict:
    """The JSON-ready report of one epoch (see the module docstring for the layout).

    Args:
        result: the epoch result.

    Returns:
        A dict of plain JSON types (lists, not tuples; ``None`` for non-finite numbers) that
        passes :func:`validate_report`.
    """
    if not isinstance(result, EpochResult):
        raise TypeError(f"Expected `result` to be an EpochResult, but got {type(result).__name__}.")
    stats, names = result.stats, result.class_names
    return {
        "schema_version": SCHEMA_VERSION,
        "epoch": int(result.epoch), "global_step": int(result.global_step),
        "feature_grid": [int(v) for v in result.feature_grid],
        "input_size": [int(v) for v in result.input_size],
        "num_misclassified": int(stats.num_misclassified),
        "num_explained": int(stats.num_explained), "num_skipped": int(stats.num_skipped),
        "flip_rate": _num(stats.flip_rate), "mean_edits": _num(stats.mean_edits),
        "semantic_consistency": _num(stats.semantic_consistency),
        "consistency_cells": int(stats.consistency_cells),
        "min_pair_count": int(stats.min_pair_count),
        "method": str(result.method), "elapsed_s": _num(result.elapsed_s),
        "failures": [str(f) for f in result.failures],
        "class_names": None if names is None else [str(n) for n in names],
        "parts": [{"id": int(p.id), "name": str(p.name), "source": str(p.source)}
                  for p in stats.parts],
        "part_stats": [{"part": str(ps.part), "error_share": _num(ps.error_share),
                        "interval": [_num(v) for v in ps.interval], "count": int(ps.count), "contribution_share": _num(ps.contribution_share),
                        "edit_cells": int(ps.edit_cells)} for ps in stats.part_stats],
        "pair_stats": [{"true": int(p.true), "pred": int(p.pred),
                        "true_name": _name(p.true, names), "pred_name": _name(p.pred, names),
                        "count": int(p.count),
                        "part_counts": {str(k): int(v) for k, v in p.part_counts.items()},
                        "dominant_parts": [str(d) for d in p.dominant_parts],
                        "dominant_share": _num(p.dominant_share),
                        "dominant_interval": [_num(v) for v in p.dominant_interval],
                        "enough": bool(p.enough),
                        "examples": [int(i) for i in p.example_indices]}
                       for p in stats.pair_stats],
        "samples": [_sample(s, names) for s in result.samples],
    }


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
                       html: bool = True, csv: bool = True) -> Path:
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
    base = f"epoch_{int(result.epoch):03d}"
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

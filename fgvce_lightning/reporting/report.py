"""The epoch report as a JSON-ready dict (layout: :mod:`fgvce_lightning.reporting.export`).

:func:`report_dict` is shared by the files written to disk (:mod:`.export`) and the HTML page
(:mod:`.html`), which both depend on it and not on each other.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from ..engine.results import Edit
from .epoch import EpochResult, ExplainedSample
from .schema import SCHEMA_VERSION

__all__ = ["report_dict"]


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
        "stage": str(result.stage), "dataloader_idx": int(result.dataloader_idx),
        "failures": [str(f) for f in result.failures],
        "skipped_batches": [{"dataloader_idx": int(dl), "batch_idx": int(b), "reason": str(r)}
                            for dl, b, r in result.skipped_batches],
        "notes": [str(n) for n in result.notes],
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

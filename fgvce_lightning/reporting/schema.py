"""The versioned schema of ``report.json`` and a small dependency-free validator for it.

The schema is written in a JSON-Schema subset (``type`` — a name or a list of names —, ``const``,
``required``, ``properties``, ``additionalProperties``, ``items``, ``minItems``, ``maxItems``,
``minimum``, ``maximum``) that :func:`validate_report` checks in pure Python. Extra keys are
allowed everywhere (readers must ignore what they do not know); a new required key or a changed
meaning bumps ``schema_version``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

__all__ = ["SCHEMA_VERSION", "report_schema", "validate_report"]

SCHEMA_VERSION = 1

_INT = {"type": "integer"}
_COUNT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NUM = {"type": ["number", "null"]}
_PROB = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_ID = {"type": ["integer", "null"]}
_NAME = {"type": ["string", "null"]}
_STRS = {"type": "array", "items": _STR}
_CELL = {"type": "array", "items": _COUNT, "minItems": 2, "maxItems": 2}
_INTERVAL = {"type": "array", "items": _PROB, "minItems": 2, "maxItems": 2}
_CELLS = {"type": "array", "items": _CELL}
_SIZE = {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2}
_GRID = {"type": ["array", "null"], "items": {"type": "array", "items": _NUM}}

_REFERENCE = {
    "type": "object",
    "required": ["batch_idx", "position", "cells"],
    "properties": {"dataloader_idx": _ID, "batch_idx": _ID, "position": _ID,
                   "id": {"type": "array", "items": _INT}, "slot": _INT, "cells": _CELLS,
                   "parts": _STRS},
}
_EDIT = {
    "type": "object",
    "required": ["query_cells", "reference", "parts", "similarity", "p_true_after"],
    "properties": {"query_cells": _CELLS, "reference": _REFERENCE, "parts": _STRS,
                   "similarity": _NUM, "contribution": _NUM, "p_true_after": _PROB,
                   "p_pred_after": _PROB, "consistent_cells": {"type": ["integer", "null"],
                                                               "minimum": 0},
                   "judged_cells": {"type": ["integer", "null"], "minimum": 0},
                   "cell_parts": {"type": ["array", "null"], "items": _STRS}},
}
_SAMPLE = {
    "type": "object",
    "required": ["dataloader_idx", "batch_idx", "position", "true", "pred", "success",
                 "final_pred", "edits"],
    "properties": {
        "dataloader_idx": _INT, "batch_idx": _INT, "position": _INT, "true": _COUNT,
        "pred": _COUNT, "true_name": _NAME, "pred_name": _NAME, "success": _BOOL,
        "final_pred": _COUNT, "skipped_reason": _NAME, "p_true_before": _PROB,
        "p_pred_before": _PROB, "num_edits": _COUNT, "head_evaluations": _COUNT, "method": _STR,
        "rank": _COUNT, "contributions": _GRID, "regions": _GRID,
        "edits": {"type": "array", "items": _EDIT},
    },
}
_PART = {"type": "object", "required": ["id", "name", "source"],
         "properties": {"id": _COUNT, "name": _STR, "source": _STR}}
_PART_STAT = {"type": "object", "required": ["part", "error_share", "count"],
              "properties": {"part": _STR, "error_share": _PROB, "count": _COUNT,
                             "interval": _INTERVAL, "contribution_share": _PROB,
                             "edit_cells": _COUNT}}
_PAIR_STAT = {"type": "object", "required": ["true", "pred", "count"],
              "properties": {"true": _COUNT, "pred": _COUNT, "true_name": _NAME,
                             "pred_name": _NAME, "count": _COUNT,
                             "part_counts": {"type": "object", "additionalProperties": _COUNT},
                             "dominant_parts": _STRS, "dominant_share": _PROB,
                             "dominant_interval": _INTERVAL, "enough": _BOOL,
                             "examples": {"type": "array", "items": _COUNT}}}
_SKIPPED = {"type": "object", "required": ["dataloader_idx", "batch_idx", "reason"],
            "properties": {"dataloader_idx": _COUNT, "batch_idx": _COUNT, "reason": _STR}}
_REPORT = {
    "type": "object",
    "required": ["schema_version", "epoch", "global_step", "feature_grid", "input_size",
                 "num_misclassified", "num_explained", "parts", "part_stats", "samples"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION}, "epoch": _COUNT, "global_step": _COUNT,
        "feature_grid": _SIZE, "input_size": _SIZE, "num_misclassified": _COUNT,
        "num_explained": _COUNT, "num_skipped": _COUNT, "flip_rate": _PROB, "mean_edits": _NUM,
        "semantic_consistency": _PROB, "consistency_cells": _COUNT, "min_pair_count": _COUNT,
        "method": _STR, "elapsed_s": _NUM, "failures": _STRS,
        "stage": _STR, "dataloader_idx": _COUNT,
        "skipped_batches": {"type": "array", "items": _SKIPPED}, "notes": _STRS,
        "class_names": {"type": ["array", "null"], "items": _STR},
        "parts": {"type": "array", "items": _PART},
        "part_stats": {"type": "array", "items": _PART_STAT},
        "pair_stats": {"type": "array", "items": _PAIR_STAT},
        "samples": {"type": "array", "items": _SAMPLE},
    },
}


def report_schema() -> dict:
    """The schema of ``report.json`` version :data:`SCHEMA_VERSION` (a fresh copy)."""
    return copy.deepcopy(_REPORT)


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def _fail(path: str, message: str) -> None:
    raise ValueError(f"Invalid report at `{path}`: {message}")


def _check(value: Any, schema: dict, path: str) -> None:
    if "const" in schema and value != schema["const"]:
        _fail(path, f"expected {schema['const']!r}, but got {value!r}.")
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[name](value) for name in names):
            _fail(path, f"expected {' or '.join(names)}, but got {type(value).__name__} {value!r:.60}.")
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        _fail(path, f"expected a finite number or null, but got {value!r} (JSON has no NaN/inf).")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            _fail(path, f"expected a value >= {schema['minimum']}, but got {value!r}.")
        if "maximum" in schema and value > schema["maximum"]:
            _fail(path, f"expected a value <= {schema['maximum']}, but got {value!r}.")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                _fail(path, f"missing required key {key!r}.")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                _check(item, properties[key], f"{path}.{key}")
            elif extra is False:
                _fail(path, f"unexpected key {key!r}.")
            elif isinstance(extra, dict):
                _check(item, extra, f"{path}.{key}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            _fail(path, f"expected at least {schema['minItems']} items, but got {len(value)}.")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            _fail(path, f"expected at most {schema['maxItems']} items, but got {len(value)}.")
        if "items" in schema:
            for i, item in enumerate(value):
                _check(item, schema["items"], f"{path}[{i}]")


def _check_consistency(report: dict) -> None:
    """Relations a schema cannot say: cells on the grid, one reference cell per query cell."""
    gh, gw = report["feature_grid"]
    if report["num_explained"] > report["num_misclassified"]:
        _fail("$.num_explained", f"expected at most num_misclassified "
                                 f"({report['num_misclassified']}), but got {report['num_explained']}.")
    for i, sample in enumerate(report["samples"]):
        for k, edit in enumerate(sample["edits"]):
            path = f"$.samples[{i}].edits[{k}]"
            cells = edit["query_cells"], edit["reference"]["cells"]
            if len(cells[0]) != len(cells[1]):
                _fail(f"{path}.reference.cells", f"expected one reference cell per query cell "
                                                 f"({len(cells[0])}), but got {len(cells[1])}.")
            for name, group in zip(("query_cells", "reference.cells"), cells):
                for j, (r, c) in enumerate(group):
                    if r >= gh or c >= gw:
                        _fail(f"{path}.{name}[{j}]", f"expected a cell inside the feature grid "
                                                     f"{[gh, gw]}, but got {[r, c]}.")
    for i, pair in enumerate(report.get("pair_stats", [])):
        for j, example in enumerate(pair.get("examples", [])):
            if example >= len(report["samples"]):
                _fail(f"$.pair_stats[{i}].examples[{j}]",
                      f"expected an index into samples (< {len(report['samples'])}), but got {example}.")


def validate_report(report: Any) -> None:
    """Check a report dict against :func:`report_schema` and its internal consistency.

    Args:
        report: the parsed ``report.json`` (or :func:`~fgvce_lightning.reporting.export.report_dict`).

    Raises:
        ValueError: naming the JSON path (``$.samples[0].edits[1].similarity``) of the first
            problem, what was expected there and what was found.
    """
    if isinstance(report, dict) and report.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        _fail("$.schema_version", f"expected schema version {SCHEMA_VERSION}, but got "
                                  f"{report.get('schema_version')!r}; this reader only knows version "
                                  f"{SCHEMA_VERSION}.")
    _check(report, _REPORT, "$")
    _check_consistency(report)

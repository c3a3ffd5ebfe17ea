"""The self-contained ``report.html`` of an epoch (inline CSS, images as PNG data URIs).

The page needs nothing but a browser: no scripts, no fonts, no external URLs. Every piece of text
that comes from the data (class names, part names, failure messages) is HTML-escaped.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any, Iterable, Optional, Sequence

import torch

from .epoch import EpochResult
from .rendered import encode_jpeg, encode_png, epoch_images
from .report import report_dict

__all__ = ["png_bytes", "png_data_uri", "jpeg_bytes", "jpeg_data_uri", "render_html"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;
max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.8em;background:#d62728;vertical-align:middle}
.ok{color:#2a7a2a;font-weight:600}.bad{color:#b22;font-weight:600}.muted{color:#777}
.sample{border:1px solid #e3e3e3;border-radius:6px;padding:.6em 1em;margin:1em 0}
img{max-width:100%;image-rendering:auto}
"""


def png_bytes(image: torch.Tensor) -> bytes:
    """Encode a ``(3, H, W)`` uint8 image as PNG (lossless; for charts and figures)."""
    return encode_png(image)


def jpeg_bytes(image: torch.Tensor, quality: int = 88) -> bytes:
    """Encode a ``(3, H, W)`` uint8 image as JPEG (4:4:4; for photographs: ~3× smaller than PNG)."""
    return encode_jpeg(image, quality)


def _data_uri(kind: str, data: bytes) -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def png_data_uri(image: torch.Tensor) -> str:
    """A ``data:image/png;base64,…`` URI of a ``(3, H, W)`` uint8 image."""
    return _data_uri("png", png_bytes(image))


def jpeg_data_uri(image: torch.Tensor, quality: int = 88) -> str:
    """A ``data:image/jpeg;base64,…`` URI of a ``(3, H, W)`` uint8 image."""
    return _data_uri("jpeg", jpeg_bytes(image, quality))


def _f(value: Optional[float], digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table; ``rows`` cells are already-escaped HTML."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cls(index: int, name: Optional[str]) -> str:
    return escape(f"{index} ({name})" if name is not None else str(index))


def _summary(report: dict) -> str:
    rows = [
        ("epoch / global step", f"{report['epoch']} / {report['global_step']}"),
        ("method", escape(report["method"])),
        ("misclassified / explained / skipped",
         f"{report['num_misclassified']} / {report['num_explained']} / {report['num_skipped']}"),
        ("flip rate", _f(report["flip_rate"])),
        ("mean edits (successful)", _f(report["mean_edits"], 2)),
        ("semantic consistency", _f(report["semantic_consistency"])),
        ("feature grid / input size",
         f"{report['feature_grid'][0]}×{report['feature_grid'][1]} / "
         f"{report['input_size'][0]}×{report['input_size'][1]}"),
        ("time explaining", f"{_f(report['elapsed_s'], 1)} s"),
        ("failures", str(len(report["failures"]))),
    ]
    return _table(("quantity", "value"), [(escape(k), v) for k, v in rows], numeric=(1,))


def _parts(report: dict) -> str:
    if not report["part_stats"]:
        return '<p class="muted">No part statistics this epoch.</p>'
    rows = []
    for ps in report["part_stats"]:
        share = ps["error_share"] or 0.0
        rows.append((escape(ps["part"]),
                     f'{_f(ps["error_share"])} <span class="bar" style="width:{share * 120:.0f}px">'
                     "</span>", _interval(ps.get("interval")), str(ps["count"]),
                     _f(ps["contribution_share"]), str(ps["edit_cells"])))
    return _table(("part", "error share", "95% interval", "mistakes", "contribution share",
                   "edited cells"), rows, numeric=(3, 4, 5))


def _interval(bounds: Optional[list]) -> str:
    if not bounds or bounds[0] is None or bounds[1] is None:
        return "–"
    return f"{bounds[0]:.2f}–{bounds[1]:.2f}"


def _pairs(report: dict) -> str:
    if not report["pair_stats"]:
        return '<p class="muted">No explained confusion pairs this epoch.</p>'
    rows = []
    least = report.get("min_pair_count", 0)
    for pair in report["pair_stats"]:
        parts = ", ".join(f"{escape(p)} ({pair['part_counts'].get(p, 0)})"
                          for p in pair["dominant_parts"][:4]) or "–"
        examples = ", ".join(f'<a href="#sample-{i}">#{i}</a>' for i in pair["examples"]) or "–"
        dominant = "–"
        if pair["dominant_parts"]:
            dominant = (f"{escape(pair['dominant_parts'][0])} {_f(pair.get('dominant_share'))} "
                        f"({_interval(pair.get('dominant_interval'))})")
            if not pair.get("enough", True):
                dominant += f' <span class="muted">too few to tell (n &lt; {least})</span>'
        rows.append((f"{_cls(pair['true'], pair['true_name'])} → "
                     f"{_cls(pair['pred'], pair['pred_name'])}", str(pair["count"]), dominant,
                     parts, examples))
    return _table(("true → predicted", "count", "dominant part, share (95% interval)",
                   "parts touched", "examples"), rows, numeric=(1,))


def _sample(index: int, sample: dict, jpeg: Optional[bytes]) -> str:
    if sample["skipped_reason"] is not None:
        verdict = f'<span class="muted">skipped: {escape(sample["skipped_reason"])}</span>'
    elif sample["success"]:
        verdict = f'<span class="ok">flipped in {sample["num_edits"]} edits</span>'
    else:
        verdict = (f'<span class="bad">not flipped after {sample["num_edits"]} edits '
                   f'(final prediction {sample["final_pred"]})</span>')
    title = (f"#{index} · sample {sample['dataloader_idx']}/{sample['batch_idx']}/"
             f"{sample['position']} · true {_cls(sample['true'], sample['true_name'])} · predicted "
             f"{_cls(sample['pred'], sample['pred_name'])}")
    if sample["skipped_reason"] is None:
        verdict += (f" · p(true) {_f(sample['p_true_before'])} → "
                    f"{_f(sample['edits'][-1]['p_true_after'] if sample['edits'] else None)}")
    parts = [f'<div class="sample" id="sample-{index}"><h3>{title}</h3><p>{verdict}</p>']
    if jpeg is not None:
        parts.append(f'<img alt="sample {index}: query, contributions, references, trajectory" '
                     f'src="{_data_uri("jpeg", jpeg)}">')
    if sample["edits"]:
        rows = []
        for k, e in enumerate(sample["edits"]):
            ref = e["reference"]
            ref_id = "/".join("?" if ref.get(key) is None else str(ref[key])
                              for key in ("dataloader_idx", "batch_idx", "position"))
            rows.append((str(k + 1), escape(str(e["query_cells"])), escape(", ".join(e["parts"]) or "–"),
                         ref_id, escape(str(ref["cells"])), _f(e["similarity"]),
                         _f(e["p_true_after"]), _f(e.get("p_pred_after"))))
        parts.append(_table(("edit", "query cells", "parts", "reference", "reference cells",
                             "similarity", "p(true) after", "p(pred) after"), rows,
                            numeric=(0, 5, 6, 7)))
    parts.append("</div>")
    return "".join(parts)


def render_html(result: EpochResult, report: Optional[dict] = None, *, panel_size: int = 160) -> str:
    """The ``report.html`` page of an epoch.

    Args:
        result: the epoch result (for the images).
        report: its :func:`~fgvce_lightning.reporting.report.report_dict` (computed if omitted).
        panel_size: side of each image panel in pixels.

    Returns:
        A complete HTML5 document, self-contained.
    """
    if report is None:
        report = report_dict(result)
    title = f"FG-VCE report · epoch {report['epoch']}"
    body: list[Any] = [f"<h1>{escape(title)}</h1>", "<h2>Summary</h2>", _summary(report)]
    body += ["<h2>Parts behind the mistakes</h2>", _parts(report)]
    images = epoch_images(result, panel_size)      # the TensorBoard panels' pictures, reused
    figures = images.figures()
    if "part_errors" in figures:
        body.append(f'<p><img alt="part error shares" '
                    f'src="{_data_uri("png", images.figure_png("part_errors"))}"></p>')
    body += ["<h2>Confusion pairs</h2>", _pairs(report)]
    if "confusion_parts" in figures:
        body.append(f'<p><img alt="confusion pair by part" '
                    f'src="{_data_uri("png", images.figure_png("confusion_parts"))}"></p>')
    if report["failures"]:
        body += ["<h2>Failures</h2><ul>"] + [f"<li>{escape(f)}</li>" for f in report["failures"]]
        body.append("</ul>")
    body.append("<h2>Samples</h2><p class=\"muted\">Panels: the query with the swapped regions "
                "outlined and numbered in edit order · the contribution map (red: evidence for the "
                "predicted class, blue: for the true class) · the reference images with the "
                "matching regions (same numbers) · p(true) and p(pred) after each edit.</p>")
    for i, (sample, data) in enumerate(zip(result.samples, report["samples"])):
        jpeg = None if sample.explanation.skipped and sample.thumbnail is None else \
            images.panel_jpeg(i)
        body.append(_sample(i, data, jpeg))
    body.append(f'<p class="muted">report.json schema_version {report["schema_version"]}</p>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}'
            f"</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")

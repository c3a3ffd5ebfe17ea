import base64
import copy
import csv
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import fgvce_lightning.reporting.export as export
from fgvce_lightning.reporting.export import report_dict, write_epoch_report
from fgvce_lightning.reporting.schema import report_schema, validate_report


def test_report_matches_the_design_contract(result):
    report = report_dict(result)
    validate_report(report)
    assert report["schema_version"] == 1 and report["epoch"] == 3 and report["global_step"] == 1200
    assert report["feature_grid"] == [4, 4] and report["input_size"] == [64, 64]
    assert (report["num_misclassified"], report["num_explained"]) == (10, 2)
    assert report["parts"][1] == {"id": 1, "name": "left wing", "source": "keypoints"}
    assert report["part_stats"][0]["part"] == "head" and report["part_stats"][0]["count"] == 1
    s0 = report["samples"][0]
    assert (s0["dataloader_idx"], s0["batch_idx"], s0["position"]) == (0, 5, 17)
    assert (s0["true"], s0["pred"], s0["success"], s0["final_pred"]) == (1, 2, True, 1)
    assert s0["pred_name"] == "<b>gull & tern</b>"
    e0 = s0["edits"][0]
    assert e0["query_cells"] == [[0, 0], [0, 1]] and e0["parts"] == ["head"]
    assert e0["reference"]["batch_idx"] == 2 and e0["reference"]["position"] == 9
    assert e0["reference"]["cells"] == [[1, 1], [1, 2]]
    assert (e0["similarity"], e0["p_true_after"], e0["p_pred_after"]) == (0.83, 0.41, 0.45)
    assert s0["contributions"][3][0] == -1.0 and s0["regions"][1][2] == 6
    assert report["pair_stats"][0]["examples"] == [0]
    # statistics a person can trust: intervals, and pairs too small to tell marked as such
    assert report["part_stats"][0]["interval"] == pytest.approx([0.0945, 0.9055], abs=1e-3)
    pair = report["pair_stats"][0]
    assert pair["dominant_share"] == 1.0 and pair["enough"] is False
    assert pair["dominant_interval"][0] == pytest.approx(0.2065, abs=1e-3)


def test_nan_becomes_null_and_json_round_trips(make_result):
    report = report_dict(make_result(nan_stats=True))
    text = json.dumps(report, allow_nan=False)        # would raise on a NaN
    loaded = json.loads(text)
    validate_report(loaded)
    assert loaded == report
    assert loaded["mean_edits"] is None and loaded["semantic_consistency"] is None
    assert loaded["samples"][1]["edits"][0]["contribution"] is None
    skipped = loaded["samples"][2]
    assert skipped["skipped_reason"] == "empty bank for class 0"
    assert skipped["p_true_before"] is None and skipped["edits"] == []


def _broken(report, mutate):
    report = copy.deepcopy(report)
    mutate(report)
    return report


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.pop("samples"), r"`\$`: missing required key 'samples'"),
    (lambda r: r.update(schema_version=2), r"`\$\.schema_version`: expected schema version 1"),
    (lambda r: r["samples"][0]["edits"][0].update(similarity="high"),
     r"`\$\.samples\[0\]\.edits\[0\]\.similarity`: expected number or null, but got str"),
    (lambda r: r["samples"][0]["edits"][1].update(p_true_after=float("nan")),
     r"`\$\.samples\[0\]\.edits\[1\]\.p_true_after`: .*JSON has no NaN"),
    (lambda r: r["samples"][0].update(success=1), r"`\$\.samples\[0\]\.success`: expected boolean"),
    (lambda r: r["samples"][1].update(true=True), r"`\$\.samples\[1\]\.true`: expected integer"),
    (lambda r: r["part_stats"][0].update(error_share=1.5), r"error_share`: expected a value <= 1"),
    (lambda r: r.update(feature_grid=[4]), r"`\$\.feature_grid`: expected at least 2 items"),
    (lambda r: r["samples"][0]["edits"][0]["query_cells"].__setitem__(1, [4, 0]),
     r"edits\[0\]\.query_cells\[1\]`: expected a cell inside the feature grid \[4, 4\]"),
    (lambda r: r["samples"][0]["edits"][0]["query_cells"].append([3, 3]),
     r"reference\.cells`: expected one reference cell per query cell \(3\), but got 2"),
    (lambda r: r["pair_stats"][1].update(examples=[9]), r"examples\[0\]`: expected an index"),
    (lambda r: r.update(num_explained=11), r"num_explained`: expected at most"),
    (lambda r: r["pair_stats"][0]["part_counts"].update(head=-1), r"part_counts\.head`"),
])
def test_broken_reports_fail_with_their_path(result, mutate, match):
    report = report_dict(result)
    with pytest.raises(ValueError, match=match):
        validate_report(_broken(report, mutate))


def test_schema_is_a_fresh_copy():
    schema = report_schema()
    assert schema["properties"]["schema_version"] == {"const": 1}
    schema["required"].clear()
    assert "samples" in report_schema()["required"]
    with pytest.raises(ValueError, match=r"`\$`: expected object"):
        validate_report([1, 2])


@pytest.fixture(scope="module")
def written(tmp_path_factory, make_result):
    """One report written with html and csv (rendering is the slow part: do it once)."""
    root = tmp_path_factory.mktemp("reports")
    return root, make_result(), write_epoch_report(make_result(), root / "fgvce")


def test_write_epoch_report_files(tmp_path, written):
    root, result, out = written
    assert out == root / "fgvce" / "epoch_003"
    assert sorted(p.name for p in out.iterdir()) == ["edits.csv", "report.html", "report.json"]
    assert [p.name for p in out.parent.iterdir()] == ["epoch_003"]   # no temporary left over
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    rows = list(csv.DictReader(io.StringIO((out / "edits.csv").read_text())))
    assert len(rows) == 3                                             # 2 + 1 edits, skipped: none
    assert rows[0]["query_cells"] == "[[0, 0], [0, 1]]" and rows[0]["parts"] == "head"
    assert (rows[1]["edit_index"], rows[1]["reference_batch_idx"], rows[1]["p_pred_after"]) == (
        "1", "3", "0.2")
    assert rows[2]["success"] == "False" and rows[2]["contribution"] == ""
    only_json = write_epoch_report(result, tmp_path / "b", html=False, csv=False)
    assert [p.name for p in only_json.iterdir()] == ["report.json"]


def test_same_epoch_twice_keeps_both(tmp_path, make_result):
    first = write_epoch_report(make_result(epoch=3), tmp_path)
    before = (first / "report.json").read_bytes()
    second = write_epoch_report(make_result(epoch=3), tmp_path, html=False)
    third = write_epoch_report(make_result(epoch=3), tmp_path, html=False)
    assert (first.name, second.name, third.name) == ("epoch_003", "epoch_003_1", "epoch_003_2")
    assert (first / "report.json").read_bytes() == before
    (tmp_path / "epoch_004").mkdir()                 # even an empty directory is not replaced
    assert write_epoch_report(make_result(epoch=4), tmp_path, html=False).name == "epoch_004_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_003", "epoch_003_1", "epoch_003_2", "epoch_004", "epoch_004_1"]


@pytest.mark.parametrize("target", ["render_html", "edits_csv", "_publish"])
def test_crash_mid_write_leaves_nothing(tmp_path, result, monkeypatch, target):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export, target, boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_epoch_report(result, tmp_path, html=target == "render_html")
    assert list(tmp_path.iterdir()) == []


def test_html_is_self_contained_and_escaped(written):
    html = (written[2] / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|file:)""", html, re.I)
    assert "<script" not in html and "<link" not in html
    figures = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    photos = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(figures) == 2            # part bars, pair heat map (lossless PNG)
    assert len(photos) == 2             # sample 0, sample 1 panels (JPEG)
    image = Image.open(io.BytesIO(base64.b64decode(photos[0])))
    assert image.format == "JPEG" and image.mode == "RGB" and image.width > image.height > 100
    assert "<b>gull" not in html and "&lt;b&gt;gull &amp; tern&lt;/b&gt;" in html
    assert 'id="sample-1"' in html and 'href="#sample-1"' in html
    assert "empty bank for class 0" in html and "non-finite features" in html
    assert "95% interval" in html and "0.09–0.91" in html
    assert "too few to tell (n &lt; 5)" in html


def test_png_encoder_round_trips():
    from fgvce_lightning.reporting.html import png_bytes

    image = torch.randint(0, 256, (3, 7, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    decoded = Image.open(io.BytesIO(png_bytes(image)))
    assert decoded.size == (11, 7)
    assert torch.equal(torch.from_numpy(np.array(decoded)).permute(2, 0, 1), image)
    with pytest.raises(ValueError, match=r"\(3, H, W\) uint8"):
        png_bytes(image.float())

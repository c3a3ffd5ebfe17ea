import math
import re

import pytest

from fgvce_lightning.reporting.scalars import custom_scalars_layout, epoch_scalars, part_tag


def test_epoch_scalars_keys_and_values(result):
    s = epoch_scalars(result)
    assert s["fgvce/flip_rate"] == 0.5
    assert s["fgvce/mean_edits"] == 2.0
    assert s["fgvce/explained"] == 2 and s["fgvce/misclassified"] == 10
    assert s["fgvce/skipped"] == 1 and s["fgvce/failures"] == 1
    assert s["fgvce/explained_fraction"] == pytest.approx(0.2)
    assert s["fgvce/semantic_consistency"] == 0.75
    assert s["fgvce/part_error_share/head"] == 0.5
    assert s["fgvce/part_error_share/left_wing"] == 0.5
    assert s["fgvce/part_contribution_share/head"] == 0.6
    assert s["fgvce/part_contribution_share/left_wing"] == 0.4
    assert s["fgvce/explain_time_s"] == 1.25
    assert all(isinstance(v, float) and math.isfinite(v) for v in s.values())


def test_non_finite_and_missing_values_are_left_out(make_result):
    s = epoch_scalars(make_result(nan_stats=True), prefix="val/cf")
    assert all(k.startswith("val/cf/") for k in s)
    assert "val/cf/mean_edits" not in s and "val/cf/semantic_consistency" not in s
    assert s["val/cf/flip_rate"] == 0.5


def test_bad_arguments(result):
    with pytest.raises(ValueError, match="prefix"):
        epoch_scalars(result, prefix="/fgvce/")
    with pytest.raises(TypeError, match="EpochResult"):
        epoch_scalars({"flip_rate": 1.0})
    assert part_tag("left wing (L)") == "left_wing_L"


def test_layout_structure_and_coverage(result):
    layout = custom_scalars_layout(["head", "left wing"])
    assert list(layout) == ["part-error panels"]
    charts = layout["part-error panels"]
    for chart in charts.values():
        assert chart[0] in ("Multiline", "Margin") and all(isinstance(t, str) for t in chart[1])
        assert len(chart[1]) == 3 if chart[0] == "Margin" else chart[1]
    # each known part: its error share with the interval as the band
    assert charts["part: left wing"] == ["Margin", [
        "fgvce/part_error_share/left_wing", "fgvce/part_error_share_low/left_wing",
        "fgvce/part_error_share_high/left_wing"]]
    tags = epoch_scalars(result)

    def charts_matching(tag):
        return [n for n, (_, regexes) in charts.items() if any(re.match(r, tag) for r in regexes)]

    for tag in tags:
        if tag.split("/")[1] in ("explain_time_s", "failures", "explained_fraction"):
            continue
        assert charts_matching(tag), f"{tag} is in no chart"
    assert set(charts_matching("fgvce/part_error_share/left_wing")) == {
        "part error share (all parts)", "part: left wing"}
    assert charts_matching("fgvce/part_error_share_low/left_wing") == ["part: left wing"]
    assert charts_matching("fgvce/part_error_share/beak") == ["part error share (all parts)"]
    assert set(charts_matching("fgvce/flip_rate")) == {"overview: flip rate, mean edits"}
    assert set(charts_matching("fgvce/misclassified")) == {"explained vs misclassified"}
    # another prefix: its own category, and the regexes do not match the default prefix
    other = custom_scalars_layout([], prefix="a.b")
    (category, other_charts), = other.items()
    assert category == "part-error panels (a.b)"
    regex = other_charts["part error share (all parts)"][1][0]
    assert re.match(regex, "a.b/part_error_share/x") and not re.match(regex, "aXb/part_error_share/x")

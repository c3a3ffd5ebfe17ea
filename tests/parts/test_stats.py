import math

import pytest
import torch

from parts_helpers import make_edit, make_explanation, skipped
from fgvce_lightning.parts.stats import PartHistory, compute_epoch_stats
from fgvce_lightning.parts.types import PartInfo
from fgvce_lightning.reporting.epoch import ExplainedSample

PARTS = (PartInfo(0, "beak", "keypoints"), PartInfo(1, "wing", "keypoints"),
         PartInfo(2, "tail", "keypoints"))


def samples():
    contrib = torch.tensor([[2.0, -1.0], [1.0, 0.0]])
    cell_names = [[("beak",), ("tail",)], [("wing",), ()]]
    s0 = ExplainedSample(
        make_explanation(0, [make_edit([(0, 0)], [(0, 0)]), make_edit([(1, 0), (1, 1)], [(0, 1), (1, 1)])],
                         true=1, pred=2, success=True, contributions=contrib),
        query_id=(0, 0, 0), edit_parts=(("beak",), ("wing",)),
        reference_parts=(("beak",), ("tail",)), cell_parts=cell_names)
    s1 = ExplainedSample(make_explanation(1, [make_edit([(0, 1)], [(0, 1)])], true=1, pred=2, success=False),
                         query_id=(0, 0, 1), edit_parts=(("beak",),))
    s2 = ExplainedSample(make_explanation(2, [make_edit([(1, 1)], [(1, 1)])], true=3, pred=4),
                         query_id=(0, 0, 2), edit_parts=((),), reference_parts=((),))
    s3 = ExplainedSample(skipped(3), query_id=(0, 0, 3))
    return [s0, s1, s2, s3]


def test_epoch_stats_known_values():
    stats = compute_epoch_stats(samples(), PARTS, num_misclassified=10)
    assert (stats.num_misclassified, stats.num_explained, stats.num_skipped) == (10, 3, 1)
    assert stats.flip_rate == pytest.approx(2 / 3)
    assert stats.mean_edits == pytest.approx(1.5)
    by_name = {p.part: p for p in stats.part_stats}
    assert [p.part for p in stats.part_stats] == ["beak", "wing", "tail"]
    assert by_name["beak"].error_share == pytest.approx(2 / 3) and by_name["beak"].count == 2
    assert by_name["wing"].error_share == pytest.approx(1 / 3) and by_name["wing"].count == 1
    assert by_name["tail"].error_share == 0 and by_name["tail"].count == 0
    # positive contribution mass 3: beak cell 2, wing cell 1, tail cell negative
    assert by_name["beak"].contribution_share == pytest.approx(2 / 3)
    assert by_name["wing"].contribution_share == pytest.approx(1 / 3)
    assert by_name["tail"].contribution_share == 0
    assert (by_name["beak"].edit_cells, by_name["wing"].edit_cells, by_name["tail"].edit_cells) == (1, 1, 0)
    # edits judged: beak<-beak (same), wing<-tail (not), ()<-() (not)
    assert stats.semantic_consistency == pytest.approx(1 / 3)
    first, second = stats.pair_stats
    assert (first.true, first.pred, first.count) == (1, 2, 2)
    assert first.part_counts == {"beak": 2, "wing": 1}
    assert first.dominant_parts == ("beak", "wing") and first.example_indices == (0, 1)
    assert (second.true, second.pred, second.count, second.dominant_parts) == (3, 4, 1, ())
    assert stats.parts == PARTS


def test_cell_parts_override_and_empty_cases():
    labels = torch.zeros(3, 2, 2, dtype=torch.bool)
    labels[2] = True                          # every cell is "tail"
    override = [labels, None, None, None]
    stats = compute_epoch_stats(samples(), PARTS, 10, cell_parts=override)
    by_name = {p.part: p for p in stats.part_stats}
    assert by_name["tail"].contribution_share == pytest.approx(1.0)
    assert by_name["tail"].edit_cells == 3
    empty = compute_epoch_stats([samples()[3]], PARTS, 1)
    assert empty.num_explained == 0 and empty.flip_rate == 0.0 and math.isnan(empty.mean_edits)
    assert empty.semantic_consistency is None and empty.pair_stats == ()
    with pytest.raises(ValueError, match="one entry per sample"):
        compute_epoch_stats(samples(), PARTS, 10, cell_parts=[labels])


def test_part_history_trends_and_state():
    history = PartHistory()
    history.update(0, compute_epoch_stats(samples(), PARTS, 10))
    history.update(2, compute_epoch_stats(samples()[1:], PARTS, 10))
    assert history.epochs == [0, 2] and len(history) == 2
    assert history.series("beak") == [(0, pytest.approx(2 / 3)), (2, pytest.approx(1 / 2))]
    assert history.series("wing", "count") == [(0, 1.0), (2, 0.0)]
    restored = PartHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.as_dict() == history.as_dict()
    with pytest.raises(ValueError, match="key"):
        history.series("beak", "nope")


def test_wilson_interval_known_values():
    from fgvce_lightning.parts.stats import wilson_interval
    lo, hi = wilson_interval(4, 5)
    assert (round(lo, 3), round(hi, 3)) == (0.376, 0.964)       # textbook values, z = 1.96
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(400, 1000)
    assert lo < 0.4 < hi and hi - lo < 0.07                      # narrows with the count
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(6, 5)


def test_intervals_pairs_marked_when_too_few_and_background_as_a_part():
    from fgvce_lightning.parts.stats import wilson_interval
    edits = lambda parts: ExplainedSample(   # noqa: E731 - one mistake of the pair (1, 2)
        make_explanation(0, [make_edit([(0, 0)], [(0, 0)])], true=1, pred=2, success=True),
        query_id=(0, 0, 0), edit_parts=(parts,))
    many = [edits(("tail",))] * 4 + [edits(("background",))] * 2
    few = [ExplainedSample(make_explanation(1, [make_edit([(0, 1)], [(0, 1)])], true=3, pred=4,
                                            success=True), query_id=(0, 1, 0),
                           edit_parts=(("beak",),))]
    stats = compute_epoch_stats(many + few, PARTS, num_misclassified=7, min_pair_count=5)
    assert [p.name for p in stats.parts] == ["beak", "wing", "tail", "background"]
    tail = next(p for p in stats.part_stats if p.part == "tail")
    assert tail.count == 4 and tail.interval == wilson_interval(4, 7)
    big, small = stats.pair_stats
    assert (big.count, big.dominant_parts[0], big.enough) == (6, "tail", True)
    assert big.dominant_share == pytest.approx(4 / 6)
    assert big.dominant_interval == wilson_interval(4, 6)
    assert (small.count, small.enough) == (1, False) and stats.min_pair_count == 5


def test_semantic_consistency_is_counted_per_cell_when_known():
    two_cells = make_explanation(0, [make_edit([(0, 0), (0, 1)], [(0, 0), (1, 1)]),
                                     make_edit([(1, 0)], [(1, 0)])], true=1, pred=2, success=True)
    s = ExplainedSample(two_cells, query_id=(0, 0, 0), edit_parts=(("beak",), ("tail",)),
                        reference_parts=(("beak",), ("wing",)), consistent_cells=(1, 0),
                        judged_cells=(2, 1))
    stats = compute_epoch_stats([s], PARTS, num_misclassified=1)
    assert stats.semantic_consistency == pytest.approx(1 / 3) and stats.consistency_cells == 3

"""A hand-built EpochResult: a flipped sample (2 edits), a failed one (no images), a skipped one."""

from __future__ import annotations

import pytest
import torch

from fgvce_lightning.engine.results import Edit, Explanation
from fgvce_lightning.parts.stats import wilson_interval
from fgvce_lightning.parts.types import EpochStats, PairStat, PartInfo, PartStat
from fgvce_lightning.reporting.epoch import EpochResult, ExplainedSample

GRID = (4, 4)
SIZE = 64
CLASS_NAMES = ("albatross", "frigatebird", "<b>gull & tern</b>", "petrel", "shearwater")


def gray(value: int = 128, size: int = SIZE) -> torch.Tensor:
    return torch.full((3, size, size), value, dtype=torch.uint8)


def build_result(epoch: int = 3, nan_stats: bool = False) -> EpochResult:
    nan = float("nan")
    edits0 = (
        Edit(query_cells=((0, 0), (0, 1)), reference_slot=1, reference_id=(0, 2, 9),
             reference_cells=((1, 1), (1, 2)), similarity=0.83, contribution=1.5,
             p_true_after=0.41, p_pred_after=0.45),
        Edit(query_cells=((2, 2),), reference_slot=4, reference_id=(0, 3, 1),
             reference_cells=((3, 3),), similarity=0.7, contribution=0.6,
             p_true_after=0.61, p_pred_after=0.2),
    )
    contributions = torch.zeros(GRID)
    contributions[0, 0], contributions[0, 1], contributions[2, 2] = 1.0, 0.5, 0.6
    contributions[3, 0] = -1.0
    regions = torch.arange(16).reshape(GRID)
    exp0 = Explanation(query_index=0, true=1, pred=2, success=True, final_pred=1, edits=edits0,
                       p_true_before=0.1, p_pred_before=0.8, contributions=contributions,
                       regions=regions, head_evaluations=321, method="fgvce")
    exp1 = Explanation(query_index=1, true=3, pred=4, success=False, final_pred=4,
                       edits=(Edit(query_cells=((1, 0),), reference_slot=-1,
                                   reference_id=(0, 7, 3), reference_cells=((1, 0),),
                                   similarity=0.5, contribution=nan, p_true_after=0.2,
                                   p_pred_after=0.7),),
                       p_true_before=0.05, p_pred_before=0.9, head_evaluations=50)
    exp2 = Explanation.skipped_query(2, true=0, pred=3, reason="empty bank for class 0")
    samples = (
        ExplainedSample(explanation=exp0, query_id=(0, 5, 17), thumbnail=gray(128),
                        reference_thumbnails=(gray(90), gray(200)),
                        edit_parts=(("head",), ("left wing",)),
                        reference_parts=(("head",), ("left wing",))),
        ExplainedSample(explanation=exp1, query_id=(0, 6, 2), edit_parts=(("left wing",),)),
        ExplainedSample(explanation=exp2, query_id=(1, 0, 4)),
    )
    stats = EpochStats(
        num_misclassified=10, num_explained=2, num_skipped=1, flip_rate=0.5,
        mean_edits=nan if nan_stats else 2.0,
        parts=(PartInfo(0, "head", "keypoints"), PartInfo(1, "left wing", "keypoints")),
        part_stats=(PartStat("head", 0.5, 1, 0.6, 2, wilson_interval(1, 2)),
                    PartStat("left wing", 0.5, 1, 0.4, 2, wilson_interval(1, 2))),
        pair_stats=(PairStat(1, 2, 1, {"head": 1}, ("head",), (0,), 1.0, wilson_interval(1, 1)),
                    PairStat(3, 4, 1, {"left wing": 1}, ("left wing",), (1,), 1.0,
                             wilson_interval(1, 1))),
        semantic_consistency=None if nan_stats else 0.75)
    return EpochResult(epoch=epoch, global_step=1200, feature_grid=GRID, input_size=(SIZE, SIZE),
                       samples=samples, stats=stats, class_names=CLASS_NAMES,
                       failures=("sample 1/0/9: non-finite features",), elapsed_s=1.25)


@pytest.fixture
def result() -> EpochResult:
    return build_result()


@pytest.fixture(scope="session")
def make_result():
    """The builder itself, for tests that need variants (another epoch, nan statistics)."""
    return build_result

import math

import pytest
import torch

from fgvce_lightning.engine.results import Edit, Explanation
from fgvce_lightning.metrics import (deletion_insertion_auc, edits_to_flip, flip_rate,
                                     near_part_hit_rate, same_part_hit_rate)


def edit(query_cells, reference_cells, ref_id=(0, 0, 7)):
    return Edit(query_cells=tuple(query_cells), reference_slot=0, reference_id=ref_id,
                reference_cells=tuple(reference_cells), similarity=0.9, contribution=1.0,
                p_true_after=0.6, p_pred_after=0.3)


def explanation(query_index, edits, success=True):
    return Explanation(query_index=query_index, true=0, pred=1, success=success,
                       final_pred=0 if success else 1, edits=tuple(edits), p_true_before=0.2,
                       p_pred_before=0.7)


def labels_at(cells_by_part, num_parts=2, size=3):
    out = torch.zeros(num_parts, size, size, dtype=torch.bool)
    for part, cells in cells_by_part.items():
        for i, j in cells:
            out[part, i, j] = True
    return out


# Query 0 has part 0 (say "beak") at cell (0, 0); nothing else.
QUERY = labels_at({0: [(0, 0)]}).unsqueeze(0)
# One region edit with two replacements: (0,0) <- (2,2) and (2,2) <- (0,0).
EXPS = [explanation(0, [edit([(0, 0), (2, 2)], [(2, 2), (0, 0)])])]


def test_near_part_query_side_and_radius():
    assert near_part_hit_rate(EXPS, QUERY) == pytest.approx(0.5)              # (0,0) on, (2,2) off
    assert near_part_hit_rate(EXPS, QUERY, radius=1) == pytest.approx(0.5)    # (2,2) is 2 away
    assert near_part_hit_rate(EXPS, QUERY, radius=2) == pytest.approx(1.0)


def test_near_part_two_sided_as_in_the_paper():
    # Reference has part 1 at (0,0): replacement 1 scores (1+0)/2, replacement 2 (0+1)/2.
    refs = {(0, 0, 7): labels_at({1: [(0, 0)]})}
    assert near_part_hit_rate(EXPS, QUERY, refs) == pytest.approx(0.5)
    # Reference has part 1 at (2,2): replacement 1 scores 1, replacement 2 scores 0.
    refs = {(0, 0, 7): labels_at({1: [(2, 2)]})}
    assert near_part_hit_rate(EXPS, QUERY, refs) == pytest.approx(0.5)
    # Reference with parts everywhere: (1+1)/2 and (0+1)/2 -> 0.75.
    refs = {(0, 0, 7): torch.ones(2, 3, 3, dtype=torch.bool)}
    assert near_part_hit_rate(EXPS, QUERY, refs) == pytest.approx(0.75)
    # radius on both sides: every cell within 2 of (0,0) -> 1.0
    refs = {(0, 0, 7): labels_at({1: [(1, 1)]})}
    assert near_part_hit_rate(EXPS, QUERY, refs, radius=2) == pytest.approx(1.0)


def test_same_part_hit_rate():
    same = {(0, 0, 7): labels_at({0: [(2, 2)]})}        # reference's beak at (2,2)
    other = {(0, 0, 7): labels_at({1: [(2, 2)]})}       # reference's wing at (2,2)
    assert same_part_hit_rate(EXPS, QUERY, same) == pytest.approx(0.5)
    assert same_part_hit_rate(EXPS, QUERY, other) == pytest.approx(0.0)
    # part-id maps work as labels too
    ids = torch.full((1, 3, 3), -1)
    ids[0, 0, 0] = 0
    assert same_part_hit_rate(EXPS, ids, {(0, 0, 7): torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]])},
                              num_parts=2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reference_cell_parts"):
        same_part_hit_rate(EXPS, QUERY, {})
    with pytest.raises(ValueError, match="reference_cell_parts"):
        same_part_hit_rate(EXPS, QUERY, None)


def test_distinguishing_first_edit_and_skipped():
    exps = [explanation(0, [edit([(0, 0)], [(0, 0)]), edit([(1, 2)], [(1, 2)])]),
            Explanation.skipped_query(0, 0, 1, reason="no references")]
    assert near_part_hit_rate(exps, QUERY) == pytest.approx(0.5)
    assert near_part_hit_rate(exps, QUERY, first_edit_only=True) == pytest.approx(1.0)
    assert near_part_hit_rate(exps, QUERY, distinguishing=torch.tensor([[False, True]])) == 0.0
    assert near_part_hit_rate(exps, QUERY, distinguishing=torch.tensor([[True, False]])) == 0.5
    assert math.isnan(near_part_hit_rate(exps[1:], QUERY))
    with pytest.raises(ValueError, match="distinguishing"):
        near_part_hit_rate(exps, QUERY, distinguishing=torch.ones(3, 2, dtype=torch.bool))


class ProbabilityHead(torch.nn.Module):
    """p(class 1) = mean of channel 0 over the cells (exactly, via log-probability logits)."""

    def forward(self, f):
        s = f[:, 0].mean(dim=(1, 2)).clamp(1e-7, 1 - 1e-7)
        return torch.stack([torch.log1p(-s), torch.log(s)], dim=1)


def test_deletion_insertion_auc_known_values():
    v = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    query = v.expand(2, 1, 2, 2).clone()
    absent = torch.zeros_like(query)
    contributions = torch.stack([v, -v])                  # perfect ranking, reversed ranking
    true, pred = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    deletion, insertion = deletion_insertion_auc(ProbabilityHead(), query, absent, contributions,
                                                 true, pred, chunk_size=3)
    # perfect: p(pred) deletes as .375,.125,0,0,0 and inserts as 0,.25,.375,.375,.375 (step 1/4)
    assert deletion.tolist() == pytest.approx([0.078125, 0.296875], abs=1e-5)
    assert insertion.tolist() == pytest.approx([0.296875, 0.078125], abs=1e-5)
    deletion, insertion = deletion_insertion_auc(ProbabilityHead(), query, absent, contributions,
                                                 true, pred, steps=2)
    # two steps of two cells: deletion .375,0,0 ; insertion 0,.375,.375
    assert deletion[0].item() == pytest.approx(0.09375, abs=1e-5)
    assert insertion[0].item() == pytest.approx(0.28125, abs=1e-5)
    with pytest.raises(ValueError, match="contributions"):
        deletion_insertion_auc(ProbabilityHead(), query, absent, v, true, pred)


def test_edits_to_flip_and_flip_rate():
    exps = [explanation(0, [edit([(0, 0)], [(0, 0)]), edit([(0, 1), (1, 1)], [(0, 0), (0, 0)])]),
            explanation(0, [edit([(0, 0)], [(0, 0)])]),
            explanation(0, [edit([(0, 0)], [(0, 0)])] * 3, success=False),
            Explanation.skipped_query(0, 0, 1, reason="non-finite features")]
    assert flip_rate(exps) == pytest.approx(2 / 3)
    assert edits_to_flip(exps) == pytest.approx(1.5)
    assert edits_to_flip(exps, unit="cells") == pytest.approx(2.0)
    assert math.isnan(flip_rate(exps[3:])) and math.isnan(edits_to_flip(exps[2:]))

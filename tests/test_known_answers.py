"""Known-answer measures: the separating-part scores, the causes, the ceiling (all by hand)."""

from __future__ import annotations

import pytest
import torch

from fgvce_lightning.known_answers import (FirstEdit, Rate, first_edits_from_report, mistake_causes,
                                           names_cause, separating_part_ceiling,
                                           separating_part_scores)
from fgvce_lightning.parts.stats import wilson_interval

SEP = {(0, 1): {"tail"}, (1, 0): {"tail"}, (2, 3): {"beak"}}


def separating(t, p):
    return SEP[(t, p)]


def fe(t, p, *cells, parts=None):
    cell_parts = tuple(frozenset(c) for c in cells)
    first = frozenset().union(*cell_parts)
    return FirstEdit(true=t, pred=p, first_parts=first, cell_parts=cell_parts,
                     cells=tuple((0, k) for k in range(len(cells))),
                     parts=frozenset(parts) if parts is not None else first)


def test_separating_part_scores_known_values():
    edits = ([fe(0, 1, {"tail"})] * 4                          # pair (0, 1): tail 4 of 6
             + [fe(0, 1, {"background"}, {"body"}, parts={"body", "background"})] * 2
             + [fe(1, 0, {"tail"}, {"body"}, {"body"})]        # names the tail, mostly body
             + [fe(2, 3, {"eye"})] * 3)                         # only 3: too few to judge
    scores = separating_part_scores(edits, separating, min_pair_count=5, unlabelled=(1, 20))
    assert (scores.first_edit.hits, scores.first_edit.total) == (5, 10)
    assert scores.first_edit_main.hits == 4                    # (1, 0)'s main part is body
    assert (scores.pairs.hits, scores.pairs.total) == (1, 1)   # only (0, 1) has >= 5
    assert scores.pair_rows[0] == (0, 1, 6, "tail", ("tail",), True)
    assert scores.pair_rows[1][:4] == (2, 3, 3, "eye") and scores.pair_rows[1][5] is False
    assert scores.edits_unlabelled.value == pytest.approx(0.05)
    assert Rate(4, 5).interval == wilson_interval(4, 5)
    assert "0.800 (4/5" in str(Rate(4, 5)) and str(Rate(0, 0)) == "n/a (0)"


def test_first_edits_from_a_report():
    report = {"samples": [
        {"true": 0, "pred": 1, "skipped_reason": None, "dataloader_idx": 0, "batch_idx": 3,
         "position": 5, "edits": [
            {"query_cells": [[1, 2], [1, 3]], "parts": ["body", "tail"],
             "cell_parts": [["tail"], ["body"]]},
            {"query_cells": [[0, 0]], "parts": []}]},
        {"true": 2, "pred": 3, "skipped_reason": "no reference", "edits": []}]}
    edits, unlabelled = first_edits_from_report(report)
    assert unlabelled == (1, 2) and len(edits) == 1
    assert edits[0].cells == ((1, 2), (1, 3)) and edits[0].first_parts == {"body", "tail"}
    assert edits[0].cell_parts == (frozenset({"tail"}), frozenset({"body"}))
    assert edits[0].query_id == (0, 3, 5)


class _Scenes:
    """A stand-in for SyntheticBirds: image ``i`` is one pixel holding ``i``, +100 when drawn with
    the exact traits, +1000 without the context."""

    def distinguishing_parts(self, t, p):
        return separating(t, p)

    def render(self, indices, exact_parts=(), clutter=True, occluder=True, context=False):
        code = torch.tensor(indices, dtype=torch.float32)
        code = code + 100 * bool(exact_parts) + 1000 * (not clutter and not occluder)
        return {"image": code.view(-1, 1, 1, 1)}


def _model(images):
    """Mistake 0 is fixed by the exact trait, 1 by removing the context, 2 by either, 3 never:
    class 0 is predicted when fixed, 1 otherwise."""
    code = images.flatten().long()
    index, exact, clean = code % 100, (code // 100) % 10 == 1, code >= 1000
    fixed = ((index == 0) & exact) | ((index == 1) & clean) | ((index == 2) & (exact | clean))
    return torch.stack([fixed.float(), (~fixed).float()], 1)


def test_mistake_causes_from_the_images_drawn_again():
    causes = mistake_causes(_model, _Scenes(), [0, 1, 2, 3], [0, 0, 0, 0], [1, 1, 1, 1],
                            batch_size=3)
    assert causes == ["part", "context", "both", "unknown"]
    context = torch.zeros(4, 2, 2, dtype=torch.bool)
    context[1, 0, 1] = True                                    # mistake 1's blob at (0, 1)
    edits = [fe(0, 1, {"tail"}), fe(0, 1, {"background"}, {"background"}),
             fe(0, 1, {"body"}), fe(0, 1, {"tail"})]
    rates = names_cause(edits, causes, context, separating)
    assert (rates["part"].hits, rates["context"].hits, rates["both"].hits) == (1, 1, 0)
    assert (rates["known"].hits, rates["known"].total) == (2, 3)
    assert "unknown" in rates and rates["unknown"].hits == 0


def test_ceiling_swaps_only_the_separating_part_with_the_same_part():
    """Additive head: class 0 reads channel 1 (the true tail), class 1 channel 0. Query 0's tail
    (cell (0, 0)) is the wrong variant; the reference's tail sits at (1, 1). Swapping the tail
    alone flips it. Query 1's wrong evidence lies outside its tail: swapping the tail is not
    enough. Query 2's tail is not visible: not flipped."""
    head = lambda x: torch.stack([x[:, 1].sum((1, 2)), x[:, 0].sum((1, 2))], 1)  # noqa: E731
    q = torch.zeros(3, 2, 2, 2)
    q[0, 0, 0, 0] = 1.0
    q[1, 0, 0, 0], q[1, 0, 1, 0] = 1.0, 2.0
    q[2, 0, 0, 0] = 1.0
    parts = torch.zeros(3, 1, 2, 2, dtype=torch.bool)       # one part: the tail
    parts[0, 0, 0, 0] = parts[1, 0, 0, 0] = True
    ref = torch.zeros(1, 2, 2, 2)
    ref[0, 1, 1, 1] = 1.5
    ref_parts = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    ref_parts[0, 0, 1, 1] = True
    sep = torch.tensor([True])
    rate = separating_part_ceiling(head, q, torch.zeros(3, dtype=torch.long), parts,
                                   [ref] * 3, [ref_parts] * 3, [sep] * 3)
    assert (rate.hits, rate.total) == (1, 3)

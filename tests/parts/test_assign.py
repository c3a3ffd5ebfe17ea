import pytest
import torch

from parts_helpers import make_edit, make_explanation, skipped
from fgvce_lightning.parts.assign import as_cell_parts, assign_parts

NAMES = ["beak", "wing", "tail"]


def query_labels():
    labels = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    labels[0, 0, 0, 0] = True            # query 0: beak at (0,0)
    labels[0, 1, 1, 1] = True            # wing at (1,1)
    labels[0, 2, 1, 1] = True            # tail at (1,1) too
    labels[1, 2, 2, 2] = True            # query 1: tail at (2,2)
    return labels


def test_assign_from_boolean_labels_with_references():
    ref = torch.zeros(3, 3, 3, dtype=torch.bool)
    ref[1, 0, 1] = True                  # reference: wing at (0,1)
    exps = [make_explanation(0, [make_edit([(0, 0), (1, 1)], [(0, 1), (2, 2)], ref_id=(0, 4, 2)),
                                 make_edit([(2, 0)], [(0, 0)], ref_id=(0, 4, 2))]),
            make_explanation(1, [make_edit([(2, 2)], [(0, 1)], ref_id=(0, 9, 9))]),
            skipped(1)]
    out = assign_parts(exps, NAMES, query_labels(), {(0, 4, 2): ref})
    # (2, 0) carries no part: the edit lies on the background; the first reference edit touches
    # the wing and a background cell: it is about the wing
    assert out[0].edit_parts == (("beak", "tail", "wing"), ("background",))
    assert out[0].reference_parts == (("wing",), ("background",))
    # per cell: beak <- wing and wing/tail <- background are judged and differ; background <-
    # background says nothing about parts and is not judged
    assert out[0].consistent_cells == (0, 0) and out[0].judged_cells == (2, 0)
    assert out[0].cell_parts[1][1] == ("tail", "wing")
    assert out[0].cell_parts[2][2] == ("background",)
    assert out[1].edit_parts == (("tail",),)
    assert out[1].reference_parts == ()          # reference (0, 9, 9) unknown -> unknown as a whole
    assert out[1].consistent_cells == ()
    assert out[2].edit_parts == () and out[2].cell_parts is None


def test_assign_from_part_id_maps_and_callable_references():
    ids = torch.tensor([[[0, 0, 1], [2, 2, 1], [-1, -1, -1]]])
    exps = [make_explanation(0, [make_edit([(0, 2), (1, 0)], [(0, 0), (0, 0)], ref_id=(1,))])]
    out = assign_parts(exps, NAMES, ids, lambda key: torch.full((3, 3), 2) if key == (1,) else None)
    assert out[0].edit_parts == (("tail", "wing"),)
    assert out[0].reference_parts == (("tail",),)
    assert out[0].cell_parts[2] == [("background",)] * 3


def test_assign_errors():
    exps = [make_explanation(5, [make_edit([(0, 0)], [(0, 0)])])]
    with pytest.raises(ValueError, match="query_index"):
        assign_parts(exps, NAMES, query_labels())
    with pytest.raises(ValueError, match="P=2"):
        assign_parts(exps, NAMES[:2], query_labels())
    with pytest.raises(TypeError, match="dtype"):
        as_cell_parts(torch.zeros(1, 3, 3), 3)

import pytest
import torch

from fgvce_lightning.parts.annotations import (cell_part_names, keypoints_to_cell_parts,
                                               masks_to_cell_parts, near_cells,
                                               part_ids_to_cell_parts)


def test_keypoints_land_in_known_cells():
    # 224x224 input on a 7x7 grid: 32 px per cell.
    kp = torch.tensor([[[0.0, 0.0, 1.0],        # part 0 -> cell (0, 0)
                        [100.0, 40.0, 1.0],     # part 1 -> x=100 col 3, y=40 row 1
                        [223.9, 223.9, 1.0],    # part 2 -> cell (6, 6)
                        [64.0, 31.99, 1.0]],    # part 3 -> row 0 (31.99 < 32), col 2
                       [[50.0, 50.0, 0.0],      # invisible
                        [-1.0, 10.0, 1.0],      # outside (left)
                        [10.0, 224.0, 1.0],     # outside (bottom edge is exclusive)
                        [float("nan"), 3.0, 1.0]]])
    out = keypoints_to_cell_parts(kp, (224, 224), (7, 7), radius=0)
    assert out.shape == (2, 4, 7, 7) and out.dtype == torch.bool
    expected = torch.zeros(2, 4, 7, 7, dtype=torch.bool)
    expected[0, 0, 0, 0] = expected[0, 1, 1, 3] = expected[0, 2, 6, 6] = expected[0, 3, 0, 2] = True
    assert torch.equal(out, expected)


def test_keypoints_non_divisible_and_rectangular_sizes():
    # 100 rows x 60 cols input on a 3x4 grid: rows of 33.3 px, cols of 15 px.
    kp = torch.tensor([[[59.0, 99.0, 2.0], [15.0, 33.4, 1.0]]])
    out = keypoints_to_cell_parts(kp, (100, 60), (3, 4), radius=0)
    assert out[0, 0].nonzero().tolist() == [[2, 3]]
    assert out[0, 1].nonzero().tolist() == [[1, 1]]


def test_keypoints_label_the_cells_within_the_radius_nearest_keypoint_first():
    """Known answers on an 8x8 input, 4x4 grid (2 px per cell, cell (i, j) centred at
    (2j + 1, 2i + 1) px). Part 0 sits at the centre of cell (1, 1), part 1 at that of (1, 3)."""
    kp = torch.tensor([[[3.0, 3.0, 1.0], [7.0, 3.0, 1.0]]])
    # radius 1 cell: the four edge neighbours of each keypoint's cell (distance 1), not the
    # diagonal ones (distance 1.41); cell (1, 2) is 1 from both: the nearest is a tie, taken by
    # the lower part index, and neither keypoint lies inside it
    out = keypoints_to_cell_parts(kp, (8, 8), (4, 4), radius=1.0)
    assert out[0, 0].nonzero().tolist() == [[0, 1], [1, 0], [1, 1], [1, 2], [2, 1]]
    assert out[0, 1].nonzero().tolist() == [[0, 3], [1, 3], [2, 3]]
    # radius 1.5: the diagonal neighbours join; the nearest keypoint decides between the parts
    wide = keypoints_to_cell_parts(kp, (8, 8), (4, 4), radius=1.5)
    assert wide[0, 0, 0, 0] and wide[0, 0, 2, 2] and not wide[0, 1, 2, 2]
    assert wide[0, 1, 2, 3] and not wide[0, 1, 3, 3]                   # 2 cells away: no
    assert not bool((wide[0, 0] & wide[0, 1]).any())   # one part per cell when none lies in it
    # a keypoint inside a cell always labels it, even when another one is nearer its centre
    kp2 = torch.tensor([[[2.1, 2.1, 1.0], [3.0, 3.0, 1.0]]])      # both inside cell (1, 1)
    both = keypoints_to_cell_parts(kp2, (8, 8), (4, 4), radius=0.5)
    assert both[0, :, 1, 1].tolist() == [True, True]
    assert not bool(both[0, 0, 0, 0])                              # 1.27 cells away
    # no keypoint within the radius: the cell carries no part (it is background)
    far = keypoints_to_cell_parts(kp, (8, 8), (4, 4), radius=1.0)
    assert not bool(far[0, :, 3, 0].any())
    with pytest.raises(ValueError, match="radius"):
        keypoints_to_cell_parts(kp, (8, 8), (4, 4), radius=-1)


def test_keypoint_validation_errors():
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        keypoints_to_cell_parts(torch.zeros(4, 3), (32, 32), (4, 4))
    with pytest.raises(ValueError, match="input_size"):
        keypoints_to_cell_parts(torch.zeros(1, 4, 3), (0, 32), (4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        keypoints_to_cell_parts([[1, 2, 1]], (32, 32), (4, 4))


def test_masks_coverage_threshold():
    # 8x8 mask on a 2x2 grid: each cell is 4x4 = 16 px.
    mask = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    mask[0, 0, :4, :4] = True           # cell (0,0) fully covered
    mask[0, 0, 4:8, 4] = True           # cell (1,1): 4/16 = 0.25
    mask[0, 1, 0, 4:7] = True           # cell (0,1): 3/16 = 0.1875
    out = masks_to_cell_parts(mask, (2, 2), min_coverage=0.2)
    assert out[0, 0].tolist() == [[True, False], [False, True]]
    # part 1 covers too little of any cell, but the cell holding most of it carries it
    assert out[0, 1].tolist() == [[False, True], [False, False]]
    out = masks_to_cell_parts(mask, (2, 2), min_coverage=0.25)
    assert out[0, 0].tolist() == [[True, False], [False, True]]
    out = masks_to_cell_parts(mask, (2, 2), min_coverage=0.5)
    assert out[0, 0].tolist() == [[True, False], [False, False]]
    out = masks_to_cell_parts(mask.float() * 0.5, (2, 2), min_coverage=0.5)   # soft masks
    assert out[0, 0].tolist() == [[True, False], [False, False]]
    with pytest.raises(ValueError, match="min_coverage"):
        masks_to_cell_parts(mask, (2, 2), min_coverage=0.0)
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        masks_to_cell_parts(mask[0], (2, 2))


def test_near_cells_dilation():
    labels = torch.zeros(1, 5, 5, dtype=torch.bool)
    labels[0, 0, 0] = True
    assert near_cells(labels, 1)[0].sum() == 4
    assert near_cells(labels, 2)[0].sum() == 9
    assert torch.equal(near_cells(labels, 0), labels)
    centre = torch.zeros(2, 3, 5, 5, dtype=torch.bool)
    centre[1, 2, 2, 2] = True
    out = near_cells(centre, 1)
    assert out.shape == centre.shape and out.sum() == 9 and out[1, 2, 1:4, 1:4].all()
    with pytest.raises(ValueError, match="radius"):
        near_cells(labels, -1)


def test_part_ids_and_names():
    ids = torch.tensor([[[0, -1], [2, 0]]])
    onehot = part_ids_to_cell_parts(ids, 3)
    assert onehot.shape == (1, 3, 2, 2)
    assert onehot[0, 0].tolist() == [[True, False], [False, True]]
    assert onehot[0, 1].sum() == 0
    with pytest.raises(ValueError, match="num_parts"):
        part_ids_to_cell_parts(ids, 2)
    labels = onehot[0].clone()
    labels[0, 1, 0] = True   # cell (1, 0) carries "a" as well as "c"
    names = cell_part_names(labels, ["a", "b", "c"])
    assert names == [[("a",), ("background",)], [("a", "c"), ("a",)]]   # never empty

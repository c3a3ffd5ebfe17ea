import math

import pytest
import torch

from fgvce_lightning.engine.correspondence import (align_references, cell_similarity, correspond,
                                                   grid_transforms)


def _object_map(h=6, w=6, seed=0):
    """A map whose object (four distinct high-norm cells) sits on a weak random background."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.rand(1, 8, h, w, generator=gen)
    for k, (i, j) in enumerate(((2, 1), (2, 2), (3, 2), (3, 3))):
        x[0, k, i, j] = 3.0
    return x


def test_grid_transforms_start_with_the_identity_and_cover_shifts_and_mirrors():
    source, inside, mirrored = grid_transforms(3, 4, max_shift=1, mirror=True)
    assert source.shape == (2 * 9, 12) and inside.shape == source.shape
    assert torch.equal(source[0], torch.arange(12)) and bool(inside[0].all())
    assert int(mirrored.sum()) == 9 and not bool(mirrored[0])
    m = int(torch.nonzero(mirrored & inside.all(1)).flatten()[0])   # the unshifted mirror
    assert source[m].view(3, 4)[0].tolist() == [3, 2, 1, 0]
    assert grid_transforms(3, 4, max_shift=None, mirror=False)[0].shape[0] == 5 * 7


@pytest.mark.parametrize("dy, dx, flip", [(0, 0, False), (1, -1, False), (0, 1, True)])
def test_a_shifted_or_mirrored_copy_is_found_again(dy, dx, flip):
    query = _object_map()
    ref = torch.roll(query, shifts=(dy, dx), dims=(2, 3))
    if flip:
        ref = torch.roll(query.flip(-1), shifts=(dy, dx), dims=(2, 3))
    valid = torch.ones(1, 1, dtype=torch.bool)
    sim = cell_similarity(query, ref[:, None])
    corr = correspond(sim, valid, (6, 6), max_shift=2, weights=query.norm(dim=1).flatten(1))
    assert bool(corr.mirrored[0, 0]) == flip
    for i, j in ((2, 1), (2, 2), (3, 2), (3, 3)):          # every object cell finds itself
        jj = (5 - j if flip else j) + dx
        assert int(corr.source[0, 0, i * 6 + j]) == (i + dy) * 6 + jj
        assert float(corr.similarity[0, 0, i * 6 + j]) == pytest.approx(1.0, abs=1e-5)


def test_the_object_decides_not_the_background():
    """With uniform weights the 32 background cells outvote the object's 4 and pick a wrong
    transform; weighted by the activation norm the object picks the right one."""
    query = _object_map(seed=1)
    query[0, 7] = 0.4 * torch.arange(36).view(6, 6) / 36       # a background gradient
    ref = torch.roll(query, shifts=(0, 2), dims=(2, 3))
    ref[0, 7] = query[0, 7]                                      # the background did not move
    sim = cell_similarity(query, ref[:, None])
    valid = torch.ones(1, 1, dtype=torch.bool)
    weighted = correspond(sim, valid, (6, 6), max_shift=2, weights=query.norm(dim=1).flatten(1))
    assert int(weighted.source[0, 0, 2 * 6 + 1]) == 2 * 6 + 3
    uniform = correspond(sim, valid, (6, 6), max_shift=2)
    assert int(uniform.source[0, 0, 2 * 6 + 1]) != 2 * 6 + 3


def test_missing_references_score_minus_infinity_and_align_keeps_the_best():
    query = _object_map()
    good = torch.roll(query, shifts=(0, 1), dims=(2, 3))
    poor = torch.rand(1, 8, 6, 6, generator=torch.Generator().manual_seed(3))
    refs = torch.stack([poor[0], good[0], torch.zeros(8, 6, 6)])[None]      # (1, 3, C, H, W)
    valid = torch.tensor([[True, True, False]])
    corr, slots, aligned = align_references(query, refs, valid, max_shift=1, keep=3)
    assert slots[0].tolist()[:2] == [1, 0] and slots[0, 2] == 2
    assert corr.score[0, 0] > corr.score[0, 1] > -math.inf == corr.score[0, 2]
    assert aligned.shape == (1, 3, 8, 36)
    # the kept reference laid out on the query's grid: the object cells line up again
    assert torch.allclose(aligned[0, 0].view(8, 6, 6)[:, 2, 1], query[0, :, 2, 1])
    (_, one, _) = align_references(query, refs, valid, max_shift=1, keep=1)
    assert one.tolist() == [[1]]


def test_protected_channels_stay_the_querys_own():
    query = _object_map()
    refs = torch.roll(query, shifts=(1, 0), dims=(2, 3))[:, None].clone()
    refs[:, :, 6:] = 9.0
    _, _, aligned = align_references(query, refs, torch.ones(1, 1, dtype=torch.bool), channels=6)
    assert torch.equal(aligned[0, 0, 6:], query[0, 6:].flatten(1))


def test_shape_is_checked():
    sim = torch.zeros(1, 16, 1, 16)
    with pytest.raises(ValueError, match="similarity"):
        correspond(sim, torch.ones(1, 1, dtype=torch.bool), (3, 3))


def test_annotations_restrict_the_correspondence_to_the_same_part():
    """2×3 grid, one part. The aligned cell of query cell (0, 0) shows no tail; the reference's
    tail is at (1, 2) and (0, 2): the nearer one, (0, 2), is taken. Query cell (1, 1) has no
    part and keeps its aligned cell; (0, 1)'s tail is shown by its aligned cell already."""
    from fgvce_lightning.engine.correspondence import restrict_to_parts
    source = torch.arange(6).view(1, 1, 6)                       # identity alignment
    qp = torch.zeros(1, 1, 6, dtype=torch.bool)
    qp[0, 0, [0, 1]] = True
    rp = torch.zeros(1, 1, 1, 6, dtype=torch.bool)
    rp[0, 0, 0, [1, 2, 5]] = True
    out = restrict_to_parts(source, qp, rp, (2, 3))
    assert out[0, 0].tolist() == [1, 1, 2, 3, 4, 5]               # (0, 0) -> (0, 1), nearest
    rp[0, 0, 0, 1] = False
    out = restrict_to_parts(source, qp, rp, (2, 3))
    assert out[0, 0].tolist() == [2, 2, 2, 3, 4, 5]
    none = restrict_to_parts(source, qp, torch.zeros_like(rp), (2, 3))   # no reference labels
    assert torch.equal(none, source)

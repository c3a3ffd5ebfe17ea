"""Tests of the saliency partition (region growing on contribution maps)."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from fgvce_lightning.engine.partition import default_max_region_size, grow_regions


def _components(cells: set[tuple[int, int]], connectivity: int) -> int:
    """Number of connected components of a set of cells (plain BFS)."""
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    seen: set[tuple[int, int]] = set()
    count = 0
    for start in cells:
        if start in seen:
            continue
        count += 1
        queue = deque([start])
        seen.add(start)
        while queue:
            i, j = queue.popleft()
            for di, dj in steps:
                nxt = (i + di, j + dj)
                if nxt in cells and nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
    return count


def _check_partition(ids: torch.Tensor, connectivity: int, max_size: int) -> None:
    assert ids.dtype == torch.int64
    for regions in ids:
        num = int(regions.max()) + 1
        assert int(regions.min()) == 0
        assert torch.equal(torch.unique(regions), torch.arange(num))      # dense, covering
        for r in range(num):
            cells = {tuple(c) for c in torch.nonzero(regions == r).tolist()}
            assert 1 <= len(cells) <= max_size
            assert _components(cells, connectivity) == 1


def test_two_planted_blobs_found_in_order_of_total_contribution() -> None:
    c = torch.zeros(1, 8, 8)
    c[0, 0, 0] = 5.0                 # strongest cell, seeded first, total 5
    c[0, 4:7, 4:7] = 1.0             # weaker cells, but total 9: must come first
    c[0, 4, 4] = 1.2
    ids = grow_regions(c, max_region_size=9)
    blob = torch.zeros(8, 8, dtype=torch.bool)
    blob[4:7, 4:7] = True
    assert torch.equal(ids[0] == 0, blob)
    peak = torch.zeros(8, 8, dtype=torch.bool)
    peak[0, 0] = True
    assert torch.equal(ids[0] == 1, peak)
    # zero-contribution background: grouped into regions after the blobs
    assert int(ids[0][~blob & ~peak].min()) == 2
    _check_partition(ids, 4, 9)


def test_threshold_separates_blobs_and_bounds_members() -> None:
    c = torch.zeros(1, 5, 5)
    c[0, 1, 1:4] = torch.tensor([4.0, 3.0, 1.0])   # 1.0 < 0.5 · 4: not in the seed's region
    ids = grow_regions(c, threshold=0.5, max_region_size=25)
    assert ids[0, 1, 1] == ids[0, 1, 2] != ids[0, 1, 3]
    loose = grow_regions(c, threshold=0.2, max_region_size=25)
    assert loose[0, 1, 1] == loose[0, 1, 2] == loose[0, 1, 3]
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 7, 7, generator=gen)
    for threshold in (0.0, 0.3, 0.8, 1.0):
        ids = grow_regions(maps, threshold=threshold)
        for m, regions in zip(maps, ids):
            for r in range(int(regions.max()) + 1):
                vals = m[regions == r]
                if vals.max() > 0:                 # positive seed: every member >= t · seed
                    assert bool((vals >= threshold * vals.max() - 1e-12).all())


@pytest.mark.parametrize("connectivity", [4, 8])
def test_regions_are_connected_disjoint_and_covering(connectivity: int) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(5, 1, 4, 4, generator=gen)
    maps = torch.nn.functional.interpolate(base, size=(9, 9), mode="bilinear")[:, 0]  # smooth blobs
    ids = grow_regions(maps, connectivity=connectivity)
    assert ids.shape == (5, 9, 9)
    _check_partition(ids, connectivity, default_max_region_size(9, 9))
    # smooth maps give multi-cell regions, not only singletons
    num_regions = ids.flatten(1).max(dim=1).values + 1
    assert bool((num_regions < 81 // 2).all()), num_regions


def test_connectivity_eight_joins_diagonal_cells() -> None:
    c = torch.zeros(1, 4, 4)
    c[0, 0, 0] = c[0, 1, 1] = c[0, 2, 2] = 1.0
    four = grow_regions(c, connectivity=4, max_region_size=16)
    eight = grow_regions(c, connectivity=8, max_region_size=16)
    assert len({int(four[0, i, i]) for i in range(3)}) == 3
    assert len({int(eight[0, i, i]) for i in range(3)}) == 1 and int(eight[0, 0, 0]) == 0


def test_max_region_size_and_default() -> None:
    assert default_max_region_size(7, 7) == 7
    assert default_max_region_size(1, 2) == 1
    ids = grow_regions(torch.ones(2, 4, 4), max_region_size=3)
    _check_partition(ids, 4, 3)
    assert int(ids.max()) + 1 >= 6          # 16 cells, at most 3 per region
    singles = grow_regions(torch.randn(1, 3, 3), max_region_size=1)
    assert torch.equal(torch.sort(singles.flatten()).values, torch.arange(9))


def test_best_first_growth_takes_strongest_neighbour() -> None:
    c = torch.tensor([[[0.0, 3.0, 0.0],
                       [2.0, 4.0, 2.5],
                       [0.0, 3.5, 0.0]]])
    ids = grow_regions(c, max_region_size=3)
    assert set(map(tuple, torch.nonzero(ids[0] == 0).tolist())) == {(1, 1), (2, 1), (0, 1)}


def test_ties_are_deterministic() -> None:
    # constant map, singletons: equal totals, so region ids follow creation = row-major order
    ids = grow_regions(torch.ones(1, 3, 4), max_region_size=1)
    assert torch.equal(ids[0], torch.arange(12).view(3, 4))
    a = grow_regions(torch.zeros(2, 5, 5))
    b = grow_regions(torch.zeros(2, 5, 5))
    assert torch.equal(a, b) and int(a[0, 0, 0]) == 0


def test_batch_equals_individual_maps() -> None:
    gen = torch.Generator().manual_seed(2)
    maps = torch.randn(4, 6, 7, generator=gen)
    maps[1] = 0.0                                            # a query that finishes early
    maps[2, 2:4, 2:5] += 3.0
    batch = grow_regions(maps, connectivity=8)
    for n in range(4):
        assert torch.equal(grow_regions(maps[n:n + 1], connectivity=8)[0], batch[n])


def test_negative_maps_and_input_untouched() -> None:
    c = -torch.arange(1.0, 10.0).view(1, 3, 3)
    copy = c.clone()
    ids = grow_regions(c, threshold=0.5, max_region_size=9)
    assert torch.equal(c, copy)
    _check_partition(ids, 4, 9)
    assert int(ids[0, 0, 0]) == 0          # least negative region first


def test_errors() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        grow_regions([[1.0]])
    with pytest.raises(ValueError, match=r"shape \(N, H, W\)"):
        grow_regions(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="finite"):
        grow_regions(torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(ValueError, match="connectivity"):
        grow_regions(torch.zeros(1, 2, 2), connectivity=6)
    with pytest.raises(ValueError, match="threshold"):
        grow_regions(torch.zeros(1, 2, 2), threshold=1.5)
    with pytest.raises(ValueError, match="max_region_size"):
        grow_regions(torch.zeros(1, 2, 2), max_region_size=0)

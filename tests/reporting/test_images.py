import pytest
import torch

from fgvce_lightning.reporting.images import (EDIT_COLORS, cell_mask, contribution_panel,
                                              query_panel, reference_panel, sample_panel,
                                              sample_panels, trajectory_image)

GRID = (4, 4)


def _color_at(image, y, x):
    return tuple(image[:, y, x].tolist())


def test_cell_mask_covers_the_cells():
    mask = cell_mask([(0, 0), (2, 3)], GRID, (64, 64))
    assert mask.dtype == torch.bool and mask.shape == (64, 64)
    assert mask[:16, :16].all() and mask[32:48, 48:].all()
    assert mask.sum() == 2 * 16 * 16
    with pytest.raises(ValueError, match="feature grid"):
        cell_mask([(4, 0)], GRID, (64, 64))


def test_query_panel_outlines_and_numbers_edits(result):
    sample = result.samples[0]
    thumb = sample.thumbnail
    panel = query_panel(thumb, sample.explanation, GRID)
    assert panel.shape == thumb.shape and panel.dtype == torch.uint8
    changed = (panel != thumb).any(0)
    # edit 1 covers rows 0-15, cols 0-31: its bottom edge is outlined in edit 1's colour
    assert _color_at(panel, 15, 20) == EDIT_COLORS[0]
    assert _color_at(panel, 8, 31) == EDIT_COLORS[0]
    # edit 2 covers cell (2, 2) = rows 32-47, cols 32-47
    assert _color_at(panel, 47, 40) == EDIT_COLORS[1]
    assert changed[32:48, 32:48].any() and changed[:16, :32].sum() > changed[:16, :32].numel() // 4
    # cells never edited stay untouched, and the inside of a region is only changed by the label
    assert not changed[52:64, 0:12].any() and not changed[20:28, 52:60].any()
    assert not changed[10:14, 20:28].any()


def test_query_panel_skips_without_thumbnail_and_resizes(result):
    exp = result.samples[0].explanation
    assert query_panel(None, exp, GRID) is None
    big = query_panel(result.samples[0].thumbnail, exp, GRID, size=160)
    assert big.shape == (3, 160, 160)
    skipped = result.samples[2].explanation
    assert torch.equal(query_panel(result.samples[0].thumbnail, skipped, GRID),
                       result.samples[0].thumbnail)


def test_contribution_panel_is_diverging_with_neutral_zero(result):
    sample = result.samples[0]
    panel = contribution_panel(sample.thumbnail, sample.explanation.contributions)
    assert panel.shape == (3, 64, 64) and panel.dtype == torch.uint8
    r, g, b = panel[:, 8, 8].tolist()       # +1.0: red
    assert r > b + 40
    r, g, b = panel[:, 56, 8].tolist()      # -1.0: blue
    assert b > r + 40
    assert torch.equal(panel[:, 20:28, 52:60], sample.thumbnail[:, 20:28, 52:60])  # 0: unchanged
    assert contribution_panel(sample.thumbnail, None) is None
    bare = contribution_panel(None, sample.explanation.contributions)
    assert bare.shape == (3, 64, 64)
    nan_map = torch.full(GRID, float("nan"))
    assert torch.equal(contribution_panel(sample.thumbnail, nan_map), sample.thumbnail)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        contribution_panel(sample.thumbnail, torch.zeros(1, 4, 4))


def test_reference_panel_outlines_matched_cells(result):
    sample = result.samples[0]
    edit = sample.explanation.edits[1]          # reference cell (3, 3): rows/cols 48-63
    ref = sample.reference_thumbnails[1]
    panel = reference_panel(ref, edit, GRID, numbers=[2])
    assert panel.shape == ref.shape and panel.dtype == torch.uint8
    assert _color_at(panel, 63, 56) == EDIT_COLORS[1]
    assert not (panel != ref).any(0)[:40, :40].any()
    assert reference_panel(None, edit, GRID) is None
    with pytest.raises(ValueError, match="one number per edit"):
        reference_panel(ref, [edit], GRID, numbers=[1, 2])


def test_trajectory_image(result):
    image = trajectory_image(result.samples[0].explanation)
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[1:]) > 100
    assert image.float().std() > 10
    assert trajectory_image(result.samples[2].explanation) is None


def test_sample_panel_combines_available_panels(result):
    full = sample_panels(result.samples[0], GRID, size=96)
    assert list(full) == ["query", "contributions", "reference_0", "reference_1", "trajectory"]
    assert all(p.shape == (3, 96, 96) for p in full.values())
    grid = sample_panel(result.samples[0], size=96)   # grid inferred from the contributions
    assert grid.dtype == torch.uint8 and grid.shape == (3, 100, 5 * 98 + 2)
    # no thumbnails, no contributions: only the trajectory remains
    assert list(sample_panels(result.samples[1], GRID)) == ["trajectory"]
    assert sample_panel(result.samples[2], GRID) is None     # skipped, no thumbnail
    with pytest.raises(ValueError, match="feature_grid"):
        sample_panel(result.samples[1])


def _reference_regions(image, regions, numbers, feature_grid):
    """The drawing draw_regions replaced: the pixel mask outlined by a max filter, the numbers by
    torchvision's draw_bounding_boxes (one PIL round trip)."""
    import torch.nn.functional as F
    from torchvision.utils import draw_bounding_boxes

    regions_numbers = [(list(cells), n) for cells, n in zip(regions, numbers) if len(cells)]
    if not regions_numbers:
        return image
    size = image.shape[1:]
    width = max(1, round(min(size) / 80))
    outlines, boxes, colors, labels = [], [], [], []
    for cells, number in regions_numbers:
        mask = cell_mask(cells, feature_grid, size)
        outside = F.pad((~mask).float()[None, None], (width,) * 4, value=1.0)
        near = F.max_pool2d(outside, kernel_size=2 * width + 1, stride=1)[0, 0] > 0.5
        outlines.append(mask & near)
        anchor = cell_mask([min(cells)], feature_grid, size).nonzero()
        (y0, x0), (y1, x1) = anchor.min(0).values.tolist(), anchor.max(0).values.tolist()
        boxes.append([x0 + width, y0 + width, max(x1, x0 + width + 1), max(y1, y0 + width + 1)])
        colors.append(EDIT_COLORS[(number - 1) % len(EDIT_COLORS)])
        labels.append(str(number))
    image = image.clone()
    for outline, color in zip(outlines, colors):
        image[:, outline] = torch.tensor(color, dtype=torch.uint8)[:, None]
    return draw_bounding_boxes(image, torch.tensor(boxes, dtype=torch.float32), labels=labels,
                               colors=colors, width=0, fill_labels=True,
                               label_colors=[(255, 255, 255)] * len(labels))


def test_draw_regions_matches_mask_outlines_and_torchvision_labels():
    import random

    from fgvce_lightning.reporting.regions import draw_regions

    rng = random.Random(0)
    for trial in range(120):
        gh, gw = rng.choice([(4, 4), (7, 7), (14, 14), (3, 5), (1, 1)])
        h, w = rng.choice([(160, 160), (64, 64), (160, 120), (97, 160), (30, 30)])
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(trial))
        n = rng.randint(1, 12)               # up to 12 edits: two-digit labels, colours wrap
        regions = [[(rng.randrange(gh), rng.randrange(gw)) for _ in range(rng.randint(1, 5))]
                   for _ in range(n)]
        numbers = list(range(1, n + 1))
        expected = _reference_regions(image, regions, numbers, (gh, gw))
        drawn = draw_regions(image, regions, numbers, (gh, gw))
        assert torch.equal(drawn, expected), (trial, gh, gw, h, w, regions)
    with pytest.raises(ValueError, match="within the feature grid"):
        draw_regions(image, [[(0, 9)]], [1], (4, 4))
    assert draw_regions(image, [[]], [1], (4, 4)) is image

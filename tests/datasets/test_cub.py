"""Tests for the CUB-200-2011 reader, on a tiny fake folder with one coloured dot per part."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fgvce_lightning.datasets.cub import (
    CUB200,
    CUB_PART_NAMES,
    FAKE_BACKGROUND,
    FAKE_PART_COLOURS,
    make_fake_cub,
)

SIZE = 48
LEFT_RIGHT = {CUB_PART_NAMES.index(f"left {p}"): CUB_PART_NAMES.index(f"right {p}")
              for p in ("eye", "leg", "wing")}
SWAP = list(range(len(CUB_PART_NAMES)))
for _l, _r in LEFT_RIGHT.items():
    SWAP[_l], SWAP[_r] = _r, _l
PALETTE = torch.cat([FAKE_PART_COLOURS.float(), torch.tensor([FAKE_BACKGROUND]).float()])


@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> Path:
    """Parent folder of a fake CUB_200_2011 (3 classes × 4 images, 80×60 and 60×80 JPEGs)."""
    root = tmp_path_factory.mktemp("cub")
    make_fake_cub(root, num_classes=3, images_per_class=4, image_size=(80, 60), seed=0)
    return root


def _part_locs(root: Path) -> np.ndarray:
    """(N, 15, 3) original keypoints read straight from the file (image ids are 1..N in order)."""
    table = np.loadtxt(root / "CUB_200_2011" / "parts" / "part_locs.txt")
    out = np.zeros((int(table[:, 0].max()), 15, 3))
    out[table[:, 0].astype(int) - 1, table[:, 1].astype(int) - 1] = table[:, 2:]
    return out


def _dot_colour(image: torch.Tensor, x: float, y: float) -> int:
    """Index into PALETTE of the colour nearest the pixel under (x, y); 15 means background."""
    pixel = image[:, round(y), round(x)] * 255.0
    return int(((PALETTE - pixel) ** 2).sum(1).argmin())


def _copy(cub: Path, tmp_path: Path) -> Path:
    shutil.copytree(cub / "CUB_200_2011", tmp_path / "CUB_200_2011")
    return tmp_path / "CUB_200_2011"


def test_parses_official_layout(cub):
    train, test = CUB200(cub, split="train"), CUB200(cub / "CUB_200_2011", split="test")
    everything = CUB200(cub, split="all", merge_left_right=False)
    assert (len(train), len(test), len(everything)) == (6, 6, 12)
    assert set(train.image_ids.tolist()).isdisjoint(test.image_ids.tolist())
    assert everything.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4       # 0-based
    assert train.num_classes == 3 and train.class_names == ("Fake Bird 1", "Fake Bird 2",
                                                            "Fake Bird 3")
    assert everything.part_names == CUB_PART_NAMES
    item = train[1]
    assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == train.labels[1]
    assert item["keypoints"].shape == (12, 3) and item["keypoints"].dtype == torch.float32
    assert item["index"] == 1
    assert item["image"].min() < -1.0                                     # ImageNet-normalised
    batch = next(iter(DataLoader(train, batch_size=4)))
    assert batch["image"].shape == (4, 3, 224, 224) and batch["keypoints"].shape == (4, 12, 3)


@pytest.mark.parametrize("crop", [None, "center", "bbox", "random"])
@pytest.mark.parametrize("hflip", [False, True])
def test_keypoints_stay_on_their_dots(cub, crop, hflip):
    ds = CUB200(cub, split="all", image_size=SIZE, crop=crop, hflip=hflip,
                merge_left_right=False, normalize=False, seed=3)
    original = _part_locs(cub)
    checked = cropped = flipped = 0
    for i in range(len(ds)):
        item, geo = ds[i], ds.geometry(i)
        kp = item["keypoints"]
        flipped += geo.flipped
        # flipped items swap left/right ids: output "left eye" is the mirrored right eye's dot
        source = SWAP if geo.flipped else list(range(15))
        for j in range(15):
            x, y, v = kp[j].tolist()
            orig = original[ds.image_ids[i] - 1, source[j]]
            if v:
                assert _dot_colour(item["image"], x, y) == source[j], (i, j, crop, hflip)
                checked += 1
            elif orig[2]:                       # annotated but cropped away: projected position
                out = geo.to_output(torch.tensor(orig[:2], dtype=torch.float32))
                torch.testing.assert_close(kp[j, :2], out)
                assert ((out < -0.5) | (out >= SIZE - 0.5)).any()
                cropped += 1
            else:                               # not annotated: (0, 0) as in part_locs.txt
                assert x == 0.0 and y == 0.0
    assert checked >= 40
    if crop in ("center", "bbox"):
        assert cropped > 0
    if crop is None:
        assert cropped == 0
    if hflip:
        assert 0 < flipped < len(ds)


def test_flip_mirrors_image_and_swaps_left_right(cub):
    plain = CUB200(cub, split="all", image_size=SIZE, merge_left_right=False, normalize=False)
    flip = CUB200(cub, split="all", image_size=SIZE, hflip=True, merge_left_right=False,
                  normalize=False)
    i = next(i for i in range(len(flip)) if flip.geometry(i).flipped)
    a, b = plain[i], flip[i]
    torch.testing.assert_close(b["image"], a["image"].flip(-1))
    expected = a["keypoints"][SWAP].clone()
    annotated = (expected[:, 0] != 0) | (expected[:, 1] != 0)
    expected[:, 0] = torch.where(annotated, SIZE - 1 - expected[:, 0], 0.0)
    torch.testing.assert_close(b["keypoints"], expected)
    left_eye = CUB_PART_NAMES.index("left eye")
    assert torch.equal(b["keypoints"][left_eye, 2], a["keypoints"][SWAP[left_eye], 2])


def test_merge_left_right(cub):
    merged = CUB200(cub, split="all", image_size=SIZE, crop=None)
    split = CUB200(cub, split="all", image_size=SIZE, crop=None, merge_left_right=False)
    assert merged.part_names == ("back", "beak", "belly", "breast", "crown", "forehead", "eye",
                                 "leg", "wing", "nape", "tail", "throat")
    cases = set()
    for i in range(len(merged)):
        m, s = merged[i]["keypoints"], split[i]["keypoints"]
        for name in ("eye", "leg", "wing"):
            pair = s[[CUB_PART_NAMES.index(f"left {name}"), CUB_PART_NAMES.index(f"right {name}")]]
            got = m[merged.part_names.index(name)]
            vis = pair[:, 2] > 0
            cases.add(int(vis.sum()))
            assert got[2] == float(vis.any())
            expected = pair[vis, :2].mean(0) if vis.any() else torch.zeros(2)
            torch.testing.assert_close(got[:2], expected)
        single = [n for n in merged.part_names if n not in ("eye", "leg", "wing")]
        for name in single:
            torch.testing.assert_close(m[merged.part_names.index(name)],
                                       s[CUB_PART_NAMES.index(name)])
    assert {1, 2} <= cases              # both the averaged and the single-visible case occur


def test_randomness_is_deterministic_per_seed_index_epoch(cub):
    ds = CUB200(cub, split="all", image_size=SIZE, crop="random", hflip=True, seed=1)
    first = [ds.geometry(i) for i in range(len(ds))]
    torch.testing.assert_close(ds[2]["image"], ds[2]["image"])
    assert first == [CUB200(cub, split="all", image_size=SIZE, crop="random", hflip=True,
                            seed=1).geometry(i) for i in range(len(ds))]
    other = CUB200(cub, split="all", image_size=SIZE, crop="random", hflip=True, seed=2)
    assert first != [other.geometry(i) for i in range(len(ds))]
    ds.set_epoch(1)
    assert first != [ds.geometry(i) for i in range(len(ds))]


def test_class_subset_and_max_images(cub):
    ds = CUB200(cub, split="all", class_subset=[2, 0])
    assert ds.class_names == ("Fake Bird 3", "Fake Bird 1") and ds.num_classes == 2
    assert sorted(ds.labels.tolist()) == [0] * 4 + [1] * 4
    assert ds.labels[ds.image_ids > 8].tolist() == [0] * 4               # class 3 → label 0
    assert CUB200(cub, split="all", class_subset=1).num_classes == 1
    few = CUB200(cub, split="all", max_images=5)
    assert len(few) == 5 and sorted(np.bincount(few.labels).tolist()) == [1, 2, 2]
    with pytest.raises(ValueError, match="class_subset"):
        CUB200(cub, class_subset=[0, 3])


def test_missing_root_and_files(cub, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CUB200(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="images.txt"):
        CUB200(tmp_path)
    root = _copy(cub, tmp_path)
    (root / "parts" / "part_locs.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"part_locs\.txt.*official CUB-200-2011 layout"):
        CUB200(root)


def test_bounding_boxes_only_needed_for_bbox_crop(cub, tmp_path):
    root = _copy(cub, tmp_path)
    (root / "bounding_boxes.txt").unlink()
    assert len(CUB200(root, split="all")) == 12
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        CUB200(root, crop="bbox")


def _rewrite(path: Path, line_number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line_number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_malformed_and_inconsistent_files(cub, tmp_path):
    root = _copy(cub, tmp_path)
    locs = root / "parts" / "part_locs.txt"
    original = locs.read_text()
    _rewrite(locs, 3, "1 3 12.0 oops 1")
    with pytest.raises(ValueError,
                       match=r"Malformed line 3 in .*part_locs\.txt.*<image_id> <part_id>"):
        CUB200(root)
    _rewrite(locs, 3, "1 3 12.0 1")
    with pytest.raises(ValueError, match="Malformed line 3"):
        CUB200(root)
    _rewrite(locs, 3, "1 16 12.0 5.0 1")
    with pytest.raises(ValueError, match="Part id 16 .* out of range"):
        CUB200(root)
    _rewrite(locs, 3, "1 2 12.0 5.0 1")
    with pytest.raises(ValueError, match=r"each \(image id, part id\) at most once"):
        CUB200(root)
    _rewrite(locs, 3, "1 3 12.0 5.0 2")
    with pytest.raises(ValueError, match="<visible> .* 0 or 1"):
        CUB200(root)
    _rewrite(locs, 3, "99 3 12.0 5.0 1")
    with pytest.raises(ValueError, match=r"Unknown image ids .*\[99\]"):
        CUB200(root)
    locs.write_text(original)

    labels = root / "image_class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt.*missing ids \[12\]"):
        CUB200(root)
    _rewrite(root / "images.txt", 2, "2")
    with pytest.raises(ValueError, match=r"Malformed line 2 in .*images\.txt"):
        CUB200(root)


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "val"}, "split"), ({"crop": "corner"}, "crop"), ({"image_size": 0}, "image_size"),
    ({"max_images": 0}, "max_images"), ({"random_crop_scale": (0.0, 1.0)}, "random_crop_scale"),
])
def test_argument_errors(cub, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CUB200(cub, **kwargs)

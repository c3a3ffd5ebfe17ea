import pytest
import torch
from torch.utils.data import DataLoader

from fgvce_lightning.datasets import (
    ATTRIBUTES,
    CLASS_SPECS,
    PART_NAMES,
    SyntheticBirds,
    class_specs,
    confusable_pairs,
    distinguishing_parts,
    make_dataloaders,
)

S = 64
P = len(PART_NAMES)


@pytest.fixture(scope="module")
def birds() -> SyntheticBirds:
    return SyntheticBirds(48, seed=3, split="val")


def test_items_have_documented_shapes_and_dtypes(birds):
    item = birds[5]
    assert set(item) == {"image", "label", "keypoints", "masks", "index"}
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["label"].shape == () and item["label"].dtype == torch.int64
    assert 0 <= int(item["label"]) < birds.num_classes
    assert item["keypoints"].shape == (P, 3) and item["keypoints"].dtype == torch.float32
    assert item["masks"].shape == (P, S, S) and item["masks"].dtype == torch.bool
    assert int(item["index"]) == 5
    assert len(birds) == 48 and birds[-1]["index"] == 47
    with pytest.raises(IndexError, match="out of range"):
        birds[48]


def test_default_collate_stacks_every_field(birds):
    batch = next(iter(DataLoader(birds, batch_size=8)))
    assert batch["image"].shape == (8, 3, S, S)
    assert batch["label"].shape == (8,)
    assert batch["keypoints"].shape == (8, P, 3)
    assert batch["masks"].shape == (8, P, S, S) and batch["masks"].dtype == torch.bool


def test_same_seed_gives_identical_items_and_other_seeds_or_splits_differ(birds):
    again = SyntheticBirds(48, seed=3, split="val", cache=False)        # lazy path, same stream
    for i in (0, 17, 47):
        a, b = birds[i], again[i]
        for key in a:
            assert torch.equal(a[key], b[key]), key
    other_seed = SyntheticBirds(8, seed=4, split="val")
    other_split = SyntheticBirds(8, seed=3, split="train")
    assert not torch.equal(other_seed[0]["image"], birds[0]["image"])
    assert not torch.equal(other_split[0]["image"], birds[0]["image"])


def test_items_do_not_depend_on_dataset_length_or_chunking(birds):
    short = SyntheticBirds(10, seed=3, split="val", chunk_size=3)
    for i in range(10):
        assert torch.equal(short[i]["image"], birds[i]["image"])
        assert torch.equal(short[i]["masks"], birds[i]["masks"])


def test_masks_are_disjoint_and_main_parts_visible(birds):
    batch = birds.render(range(48))
    masks = batch["masks"]
    assert int(masks.sum(dim=1).max()) <= 1                             # one part per pixel at most
    area = masks.flatten(2).sum(-1).float()                             # (N, P)
    body, head, beak = (PART_NAMES.index(p) for p in ("body", "head", "beak"))
    assert (area[:, body] > 20).float().mean() > 0.9
    assert (area[:, head] > 5).float().mean() > 0.85
    assert (area[:, beak] > 0).float().mean() > 0.8
    # the bird covers a reasonable share of the image
    bird = masks.any(dim=1).flatten(1).float().mean(1)
    assert ((bird > 0.03) & (bird < 0.5)).all()


def test_visible_keypoints_lie_in_their_part_mask(birds):
    batch = birds.render(range(48))
    kp, masks = batch["keypoints"], batch["masks"]
    visible = kp[..., 2] > 0
    assert visible.float().mean() > 0.8
    n, p = torch.nonzero(visible, as_tuple=True)
    x, y = kp[n, p, 0].round().long(), kp[n, p, 1].round().long()
    assert ((x >= 0) & (x < S) & (y >= 0) & (y < S)).all()
    assert masks[n, p, y, x].all()
    # an invisible keypoint means its part has no pixel near the anchor; a part without any
    # visible pixel is never marked visible
    empty = ~masks.flatten(2).any(-1)
    assert not (visible & empty).any()


@pytest.mark.parametrize("true,pred", [(0, 1), (0, 2), (0, 4), (3, 5), (6, 1)])
def test_classes_differ_only_in_their_distinguishing_parts(true, pred):
    birds = SyntheticBirds(0, seed=1)
    indices = list(range(12))
    a = birds.render(indices, labels=[true] * 12)
    b = birds.render(indices, labels=[pred] * 12)
    parts = distinguishing_parts(true, pred)
    ids = [PART_NAMES.index(name) for name in parts]
    allowed = a["masks"][:, ids].any(1) | b["masks"][:, ids].any(1)     # (N, S, S)
    changed = (a["image"] - b["image"]).abs().amax(dim=1) > 1e-6
    assert changed.any(), "the two species should look different somewhere"
    assert not (changed & ~allowed).any(), f"pixels outside {sorted(parts)} changed"
    # the parts that are not distinguishing keep exactly the same masks
    others = [k for k in range(P) if k not in ids]
    unaffected = a["masks"][:, others] == b["masks"][:, others]
    occluded_by_changed = allowed[:, None].expand_as(unaffected)
    assert (unaffected | occluded_by_changed).all()
    # and every declared part really changes in some image
    for k in ids:
        in_part = a["masks"][:, k] | b["masks"][:, k]
        assert (changed & in_part).any(), f"part {PART_NAMES[k]} never changes"


def test_render_with_own_labels_matches_items(birds):
    batch = birds.render([2, 9])
    assert torch.equal(batch["image"][1], birds[9]["image"])
    forced = birds.render([2, 9], labels=batch["label"])
    assert torch.equal(forced["image"], batch["image"])


def test_class_specs_and_distinguishing_parts():
    assert len(CLASS_SPECS) == 8 and len(set(s.name for s in CLASS_SPECS)) == 8
    assert CLASS_SPECS[0].name == "yellow-billed plain-winged round-tailed finch"
    assert distinguishing_parts(0, 1) == {"beak"}
    assert distinguishing_parts(2, 6) == {"tail"}
    assert distinguishing_parts(torch.tensor(3), torch.tensor(5)) == {"wing", "tail"}
    assert distinguishing_parts(4, 4) == set()
    pairs = confusable_pairs(8)
    assert len(pairs) == 12                                             # edges of a 3-cube
    assert all(len(distinguishing_parts(a, b)) == 1 for a, b in pairs)
    assert all(s.traits.keys() == {"beak", "wing", "tail"} for s in CLASS_SPECS)
    assert len(class_specs(20)) == 20 and {a.part for a in ATTRIBUTES} <= set(PART_NAMES)
    assert SyntheticBirds(0, num_classes=5).distinguishing_parts(1, 4) == {"beak", "tail"}


def test_invalid_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="Expected `num_classes`"):
        SyntheticBirds(4, num_classes=1)
    with pytest.raises(ValueError, match="Expected `split`"):
        SyntheticBirds(4, split="validation")
    with pytest.raises(ValueError, match="Expected `image_size`"):
        SyntheticBirds(4, image_size=16)
    with pytest.raises(ValueError, match="Expected `attribute_noise`"):
        SyntheticBirds(4, attribute_noise=-1.0)
    with pytest.raises(ValueError, match="Expected `labels`"):
        SyntheticBirds(0).render([0, 1], labels=[0, 9])
    with pytest.raises(ValueError, match="Expected `pred`"):
        SyntheticBirds(0, num_classes=4).distinguishing_parts(0, 5)
    with pytest.raises(ValueError, match="Expected `batch_size`"):
        make_dataloaders(4, 4, batch_size=0)


def test_make_dataloaders_val_unshuffled_and_train_reproducible():
    train, val = make_dataloaders(24, 20, batch_size=8, seed=2)
    idx = torch.cat([b["index"] for b in val])
    assert torch.equal(idx, torch.arange(20))                            # batch_idx * 8 + position
    first = torch.cat([b["index"] for b in train])
    train2, _ = make_dataloaders(24, 4, batch_size=8, seed=2)
    assert torch.equal(first, torch.cat([b["index"] for b in train2]))
    assert sorted(first.tolist()) == list(range(24)) and not torch.equal(first, torch.arange(24))
    assert val.dataset.split == "val" and train.dataset.split == "train"

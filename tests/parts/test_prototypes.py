import pytest
import torch

from fgvce_lightning.parts.prototypes import PartPrototypes


def planted_maps(n=12, c=16, h=4, w=4, k=4, noise=0.05, drift=0.0, seed=0):
    """Feature maps whose cells belong to `k` planted parts (orthogonal directions).

    Part 0 is background: small activation norm. ``drift`` moves every part direction by that
    much along a fixed random unit direction (the features' slow drift over epochs).
    Returns maps (n,C,H,W) and labels (n,H,W).
    """
    shift = torch.nn.functional.normalize(torch.randn(k, c, generator=torch.Generator().manual_seed(99)), dim=1)
    dirs = torch.eye(c)[:k] + drift * shift
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(k, (n, h, w), generator=g)
    norms = torch.where(labels == 0, 0.5, 3.0)
    cells = dirs[labels] * norms[..., None] + noise * torch.randn(n, h, w, c, generator=g)
    return cells.permute(0, 3, 1, 2).contiguous(), labels


def purity(found, planted, k):
    """Share of cells whose found cluster's majority planted label equals their own."""
    correct = 0
    for cl in range(k):
        members = planted[found == cl]
        if members.numel():
            correct += int(torch.bincount(members, minlength=k).max())
    return correct / planted.numel()


def test_recovers_planted_parts_and_flags_background():
    maps, labels = planted_maps()
    protos = PartPrototypes(num_parts=4, background=True, seed=0)
    protos.fit(maps)
    ids = protos.assign(maps)
    assert ids.shape == labels.shape and ids.dtype == torch.int64
    assert purity(ids, labels, 4) == 1.0
    assert purity(labels, ids, 4) == 1.0          # one-to-one: no planted part split in two
    bg = protos.background_index
    assert (ids[labels == 0] == bg).all()
    assert protos.names[bg] == "background"
    assert sorted(protos.names) == sorted(["background"] + [f"part {k}" for k in range(4) if k != bg])


def test_deterministic_by_seed_and_leaves_global_rng_alone():
    maps, _ = planted_maps(noise=0.3)
    state = torch.get_rng_state()
    a = PartPrototypes(num_parts=5, seed=3).fit(maps)
    b = PartPrototypes(num_parts=5, seed=3).fit(maps)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    c = PartPrototypes(num_parts=5, seed=4).fit(maps)
    assert c.shape == a.shape


def test_warm_start_keeps_ids_stable_when_data_shifts():
    maps, labels = planted_maps(seed=0)
    protos = PartPrototypes(num_parts=4, seed=0)
    protos.update(maps)
    mapping = {int(p): int(protos.assign(maps)[labels == p][0]) for p in range(4)}
    for epoch in range(1, 4):   # features drift a little every epoch, new samples each time
        shifted, new_labels = planted_maps(seed=epoch, drift=0.1 * epoch)
        protos.update(shifted)
        ids = protos.assign(shifted)
        for p in range(4):
            assert (ids[new_labels == p] == mapping[p]).all(), f"part {p} relabelled at epoch {epoch}"
    assert protos.num_fits == 4


def test_names_and_state_dict_roundtrip():
    maps, _ = planted_maps()
    protos = PartPrototypes(num_parts=4, seed=1)
    protos.update(maps)
    other = 0 if protos.background_index != 0 else 1
    protos.set_names({other: "beak"})
    assert protos.names[other] == "beak"
    assert protos.parts()[other].name == "beak" and protos.parts()[other].source == "prototypes"
    with pytest.raises(ValueError, match="distinct"):
        protos.set_names({(other + 1) % 4 if (other + 1) % 4 != protos.background_index
                          else (other + 2) % 4: "beak"})
    with pytest.raises(ValueError, match="part ids"):
        protos.set_names({9: "tail"})
    restored = PartPrototypes(num_parts=4, seed=1)
    restored.load_state_dict(protos.state_dict())
    assert torch.equal(restored.assign(maps), protos.assign(maps))
    assert restored.names == protos.names
    shifted, _ = planted_maps(seed=5, drift=0.05)
    assert torch.equal(restored.update(shifted), protos.update(shifted))
    with pytest.raises(ValueError, match="num_parts"):
        PartPrototypes(num_parts=3).load_state_dict(protos.state_dict())


def test_errors_are_explicit():
    protos = PartPrototypes(num_parts=4)
    with pytest.raises(RuntimeError, match="update"):
        protos.assign(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="at least"):
        protos.fit(torch.randn(3, 8))
    with pytest.raises(ValueError, match="background"):
        PartPrototypes(num_parts=1, background=True)


def test_typical_patches_and_strip():
    maps, labels = planted_maps(n=6, h=3, w=3)
    protos = PartPrototypes(num_parts=4, seed=0)
    protos.fit(maps)
    ids = protos.assign(maps)
    patches = protos.typical_patches(maps, k=4)
    assert len(patches) == 4
    sims = protos.similarities(maps)
    for part, plist in enumerate(patches):
        assert len(plist) <= 4 and len({i for i, _ in plist}) == len(plist)   # one per image
        for i, (r, c) in plist:
            assert ids[i, r, c] == part
        scores = [float(sims[i, part, r, c]) for i, (r, c) in plist]
        assert scores == sorted(scores, reverse=True)
    # Thumbnails: 30x30, cell (r, c) of image i painted with value 10*i + 3*r + c in every channel.
    thumbs = torch.zeros(6, 3, 30, 30, dtype=torch.uint8)
    for i in range(6):
        for r in range(3):
            for c in range(3):
                thumbs[i, :, 10 * r:10 * r + 10, 10 * c:10 * c + 10] = 10 * i + 3 * r + c
    part = int(ids[0, 0, 0])
    strip = protos.patch_strip(part, maps, thumbs, k=4, size=16, context=0.0, padding=2)
    assert strip.dtype == torch.uint8 and strip.shape == (3, 16 + 4, 4 * (16 + 2) + 2)
    first_img, (r, c) = patches[part][0]
    tile = strip[:, 2:18, 2:18]
    assert torch.all(tile == 10 * first_img + 3 * r + c)


def _strip_one_by_one(protos, part, maps, thumbs, k, size, context, padding):
    """The strip as drawn before it was vectorised: each crop resized by F.interpolate."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid

    gh, gw = maps.shape[-2:]
    imgs = thumbs.float() / 255.0
    h, w = imgs.shape[-2:]
    tiles = []
    for idx, (i, j) in protos.typical_patches(maps, k=k)[part]:
        top = max(0, int((i - context) * h / gh))
        bottom = min(h, max(top + 1, int(round((i + 1 + context) * h / gh))))
        left = max(0, int((j - context) * w / gw))
        right = min(w, max(left + 1, int(round((j + 1 + context) * w / gw))))
        crop = imgs[idx:idx + 1, :, top:bottom, left:right]
        tiles.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0])
    while len(tiles) < k:
        tiles.append(torch.full((3, size, size), 0.5))
    grid = make_grid(torch.stack(tiles).clamp(0, 1), nrow=k, padding=padding, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8)


@pytest.mark.parametrize("context, size", [(0.5, 48), (0.0, 13), (1.5, 20)])
def test_patch_strips_of_all_parts_in_one_pass_equal_the_strips_one_by_one(monkeypatch, context, size):
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(10, 6, 4, 5, generator=gen)
    thumbs = torch.randint(0, 256, (10, 3, 28, 35), dtype=torch.uint8, generator=gen)
    protos = PartPrototypes(num_parts=7, seed=0)
    protos.fit(maps)
    expected = [_strip_one_by_one(protos, p, maps, thumbs, 8, size, context, 2) for p in range(7)]
    calls = []
    similarities = protos.similarities
    monkeypatch.setattr(protos, "similarities", lambda f: calls.append(1) or similarities(f))
    strips = protos.patch_strips(maps, thumbs, k=8, size=size, context=context, padding=2)
    assert calls == [1]                          # one similarity pass for every part together
    assert strips.shape == (7, *expected[0].shape) and strips.dtype == torch.uint8
    for part in range(7):                        # (k=8 > 10 images' patches of a part: grey tiles)
        assert (strips[part].int() - expected[part].int()).abs().max() <= 1, part
    assert torch.equal(protos.patch_strip(3, maps, thumbs, k=8, size=size, context=context),
                       strips[3])
    with pytest.raises(ValueError, match=r"part ids in \[0, 7\)"):
        protos.patch_strips(maps, thumbs, parts=[7])

"""Bounded stores of the callback: batch parsing, thumbnails, reservoir sampling, reference extras."""

from __future__ import annotations

import pytest
import torch

from fgvce_lightning.collection import (MistakeBuffer, ReferenceExtras, make_thumbnails,
                                        parse_batch)


def test_parse_tuple_dict_and_custom_batches():
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([1, 0])
    assert parse_batch((x, y)).labels.tolist() == [1, 0]
    kp = torch.zeros(2, 5, 3)
    parsed = parse_batch({"image": x, "label": y, "keypoints": kp})
    assert parsed.images is x and parsed.keypoints is kp and parsed.masks is None
    assert parse_batch(object(), batch_parser=lambda b: (x, y)).images is x
    with pytest.raises(TypeError, match="batch_parser"):
        parse_batch({"pixels": x, "label": y})
    with pytest.raises(TypeError, match=r"labels of shape \(2,\)"):
        parse_batch((x, torch.zeros(3)))


def test_thumbnails_are_small_uint8_and_min_max_normalised():
    img = torch.linspace(-3, 5, 3 * 32 * 32).view(1, 3, 32, 32)
    th = make_thumbnails(img, 16)
    assert th.shape == (1, 3, 16, 16) and th.dtype == torch.uint8
    assert int(th.min()) == 0 and int(th.max()) >= 250
    assert make_thumbnails(torch.zeros(2, 1, 8, 8), 8).shape == (2, 3, 8, 8)  # grey → RGB, no nan


def test_reservoir_keeps_every_mistake_with_equal_probability():
    counts = torch.zeros(100)
    buf = MistakeBuffer(10)
    for trial in range(300):
        buf.reset(reseed=trial)
        for b in range(10):                                  # 10 batches of 10 mistakes
            buf.add(10, v=torch.arange(b * 10, b * 10 + 10)[:, None])
        kept = buf.get("v").flatten()
        assert kept.unique().numel() == 10                   # no duplicates, always full
        counts[kept] += 1
    per_batch = counts.view(10, 10).sum(1) / 300           # expected 1 per batch
    assert torch.allclose(per_batch, torch.ones(10), atol=0.2), per_batch  # late batches not favoured


def test_reservoir_memory_is_fixed_and_lazy_columns_compute_only_kept_rows():
    buf = MistakeBuffer(4)
    seen_rows = []

    def thumbs(rows):
        seen_rows.append(rows.numel())
        return torch.zeros(rows.numel(), 3, 2, 2, dtype=torch.uint8)

    buf.add(3, f=torch.randn(3, 5), t=thumbs)
    size = buf.memory_bytes
    for _ in range(20):
        buf.add(8, f=torch.randn(8, 5), t=thumbs)
    assert buf.memory_bytes == size and buf.size == 4 and buf.seen == 163
    assert max(seen_rows) <= 4                               # never more thumbnails than slots


def test_reference_extras_mirror_a_ring_buffer_and_find_ids():
    ex = ReferenceExtras(num_classes=2, capacity_per_class=2)
    ids = torch.tensor([[0, 0, i] for i in range(5)])
    ex.add(torch.tensor([0, 0, 0, 1, 0]), ids, thumb=torch.arange(5)[:, None])
    # class 0 received ids 0, 1, 2, 4: only the last two (2, 4) survive
    assert ex.lookup_id("thumb", (0, 0, 4)).item() == 4
    assert ex.lookup_id("thumb", (0, 0, 2)).item() == 2
    assert ex.lookup_id("thumb", (0, 0, 0)) is None
    assert ex.lookup_id("thumb", (0, 0, 3)).item() == 3
    assert ex.lookup("thumb", torch.tensor([1, 0]), ids[[3, 1]]) == [torch.tensor([3]), None]


def test_reference_extras_keep_exactly_the_samples_the_bank_keeps():
    from fgvce_lightning.collection import ReferenceExtras
    from fgvce_lightning.engine.bank import ReferenceBank

    gen = torch.Generator().manual_seed(0)
    bank = ReferenceBank(3, 4, (2, 2, 2))
    extras = ReferenceExtras(3, 4)
    for batch in range(5):                       # batches with more than `capacity` of a class
        labels = torch.randint(0, 3, (9,), generator=gen)
        ids = torch.stack([torch.zeros(9), torch.full((9,), batch), torch.arange(9)], 1).long()
        bank.add(torch.randn(9, 2, 2, 2, generator=gen), labels, ids)
        extras.add(labels, ids, thumb=ids.float())
    for c in range(3):
        _, bank_ids = bank.get(c)
        kept = {tuple(i) for i in bank_ids.tolist()}
        assert kept == {tuple(i) for i in extras.ids[c].tolist() if i[0] >= 0}
        for key in kept:                          # and every kept sample's extras are found
            assert torch.equal(extras.lookup_id("thumb", key), torch.tensor(key).float())


def test_stores_keep_bank_and_extras_in_step_when_maps_are_not_finite():
    from fgvce_lightning import _monitor_steps as steps
    from fgvce_lightning.collection import ParsedBatch

    store = steps.Stores.build(
        num_classes=2, feature_shape=(2, 2, 2), input_size=(8, 8), device=torch.device("cpu"),
        dtype=torch.float16, feature_dtype=torch.float32, mistakes=4, budget_bytes=2 ** 20,
        max_per_class=3, thumbnail_size=8, part_source="prototypes", num_annotated=0, seed=0)
    gen = torch.Generator().manual_seed(0)
    for batch in range(4):
        feats = torch.randn(6, 2, 2, 2, generator=gen)
        feats[1, 0, 0, 0] = float("nan")
        feats[4, 1, 1, 1] = 1e6                  # finite in float32, inf in the float16 bank
        labels = torch.tensor([0, 0, 1, 1, 0, 1])
        images = torch.rand(6, 3, 8, 8, generator=gen)
        ids = torch.stack([torch.zeros(6), torch.full((6,), batch), torch.arange(6)], 1).long()
        store.add(feats, labels, labels.clone(), torch.zeros(6, dtype=torch.bool), ids,
                  ParsedBatch(images, labels))
    for c in range(2):
        _, bank_ids = store.bank.get(c)
        kept = {tuple(i) for i in bank_ids.tolist()}
        assert kept and not any(k[2] in (1, 4) for k in kept)        # the refused maps
        assert kept == {tuple(i) for i in store.extras.ids[c].tolist() if i[0] >= 0}
        assert all(store.extras.lookup_id("thumb", k) is not None for k in kept)

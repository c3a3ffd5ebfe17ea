"""Bounded stores of the callback: batch parsing, thumbnails, reservoir sampling, reference extras."""

from __future__ import annotations

import pytest
import torch

from fgvce_lightning.monitor import pending as pending_module, stores as stores_module
from fgvce_lightning.monitor.batches import ParsedBatch, parse_batch, pictures, small_images
from fgvce_lightning.monitor.buffers import MistakeBuffer, ReferenceExtras


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


def test_pictures_are_uint8_and_min_max_normalised_per_image():
    img = torch.linspace(-3, 5, 3 * 32 * 32).view(1, 3, 32, 32)
    small = small_images(img, 16)
    assert small.shape == (1, 3, 16, 16) and small.dtype == torch.float16
    pic = pictures(small)
    assert pic.shape == (1, 3, 16, 16) and pic.dtype == torch.uint8
    assert int(pic.min()) == 0 and int(pic.max()) == 255
    grey = pictures(small_images(torch.zeros(2, 1, 8, 8), 8))
    assert grey.shape == (2, 3, 8, 8) and int(grey.max()) == 0            # grey → RGB, no nan
    one = small_images(torch.randn(3, 3, 8, 8), 8)
    assert torch.equal(pictures(one[1]), pictures(one)[1])                # one (3, h, w) image
    odd = one.clone()
    odd[0, 0, 0, 0], odd[0, 0, 0, 1] = float("nan"), float("inf")
    drawn = pictures(odd)
    assert int(drawn[0, 0, 0, 1]) == 255 and int(drawn[0].min()) == 0    # inf saturates, nan is 0
    assert torch.equal(drawn[1:], pictures(one[1:]))                      # images apart


@pytest.mark.parametrize("shape,dtype,size", [((6, 3, 16, 16), torch.float32, 16),
                                              ((6, 1, 16, 16), torch.float32, 16),
                                              ((6, 4, 16, 16), torch.float32, 8),
                                              ((6, 3, 16, 16), torch.float16, 16),
                                              ((6, 3, 16, 16), torch.bfloat16, 8),
                                              ((6, 3, 32, 32), torch.float32, 16)])
def test_kept_images_are_within_a_level_of_exact_pictures_and_leave_the_images_alone(
        shape, dtype, size):
    torch.manual_seed(0)
    images = (torch.randn(shape) * 3 + 1).to(dtype)
    before = images.clone()
    small = small_images(images, size)
    assert small.shape == (6, 3, size, size) and small.dtype == torch.float16
    assert torch.equal(images, before)                    # the user's images are never written
    into = torch.zeros(8, 3, size, size, dtype=torch.float16)
    assert small_images(images, size, out=into[1:7]).data_ptr() == into[1].data_ptr()
    assert torch.equal(into[1:7], small) and not into[0].any() and not into[7].any()
    with pytest.raises(ValueError, match="float16 tensor of shape"):
        small_images(images, size, out=into[:5])
    # the exact picture, computed in float64 from the resized RGB images
    x = images.double()[:, :3].expand(-1, 3, -1, -1)
    if shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False, antialias=True)
    lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    exact = ((x - lo) / (hi - lo) * 255).round()
    assert float((pictures(small).double() - exact).abs().max()) <= 1.0


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
    # `rows`: only those samples of the batch, copied without a gather, exactly as if gathered
    labels, ids = torch.tensor([0, 1, 0, 0, 1, 0, 1]), torch.tensor([[1, 0, i] for i in range(7)])
    values, rows = torch.arange(7)[:, None] * 10, torch.tensor([0, 2, 3, 4, 5])
    for picked in (rows, torch.arange(7)):
        direct, gathered = ReferenceExtras(2, 2), ReferenceExtras(2, 2)
        for _ in range(2):                                   # (the second batch wraps around)
            direct.add(labels, ids, rows=picked, thumb=values)
            gathered.add(labels[picked], ids[picked], thumb=values[picked])
        assert torch.equal(direct.ids, gathered.ids) and torch.equal(direct.count, gathered.count)
        assert torch.equal(direct._rings("thumb"), gathered._rings("thumb"))
    assert direct.lookup_id("thumb", (1, 0, 6)).item() == 60
    left_out = ReferenceExtras(2, 2)
    left_out.add(labels, ids, rows=rows, thumb=values)
    assert left_out.lookup_id("thumb", (1, 0, 1)) is None and left_out.lookup_id("thumb", (1, 0, 6)) is None
    assert left_out.lookup_id("thumb", (1, 0, 4)).item() == 40


def test_reference_extras_keep_exactly_the_samples_the_bank_keeps():
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
    store = stores_module.Stores.build(
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
        store.add(pending_module.BatchSet(feats, torch.zeros(6, 2), labels, None, None,
                                 small_images(images, 8), ids),
                  labels.clone(), torch.zeros(6, dtype=torch.bool))
    for c in range(2):
        _, bank_ids = store.bank.get(c)
        kept = {tuple(i) for i in bank_ids.tolist()}
        assert kept and not any(k[2] in (1, 4) for k in kept)        # the refused maps
        assert kept == {tuple(i) for i in store.extras.ids[c].tolist() if i[0] >= 0}
        assert all(store.extras.lookup_id("thumb", k) is not None for k in kept)


def _stores(seed: int = 0, budget: int = 2 ** 22, max_per_class=4):
    return stores_module.Stores.build(
        num_classes=3, feature_shape=(4, 3, 3), input_size=(12, 12), device=torch.device("cpu"),
        dtype=torch.float32, feature_dtype=torch.float32, mistakes=5, budget_bytes=budget,
        max_per_class=max_per_class, thumbnail_size=6, part_source="keypoints", num_annotated=2,
        seed=seed)


def _batches(num: int, size: int = 7):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(num):
        feats = torch.randn(size, 4, 3, 3, generator=gen)
        logits = torch.randn(size, 3, generator=gen)
        labels = torch.randint(0, 3, (size,), generator=gen)
        kp = torch.rand(size, 2, 3, generator=gen) * 12
        out.append((feats, logits, ParsedBatch(torch.rand(size, 3, 12, 12, generator=gen), labels, kp,
                                               torch.ones(size, 2, 12, 12, dtype=torch.bool))))
    return out


def _store_all(store, batch):
    pred = batch.logits.argmax(1)
    store.check(batch.feats, batch.logits, batch)
    store.add(batch, pred, pred != batch.labels)


def test_batches_stored_together_leave_the_stores_exactly_as_one_by_one():
    batches = _batches(6)
    one, together = _stores(), _stores()
    for i, (feats, logits, parsed) in enumerate(batches):
        b = feats.shape[0]
        ids = torch.stack([torch.zeros(b), torch.full((b,), i), torch.arange(b)], 1).long()
        thumbs = small_images(parsed.images, one.thumbnail_size)
        _store_all(one, pending_module.BatchSet(feats, logits, parsed.labels, parsed.keypoints, None,
                                       thumbs, ids))
    pending = pending_module.PendingBatches(2 ** 20, together.thumbnail_size)
    buffers = set()
    for i, (feats, logits, parsed) in enumerate(batches):
        assert pending.fits(feats, logits, together.needed(parsed))
        if i == 3:                   # the hook's way: the feature maps written where they wait
            pending.slot(feats).copy_(feats)
        pending.push(feats, logits, together.needed(parsed), 0, i)
        if i in (1, 4):                                   # three chunks: 2 + 3 + 1 batches
            taken = pending.take()
            buffers.add(taken.feats.data_ptr())
            _store_all(together, taken)
            pending.release(taken)          # its buffers are filled again by the next batches
    taken = pending.take()
    _store_all(together, taken)
    assert buffers == {taken.feats.data_ptr()}            # one set of buffers, reused
    assert len(pending) == 0 and pending.rows == 0 and pending.take() is None
    assert one.mistakes.seen == together.mistakes.seen == sum(
        int((lg.argmax(1) != p.labels).sum()) for _, lg, p in batches)
    assert one.mistakes.seen > one.mistakes.capacity      # the reservoir drew
    for name in ("features", "true", "pred", "ids", "thumb", "parts"):
        assert torch.equal(one.mistakes.get(name), together.mistakes.get(name)), name
    for c in range(3):
        for a, b in zip(one.bank.get(c), together.bank.get(c)):
            assert torch.equal(a, b)
    assert torch.equal(one.extras.ids, together.extras.ids)
    assert torch.equal(one.extras._rings("thumb"), together.extras._rings("thumb"))
    assert torch.equal(one.extras._rings("parts"), together.extras._rings("parts"))
    # every kept thumbnail is its own image's
    for key, thumb in zip(together.mistakes.get("ids").tolist(), together.mistakes.get("thumb")):
        image = batches[key[1]][2].images[key[2]:key[2] + 1]
        assert torch.equal(thumb, small_images(image, 6)[0])



def test_stores_keep_the_first_references_of_each_class_in_an_epoch_with_their_extras():
    batches = _batches(6)
    store = _stores(max_per_class=2)
    for epoch in range(2):
        store.reset(reseed=epoch)
        pending = pending_module.PendingBatches(2 ** 20, store.thumbnail_size)
        for i, (feats, logits, parsed) in enumerate(batches[epoch:]):     # another order
            pending.push(feats, logits, store.needed(parsed), 0, i)
            if i % 2:
                taken = pending.take()
                _store_all(store, taken)
                pending.release(taken)
        rest = pending.take()
        if rest is not None:
            _store_all(store, rest)
        correct = [(i, j, int(p.labels[j])) for i, (_, lg, p) in enumerate(batches[epoch:])
                   for j in range(lg.shape[0]) if int(lg[j].argmax()) == int(p.labels[j])]
        for c in range(3):
            first = [(0, i, j) for i, j, label in correct if label == c][:2]
            assert len(first) == 2                        # (more than two were correct)
            _, ids = store.bank.get(c)
            assert [tuple(k) for k in ids.tolist()] == first
            assert store.bank.seen()[c] == sum(1 for *_, label in correct if label == c)
            for key in first:                             # their thumbnails and part labels
                parsed = batches[epoch:][key[1]][2]
                image = parsed.images[key[2]:key[2] + 1]
                assert torch.equal(store.extras.lookup_id("thumb", key), small_images(image, 6)[0])
                assert torch.equal(store.extras.lookup_id("parts", key),
                                   store.cell_parts(store.needed(parsed))[key[2]])

def test_pending_batches_hold_only_what_the_stores_use_and_refuse_mismatched_batches():
    store = _stores()
    (feats, logits, parsed), = _batches(1)
    slim = store.needed(parsed)
    assert slim.keypoints is parsed.keypoints and slim.masks is None   # masks are not held
    per_row = sum(t[0].numel() * t.element_size() for t in (feats, logits, slim.labels,
                                                            slim.keypoints)) + 3 * 5 * 5 * 2
    pending = pending_module.PendingBatches(12 * per_row, thumbnail_size=5)
    pending.push(feats, logits, slim, 2, 9)
    # buffers for 12 rows of what the stores keep (not the images, not the masks)
    assert pending.memory_bytes == 12 * per_row and pending.rows == 7 and len(pending) == 1
    assert not pending.fits(feats, logits, parsed)                      # masks present now
    assert not pending.fits(feats[:, :, :2], logits, slim)              # another grid
    assert not pending.fits(feats.double(), logits, slim)
    other = type(slim)(torch.rand(7, 3, 10, 10), slim.labels, slim.keypoints)
    assert not pending.fits(feats, logits, other)                       # another input size
    assert pending.fits(feats[:3], logits[:3], type(slim)(slim.images[:3], slim.labels[:3],
                                                          slim.keypoints[:3]))
    assert not pending.fits(feats, logits, slim)                        # no room for 7 more
    with pytest.raises(ValueError, match="fits the waiting ones"):
        pending.push(feats, logits, slim, 2, 10)
    assert pending.slot(feats) is None and pending.slot(feats[:3].double()) is None
    pending.push(feats[:3], logits[:3], type(slim)(slim.images[:3], slim.labels[:3],
                                                   slim.keypoints[:3]), 2, 10)
    taken = pending.take()
    assert taken.feats.shape[0] == taken.logits.shape[0] == taken.keypoints.shape[0] == 10
    assert taken.masks is None and taken.labels.tolist() == slim.labels.tolist() + slim.labels[:3].tolist()
    assert taken.thumbs.shape == (10, 3, 5, 5) and taken.thumbs.dtype == torch.float16
    assert torch.equal(taken.thumbs, small_images(torch.cat([slim.images, slim.images[:3]]), 5))
    ids = taken.ids
    assert ids.tolist() == [[2, 9, i] for i in range(7)] + [[2, 10, i] for i in range(3)]
    with pytest.raises(ValueError, match="carry `keypoints`"):
        store.check_shapes(feats, logits, type(slim)(slim.images, slim.labels))
    with pytest.raises(ValueError, match="2 parts"):
        store.check_shapes(feats, logits, type(slim)(slim.images, slim.labels, slim.keypoints[:, :1]))
    with pytest.raises(ValueError, match="feature maps of shape"):
        store.check_shapes(feats[:, :2], logits, slim)


def test_deferred_thumbnails_are_cast_later_and_their_images_count_against_the_set():
    store = _stores()
    batches = _batches(3)
    feats, logits, parsed = batches[0]
    slim = store.needed(parsed)
    per_row = sum(t[0].numel() * t.element_size() for t in (feats, logits, slim.labels,
                                                            slim.keypoints)) + 3 * 6 * 6 * 2
    image_bytes = slim.images.numel() * slim.images.element_size()
    # room for the rows and held images of 2 batches
    limit = 2 * (7 * per_row + image_bytes)
    pending = pending_module.PendingBatches(limit, thumbnail_size=6)
    for i, (f, lg, p) in enumerate(batches[:2]):
        assert pending.fits(f, lg, store.needed(p), defer_thumbnails=True)
        pending.push(f, lg, store.needed(p), 0, i, defer_thumbnails=True)
    assert pending._slab.rows == 14                      # buffers sized with the images beside
    f, lg, p = batches[2]
    assert not pending.fits(f, lg, store.needed(p), defer_thumbnails=True) and pending.full
    # buffers made for cast-at-once batches have rows for more, but the held images fill the set
    roomy = pending_module.PendingBatches(limit, thumbnail_size=6)
    roomy.push(*batches[0][:2], store.needed(batches[0][2]), 0, 0)
    roomy.release(roomy.take())
    for i, (f, lg, p) in enumerate(batches[:2]):
        roomy.push(f, lg, store.needed(p), 0, i, defer_thumbnails=True)
    assert roomy._slab.rows >= 3 * 7 and roomy.full
    assert not roomy.fits(*batches[2][:2], store.needed(batches[2][2]), defer_thumbnails=True)
    assert roomy.fits(*batches[2][:2], store.needed(batches[2][2]))   # cast at once, it fits
    taken = pending.take()
    pending.cast_thumbnails(taken)
    images = torch.cat([b[2].images for b in batches[:2]])
    assert torch.equal(taken.thumbs, small_images(images, 6))
    pending.release(taken)
    assert pending.take() is None


def test_the_memory_budget_counts_the_batches_waiting_to_be_stored():
    assert _stores(budget=2 ** 30).pending_bytes == 32 * 2 ** 20           # capped
    for budget in (2 ** 13, 2 ** 14, 2 ** 15):
        store = _stores(budget=budget, max_per_class=None)
        assert store.pending_bytes == budget // 16
        pending = pending_module.PendingBatches(store.pending_bytes, store.thumbnail_size)
        for i, (feats, logits, parsed) in enumerate(_batches(60, size=16)):   # fill everything
            if not pending.fits(feats, logits, store.needed(parsed)):
                taken = pending.take()
                _store_all(store, taken)
                pending.release(taken)
            pending.push(feats, logits, store.needed(parsed), 0, i)
            # a set holds at most the budget's share, or one batch when that is larger
            one_batch = sum(t.numel() * t.element_size() for t in (
                feats, logits, parsed.labels, parsed.keypoints)) + 16 * 3 * 6 * 6 * 2
            assert pending.memory_bytes <= max(store.pending_bytes, one_batch)
        _store_all(store, pending.take())
        assert int(store.bank.counts().min()) == store.bank.capacity_per_class >= 1
        # what the stores hold and two sets of waiting batches fit the budget, and one more
        # reference per class would not
        held = store.memory_bytes + 2 * store.pending_bytes
        per_class = (store.bank.memory_bytes + store.extras.memory_bytes) / (
            3 * store.bank.capacity_per_class)
        assert held <= budget < held + 3 * per_class, (budget, held)


def test_finite_rows_is_exact_for_nan_inf_and_overflowing_sums():
    from fgvce_lightning.engine._util import finite_rows

    x = torch.randn(6, 4, 3, 3)
    x[1, 0, 0, 0] = float("nan")
    x[2, 1, 1, 1] = float("inf")
    x[3] = 3e38                                   # finite values whose sum overflows
    x[4, 0, 0, 0], x[4, 0, 0, 1] = float("inf"), -float("inf")   # their sum is nan
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        y = x.to(dtype)
        assert torch.equal(finite_rows(y), torch.isfinite(y).flatten(1).all(1)), dtype
    assert finite_rows(torch.empty(0, 2, 2, 2)).shape == (0,)


def test_copy_rows_matches_indexed_assignment_for_every_dtype_and_layout():
    from fgvce_lightning.engine._util import copy_rows

    gen = torch.Generator().manual_seed(0)
    for dtype, shape in ((torch.uint8, (3, 4, 4)), (torch.uint8, (3, 5, 5)),   # words / bytes
                         (torch.bool, (2, 4, 4)), (torch.float32, (2, 3)), (torch.int64, (3,))):
        dest = (torch.rand(9, *shape, generator=gen) * 200).to(dtype)
        src = (torch.rand(4, *shape, generator=gen) * 200).to(dtype)
        index = torch.tensor([7, 0, 3, 5])
        expected = dest.clone()
        expected[index] = src
        copy_rows(dest, index, src)
        assert torch.equal(dest, expected), (dtype, shape)
    store = torch.zeros(2, 5, 3, 8, 8, dtype=torch.uint8)     # a view of a (class, slot) store
    rows = torch.full((2, 3, 8, 8), 7, dtype=torch.uint8)
    copy_rows(store.view(-1, 3, 8, 8), torch.tensor([1, 8]), rows)
    assert store[0, 1].eq(7).all() and store[1, 3].eq(7).all() and int(store.sum()) == 7 * 2 * 192
    odd = torch.zeros(10, 3, 8, dtype=torch.uint8)[:, :, 1:]    # not contiguous: written through
    copy_rows(odd, torch.tensor([2]), torch.ones(1, 3, 7, dtype=torch.uint8))
    assert int(odd.sum()) == 21 and odd[2].eq(1).all()


def test_reference_extras_rows_of_a_class_follow_the_banks_slot_order():
    from fgvce_lightning.engine.bank import ReferenceBank

    gen = torch.Generator().manual_seed(0)
    bank, extras = ReferenceBank(3, 4, (2, 2, 2)), ReferenceExtras(3, 4)
    labels = torch.randint(0, 3, (9,), generator=gen)
    ids = torch.stack([torch.zeros(9), torch.zeros(9), torch.arange(9)], 1).long()
    bank.add(torch.randn(9, 2, 2, 2, generator=gen), labels, ids)
    extras.add(labels, ids, thumb=ids.float())
    for c in range(3):
        _, bank_ids = bank.get(c)
        rows, found = extras.rows_of("thumb", c, bank_ids)
        assert bool(found.all()) and torch.equal(rows, bank_ids.float())
        for key, row in zip(bank_ids.tolist(), rows):          # as the lookup by id finds them
            assert torch.equal(extras.lookup_id("thumb", tuple(key)), row)
    _, bank_ids = bank.get(0)
    _, found = extras.rows_of("thumb", 0, bank_ids + 1)         # ids that are not there
    assert not bool(found.any())

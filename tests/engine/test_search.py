import dataclasses

import pytest
import torch
from torch import nn

from fgvce_lightning.engine.bank import ReferenceBank
from fgvce_lightning.engine.greedy import greedy_search
from fgvce_lightning.engine.search import SearchConfig, counterfactual_search

from cell_heads import C, H, S_CELLS, W, CellLinearHead as _CellHead


class CellLinearHead(_CellHead):
    """The additive cell head with true-class bias -2.

    A query with channel 0 = 1 on the three cells has margin ``3 - (0 - 2) = 5``; each cell swapped
    for a reference cell with channel 1 = 1 lowers it by 2, so exactly the three cells must be
    replaced to flip.
    """

    def __init__(self):
        super().__init__(true_bias=-2.0)


class MaxHead(nn.Module):
    """Class 1 = 3 · max(x[0] at A, x[0] at B): A and B must both go; D is tempting but useless.

    Class 0 reads channel 1 on A, B and D. Query: x[0] = 1 on A and B, x[1] = -1 on D, so D has
    the largest contribution (+2) but the flip needs exactly {A, B}.
    """
    A, B, D = (0, 0), (3, 3), (0, 3)

    def forward(self, x):
        pred = 3 * torch.maximum(x[:, 0, 0, 0], x[:, 0, 3, 3])
        true = x[:, 1, 0, 0] + x[:, 1, 3, 3] + x[:, 1, 0, 3]
        return torch.stack([true, pred, torch.full_like(true, -10.0)], 1)


def _background(n, gen):
    x = torch.zeros(n, C, H, W)
    x[:, 2:] = 0.5 + 0.5 * torch.rand(n, 2, H, W, generator=gen)
    return x


def _make_bank(cells, num_refs=2, dtype=torch.float32, gen=None):
    gen = gen or torch.Generator().manual_seed(1)
    refs = _background(num_refs, gen)
    for r, c in cells:
        refs[:, :, r, c] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    bank = ReferenceBank(3, 4, (C, H, W), dtype=dtype)
    ids = torch.stack([torch.zeros(num_refs), torch.arange(num_refs), torch.arange(num_refs) + 10],
                      1).long()
    bank.add(refs, torch.zeros(num_refs, dtype=torch.long), ids)
    return bank


def _linear_problem(n=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = _background(n, gen)
    for r, c in S_CELLS:
        q[:, :, r, c] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    return q, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)


CFG = SearchConfig()
"""The references hold the true part on the query's own S cells, so the correspondence is the
identity: each S cell's absent value is the reference's channel-1 cell, worth exactly 2."""


def test_finds_exactly_the_minimal_cells_of_an_additive_head():
    head = CellLinearHead()
    q, t, p = _linear_problem()
    bank = _make_bank(S_CELLS)
    (res,) = counterfactual_search(head, q, t, p, bank, CFG)
    assert res.success and res.final_pred == 0 and res.skipped_reason is None
    assert sorted(res.edited_cells) == sorted(S_CELLS)
    assert res.edits[0].query_cells == ((1, 1), (1, 2))        # the strongest region goes first
    # exact contributions: 2 on the three cells, 0 elsewhere; regions ordered by them
    expected = torch.zeros(H, W)
    for r, c in S_CELLS:
        expected[r, c] = 2.0
    assert torch.allclose(res.contributions, expected, atol=1e-5)
    assert res.contributions.device.type == "cpu" and res.regions.dtype == torch.int64
    assert res.regions[1, 1] == res.regions[1, 2] == 0 and res.regions[3, 3] == 1
    for e in res.edits:
        assert e.reference_cells == e.query_cells                    # the corresponding cells
        assert e.reference_slot in (0, 1) and e.reference_id == (0, e.reference_slot,
                                                                  e.reference_slot + 10)
        assert e.contribution == pytest.approx(2.0 * len(e.query_cells), abs=1e-4)
    # margin 5 -> 1 -> -1: p(true) rises, p(pred) falls, the last edit flips
    assert res.p_true_before < res.edits[0].p_true_after < res.edits[1].p_true_after
    assert res.edits[1].p_true_after > res.edits[1].p_pred_after
    assert res.p_pred_before > res.edits[0].p_pred_after > res.edits[1].p_pred_after
    # every map the head saw is accounted for, but for the memory plan's one probe of the
    # head's activations (once per head and map shape: a second search does not probe again)
    assert res.head_evaluations == head.seen - 1
    seen = head.seen
    (again,) = counterfactual_search(head, q, t, p, bank, CFG)
    assert head.seen - seen == again.head_evaluations == res.head_evaluations
    (unplanned,) = counterfactual_search(CellLinearHead(), q, t, p, bank,
                                         dataclasses.replace(CFG, search_memory_mb=None))
    assert unplanned.edits == res.edits


def test_minimality_pass_drops_the_unneeded_edit():
    gen = torch.Generator().manual_seed(3)
    q = _background(1, gen)
    q[0, :, 0, 0] = q[0, :, 3, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    q[0, :, 0, 3] = torch.tensor([0.0, -1.0, 0.0, 0.0])
    bank = _make_bank((MaxHead.A, MaxHead.B, MaxHead.D))
    t, p = torch.tensor([0]), torch.tensor([1])
    full = counterfactual_search(MaxHead(), q, t, p, bank, SearchConfig(minimality=False,
                                                                          trim=False))[0]
    assert full.success and full.edits[0].query_cells == (MaxHead.D,)
    assert set(full.edited_cells) >= {MaxHead.A, MaxHead.B, MaxHead.D}
    res = counterfactual_search(MaxHead(), q, t, p, bank, SearchConfig())[0]
    assert res.success and sorted(res.edited_cells) == [MaxHead.A, MaxHead.B]
    # the trajectory is recomputed for the kept edits: flipped only after the last one
    assert res.edits[-1].p_true_after > 0.5 > res.edits[0].p_true_after
    assert res.head_evaluations > full.head_evaluations


class SmallConvHead(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(C, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _random_problem(seed=0, n_bank=60, num_classes=3):
    """A random conv head, random references per class and queries with true != pred."""
    torch.manual_seed(seed)
    head = SmallConvHead(num_classes).eval()
    x = torch.randn(n_bank + 40, C, H, W)
    with torch.no_grad():
        pred = head(x).argmax(1)
    bank = ReferenceBank(num_classes, 3, (C, H, W))
    labels = torch.arange(n_bank) % num_classes
    bank.add(x[:n_bank], labels, torch.arange(n_bank)[:, None].repeat(1, 3))
    y = (pred + torch.randint(1, num_classes, (x.shape[0],))) % num_classes
    wrong = torch.arange(n_bank, x.shape[0])
    wrong = wrong[bank.counts()[y[wrong]] > 0][:6]
    return head, x[wrong], y[wrong], pred[wrong], bank


def _apply(query, edits, refs):
    out = query.clone()
    for e in edits:
        for (qr, qc), (rr, rc) in zip(e.query_cells, e.reference_cells):
            out[:, qr, qc] = refs[e.reference_slot][:, rr, rc]
    return out


def test_trim_keeps_exactly_the_cells_the_flip_needs():
    """One region covers the whole grid (threshold 0, no size cap), so the search swaps all 16
    cells at once; only the three S_CELLS move the additive head (2 each, margin 5), so the trim
    must keep exactly them, as one edit, with a trajectory that matches the head."""
    head = CellLinearHead()
    q, t, p = _linear_problem(n=3, seed=4)
    bank = _make_bank(S_CELLS)
    one_region = {"region_threshold": 0.0, "max_region_size": H * W}
    (full,) = counterfactual_search(head, q[:1], t[:1], p[:1], bank,
                                    SearchConfig(**one_region, trim=False))
    assert full.success and full.num_edits == 1 and len(full.edited_cells) == H * W
    head.seen = 0
    (single,) = counterfactual_search(head, q[:1], t[:1], p[:1], bank, SearchConfig(**one_region))
    assert single.head_evaluations == head.seen              # every map the head saw is counted
    # the trim costs one evaluation per proper prefix of the ranked cells, plus the replay
    assert single.head_evaluations == full.head_evaluations + (H * W - 1) + 1
    results = counterfactual_search(head, q, t, p, bank, SearchConfig(**one_region))
    assert results[0] == single
    refs, _ = bank.get(0)
    for res in results:
        assert res.success and res.num_edits == 1
        assert sorted(res.edited_cells) == sorted(S_CELLS)
        edit = res.edits[0]
        assert len(edit.reference_cells) == len(edit.query_cells)
        assert edit.reference_cells == edit.query_cells
        assert edit.contribution == pytest.approx(6.0, abs=1e-4)   # 2 per kept cell
        assert res.regions.unique().numel() == 1                    # the partition is unchanged
        x = _apply(q[res.query_index], res.edits, refs)
        with torch.no_grad():
            probs = head.eval()(x[None]).softmax(1)[0]
        assert int(probs.argmax()) == res.final_pred == 0
        assert probs[0].item() == pytest.approx(edit.p_true_after, abs=1e-5)
        assert probs[1].item() == pytest.approx(edit.p_pred_after, abs=1e-5)


def test_trim_keeps_the_shortest_flipping_prefix():
    """With true-class bias 0 two of the three S_CELLS flip (margin 3, each swap -2): the trim
    keeps two of them, and the single edit still flips."""
    head = _CellHead(true_bias=0.0)
    q, t, p = _linear_problem()
    bank = _make_bank(S_CELLS)
    cfg = SearchConfig(region_threshold=0.0, max_region_size=H * W)
    (res,) = counterfactual_search(head, q, t, p, bank, cfg)
    assert res.success and res.num_edits == 1
    assert len(res.edited_cells) == 2 and set(res.edited_cells) <= set(S_CELLS)
    (untrimmed,) = counterfactual_search(head, q, t, p, bank,
                                         SearchConfig(**{**cfg.__dict__, "trim": False}))
    assert len(untrimmed.edited_cells) == H * W


def test_edits_reproduce_the_flip_and_are_one_minimal():
    head, q, t, p, bank = _random_problem()
    results = counterfactual_search(head, q, t, p, bank, SearchConfig(max_edits=12))
    assert sum(r.success for r in results) >= 2
    for r, query in zip(results, q):
        assert r.num_edits >= 1 and r.regions.shape == (H, W)
        refs, _ = bank.get(r.true)
        with torch.no_grad():
            probs = head(_apply(query, r.edits, refs)[None]).softmax(1)[0]
        assert int(probs.argmax()) == r.final_pred
        assert probs[r.true].item() == pytest.approx(r.edits[-1].p_true_after, abs=1e-5)
        assert probs[r.pred].item() == pytest.approx(r.edits[-1].p_pred_after, abs=1e-5)
        if r.success and r.num_edits > 1:
            for drop in range(r.num_edits):
                kept = [e for j, e in enumerate(r.edits) if j != drop]
                with torch.no_grad():
                    assert int(head(_apply(query, kept, refs)[None]).argmax()) != r.true


def test_batched_equals_per_query_and_seed_is_deterministic():
    head, q, t, p, bank = _random_problem(seed=1)
    batched = counterfactual_search(head, q, t, p, bank, SearchConfig(seed=5))
    again = counterfactual_search(head, q, t, p, bank, SearchConfig(seed=5))
    assert batched == again
    for i in range(q.shape[0]):
        (single,) = counterfactual_search(head, q[i:i + 1], t[i:i + 1], p[i:i + 1], bank,
                                          SearchConfig(seed=5))
        b = batched[i]
        assert (single.success, single.final_pred) == (b.success, b.final_pred)
        assert [(e.query_cells, e.reference_slot, e.reference_cells) for e in single.edits] == \
            [(e.query_cells, e.reference_slot, e.reference_cells) for e in b.edits]
        assert torch.allclose(single.contributions, b.contributions, atol=1e-5)


def test_state_is_preserved():
    head, q, t, p, bank = _random_problem(seed=2)
    head.train()
    head.bn.eval()
    flags = [m.training for m in head.modules()]
    rng = torch.get_rng_state()
    counterfactual_search(head, q, t, p, bank)
    assert [m.training for m in head.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(prm.grad is None for prm in head.parameters())


class Boom(Exception):
    pass


def test_state_is_preserved_when_the_head_raises():
    head, q, t, p, bank = _random_problem(seed=2)
    head.train()
    calls = {"n": 0}

    def exploding(x):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Boom("head failed")
        return head(x)

    rng = torch.get_rng_state()
    with pytest.raises(Boom):
        counterfactual_search(exploding, q, t, p, bank, modules=[head])
    assert all(m.training for m in head.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_works_under_inference_mode_and_with_half_precision_banks():
    head = CellLinearHead()
    q, t, p = _linear_problem(n=2)
    expected = counterfactual_search(head, q, t, p, _make_bank(S_CELLS), CFG)
    with torch.inference_mode():
        got = counterfactual_search(head, q.clone(), t, p, _make_bank(S_CELLS), CFG)
    assert got == expected and all(r.success for r in got)
    assert all(prm.grad is None for prm in head.parameters())
    for dtype in (torch.bfloat16, torch.float16):
        res = counterfactual_search(head, q, t, p, _make_bank(S_CELLS, dtype=dtype), CFG)
        assert [r.edited_cells for r in res] == [r.edited_cells for r in expected]


def test_non_differentiable_head_is_explained_all_the_same():
    """The FG-VCE search needs no gradients (only the Grad-CAM baseline does)."""
    head = CellLinearHead()

    def detached(x):
        with torch.no_grad():
            return head(x)

    q, t, p = _linear_problem()
    bank = _make_bank(S_CELLS)
    (with_grad,) = counterfactual_search(head, q, t, p, bank, CFG)
    (res,) = counterfactual_search(detached, q, t, p, bank, CFG, modules=[head])
    assert res.success and res.edits == with_grad.edits
    assert all(prm.grad is None for prm in head.parameters())


def test_skipped_queries_do_not_break_the_batch():
    head = CellLinearHead()
    q, t, p = _linear_problem(n=4)
    q[1, 0, 2, 2] = float("nan")
    t[2] = 2                       # no reference of class 2 in the bank
    p[3] = 0                       # true == pred: not a mistake
    res = counterfactual_search(head, q, t, p, _make_bank(S_CELLS), CFG)
    assert res[0].success and not res[0].skipped
    assert "non-finite" in res[1].skipped_reason
    assert "no reference" in res[2].skipped_reason and res[2].true == 2
    assert "not a misclassification" in res[3].skipped_reason
    assert [r.query_index for r in res] == [0, 1, 2, 3]


def test_errors():
    head = CellLinearHead()
    q, t, p = _linear_problem()
    bank = _make_bank(S_CELLS)
    with pytest.raises(ValueError, match="3 class logits"):
        counterfactual_search(lambda x: torch.zeros(x.shape[0], 5), q, t, p, bank)
    with pytest.raises(ValueError, match="bank's shape"):
        counterfactual_search(head, torch.zeros(1, C, 5, 5), t, p, bank)
    with pytest.raises(ValueError, match="spatial feature map"):
        counterfactual_search(head, torch.zeros(1, C), t, p, bank)
    with pytest.raises(ValueError, match=r"`true` to lie in \[0, 3\)"):
        counterfactual_search(head, q, torch.tensor([7]), p, bank)
    with pytest.raises(ValueError, match="`pred` to be an integer tensor of shape"):
        counterfactual_search(head, q, t, torch.tensor([1, 1]), bank)
    with pytest.raises(ValueError, match="odd"):
        SearchConfig(window=4)


@pytest.mark.parametrize("field, bad", [
    ("num_references", 0), ("num_references", 2.0), ("region_threshold", -0.1),
    ("region_threshold", 1.5), ("region_threshold", float("nan")), ("region_threshold", True),
    ("max_region_size", 0), ("max_shift", -1), ("mirror", "yes"), ("trim", 1),
    ("protected_channels", -1), ("seed", 2 ** 70), ("seed", 1.0), ("num_classes", 1),
    ("region_order", "shapley")])
def test_config_fields_are_checked_at_construction(field, bad):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SearchConfig(**{field: bad})


# ---------------------------------------------------------------------------- correspondence
class _PartHead(nn.Module):
    """Additive: ``true = Σ x1`` over all cells, ``pred = Σ x0``; channel 2 is appearance (the
    object), channel 3 background texture."""

    def forward(self, x):
        return torch.stack([x[:, 1].sum((1, 2)), x[:, 0].sum((1, 2))], 1)


def _off_part_problem():
    """The evidence-maximising swap lands off-part, the corresponding swap on-part.

    Query (4×4): the object is the two cells of row 3 at columns 0-1 (appearance 2); its wrong
    part (channel 0) is at ``D = (3, 0)``. The reference of the true class shows the same object
    one column to the right, its true part (channel 1) at ``(3, 1)``, the cell that corresponds
    to ``D``; it also has a strong true-class blob at ``(0, 0)`` in its background, which under
    that alignment corresponds to no query cell. Pasting the blob onto ``D`` gives the larger
    margin (3 against 1), so a swap chosen by evidence alone copies the blob; the corresponding
    swap copies the reference's own part.
    """
    size = 4
    query = torch.zeros(1, 4, size, size)
    query[0, 3] = 0.3
    query[0, :, 3, 0] = torch.tensor([1.0, 0.0, 2.0, 0.0])
    query[0, :, 3, 1] = torch.tensor([0.0, 0.0, 2.0, 0.0])
    ref = torch.zeros(1, 4, size, size)
    ref[0, 3] = 0.3
    ref[0, :, 3, 1] = torch.tensor([0.0, 1.0, 2.0, 0.0])
    ref[0, :, 3, 2] = torch.tensor([0.0, 0.0, 2.0, 0.0])
    ref[0, :, 0, 0] = torch.tensor([0.0, 3.0, 0.0, 0.3])
    bank = ReferenceBank(2, 2, (4, size, size))
    bank.add(ref, torch.tensor([0]), torch.tensor([[0, 0, 5]]))
    return _PartHead(), query, bank


def test_swaps_copy_the_corresponding_part_not_the_strongest_evidence():
    head, query, bank = _off_part_problem()
    true, pred = torch.tensor([0]), torch.tensor([1])
    assert head(query).argmax(1).item() == 1
    # the greedy baseline scores every (query cell, reference cell) pair and pastes the blob
    (greedy,) = greedy_search(head, query, true, pred, bank, SearchConfig(), max_cells=1)
    assert greedy.success and greedy.edits[0].reference_cells == ((0, 0),)
    (res,) = counterfactual_search(head, query, true, pred, bank, SearchConfig(max_shift=1))
    assert res.success and res.num_edits == 1
    assert res.edits[0].query_cells == ((3, 0),) and res.edits[0].reference_cells == ((3, 1),)
    expected = torch.zeros(4, 4)
    expected[3, 0] = 2.0                        # only D differs from its corresponding cell
    assert torch.allclose(res.contributions, expected, atol=1e-5)


def test_a_mirrored_reference_corresponds_mirrored_cells():
    """The same problem with the reference mirrored left-right: the query's part at (3, 0)
    corresponds to the reference's (3, 2), and the blob, now at (0, 3), to no query cell."""
    head, query, bank = _off_part_problem()
    ref = bank.get(0)[0].flip(-1)                # part at (3, 2), object at columns 1-2
    mirrored = ReferenceBank(2, 2, (4, 4, 4))
    mirrored.add(ref, torch.tensor([0]), torch.tensor([[0, 0, 5]]))
    true, pred = torch.tensor([0]), torch.tensor([1])
    (res,) = counterfactual_search(head, query, true, pred, mirrored, SearchConfig(max_shift=1))
    assert res.success and res.edits[0].query_cells == ((3, 0),)
    assert res.edits[0].reference_cells == ((3, 2),)
    (plain,) = counterfactual_search(head, query, true, pred, mirrored,
                                     SearchConfig(max_shift=1, mirror=False))
    assert plain.edits[0].reference_cells != ((3, 2),)   # without mirrors no transform fits


def test_annotations_restrict_the_swap_to_the_same_part():
    """The reference's true part sits two columns right of the cell that aligns with the query's
    wrong part. Without labels, the only swap of corresponding cells that brings the true part in
    lands on the query's background at (1, 2); with the part labels the query's part cell
    corresponds to the reference's part, and that one swap flips."""
    head = _PartHead()
    query = torch.zeros(1, 4, 4, 4)
    query[0, 3] = 0.3
    query[0, :, 1, 0] = torch.tensor([1.5, 0.0, 2.0, 0.0])        # wrong part at (1, 0)
    ref = torch.zeros(1, 4, 4, 4)
    ref[0, 3] = 0.3
    ref[0, :, 1, 0] = torch.tensor([0.5, 0.0, 2.0, 0.0])          # the object, aligned
    ref[0, :, 1, 2] = torch.tensor([0.0, 1.0, 0.0, 0.3])          # its part, displaced
    bank = ReferenceBank(2, 2, (4, 4, 4))
    bank.add(ref, torch.tensor([0]), torch.tensor([[0, 0, 5]]))
    true, pred = torch.tensor([0]), torch.tensor([1])
    cfg = SearchConfig(max_shift=0, mirror=False)
    (plain,) = counterfactual_search(head, query, true, pred, bank, cfg)
    assert (1, 2) in plain.edited_cells                  # the part pasted onto the background
    qp = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    qp[0, 0, 1, 0] = True
    rp = torch.zeros(1, 4, 4, dtype=torch.bool)
    rp[0, 1, 2] = True
    (res,) = counterfactual_search(head, query, true, pred, bank, cfg, query_parts=qp,
                                   reference_parts={(0, 0, 5): rp})
    assert res.success and res.num_edits == 1
    assert res.edits[0].query_cells == ((1, 0),) and res.edits[0].reference_cells == ((1, 2),)
    with pytest.raises(ValueError, match="query_parts"):
        counterfactual_search(head, query, true, pred, bank, cfg, query_parts=qp[0],
                              reference_parts={(0, 0, 5): rp})
    with pytest.raises(ValueError, match="labels of reference"):
        counterfactual_search(head, query, true, pred, bank, cfg, query_parts=qp,
                              reference_parts={(0, 0, 5): rp[:, :2]})

import pytest
import torch
from torch import nn

from fgvce_lightning.engine.bank import ReferenceBank
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


CFG = SearchConfig(candidate_fraction=0.15, absent_fraction=0.15)
"""The known answers below use the evidence-cell baseline (absent = the reference's channel-1
cell), under which each S cell's contribution is exactly 2."""


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
        assert all(cell in S_CELLS for cell in e.reference_cells)   # evidence cells only
        assert e.reference_slot in (0, 1) and e.reference_id == (0, e.reference_slot,
                                                                  e.reference_slot + 10)
        assert e.contribution == pytest.approx(2.0 * len(e.query_cells), abs=1e-4)
    # margin 5 -> 1 -> -1: p(true) rises, p(pred) falls, the last edit flips
    assert res.p_true_before < res.edits[0].p_true_after < res.edits[1].p_true_after
    assert res.edits[1].p_true_after > res.edits[1].p_pred_after
    assert res.p_pred_before > res.edits[0].p_pred_after > res.edits[1].p_pred_after
    # every map the head saw is accounted for
    assert res.head_evaluations == head.seen


def test_minimality_pass_drops_the_unneeded_edit():
    gen = torch.Generator().manual_seed(3)
    q = _background(1, gen)
    q[0, :, 0, 0] = q[0, :, 3, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    q[0, :, 0, 3] = torch.tensor([0.0, -1.0, 0.0, 0.0])
    bank = _make_bank((MaxHead.A, MaxHead.B, MaxHead.D))
    t, p = torch.tensor([0]), torch.tensor([1])
    full = counterfactual_search(MaxHead(), q, t, p, bank, SearchConfig(
        candidate_fraction=0.15, absent_fraction=0.15, minimality=False, trim=False))[0]
    assert full.success and full.edits[0].query_cells == (MaxHead.D,)
    assert set(full.edited_cells) >= {MaxHead.A, MaxHead.B, MaxHead.D}
    res = counterfactual_search(MaxHead(), q, t, p, bank, SearchConfig(candidate_fraction=0.15, absent_fraction=0.15))[0]
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
    one_region = {"candidate_fraction": 0.15, "absent_fraction": 0.15, "region_threshold": 0.0, "max_region_size": H * W}
    (full,) = counterfactual_search(head, q[:1], t[:1], p[:1], bank,
                                    SearchConfig(**one_region, trim=False))
    assert full.success and full.num_edits == 1 and len(full.edited_cells) == H * W
    head.seen = 0
    (single,) = counterfactual_search(head, q[:1], t[:1], p[:1], bank, SearchConfig(**one_region))
    assert single.head_evaluations == head.seen              # every map the head saw is counted
    # the trim costs one evaluation per edited cell and one per proper prefix, plus the replay
    assert single.head_evaluations == full.head_evaluations + (H * W) + (H * W - 1) + 1
    results = counterfactual_search(head, q, t, p, bank, SearchConfig(**one_region))
    assert results[0] == single
    refs, _ = bank.get(0)
    for res in results:
        assert res.success and res.num_edits == 1
        assert sorted(res.edited_cells) == sorted(S_CELLS)
        edit = res.edits[0]
        assert len(edit.reference_cells) == len(edit.query_cells)
        assert all(cell in S_CELLS for cell in edit.reference_cells)
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
    cfg = SearchConfig(candidate_fraction=0.15, absent_fraction=0.15, region_threshold=0.0, max_region_size=H * W)
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


def test_non_differentiable_head_falls_back_to_all_cells():
    head = CellLinearHead()

    def detached(x):
        with torch.no_grad():
            return head(x)

    q, t, p = _linear_problem()
    bank = _make_bank(S_CELLS)
    (with_grad,) = counterfactual_search(head, q, t, p, bank, CFG)
    assert all(c in S_CELLS for e in with_grad.edits for c in e.reference_cells)
    # without gradients every reference cell is a candidate: the search still runs, and matches
    # (cosine ties between orthogonal cells) now come from outside the evidence cells (the trim
    # would drop those useless swaps again, so it is off here)
    (res,) = counterfactual_search(detached, q, t, p, bank,
                                   SearchConfig(candidate_fraction=0.15, absent_fraction=0.15, trim=False))
    assert not res.skipped and res.num_edits >= 1
    assert any(c not in S_CELLS for e in res.edits for c in e.reference_cells)
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
    with pytest.raises(ValueError, match="candidate_fraction"):
        SearchConfig(candidate_fraction=0.0)
    for bad in (0.0, 1.5, True, "all"):
        with pytest.raises(ValueError, match="absent_fraction"):
            SearchConfig(absent_fraction=bad)
    with pytest.raises(ValueError, match="odd"):
        SearchConfig(window=4)


# ---------------------------------------------------------------------------- first-order lookahead
def _decoy_problem():
    """The true class's evidence sits in reference cells that look nothing like the query's
    cells, while look-alike "decoy" cells carry too little of it to flip the prediction.

    Query: channel 0 = 1 on ``S_CELLS`` (class 1, the mistake: logit 3 vs the truth's bias 1).
    Reference of class 0: decoys (0.5, 0, 0, 0.2) on ``S_CELLS`` (cosine 0.93 to the query cells;
    swapping all three still leaves class 1 ahead, 1.5 vs 1) and evidence (0, 2, 0, 0) in cell
    (0, 0) (cosine 0; one copy onto an S cell flips: class 0 gets 3, class 1 drops to 2).
    """
    head = _CellHead(true_bias=1.0).eval()
    query = torch.zeros(1, C, H, W)
    ref = torch.zeros(1, C, H, W)
    for r, c in S_CELLS:
        query[0, 0, r, c] = 1.0
        ref[0, 0, r, c], ref[0, 3, r, c] = 0.5, 0.2
    ref[0, 1, 0, 0] = 2.0
    bank = ReferenceBank(3, 2, (C, H, W))
    bank.add(ref, torch.tensor([0]), torch.tensor([[0, 0, 7]]))
    return head, query, bank


def test_first_order_candidates_find_evidence_that_similarity_misses():
    head, query, bank = _decoy_problem()
    true, pred = torch.tensor([0]), torch.tensor([1])
    base = dict(candidate_fraction=1.0, rigid_matching=False, reference_lookahead=1, seed=0)
    without = counterfactual_search(head, query, true, pred, bank,
                                    SearchConfig(taylor_lookahead=0, **base))[0]
    assert not without.skipped and not without.success        # the look-alikes cannot flip it
    onto_s = [rc for e in without.edits for qc, rc in zip(e.query_cells, e.reference_cells)
              if qc in S_CELLS]
    assert onto_s and all(rc in S_CELLS for rc in onto_s)   # the S cells only got decoys

    found = counterfactual_search(head, query, true, pred, bank,
                                  SearchConfig(taylor_lookahead=1, **base))[0]
    assert found.success and found.final_pred == 0
    assert found.num_edits == 1 and len(found.edits[0].query_cells) == 1   # one copy is enough
    assert found.edits[0].reference_cells == ((0, 0),)                     # the evidence cell
    assert found.edits[0].query_cells[0] in S_CELLS


def test_taylor_lookahead_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="taylor_lookahead"):
            SearchConfig(taylor_lookahead=bad)


class _PositionalHead(nn.Module):
    """Additive, position-dependent head on 3 channels: ``true = Σ w_cell · x1``, ``pred = Σ x0``.

    Channel 0 is the predicted class's part, channel 1 the true class's, channel 2 plain
    appearance. The true-class weight is 3 at ``E`` (an empty cell) and 1 elsewhere, so pasting the
    true part at ``E`` raises the margin most, though the query's wrong part sits at ``D``.
    """
    D, E = (3, 0), (0, 3)

    def forward(self, x):
        w = torch.ones(x.shape[-2:], dtype=x.dtype, device=x.device)
        w[self.E] = 3.0
        return torch.stack([(x[:, 1] * w).sum((1, 2)), x[:, 0].sum((1, 2))], 1)


def test_absent_baseline_points_the_ranking_at_the_deviating_cell():
    size = 4
    background = torch.tensor([0.0, 0.0, 1.0])
    query = background.view(1, 3, 1, 1).repeat(1, 1, size, size)
    query[0, :, 3, 0] = torch.tensor([1.0, 0.0, 0.5])             # the wrong part, at D
    ref = background.view(1, 3, 1, 1).repeat(1, 1, size, size)
    ref[0, :, 1, 1] = torch.tensor([0.0, 1.0, 0.5])               # the true part
    bank = ReferenceBank(2, 2, (3, size, size))
    bank.add(ref, torch.tensor([0]), torch.tensor([[0, 0, 0]]))
    head, true, pred = _PositionalHead(), torch.tensor([0]), torch.tensor([1])
    assert head(query).argmax(1).item() == 1 and head(ref).argmax(1).item() == 0
    one_cell = 1.0 / (size * size)              # one candidate: the true-part cell
    base = dict(candidate_fraction=one_cell, reference_lookahead=1, max_region_size=1, seed=0)

    # default: a cell's absent value is its most similar reference cell, background for every
    # cell (D's wrong part included), so only D's difference from the true class counts
    (res,) = counterfactual_search(head, query, true, pred, bank, SearchConfig(**base))
    expected = torch.zeros(size, size)
    expected[head.D] = 1.0                                        # removing the wrong part
    assert torch.allclose(res.contributions, expected, atol=1e-5)
    assert res.success and res.num_edits == 1
    assert res.edits[0].query_cells == (head.D,) and res.edits[0].reference_cells == ((1, 1),)

    # evidence-cell baseline: every absent cell becomes the true part, so every cell scores, E
    # most (weight 3) and the edit paints the part onto the empty cell instead
    (ev,) = counterfactual_search(head, query, true, pred, bank,
                                  SearchConfig(absent_fraction=one_cell, **base))
    expected = torch.ones(size, size)
    expected[head.E], expected[head.D] = 3.0, 2.0
    assert torch.allclose(ev.contributions, expected, atol=1e-5)
    assert ev.success and ev.edits[0].query_cells == (head.E,)

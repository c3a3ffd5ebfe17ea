import math

import pytest
import torch

from fgvce_lightning.engine.bank import ReferenceBank
from fgvce_lightning.engine.greedy import greedy_search
from fgvce_lightning.engine.search import SearchConfig

from cell_heads import C, H, S_CELLS, W, CellLinearHead as _CellHead


class CellLinearHead(_CellHead):
    """The additive cell head with true-class bias -4.

    The query has channel 0 = (1.0, 1.2, 1.4) on the three cells (margin 7.6), the references
    channel 1 = (1.0, 1.3, 1.6) there; swapping reference cell v onto query cell u lowers the
    margin by q0[u] + r1[v] on those cells (unique best swap, no ties): 7.6 -> 4.6 -> 1.8 -> -0.8.
    """

    def __init__(self):
        super().__init__(true_bias=-4.0)


def _problem(n=1, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.zeros(n, C, H, W)
    q[:, 2:] = 0.5 + 0.5 * torch.rand(n, 2, H, W, generator=gen)
    refs = torch.zeros(3, C, H, W)
    refs[:, 2:] = 0.5 + 0.5 * torch.rand(3, 2, H, W, generator=gen)
    for j, (r, c) in enumerate(S_CELLS):
        q[:, :, r, c] = torch.tensor([1.0 + 0.2 * j, 0.0, 0.0, 0.0])
        refs[:, :, r, c] = torch.tensor([0.0, 1.0 + 0.3 * j, 0.0, 0.0])
    bank = ReferenceBank(3, 4, (C, H, W), dtype=dtype)
    bank.add(refs, torch.zeros(3, dtype=torch.long), torch.arange(9).view(3, 3))
    return q, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long), bank


def test_greedy_flips_with_exactly_the_needed_cells():
    head = CellLinearHead()
    q, t, p, bank = _problem()
    (res,) = greedy_search(head, q, t, p, bank)
    assert res.success and res.final_pred == 0 and res.method == "greedy"
    assert res.edited_cells == S_CELLS[::-1] and res.num_edits == 3   # strongest cell first
    for e in res.edits:
        assert len(e.query_cells) == 1 and e.reference_cells == ((3, 3),)
        assert math.isnan(e.contribution)
        assert e.reference_id == tuple(range(3 * e.reference_slot, 3 * e.reference_slot + 3))
    # margin 7.6 -> 4.6 -> 1.8 -> -0.8: monotone trajectory, flipped only at the end
    traj = res.trajectory_true
    assert all(a < b for a, b in zip(traj, traj[1:]))
    assert res.edits[1].p_true_after < 0.5 < res.edits[2].p_true_after
    # step t scores every (free query cell, reference cell) pair: (16 - t) * 16 maps
    assert res.head_evaluations == 1 + 16 * 16 + 15 * 16 + 14 * 16 == head.seen
    assert res.contributions is None and res.regions is None


def test_greedy_budget_and_batching():
    head = CellLinearHead()
    q, t, p, bank = _problem(n=3, seed=1)
    q[1, 0, 1, 1] = 3.0   # needs more than the budget of two swaps
    (short,) = greedy_search(head, q[1:2], t[1:2], p[1:2], bank, max_cells=2)
    assert not short.success and short.num_edits == 2
    batched = greedy_search(head, q, t, p, bank, SearchConfig(chunk_size=100))
    for i in range(3):
        (single,) = greedy_search(head, q[i:i + 1], t[i:i + 1], p[i:i + 1], bank)
        assert _key(single) == _key(batched[i])
        assert single.trajectory_true == pytest.approx(batched[i].trajectory_true, abs=1e-5)
        assert single.head_evaluations == batched[i].head_evaluations
    again = greedy_search(head, q, t, p, bank, SearchConfig(chunk_size=100))  # deterministic
    assert [(_key(r), r.trajectory_true) for r in again] == \
        [(_key(r), r.trajectory_true) for r in batched]


def _key(r):
    return (r.success, r.final_pred, [(e.query_cells, e.reference_slot, e.reference_cells)
                                      for e in r.edits])


def test_greedy_preserves_state_and_handles_skips():
    head = CellLinearHead().train()
    q, t, p, bank = _problem(n=3, dtype=torch.bfloat16)
    q[1, 1, 0, 0] = float("inf")
    t[2] = 2
    rng = torch.get_rng_state()
    with torch.inference_mode():
        res = greedy_search(head, q, t, p, bank)
    assert res[0].success
    assert "non-finite" in res[1].skipped_reason and res[1].method == "greedy"
    assert "no reference" in res[2].skipped_reason
    assert all(m.training for m in head.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(prm.grad is None for prm in head.parameters())


def test_greedy_errors():
    head = CellLinearHead()
    q, t, p, bank = _problem()
    with pytest.raises(ValueError, match="3 class logits"):
        greedy_search(lambda x: torch.zeros(x.shape[0], 4), q, t, p, bank)
    with pytest.raises(ValueError, match="bank's shape"):
        greedy_search(head, torch.zeros(1, C + 1, H, W), t, p, bank)
    with pytest.raises(ValueError, match="max_cells"):
        greedy_search(head, q, t, p, bank, max_cells=0)

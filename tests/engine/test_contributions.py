"""Tests of the local-window Shapley contributions, with tiny heads whose answers are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fgvce_lightning.engine._util import margin
from fgvce_lightning.engine.contributions import (
    ContributionResult,
    exact_local_shapley,
    is_additive_head,
    local_shapley,
)

TRUE = torch.tensor([0, 1, 2])
PRED = torch.tensor([1, 2, 0])


class GapLinear(nn.Module):
    """Global average pooling + linear, hand-set weights: additive over cells."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]]))
            self.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.mean(dim=(2, 3)))


def per_cell_tanh_head(f: torch.Tensor) -> torch.Tensor:
    """A non-linear but additive head: sum over cells of per-cell functions."""
    w = torch.tensor([[1.0, -1.0], [2.0, 0.5], [-0.5, 1.5]])
    return torch.tanh(torch.einsum("kc,nchw->nkhw", w, f)).sum(dim=(2, 3))


class ConvMaxHead(nn.Module):
    """Conv 3×3 + ReLU + global max pool + linear: interactions between neighbouring cells."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(f)).amax(dim=(2, 3)))


def product_head(f: torch.Tensor) -> torch.Tensor:
    """logit_1 = f[0, 0, 0] · f[0, 0, 1] (the two cells only count together), other logits 0."""
    z = torch.zeros(f.shape[0], 3)
    z[:, 1] = f[:, 0, 0, 0] * f[:, 0, 0, 1]
    return z


def _data(n: int = 3, h: int = 4, w: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, h, w, generator=gen), torch.randn(n, 2, h, w, generator=gen)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# additive heads
# ---------------------------------------------------------------------------------------------

def test_additive_head_closed_form_equals_exhaustive_and_analytic() -> None:
    head = GapLinear()
    query, absent = _data()
    assert is_additive_head(head, query, absent, TRUE, PRED)
    res = local_shapley(head, query, absent, TRUE, PRED)
    exact = exact_local_shapley(head, query, absent, TRUE, PRED)
    # analytic: phi_u = (w_pred - w_true) · (q_u - a_u) / (H W)
    w = head.fc.weight.detach()
    analytic = torch.einsum("nc,nchw->nhw", w[PRED] - w[TRUE], query - absent) / 16
    assert res.exact and exact.exact
    assert res.values.shape == (3, 4, 4) and res.values.dtype == torch.float32
    torch.testing.assert_close(res.values, analytic, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(exact.values, analytic, atol=1e-6, rtol=1e-5)
    # 4 · num_pairs for the check, H·W + 2 for the closed form and its identity check
    assert res.head_evaluations.tolist() == [4 + 16 + 2] * 3
    assert res.head_evaluations.dtype == torch.int64


def test_additive_nonlinear_per_cell_head_uses_exact_closed_form() -> None:
    query, absent = _data(h=3, w=4)
    assert is_additive_head(per_cell_tanh_head, query, absent, TRUE, PRED)
    res = local_shapley(per_cell_tanh_head, query, absent, TRUE, PRED)
    exact = exact_local_shapley(per_cell_tanh_head, query, absent, TRUE, PRED)
    assert res.exact
    torch.testing.assert_close(res.values, exact.values, atol=1e-5, rtol=1e-5)


def test_detector_rejects_non_additive_heads_and_falls_back_to_monte_carlo() -> None:
    query, absent = _data()
    assert not is_additive_head(ConvMaxHead(), query, absent, TRUE, PRED)
    q2, a2 = torch.ones(3, 2, 2, 2), torch.zeros(3, 2, 2, 2)
    assert not is_additive_head(product_head, q2, a2, TRUE, PRED)
    res = local_shapley(ConvMaxHead(), query, absent, TRUE, PRED, num_samples=4)
    plain = local_shapley(ConvMaxHead(), query, absent, TRUE, PRED, exact_if_additive=False)
    assert not res.exact and not plain.exact
    # the check's 4 evaluations, then the distinct coalitions (at most 2 · H·W per sample)
    mc = res.head_evaluations - 4
    assert len(set(mc.tolist())) == 1 and 16 * 4 < int(mc[0]) < 2 * 16 * 4
    assert len(set(plain.head_evaluations.tolist())) == 1
    assert 16 * 4 < int(plain.head_evaluations[0]) < 2 * 16 * 4
    # default cost on a 7×7 grid (4 samples): below the 2 · 49 · 4 coalitions
    q7, a7 = _data(n=1, h=7, w=7)
    cost = int(local_shapley(ConvMaxHead(), q7, a7, TRUE[:1], PRED[:1]).head_evaluations[0])
    assert 4 + 49 * 4 < cost < 4 + 2 * 49 * 4


def test_additivity_pairs_stop_at_the_first_failure() -> None:
    from fgvce_lightning.engine.contributions import _additive_closed_form
    query, absent = _data()
    kw = dict(num_pairs=3, rtol=1e-4, atol=1e-5, chunk_size=64, num_classes=None)
    ok, values, evals = _additive_closed_form(ConvMaxHead(), query, absent, TRUE, PRED,
                                              generator=_gen(0), **kw)
    assert not bool(ok.all()) and values is None
    assert evals.tolist() == [4] * 3                  # the first pair already failed
    ok, values, evals = _additive_closed_form(GapLinear(), query, absent, TRUE, PRED,
                                              generator=_gen(0), **kw)
    assert bool(ok.all()) and values is not None
    assert evals.tolist() == [3 * 4 + 16 + 2] * 3     # every pair, then the closed form


class RecordingHead(torch.nn.Module):
    """ConvMaxHead that keeps every feature map it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.seen = ConvMaxHead(), []

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        self.seen.append(f.detach().clone())
        return self.inner(f)


@pytest.mark.parametrize("window,samples,antithetic", [(3, 1, True), (3, 4, True), (3, 3, False),
                                                       (7, 2, True)])
def test_each_distinct_coalition_is_evaluated_once(window: int, samples: int,
                                                   antithetic: bool) -> None:
    # query and absent differ at every cell, so distinct maps are distinct coalitions
    query, absent = _data(n=2, h=4, w=4, seed=3)
    head = RecordingHead()
    res = local_shapley(head, query, absent, TRUE[:2], PRED[:2], window=window,
                        num_samples=samples, antithetic=antithetic, exact_if_additive=False,
                        generator=_gen(2), chunk_size=13)
    seen = torch.cat(head.seen)
    assert seen.shape[0] == int(res.head_evaluations.sum())
    for n in range(2):  # every map belongs to one query: each cell is its query's or absent's
        mine = seen[((seen == query[n]) | (seen == absent[n])).flatten(1).all(1)]
        assert mine.shape[0] == int(res.head_evaluations[n])
        assert torch.unique(mine.flatten(1), dim=0).shape[0] == mine.shape[0]
    # the same estimate as evaluating every (cell, sample) coalition pair on its own
    ref = local_shapley(ConvMaxHead(), query, absent, TRUE[:2], PRED[:2], window=window,
                        num_samples=samples, antithetic=antithetic, exact_if_additive=False,
                        generator=_gen(2), chunk_size=4096)
    torch.testing.assert_close(res.values, ref.values, atol=1e-5, rtol=1e-5)


def test_whole_grid_window_is_the_chain_sampler() -> None:
    # one order of the whole grid: the H·W + 1 prefixes, and the marginals add up exactly to
    # v(all) - v(none) (efficiency holds for every single order)
    head = ConvMaxHead()
    query, absent = _data(h=3, w=3, seed=4)
    res = local_shapley(head, query, absent, TRUE, PRED, window=5, num_samples=1,
                        antithetic=False, exact_if_additive=False, generator=_gen(9))
    assert res.head_evaluations.tolist() == [3 * 3 + 1] * 3
    with torch.no_grad():
        total = margin(head(query), TRUE, PRED) - margin(head(absent), TRUE, PRED)
    torch.testing.assert_close(res.values.sum(dim=(1, 2)), total, atol=1e-5, rtol=1e-5)
    # an antithetic pair: the order and its reverse share only the full and the empty map
    pair = local_shapley(head, query, absent, TRUE, PRED, window=5, num_samples=2,
                         exact_if_additive=False, generator=_gen(9))
    assert pair.head_evaluations.tolist() == [2 * (3 * 3 + 1) - 2] * 3


# ---------------------------------------------------------------------------------------------
# exact enumeration and Monte Carlo accuracy
# ---------------------------------------------------------------------------------------------

def test_two_player_interaction_is_split_equally() -> None:
    # v(S) = 1 iff both cells present: Shapley gives 1/2 each; an antithetic pair is exact here.
    query, absent = torch.ones(1, 2, 1, 2), torch.zeros(1, 2, 1, 2)
    true, pred = torch.tensor([0]), torch.tensor([1])
    exact = exact_local_shapley(product_head, query, absent, true, pred)
    torch.testing.assert_close(exact.values, torch.full((1, 1, 2), 0.5))
    mc = local_shapley(product_head, query, absent, true, pred, num_samples=2)
    assert not mc.exact
    torch.testing.assert_close(mc.values, torch.full((1, 1, 2), 0.5))


@pytest.mark.parametrize("shape", [(3, 3), (2, 3)])
def test_whole_grid_window_is_efficient(shape: tuple[int, int]) -> None:
    # window >= 2·max(H, W) - 1 covers the grid for every cell: ordinary Shapley values
    head = ConvMaxHead()
    query, absent = _data(h=shape[0], w=shape[1])
    exact = exact_local_shapley(head, query, absent, TRUE, PRED, window=5)
    with torch.no_grad():
        total = margin(head(query), TRUE, PRED) - margin(head(absent), TRUE, PRED)
    torch.testing.assert_close(exact.values.sum(dim=(1, 2)), total, atol=1e-5, rtol=1e-5)
    assert exact.head_evaluations.tolist() == [shape[0] * shape[1] * 2 ** (shape[0] * shape[1])] * 3


def test_monte_carlo_error_shrinks_with_samples() -> None:
    head = ConvMaxHead()
    query, absent = _data(n=2, h=3, w=3)  # corner, edge and centre windows
    exact = exact_local_shapley(head, query, absent, TRUE[:2], PRED[:2]).values
    rmse = {}
    for samples in (4, 32, 256):
        errs = [local_shapley(head, query, absent, TRUE[:2], PRED[:2], num_samples=samples,
                              generator=_gen(seed), exact_if_additive=False).values - exact
                for seed in range(3)]
        rmse[samples] = torch.stack(errs).pow(2).mean().sqrt().item()
    scale = exact.pow(2).mean().sqrt().item()
    assert rmse[4] > rmse[32] > rmse[256], rmse
    assert rmse[256] < 0.1 * scale, (rmse, scale)


def test_antithetic_pairs_have_lower_error_than_plain_sampling() -> None:
    head = ConvMaxHead()
    query, absent = _data(n=2, h=3, w=3)
    exact = exact_local_shapley(head, query, absent, TRUE[:2], PRED[:2]).values

    def mse(antithetic: bool) -> float:
        errs = [local_shapley(head, query, absent, TRUE[:2], PRED[:2], num_samples=4,
                              antithetic=antithetic, generator=_gen(seed),
                              exact_if_additive=False).values - exact for seed in range(20)]
        return torch.stack(errs).pow(2).mean().item()

    # same evaluation count (2 · H·W · 4 per query) for both
    assert mse(True) < 0.7 * mse(False)


# ---------------------------------------------------------------------------------------------
# randomness, batching, chunking
# ---------------------------------------------------------------------------------------------

def test_seeds_and_global_rng() -> None:
    head = ConvMaxHead()
    query, absent = _data()
    state = torch.get_rng_state()
    a = local_shapley(head, query, absent, TRUE, PRED, generator=_gen(7))
    b = local_shapley(head, query, absent, TRUE, PRED, generator=_gen(7))
    c = local_shapley(head, query, absent, TRUE, PRED, generator=_gen(8))
    d = local_shapley(head, query, absent, TRUE, PRED)  # default generator: seed 0
    e = local_shapley(head, query, absent, TRUE, PRED, generator=_gen(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.values, b.values)
    assert not torch.equal(a.values, c.values)
    assert torch.equal(d.values, e.values)


@pytest.mark.parametrize("head", [ConvMaxHead(), GapLinear()], ids=["mc", "additive"])
def test_batch_equals_individual_queries(head: nn.Module) -> None:
    query, absent = _data()
    batch = local_shapley(head, query, absent, TRUE, PRED, generator=_gen(5))
    for n in range(3):
        one = local_shapley(head, query[n:n + 1], absent[n:n + 1], TRUE[n:n + 1], PRED[n:n + 1],
                            generator=_gen(5))
        assert one.exact == batch.exact
        torch.testing.assert_close(one.values[0], batch.values[n], atol=1e-5, rtol=1e-5)
        assert one.head_evaluations[0] == batch.head_evaluations[n]


def test_chunk_size_does_not_change_the_result() -> None:
    head = ConvMaxHead()
    query, absent = _data(h=3, w=3)
    big = local_shapley(head, query, absent, TRUE, PRED, generator=_gen(1), chunk_size=4096)
    small = local_shapley(head, query, absent, TRUE, PRED, generator=_gen(1), chunk_size=7)
    torch.testing.assert_close(big.values, small.values, atol=1e-5, rtol=1e-5)
    ex_big = exact_local_shapley(head, query, absent, TRUE, PRED)
    ex_small = exact_local_shapley(head, query, absent, TRUE, PRED, chunk_size=97)
    torch.testing.assert_close(ex_big.values, ex_small.values, atol=1e-5, rtol=1e-5)


def test_odd_sample_count_and_result_type() -> None:
    query, absent = _data(n=1, h=2, w=2)
    res = local_shapley(ConvMaxHead(), query, absent, TRUE[:1], PRED[:1], num_samples=3,
                        exact_if_additive=False)
    assert isinstance(res, ContributionResult)
    # a 3×3 window covers the 2×2 grid: three chains of 5 prefixes share at least the full and
    # the empty map
    assert 2 * 4 < int(res.head_evaluations[0]) <= 3 * 5 - 4
    assert torch.isfinite(res.values).all()


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_input_errors() -> None:
    head = GapLinear()
    query, absent = _data()
    with pytest.raises(ValueError, match="spatial feature map"):
        local_shapley(head, query[:, :, 0], absent, TRUE, PRED)
    with pytest.raises(TypeError, match="torch.Tensor"):
        local_shapley(head, query.numpy(), absent, TRUE, PRED)
    with pytest.raises(ValueError, match="shape of `query`"):
        local_shapley(head, query, absent[:, :, :3], TRUE, PRED)
    with pytest.raises(ValueError, match=r"`pred` to be an integer tensor of shape \(3,\)"):
        local_shapley(head, query, absent, TRUE, PRED[:2])
    with pytest.raises(ValueError, match="`true` to be an integer tensor"):
        local_shapley(head, query, absent, TRUE.float(), PRED)
    for window in (2, 0, -1, 3.0):
        with pytest.raises(ValueError, match="odd positive integer"):
            local_shapley(head, query, absent, TRUE, PRED, window=window)
    with pytest.raises(ValueError, match="num_samples"):
        local_shapley(head, query, absent, TRUE, PRED, num_samples=0)
    with pytest.raises(TypeError, match="generator"):
        local_shapley(head, query, absent, TRUE, PRED, generator=0)


def test_head_errors() -> None:
    query, absent = _data()

    def two_logits(f: torch.Tensor) -> torch.Tensor:
        return f.mean(dim=(2, 3))  # 2 classes, but labels go up to 2

    with pytest.raises(ValueError, match="logits for every class"):
        local_shapley(two_logits, query, absent, TRUE, PRED)
    with pytest.raises(ValueError, match="5 class logits"):
        local_shapley(GapLinear(), query, absent, TRUE, PRED, num_classes=5)
    with pytest.raises(ValueError, match="logits of shape"):
        local_shapley(lambda f: f.sum(dim=1), query, absent, TRUE, PRED)
    with pytest.raises(ValueError, match="max_players"):
        exact_local_shapley(GapLinear(), query, absent, TRUE, PRED, window=5)

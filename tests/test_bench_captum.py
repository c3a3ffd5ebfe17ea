"""Smoke and correctness tests of ``benchmarks/bench_captum.py`` (skipped without captum)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("captum")

from fgvce_lightning.engine._util import margin  # noqa: E402
from fgvce_lightning.engine.contributions import exact_local_shapley, local_shapley  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_captum.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_captum", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_captum"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_captum", None)


class ConvReluHead(nn.Module):
    """Conv 3×3 + ReLU + global mean + linear with seeded weights: cells interact."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(f)).mean(dim=(2, 3)))


def _tiny_game():
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 2, 3, 3, generator=gen)
    absent = torch.randn(2, 2, 3, 3, generator=gen)
    return ConvReluHead().eval(), query, absent, torch.tensor([0, 2]), torch.tensor([1, 0])


def test_captum_wrapper_plays_the_global_cell_game(bench):
    head, query, absent, true, pred = _tiny_game()
    # on a 3×3 grid a 5×5 window covers the grid for every cell: the global game, 9 players
    exact = exact_local_shapley(head, query, absent, true, pred, window=5).values
    values, counter = bench.captum_cell_shapley(head, query, absent, true, pred, n_samples=100,
                                                seed=1)
    assert values.shape == (2, 3, 3)
    assert counter.rows == 2 * (1 + 100 * 9)
    # efficiency holds exactly for every permutation: sum = v(all) - v(none)
    with torch.no_grad():
        gap = margin(head(query), true, pred) - margin(head(absent), true, pred)
    torch.testing.assert_close(values.sum(dim=(1, 2)), gap, atol=1e-4, rtol=1e-4)
    # and the sampled values approach the exact global Shapley values (seen: 3-5% at 100)
    scale = exact.abs().max()
    assert (values - exact).abs().max() < 0.1 * scale
    assert bench.spearman(values, exact).min() > 0.9
    # ours with a grid-covering window estimates the same values
    ours = local_shapley(head, query, absent, true, pred, window=5, num_samples=50,
                         generator=torch.Generator().manual_seed(2)).values
    assert (ours - exact).abs().max() < 0.1 * scale


def test_rank_metrics_on_known_maps(bench):
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]])
    b = torch.tensor([[[10.0, 20.0], [30.0, 40.0]], [[4.0, 3.0], [2.0, 1.0]]])
    torch.testing.assert_close(bench.spearman(a, b), torch.tensor([1.0, -1.0], dtype=torch.float64))
    # one swapped pair among 4 values: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    c = torch.tensor([[[2.0, 1.0], [3.0, 4.0]]])
    torch.testing.assert_close(bench.spearman(a[:1], c), torch.tensor([0.8], dtype=torch.float64))
    torch.testing.assert_close(bench.topk_overlap(a, b, k=2),
                               torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        bench.spearman(a, b[:1])


def test_benchmark_runs_end_to_end_on_a_tiny_config(bench, capsys):
    threads = torch.get_num_threads()
    result = bench.main(["--queries", "2", "--width", "4", "--image-size", "32",
                         "--captum-samples", "2", "--ref-samples", "8", "--repeats", "1",
                         "--seed", "3"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # --threads is restored for the caller
    methods = result["methods"]
    names = [m.name for m in methods]
    assert names == ["ours local k=3, S=4", "ours global k=7, S=4", "captum S=2",
                     "captum reference S=8"]
    for name in names:
        assert name in out
    assert "rho vs ref" in out and "split halves" in out and "time x" in out
    hw = 16  # 32-pixel inputs give a 4×4 grid
    assert result["setup"]["grid"] == (4, 4)
    # head evaluations per query: ours the additivity check (4) and the distinct coalitions
    # (below 2·HW·S; the global window's antithetic pairs of chains share only the full and the
    # empty map within a pair: 2·HW per pair); captum 1 + S·HW
    local, whole = methods[0].evals_per_query, methods[1].evals_per_query
    assert hw * 4 + 4 < local < 2 * hw * 4 + 4
    assert 2 * hw + 4 < whole <= 2 * (2 * hw) + 4
    assert [m.evals_per_query for m in methods[2:]] == [1 + 2 * hw, 2 * (1 + 4 * hw)]
    for m in methods:
        assert m.values.shape == (2, 4, 4) and torch.isfinite(m.values).all()
        assert m.seconds > 0
    for rho, top in result["pairwise"].values():
        assert -1.0 <= rho <= 1.0 and 0.0 <= top <= 1.0
    rho, top = result["reference_split_half"]
    assert -1.0 <= rho <= 1.0 and 0.0 <= top <= 1.0

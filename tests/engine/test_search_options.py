"""Reference lookahead, protected (class-token) channels and the baseline region orders."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgvce_lightning.engine.bank import ReferenceBank
from fgvce_lightning.engine.candidates import gradcam_scores
from fgvce_lightning.engine.greedy import greedy_search
from fgvce_lightning.engine.search import SearchConfig, counterfactual_search

C, H, W, K = 6, 4, 4, 3


class ConvHead(nn.Module):
    def __init__(self, channels=C, protected=0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.protected = protected
        self.conv = nn.Conv2d(channels - protected, 8, 3, padding=1)
        self.fc = nn.Linear(8 + protected, K)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        cs = x.shape[1] - self.protected
        feats = torch.relu(self.conv(x[:, :cs])).amax((2, 3))
        prefix = x[:, cs:].mean((2, 3))          # a class token copied into every cell
        return self.fc(torch.cat([feats, prefix], 1))


def _problem(head, n_refs=6, n_queries=12, seed=0, protected=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(200, C, H, W, generator=gen)
    if protected:
        feats[:, C - protected:] = torch.randn(200, protected, 1, 1, generator=gen)
    with torch.no_grad():
        head.fc.bias -= head(feats).mean(0)        # balance the classes of the random head
        pred = head(feats).argmax(1)
    labels = torch.where(torch.arange(200) < 120, pred, (pred + 1) % K)
    bank = ReferenceBank(K, n_refs, (C, H, W))
    correct = pred == labels
    ids = torch.stack([torch.zeros(200), torch.arange(200), torch.zeros(200)], 1).long()
    bank.add(feats[correct], labels[correct], ids[correct])
    wrong = (~correct).nonzero().squeeze(1)[:n_queries]
    head.seen.clear()
    return feats[wrong], labels[wrong], pred[wrong], bank


def _margin(head, x, true):
    with torch.no_grad():
        logits = head(x)
    others = logits.scatter(1, true[:, None], float("-inf")).max(1).values
    return logits.gather(1, true[:, None]).squeeze(1) - others


def test_lookahead_keeps_the_reference_that_moves_the_prediction_most():
    head = ConvHead()
    queries, true, pred, bank = _problem(head)
    cfg = SearchConfig(candidate_fraction=1.0, reference_lookahead=K * 10, minimality=False, trim=False,
                       max_edits=1, rigid_matching=False, taylor_lookahead=0)
    results = counterfactual_search(head, queries, true, pred, bank, cfg)
    checked = 0
    for ex in results:
        if ex.skipped or not ex.edits:
            continue
        refs, _ = bank.get(ex.true)
        q = queries[ex.query_index]
        cells = torch.tensor([r * W + c for r, c in ex.edits[0].query_cells])
        margins = []
        for k in range(refs.shape[0]):   # brute force: the region swapped from every reference
            qn = F.normalize(q.reshape(C, -1)[:, cells], dim=0)
            rn = F.normalize(refs[k].reshape(C, -1), dim=0)
            match = (qn.T @ rn).argmax(1)
            x = q.reshape(C, -1).clone()
            x[:, cells] = refs[k].reshape(C, -1)[:, match]
            margins.append(float(_margin(head, x.view(1, C, H, W), torch.tensor([ex.true]))))
        assert ex.edits[0].reference_slot == max(range(len(margins)), key=margins.__getitem__)
        checked += 1
    assert checked >= 5


def test_rigid_candidates_compete_with_cosine_ones():
    head = ConvHead(seed=1)
    queries, true, pred, bank = _problem(head, seed=1)
    cfg = SearchConfig(candidate_fraction=1.0, reference_lookahead=200, minimality=False, trim=False,
                       max_edits=1, rigid_matching=True, max_shift=1, taylor_lookahead=0)
    results = counterfactual_search(head, queries, true, pred, bank, cfg)
    checked = 0
    for ex in results:
        if ex.skipped or not ex.edits:
            continue
        edit = ex.edits[0]
        refs, _ = bank.get(ex.true)
        q = queries[ex.query_index].reshape(C, -1)
        cells = [r * W + c for r, c in edit.query_cells]
        t = torch.tensor([ex.true])

        def margin_of(k, sources):
            x = q.clone()
            x[:, cells] = refs[k].reshape(C, -1)[:, sources]
            return float(_margin(head, x.view(1, C, H, W), t))

        chosen = margin_of(edit.reference_slot, [r * W + c for r, c in edit.reference_cells])
        best = -float("inf")
        for k in range(refs.shape[0]):
            qn = F.normalize(q[:, cells], dim=0)
            rn = F.normalize(refs[k].reshape(C, -1), dim=0)
            best = max(best, margin_of(k, (qn.T @ rn).argmax(1).tolist()))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    src = [(r + dy, c + dx) for r, c in edit.query_cells]
                    if all(0 <= r < H and 0 <= c < W for r, c in src):
                        best = max(best, margin_of(k, [r * W + c for r, c in src]))
        assert chosen == pytest.approx(best, abs=1e-5)
        checked += 1
    assert checked >= 5


def test_lookahead_flips_at_least_as_often_as_the_best_match_alone():
    head = ConvHead(seed=3)
    queries, true, pred, bank = _problem(head, seed=3, n_queries=24)
    one = counterfactual_search(head, queries, true, pred, bank,
                                SearchConfig(reference_lookahead=1, max_edits=3))
    four = counterfactual_search(head, queries, true, pred, bank,
                                 SearchConfig(reference_lookahead=4, max_edits=3))
    assert sum(e.success for e in four) >= sum(e.success for e in one)


def test_protected_channels_are_never_swapped():
    p = 2
    head = ConvHead(protected=p)
    queries, true, pred, bank = _problem(head, protected=p)
    cfg = SearchConfig(protected_channels=p)
    for search in (counterfactual_search, greedy_search):
        head.seen.clear()
        results = search(head, queries, true, pred, bank, cfg)
        assert any(e.edits for e in results)
        prefixes = {tuple(q[C - p:, 0, 0].tolist()) for q in queries}
        for batch in head.seen:          # every map the head saw keeps one query's own prefix
            tokens = batch[:, C - p:]
            assert torch.equal(tokens, tokens[:, :, :1, :1].expand_as(tokens))
            seen = {tuple(t.tolist()) for t in tokens[:, :, 0, 0]}
            assert seen <= prefixes | {tuple(r[C - p:, 0, 0].tolist())
                                       for c in range(K) for r in bank.get(c)[0]}
            # references' prefixes only appear in the candidate-scoring pass (whole references)
        edited_maps = torch.cat(head.seen[1:]) if search is greedy_search else None
        if edited_maps is not None:
            assert {tuple(t.tolist()) for t in edited_maps[:, C - p:, 0, 0]} <= prefixes


def test_protected_channels_must_leave_something_to_swap():
    head = ConvHead()
    queries, true, pred, bank = _problem(head)
    with pytest.raises(ValueError, match="protected_channels"):
        counterfactual_search(head, queries, true, pred, bank, SearchConfig(protected_channels=C))
    with pytest.raises(ValueError, match="protected_channels"):
        SearchConfig(protected_channels=-1)


@pytest.mark.parametrize("order, method", [("gradcam", "gradcam"), ("random", "random")])
def test_baseline_region_orders(order, method):
    head = ConvHead()
    queries, true, pred, bank = _problem(head)
    main = counterfactual_search(head, queries, true, pred, bank)
    base = counterfactual_search(head, queries, true, pred, bank,
                                 SearchConfig(region_order=order))
    assert {e.method for e in base if not e.skipped} == {method}
    assert sum(e.head_evaluations for e in base) < sum(e.head_evaluations for e in main)
    again = counterfactual_search(head, queries, true, pred, bank,
                                  SearchConfig(region_order=order))
    assert [e.edits for e in again] == [e.edits for e in base]
    with pytest.raises(ValueError, match="region_order"):
        SearchConfig(region_order="saliency")


def test_gradcam_scores_match_the_definition():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(C, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, K))
    x = torch.randn(3, C, H, W)
    true, pred = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    with torch.inference_mode():
        cam = gradcam_scores(head, x, true, pred)
    xg = x.clone().requires_grad_(True)
    logits = head(xg)
    s = (logits.gather(1, pred[:, None]) - logits.gather(1, true[:, None])).sum()
    (g,) = torch.autograd.grad(s, xg)
    expected = torch.relu((g.mean((2, 3), keepdim=True) * x).sum(1))
    torch.testing.assert_close(cam, expected)

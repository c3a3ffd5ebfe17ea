"""Reference choice, protected (class-token) channels and the baseline region orders."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgvce_lightning.engine.bank import ReferenceBank
from fgvce_lightning.engine.gradients import gradcam_scores
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


def _brute_force_correspondence(q, ref, max_shift, mirror=True):
    """Loop over every rigid transform: the source cell of every query cell and the score."""
    norm = q.norm(dim=0).flatten()
    qn, rn = F.normalize(q, dim=0), F.normalize(ref, dim=0)
    best = None
    for flip in ((False, True) if mirror else (False,)):
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                score, sources = 0.0, []
                for i in range(H):
                    for j in range(W):
                        ti, tj = i + dy, ((W - 1 - j) if flip else j) + dx
                        inside = 0 <= ti < H and 0 <= tj < W
                        ti, tj = min(max(ti, 0), H - 1), min(max(tj, 0), W - 1)
                        sources.append(ti * W + tj)
                        if inside:
                            score += float(norm[i * W + j] * (qn[:, i, j] @ rn[:, ti, tj]))
                if best is None or score > best[0] + 1e-6:
                    best = (score, sources)
    return best[0] / float(norm.sum()), best[1]


def test_each_step_keeps_the_best_aligned_reference_that_moves_the_prediction_most():
    head = ConvHead()
    queries, true, pred, bank = _problem(head)
    cfg = SearchConfig(num_references=4, minimality=False, trim=False, max_edits=1, max_shift=1)
    results = counterfactual_search(head, queries, true, pred, bank, cfg)
    checked = 0
    for ex in results:
        if ex.skipped or not ex.edits:
            continue
        refs, _ = bank.get(ex.true)
        q = queries[ex.query_index]
        aligned = [_brute_force_correspondence(q, refs[k], 1) for k in range(refs.shape[0])]
        kept = sorted(range(len(aligned)), key=lambda k: -aligned[k][0])[:4]
        edit = ex.edits[0]
        assert edit.reference_slot in kept
        cells = [r * W + c for r, c in edit.query_cells]
        sources = aligned[edit.reference_slot][1]
        assert [r * W + c for r, c in edit.reference_cells] == [sources[u] for u in cells]
        margins = {}
        for k in kept:   # brute force: the region swapped from every kept reference
            x = q.reshape(C, -1).clone()
            x[:, cells] = refs[k].reshape(C, -1)[:, [aligned[k][1][u] for u in cells]]
            margins[k] = float(_margin(head, x.view(1, C, H, W), torch.tensor([ex.true])))
        assert margins[edit.reference_slot] == pytest.approx(max(margins.values()), abs=1e-5)
        checked += 1
    assert checked >= 5


def test_more_references_flip_at_least_as_often_as_the_best_aligned_alone():
    head = ConvHead(seed=3)
    queries, true, pred, bank = _problem(head, seed=3, n_queries=24)
    one = counterfactual_search(head, queries, true, pred, bank,
                                SearchConfig(num_references=1, max_edits=3))
    four = counterfactual_search(head, queries, true, pred, bank,
                                 SearchConfig(num_references=4, max_edits=3))
    assert sum(e.success for e in four) >= sum(e.success for e in one)
    assert sum(e.success for e in four) > 0


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
            assert seen <= prefixes          # never a reference's own tokens


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

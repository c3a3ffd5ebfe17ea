"""Greedy cell-swap counterfactuals (Goyal et al. 2019), the baseline FG-VCE is compared with.

Per query, the reference is the bank map of class ``true`` whose spatially pooled features are
the most cosine-similar to the query's. Each step evaluates EVERY swap (unedited query cell ``u``
← reference cell ``v``) of every active query in chunked batched head calls and applies the one
that most increases ``logit_true - logit_pred``; a query stops when it is classified as ``true``
or after ``max_cells`` swaps. That costs ``(H·W - t) · H·W`` head evaluations at step ``t``
(about 2,400 per step on a 7×7 grid), which is what FG-VCE's contributions avoid.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._util import Head, evaluate_head, preserved_rng_state, preserved_training_flags
from .bank import ReferenceBank
from .results import Edit, Explanation
from .config import SearchConfig
from .queries import QueryBatch, modules_of, prepare_queries

__all__ = ["greedy_search"]


def greedy_search(head: Head, queries: torch.Tensor, true: torch.Tensor, pred: torch.Tensor,
                  bank: ReferenceBank, config: SearchConfig = SearchConfig(),
                  generator: Optional[torch.Generator] = None, *, max_cells: Optional[int] = None,
                  modules: Sequence[nn.Module] = ()) -> list[Explanation]:
    """Explain a batch of misclassifications with greedy single-cell swaps (``method="greedy"``).

    Deterministic (``generator`` is accepted for interface symmetry and not used). The head runs
    in eval mode; training flags, the global RNG state and parameters' ``.grad`` are preserved.

    Args:
        head: maps feature maps ``(B, C, H, W)`` to logits ``(B, num_classes)``.
        queries: ``(N, C, H, W)`` feature maps of the misclassified samples.
        true: ``(N,)`` true classes.
        pred: ``(N,)`` predicted (wrong) classes.
        bank: references of correctly classified samples per class.
        config: uses ``chunk_size`` and ``num_classes``.
        generator: unused.
        max_cells: most cell swaps per query (default ``H·W // 2``).
        modules: extra modules to keep in eval mode during the search.

    Returns:
        One :class:`Explanation` per query; every edit swaps one cell and ``contribution`` is
        ``nan``.
    """
    if not isinstance(config, SearchConfig):
        raise TypeError(f"Expected `config` to be a SearchConfig, but got {type(config).__name__}.")
    device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
    with preserved_training_flags(*modules_of(head, modules)), preserved_rng_state([device]), \
            torch.no_grad():
        batch = prepare_queries(head, queries, true, pred, bank, config, "greedy")
        hw = batch.query.shape[2] * batch.query.shape[3]
        if max_cells is None:
            max_cells = max(1, hw // 2)
        if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1:
            raise ValueError(f"Expected `max_cells` to be a positive integer or None, but got "
                             f"{max_cells!r}.")
        if batch.index.numel() == 0:
            return batch.results
        return _greedy(head, batch, config, min(max_cells, hw))


def _greedy(head: Head, b: QueryBatch, config: SearchConfig, max_cells: int) -> list[Explanation]:
    m, c, h, w = b.query.shape
    hw, device = h * w, b.query.device
    rows = torch.arange(m, device=device)
    cs = c - config.protected_channels          # trailing protected channels are never swapped
    if cs < 1:
        raise ValueError(f"Expected `protected_channels` ({config.protected_channels}) to leave at "
                         f"least one channel of the {c} feature channels to swap.")
    # one reference per query: highest cosine similarity of the pooled features
    pooled_sim = F.cosine_similarity(b.query[:, :cs].mean((2, 3))[:, None],
                                     b.refs[:, :, :cs].mean((3, 4)), dim=2)
    slot = pooled_sim.masked_fill(~b.valid, -math.inf).argmax(1)                   # (M,)
    ref = b.refs[rows, slot].reshape(m, c, hw)                                      # (M, C, HW)
    cell_sim = torch.bmm(F.normalize(b.query[:, :cs].reshape(m, cs, hw), dim=1).transpose(1, 2),
                         F.normalize(ref[:, :cs], dim=1))                           # (M, HW, HW)
    ref[:, cs:] = b.query.reshape(m, c, hw)[:, cs:]   # a swap keeps the query's own prefix

    current = b.query.reshape(m, c, hw).clone()
    edited = torch.zeros(m, hw, dtype=torch.bool, device=device)
    done = torch.zeros(m, dtype=torch.bool, device=device)
    final = torch.full((m,), -1, dtype=torch.long, device=device)
    swaps = torch.full((m, max_cells, 2), -1, dtype=torch.long, device=device)     # (u, v)
    traj = torch.full((m, max_cells, 2), float("nan"), device=device)              # p_t, p_p
    for t in range(max_cells):
        idx = (~done).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        a = idx.numel()
        free = torch.argsort(edited[idx].to(torch.int8), dim=1, stable=True)[:, :hw - t]
        per_query = (hw - t) * hw                   # every active query has t edited cells
        total = a * per_query
        score = torch.empty(total, device=device)
        p_true = torch.empty(total, device=device)
        p_pred = torch.empty(total, device=device)
        argmax = torch.empty(total, dtype=torch.long, device=device)
        for start in range(0, total, config.chunk_size):
            i = torch.arange(start, min(start + config.chunk_size, total), device=device)
            qa, j, v = i // per_query, (i // hw) % (hw - t), i % hw
            q, u = idx[qa], free[qa, j]
            x = current[q]
            x[torch.arange(i.numel(), device=device), :, u] = ref[q, :, v]
            logits = evaluate_head(head, x.view(-1, c, h, w), config.chunk_size, b.num_classes)
            lt = logits.gather(1, b.true[q, None]).squeeze(1)
            score[i] = lt - logits.gather(1, b.pred[q, None]).squeeze(1)
            probs = logits.softmax(1)
            p_true[i] = probs.gather(1, b.true[q, None]).squeeze(1)
            p_pred[i] = probs.gather(1, b.pred[q, None]).squeeze(1)
            argmax[i] = logits.argmax(1)
        best = score.view(a, per_query).argmax(1) + torch.arange(a, device=device) * per_query
        u_best = free[torch.arange(a, device=device), (best // hw) % (hw - t)]
        v_best = best % hw
        current[idx, :, u_best] = ref[idx, :, v_best]
        edited[idx, u_best] = True
        swaps[idx, t, 0], swaps[idx, t, 1] = u_best, v_best
        traj[idx, t, 0], traj[idx, t, 1] = p_true[best], p_pred[best]
        final[idx] = argmax[best]
        b.evals[idx] += per_query
        done[idx] = argmax[best] == b.true[idx]
    success = final == b.true
    return _explanations(b, slot, swaps, traj, final, success, cell_sim, w)


def _explanations(b: QueryBatch, slot: torch.Tensor, swaps: torch.Tensor, traj: torch.Tensor,
                  final: torch.Tensor, success: torch.Tensor, cell_sim: torch.Tensor, w: int
                  ) -> list[Explanation]:
    swaps, traj, slot, cell_sim = swaps.cpu(), traj.cpu(), slot.cpu(), cell_sim.cpu()
    index, true, pred = b.index.cpu(), b.true.cpu(), b.pred.cpu()
    p_true, p_pred, ids, evals = b.p_true.cpu(), b.p_pred.cpu(), b.ref_ids.cpu(), b.evals.cpu()
    final, success = final.cpu(), success.cpu()
    results = list(b.results)
    for i in range(index.numel()):
        k = int(slot[i])
        reference_id = tuple(int(x) for x in ids[i, k])
        edits = tuple(
            Edit(query_cells=((u // w, u % w),), reference_slot=k, reference_id=reference_id,
                 reference_cells=((v // w, v % w),), similarity=float(cell_sim[i, u, v]),
                 contribution=float("nan"), p_true_after=float(traj[i, t, 0]),
                 p_pred_after=float(traj[i, t, 1]))
            for t, (u, v) in enumerate(swaps[i].tolist()) if u >= 0)
        results[int(index[i])] = Explanation(
            query_index=int(index[i]), true=int(true[i]), pred=int(pred[i]),
            success=bool(success[i]), final_pred=int(final[i]), edits=edits,
            p_true_before=float(p_true[i]), p_pred_before=float(p_pred[i]),
            head_evaluations=int(evals[i]), method="greedy")
    return results

"""The queries of a search: input checks, skip reasons, the references of each query, and the
batched evaluation of edited feature maps. Shared by the FG-VCE search and the greedy baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ._util import Head, check_feature_map, evaluate_head, finite_rows
from .bank import ReferenceBank
from .config import SearchConfig
from .results import Explanation

__all__ = ["QueryBatch", "prepare_queries", "evaluate_variants", "modules_of"]


@dataclass
class QueryBatch:
    """The explainable queries of a batch, with their references (float32, query device)."""

    index: torch.Tensor        # (M,) positions in the caller's batch
    query: torch.Tensor        # (M, C, H, W)
    true: torch.Tensor         # (M,)
    pred: torch.Tensor         # (M,)
    p_true: torch.Tensor       # (M,) before any edit
    p_pred: torch.Tensor       # (M,)
    refs: torch.Tensor         # (M, K, C, H, W)
    ref_ids: torch.Tensor      # (M, K, id_width)
    valid: torch.Tensor        # (M, K)
    evals: torch.Tensor        # (M,) int64 head evaluations so far
    num_classes: int
    results: list              # (N,) Explanation for skipped queries, None otherwise


def modules_of(head: Head, modules: Sequence[nn.Module]) -> list[nn.Module]:
    found = [m for m in modules if isinstance(m, nn.Module)]
    if isinstance(head, nn.Module):
        found.append(head)
    owner = getattr(head, "__self__", None)
    if isinstance(owner, nn.Module):
        found.append(owner)
    return found


def _check_labels(labels: object, name: str, n: int, num_classes: int,
                  device: torch.device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or tuple(labels.shape) != (n,):
        raise ValueError(f"Expected `{name}` to be an integer tensor of shape ({n},), but got shape "
                         f"{tuple(labels.shape)} and dtype {labels.dtype}.")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"Expected `{name}` to lie in [0, {num_classes}), but got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]. Check `num_classes`.")
    return labels.to(device=device, dtype=torch.long)


def prepare_queries(head: Head, queries: torch.Tensor, true: object, pred: object, bank: ReferenceBank,
             config: SearchConfig, method: str) -> QueryBatch:
    """Check inputs, evaluate the unedited queries, pick the explainable ones, gather references."""
    queries = check_feature_map(queries, "queries")
    if not isinstance(bank, ReferenceBank):
        raise TypeError(f"Expected `bank` to be a ReferenceBank, but got {type(bank).__name__}.")
    if tuple(queries.shape[1:]) != bank.feature_shape:
        raise ValueError(f"Expected `queries` to have feature maps of the bank's shape "
                         f"{bank.feature_shape}, but got {tuple(queries.shape[1:])}. Use the same "
                         "split point for the bank and the queries.")
    num_classes = config.num_classes or bank.num_classes
    if num_classes != bank.num_classes:
        raise ValueError(f"Expected `config.num_classes` ({num_classes}) to equal the bank's "
                         f"num_classes ({bank.num_classes}).")
    n, device = queries.shape[0], queries.device
    true = _check_labels(true, "true", n, num_classes, device)
    pred = _check_labels(pred, "pred", n, num_classes, device)
    query = queries.detach().float()
    reasons: list = [None] * n
    finite = finite_rows(query)
    has_refs = bank.counts().to(device)[true] > 0
    logits = torch.zeros(n, num_classes, device=device)
    if bool(finite.any()):
        logits[finite] = evaluate_head(head, query[finite], config.chunk_size, num_classes)
    logits_ok = torch.isfinite(logits).all(1)
    # per-query bookkeeping of skip reasons on python lists (one transfer, no tensor work)
    true_l, pred_l = true.tolist(), pred.tolist()
    rows = zip(finite.tolist(), true_l, pred_l, logits_ok.tolist(), logits.argmax(1).tolist(),
               has_refs.tolist())
    for i, (fin, t, p, lok, am, refs_ok) in enumerate(rows):
        if not fin:
            reasons[i] = "non-finite values (NaN/inf) in the query feature map"
        elif t == p:
            reasons[i] = f"not a misclassification: true == pred == {t}"
        elif not lok:
            reasons[i] = "the head returned non-finite logits for the query"
        elif am == t:
            reasons[i] = f"the head already predicts the true class {t}"
        elif not refs_ok:
            reasons[i] = f"no reference feature maps of the true class {t} in the bank yet"
    results = [None if r is None else Explanation.skipped_query(i, true_l[i], pred_l[i], r,
                                                                method=method)
               for i, r in enumerate(reasons)]
    index = torch.tensor([i for i, r in enumerate(reasons) if r is None], dtype=torch.long,
                         device=device)
    probs = logits[index].softmax(1)
    t, p = true[index], pred[index]
    refs, ref_ids, valid = bank.gather(t.to(bank.device))
    refs = refs.to(device=device, dtype=torch.float32)
    return QueryBatch(index=index, query=query[index], true=t, pred=p,
                  p_true=probs.gather(1, t[:, None]).squeeze(1),
                  p_pred=probs.gather(1, p[:, None]).squeeze(1),
                  refs=refs, ref_ids=ref_ids.to(device), valid=valid.to(device),
                  evals=torch.ones(index.numel(), dtype=torch.long, device=device),
                  num_classes=num_classes, results=results)


def evaluate_variants(head: Head, feats: torch.Tensor, true: torch.Tensor, pred: torch.Tensor,
              config: SearchConfig, num_classes: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head on ``feats``: ``p_true``, ``p_pred``, ``argmax`` and the true-class margin."""
    logits = evaluate_head(head, feats, config.chunk_size, num_classes)
    probs = logits.softmax(1)
    lt = logits.gather(1, true[:, None]).squeeze(1)
    others = logits.scatter(1, true[:, None], float("-inf")).max(1).values
    return (probs.gather(1, true[:, None]).squeeze(1), probs.gather(1, pred[:, None]).squeeze(1),
            logits.argmax(1), lt - others)

"""How many queries to search together, and how many maps per head call, for a memory budget.

The search's memory grows with the queries searched together: each holds its true class's
references (``K`` maps), their cell similarities and transform scores, the ``P`` best-aligned
references laid out on its grid and the ``P`` variants of every edit step. The head's calls add
``chunk`` maps and their activations. :func:`plan_search` sizes both from
``SearchConfig.search_memory_mb``: a quarter of it for a head call, the rest for the groups of
queries (at least one query and one map, whatever the budget: the search never refuses to run,
and a single query that does not fit is the head's own out-of-memory error).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ._util import Head
from .bank import ReferenceBank
from .config import SearchConfig
from .correspondence import grid_transforms

__all__ = ["SearchPlan", "plan_search", "head_activation_bytes", "query_bytes"]

_MB = 2 ** 20
_activation_cache: "weakref.WeakKeyDictionary[Any, dict[tuple, int]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SearchPlan:
    """Attributes: ``group`` queries searched together; ``chunk`` maps per head call;
    ``query_bytes`` and ``map_bytes``: the estimates they follow from (per query; per map
    evaluated, its activations included); ``budget_bytes``."""

    group: int
    chunk: int
    query_bytes: int
    map_bytes: int
    budget_bytes: int


def head_activation_bytes(head: Head, sample: torch.Tensor,
                          modules: Sequence[nn.Module] = ()) -> int:
    """Bytes the head's intermediate outputs take per feature map: every submodule's output
    summed, measured on one map with forward hooks (an upper bound on what is alive at once).
    The hooks go on ``head`` when it is an ``nn.Module`` and on ``modules`` (e.g. the model a
    plain ``head`` function calls into: only the submodules the head runs report); with neither,
    four maps' worth is assumed. Cached per head and map shape."""
    key = (tuple(sample.shape[1:]), sample.dtype, str(sample.device),
           tuple(id(m) for m in modules))
    try:
        cached = _activation_cache.setdefault(head, {})
    except TypeError:                    # (not weakly referenceable: measured every time)
        cached = {}
    if key in cached:
        return cached[key]
    one = sample[:1]
    total = 4 * one.numel() * one.element_size()
    roots = [m for m in (head, *modules) if isinstance(m, nn.Module)]
    if roots:
        seen = [0]

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, torch.Tensor):
                    seen[0] += t.numel() * t.element_size()

        handles = [m.register_forward_hook(hook)
                   for m in {id(sub): sub for root in roots for sub in root.modules()}.values()]
        try:
            with torch.no_grad():
                head(one)
        finally:
            for h in handles:
                h.remove()
        total = max(seen[0], one.numel() * one.element_size())
    cached[key] = int(total)
    return int(total)


def query_bytes(feature_shape: tuple[int, int, int], num_refs: int, config: SearchConfig) -> int:
    """Estimated peak bytes of one query's search buffers (float32): ``3K`` reference maps (the
    gathered ones, their copy laid out for the similarity product, the kept ones' copy),
    ``4P + 6`` maps (aligned references, variants, the edited query), two ``(HW, K, HW)``
    similarity tensors (and the copy laid out for the transform gather) and three
    ``(K, HW, O)`` transform-score tensors (``O`` rigid transforms)."""
    c, h, w = feature_shape
    hw, m = h * w, c * h * w * 4
    k, p = max(1, num_refs), min(config.num_references, max(1, num_refs))
    o = grid_transforms(h, w, config.max_shift, config.mirror)[0].shape[0]
    return int((3 * k + 4 * p + 6) * m + k * hw * (2 * hw + 3 * o) * 4)


def plan_search(head: Head, queries: torch.Tensor, true: torch.Tensor, bank: ReferenceBank,
                config: SearchConfig, modules: Sequence[nn.Module] = ()) -> SearchPlan:
    """Group size and head chunk for ``config.search_memory_mb`` (``None``: all queries at
    once, ``config.chunk_size`` maps per call); ``modules``: see :func:`head_activation_bytes`."""
    n = int(queries.shape[0])
    t = true.to(bank.device).long()
    t = t[(t >= 0) & (t < bank.num_classes)]        # (bad labels: the search's own error)
    refs = int(bank.counts()[t].max()) if t.numel() else 1
    per_query = query_bytes(tuple(queries.shape[1:]), refs, config)
    if config.search_memory_mb is None or n == 0:
        return SearchPlan(max(1, n), config.chunk_size, per_query, 0, 0)
    budget = int(config.search_memory_mb * _MB)
    one = queries[:1].float()
    per_map = one.numel() * one.element_size() * 2 + head_activation_bytes(head, one, modules)
    chunk = int(max(1, min(config.chunk_size, (budget // 4) // per_map)))
    group = int(max(1, min(n, (budget - chunk * per_map) // per_query)))
    return SearchPlan(group, chunk, per_query, per_map, budget)

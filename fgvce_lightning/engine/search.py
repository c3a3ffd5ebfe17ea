"""FG-VCE counterfactual search: correspondence → contributions → regions → swaps → minimality.

For a batch of misclassified queries (feature maps of class ``true`` predicted as ``pred``) the
search finds, per query, the few regions of the feature map that, replaced by the *corresponding*
cells of one correctly classified reference of class ``true``, make the head predict ``true``:

1. the references of class ``true`` from the :class:`~fgvce_lightning.engine.bank.ReferenceBank`;
2. correspondence: every (query, reference) pair is aligned by the rigid transform of the grid
   (shift, optionally mirrored) under which they agree best, so query cell ``u`` has one
   corresponding cell ``c(u)`` in every reference: the same part of the object
   (:mod:`~fgvce_lightning.engine.correspondence`); the ``num_references`` best-aligned
   references are kept;
3. local Shapley contributions of every query cell, a cell being "absent" when it is replaced by
   its corresponding cell of the best-aligned reference: a cell scores by how much *its*
   difference from the true class matters;
4. regions grown from the contribution map;
5. all queries in lock-step apply their next region, one batched head call per step that tries
   the region's swap from each of the ``num_references`` best-aligned references and keeps the
   one that moves the prediction furthest towards ``true``; a query stops when it flips;
6. minimality pass: drop edits the flip does not need;
7. trim: keep the shortest prefix of the edited cells, ranked by their contributions, that still
   flips; then recompute the trajectory.

A swap never copies a reference cell onto a query cell it does not correspond to: evidence pasted
onto the wrong part (or the background) also flips a pooled head, but it says nothing true about
which part of the query differs from the true class.

Loops run over steps only; every step is one batched (chunked) head call for all queries.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._util import Head, preserved_rng_state, preserved_training_flags
from .bank import ReferenceBank
from .config import METHOD_NAMES, REGION_ORDERS, SearchConfig
from .contributions import local_shapley
from .correspondence import align_references
from .gradients import gradcam_scores
from .memory import plan_search
from .partition import grow_regions
from .queries import QueryBatch, evaluate_variants, modules_of, prepare_queries
from .refine import minimality_pass, region_nonempty, replay, trim_pass
from .results import Edit, Explanation

__all__ = ["SearchConfig", "counterfactual_search", "REGION_ORDERS"]

#: subset pairs of the additivity test before the Shapley sampling (tested one after the
#: other: 4 evaluations when a query fails the first, 8 at most). One pair let a random-weight
#: ResNet-50 head pass the first stage and fail the second, wasting the closed form's
#: ``H·W + 2`` evaluations (1051 per explanation on 14×14 at two samples,
#: benchmarks/bench_scale.py); two reject it at the first stage (8 evaluations instead of 55
#: on 7×7)
ADDITIVITY_PAIRS = 2


def counterfactual_search(head: Head, queries: torch.Tensor, true: torch.Tensor,
                          pred: torch.Tensor, bank: ReferenceBank,
                          config: SearchConfig = SearchConfig(),
                          generator: Optional[torch.Generator] = None, *,
                          modules: Sequence[nn.Module] = (),
                          query_parts: Optional[torch.Tensor] = None,
                          reference_parts: Optional[PartLookup] = None) -> list[Explanation]:
    """Explain a batch of misclassifications with FG-VCE region swaps.

    The head runs in eval mode; every module's ``training`` flag, the global RNG state and the
    parameters' ``.grad`` are left as they were (also when the head raises).

    Args:
        head: maps feature maps ``(B, C, H, W)`` to logits ``(B, num_classes)``.
        queries: ``(N, C, H, W)`` feature maps of the misclassified samples.
        true: ``(N,)`` true classes.
        pred: ``(N,)`` predicted (wrong) classes.
        bank: references of correctly classified samples per class.
        config: search parameters.
        generator: randomness of the Shapley sampling (default: seeded with ``config.seed``).
        modules: modules to put in eval mode during the search besides ``head`` itself (e.g. the
            LightningModule when ``head`` is a plain function).
        query_parts: optional ``(N, L, H, W)`` bool part labels of the queries' cells (from
            keypoints or masks); with ``reference_parts`` the annotations restrict the
            correspondence further: a query cell whose aligned reference cell shows none of its
            parts takes the nearest reference cell that does
            (:func:`~fgvce_lightning.engine.correspondence.restrict_to_parts`).
        reference_parts: the references' ``(L, H, W)`` bool labels by ``Edit.reference_id``: a
            mapping, or a callable returning ``None`` for a reference without labels.

    Returns:
        One :class:`Explanation` per query, in order; skipped queries (non-finite features, no
        reference of the true class, not a mistake) carry a ``skipped_reason``.

    Raises:
        TypeError, ValueError: on malformed inputs, a shape mismatch with the bank, or a head
            that does not return ``(B, num_classes)`` logits.
    """
    if not isinstance(config, SearchConfig):
        raise TypeError(f"Expected `config` to be a SearchConfig, but got {type(config).__name__}.")
    device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
    with preserved_training_flags(*modules_of(head, modules)), preserved_rng_state([device]), \
            torch.no_grad():
        plan = None
        if config.search_memory_mb is not None and isinstance(queries, torch.Tensor) \
                and queries.dim() == 4 and isinstance(true, torch.Tensor) \
                and tuple(queries.shape[1:]) == bank.feature_shape:
            plan = plan_search(head, queries, true, bank, config, modules)
            config = dataclasses.replace(config, chunk_size=plan.chunk)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(config.seed)
        memo: dict = {}
        if plan is None or plan.group >= queries.shape[0]:
            return _prepare_and_search(head, queries, true, pred, bank, config, generator,
                                       query_parts, reference_parts, memo)
        # groups of queries: the budget bounds the buffers. Every group starts from the same
        # generator state, so it draws the Shapley orders the whole batch would have drawn (they
        # are shared by the queries of a batch). A head that one group showed not to be additive
        # is not tested again on the next (a small group of a nearly additive head can pass the
        # first stage and waste the closed form's H·W + 2 evaluations: 496 instead of 408 per
        # explanation for the random ResNet-50 at 448 px, benchmarks/bench_scale.py)
        out: list[Explanation] = []
        state = generator.get_state()
        for start in range(0, queries.shape[0], plan.group):
            generator.set_state(state)
            rows = slice(start, start + plan.group)
            part = _prepare_and_search(head, queries[rows], true[rows], pred[rows], bank, config,
                                       generator, None if query_parts is None else
                                       query_parts[rows], reference_parts, memo)
            out += [dataclasses.replace(e, query_index=e.query_index + start) for e in part]
        return out


def _prepare_and_search(head: Head, queries: torch.Tensor, true: torch.Tensor,
                        pred: torch.Tensor, bank: ReferenceBank, config: SearchConfig,
                        generator: torch.Generator, query_parts: Optional[torch.Tensor],
                        reference_parts: Optional["PartLookup"], memo: dict
                        ) -> list[Explanation]:
    batch = prepare_queries(head, queries, true, pred, bank, config,
                            METHOD_NAMES[config.region_order])
    if batch.index.numel() == 0:
        return batch.results
    parts = _part_labels(batch, query_parts, reference_parts)
    return _search(head, batch, config, generator, parts, memo)




PartLookup = Union[Mapping[tuple, torch.Tensor], Callable[[tuple], Optional[torch.Tensor]]]
"""Part labels ``(L, H, W)`` bool of a reference, by its id (``None`` when unknown)."""


def _part_labels(b: QueryBatch, query_parts: Optional[torch.Tensor],
                 reference_parts: Optional[PartLookup]
                 ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The queries' ``(M, L, H, W)`` and their references' ``(M, K, L, H, W)`` part labels
    (all ``False`` for a reference without labels), or ``None`` when not both are given."""
    if query_parts is None or reference_parts is None:
        return None
    n = len(b.results)
    if (not isinstance(query_parts, torch.Tensor) or query_parts.dim() != 4
            or query_parts.shape[0] != n or tuple(query_parts.shape[2:]) != tuple(b.query.shape[2:])):
        raise ValueError(f"Expected `query_parts` of shape ({n}, L, {b.query.shape[2]}, "
                         f"{b.query.shape[3]}) (one label map per query), but got "
                         f"{tuple(getattr(query_parts, 'shape', ())) or type(query_parts).__name__}.")
    qp = query_parts.to(b.query.device).bool()[b.index]
    lookup = reference_parts.get if isinstance(reference_parts, Mapping) else reference_parts
    m, k = b.valid.shape
    rp = torch.zeros(m, k, *qp.shape[1:], dtype=torch.bool)
    seen: dict[tuple, Optional[torch.Tensor]] = {}
    for i, row in enumerate(b.ref_ids.tolist()):       # labels by id: marshalling, not search
        for j, key in enumerate(row):
            if not bool(b.valid[i, j]):
                continue
            key = tuple(key)
            if key not in seen:
                seen[key] = lookup(key)
            found = seen[key]
            if found is not None:
                if tuple(found.shape) != tuple(qp.shape[1:]):
                    raise ValueError(f"Expected the labels of reference {key} to have shape "
                                     f"{tuple(qp.shape[1:])} like `query_parts`, but got "
                                     f"{tuple(found.shape)}.")
                rp[i, j] = found.bool().cpu()
    return qp, rp.to(b.query.device)


def _search(head: Head, b: QueryBatch, config: SearchConfig, generator: torch.Generator,
            parts: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
            memo: Optional[dict] = None) -> list[Explanation]:
    """Search one batch; ``memo["non_additive"]`` carries, from one group of queries to the
    next, that the head was found not to be additive."""
    memo = {} if memo is None else memo
    m, c, h, w = b.query.shape
    hw, device = h * w, b.query.device
    num_classes = b.num_classes
    cs = c - config.protected_channels                  # channels that are matched and swapped
    if cs < 1:
        raise ValueError(f"Expected `protected_channels` ({config.protected_channels}) to leave at "
                         f"least one channel of the {c} feature channels to swap.")

    # 2. correspondence: the best-aligned references laid out on the query's grid, cell by cell
    qflat = b.query.reshape(m, c, hw)
    corr, slots, aligned = align_references(
        b.query, b.refs, b.valid, max_shift=config.max_shift, mirror=config.mirror,
        channels=cs, keep=config.num_references, query_parts=None if parts is None else parts[0],
        reference_parts=None if parts is None else parts[1])                   # (M, P, C, HW)
    ref_ok = torch.isfinite(corr.score)                                         # (M, P)

    # 3. the cell ranking; "absent" = the corresponding cell of the best-aligned reference
    if config.region_order == "contribution":
        contrib = local_shapley(head, b.query, aligned[:, 0].reshape(m, c, h, w), b.true, b.pred,
                                window=config.window, num_samples=config.num_samples,
                                antithetic=config.antithetic, chunk_size=config.chunk_size,
                                generator=generator, num_classes=num_classes,
                                num_pairs=ADDITIVITY_PAIRS,
                                exact_if_additive=not memo.get("non_additive", False))
        memo["non_additive"] = memo.get("non_additive", False) or not contrib.exact
        values = contrib.values.to(device)
        b.evals += contrib.head_evaluations.to(device)
    elif config.region_order == "gradcam":
        values = gradcam_scores(head, b.query, b.true, b.pred, chunk_size=config.chunk_size,
                                channels=cs).to(device)
        b.evals += 1
    else:  # random: query n's scores depend only on the seed, not on the batch
        noise = torch.rand(hw, generator=generator, device=generator.device)
        values = noise.to(device)[None].expand(m, hw).reshape(m, h, w).clone()

    # 4. regions
    regions = grow_regions(values, threshold=config.region_threshold,
                           max_region_size=config.max_region_size).view(m, hw)
    num_regions = regions.max(1).values + 1                                     # (M,)
    r_max = int(num_regions.max())
    region_ref = torch.zeros(m, r_max, dtype=torch.long, device=device)        # (M, R) column
    repl = aligned[:, 0].clone()                                                # (M, C, HW)
    def edited(idx: Optional[torch.Tensor], cell_mask: torch.Tensor) -> torch.Tensor:
        """The queries ``idx`` (``None``: all, without row copies) with ``cell_mask`` swapped."""
        if idx is None:
            return torch.where(cell_mask[:, None], repl, qflat).view(-1, c, h, w)
        return torch.where(cell_mask[:, None], repl[idx], qflat[idx]).view(-1, c, h, w)

    # 5. lock-step search over region steps: each region's swap from every kept reference
    steps = min(config.max_edits, r_max)
    traj_t = torch.full((m, max(steps, 1)), float("nan"), device=device)
    traj_p = traj_t.clone()
    final = torch.full((m,), -1, dtype=torch.long, device=device)
    applied = torch.zeros(m, dtype=torch.long, device=device)
    success = torch.zeros(m, dtype=torch.bool, device=device)
    for t in range(steps):
        idx = (~success & (num_regions > t)).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        a = idx.numel()
        ok_l = ref_ok[idx]                                                      # (A, P)
        nv = ok_l.shape[1]
        every = a == m                                    # (idx is sorted: all of them)
        feat_l = aligned if every else aligned[idx]                             # (A, P, C, HW)
        base = edited(None if every else idx, regions[idx] < t).view(a, 1, c, hw)
        in_region = (regions[idx] == t)[:, None, None, :]                       # (A, 1, 1, HW)
        variants = torch.where(in_region, feat_l, base).reshape(a * nv, c, h, w)
        usable = ok_l.reshape(-1)                      # evaluate only candidates that exist
        owner = torch.arange(a, device=device).repeat_interleave(nv)[usable]
        pt, pp, tm = (torch.full((a * nv,), float("-inf"), device=device) for _ in range(3))
        am = torch.full((a * nv,), -1, dtype=torch.long, device=device)
        pt[usable], pp[usable], am[usable], tm[usable] = evaluate_variants(
            head, variants if bool(usable.all()) else variants[usable], b.true[idx][owner],
            b.pred[idx][owner], config, num_classes)
        pt, pp, am, tm = (v.view(a, nv) for v in (pt, pp, am, tm))
        b.evals[idx] += ok_l.sum(1)
        best = tm.masked_fill(~ok_l, float("-inf")).argmax(1)                  # (A,)
        ar = torch.arange(a, device=device)
        region_ref[idx, t] = best
        repl[idx] = torch.where(in_region[:, 0], feat_l[ar, best], repl[idx])
        traj_t[idx, t], traj_p[idx, t], final[idx] = pt[ar, best], pp[ar, best], am[ar, best]
        applied[idx] = t + 1
        success[idx] = am[ar, best] == b.true[idx]
    kept = (torch.arange(r_max, device=device)[None] < applied[:, None])       # (M, R)

    # 6. minimality: drop, one per iteration and query, the edit whose removal keeps the flip
    changed = torch.zeros(m, dtype=torch.bool, device=device)
    if config.minimality:
        kept, changed = minimality_pass(head, b, config, kept, success, regions, edited)
    # 7. trim: keep the smallest prefix of the edited cells, ranked by their contributions, that
    #    still flips; then the edits the trimmed flip no longer needs go too
    cell_keep = None
    if config.trim:
        cell_keep, trimmed = trim_pass(head, b, config, kept, success, regions, edited,
                                       values.reshape(m, hw).float())
        kept = kept & region_nonempty(cell_keep, regions, r_max)
        if config.minimality and bool(trimmed.any()):
            kept, dropped = minimality_pass(head, b, config, kept, success & trimmed, regions,
                                            edited, cell_keep)
            trimmed = trimmed | dropped
        changed = changed | trimmed
    if bool(changed.any()):
        traj_t, traj_p, final = replay(head, b, config, kept, changed, regions, edited,
                                       traj_t, traj_p, final, cell_keep)
        success = torch.where(changed, final == b.true, success)
    cell_ref = region_ref.gather(1, regions)                                    # (M, HW)
    cell_match = corr.source.gather(1, cell_ref[:, None]).squeeze(1)
    cell_sim = corr.similarity.gather(1, cell_ref[:, None]).squeeze(1)
    region_ref = slots.gather(1, region_ref)                   # back to the references' slots
    return _explanations(b, kept, traj_t, traj_p, final, success, regions, region_ref,
                         cell_match, cell_sim, values, METHOD_NAMES[config.region_order],
                         cell_keep)


def _explanations(b: QueryBatch, kept: torch.Tensor, traj_t: torch.Tensor, traj_p: torch.Tensor,
                  final: torch.Tensor, success: torch.Tensor, regions: torch.Tensor,
                  region_ref: torch.Tensor, cell_match: torch.Tensor, cell_sim: torch.Tensor,
                  values: torch.Tensor, method: str = "fgvce",
                  cell_keep: Optional[torch.Tensor] = None) -> list[Explanation]:
    """Assemble the frozen results (CPU, python scalars) in the caller's order."""
    m, hw = regions.shape
    h, w = b.query.shape[2:]
    if cell_keep is None:
        cell_keep = torch.ones_like(regions, dtype=torch.bool)
    # every edit of every query at once: (query, region) pairs in step order, their cells
    qi, ri = kept.nonzero(as_tuple=True)                                  # row-major: step order
    cells = (regions[qi] == ri[:, None]) & cell_keep[qi]                  # (E, HW)
    e_idx, u_idx = cells.nonzero(as_tuple=True)                           # by edit, then cell
    count = cells.sum(1)
    flat_sim = cell_sim.float()[qi[e_idx], u_idx]
    flat_val = values.reshape(m, hw).float()[qi[e_idx], u_idx]
    sim_sum = torch.zeros(qi.numel(), device=regions.device).index_add_(0, e_idx, flat_sim)
    val_sum = torch.zeros(qi.numel(), device=regions.device).index_add_(0, e_idx, flat_val)
    ranks = (torch.cumsum(kept.long(), 1) - 1)[qi, ri]                    # step of each edit
    slot = region_ref[qi, ri]
    lists = {k: v.detach().cpu().tolist() for k, v in dict(
        qi=qi, slot=slot, ref_id=b.ref_ids[qi, slot], count=count, u=u_idx,
        match=cell_match[qi[e_idx], u_idx], sim=sim_sum / count.clamp_min(1), val=val_sum,
        pt=traj_t[qi, ranks], pp=traj_p[qi, ranks], index=b.index, true=b.true, pred=b.pred,
        final=final, success=success, p_true=b.p_true, p_pred=b.p_pred, evals=b.evals).items()}
    values_cpu = values.reshape(m, h, w).float().cpu()
    regions_cpu = regions.view(m, h, w).cpu()
    edits: list[list[Edit]] = [[] for _ in range(m)]
    start = 0
    for e, i in enumerate(lists["qi"]):                                   # marshalling
        end = start + lists["count"][e]
        us, vs = lists["u"][start:end], lists["match"][start:end]
        edits[i].append(Edit(
            query_cells=tuple((u // w, u % w) for u in us),
            reference_slot=lists["slot"][e], reference_id=tuple(lists["ref_id"][e]),
            reference_cells=tuple((v // w, v % w) for v in vs),
            similarity=lists["sim"][e] if end > start else float("nan"),
            contribution=lists["val"][e],
            p_true_after=lists["pt"][e], p_pred_after=lists["pp"][e]))
        start = end
    results = list(b.results)
    for i in range(m):
        results[lists["index"][i]] = Explanation(
            query_index=lists["index"][i], true=lists["true"][i], pred=lists["pred"][i],
            success=bool(lists["success"][i]), final_pred=lists["final"][i],
            edits=tuple(edits[i]), p_true_before=lists["p_true"][i],
            p_pred_before=lists["p_pred"][i], contributions=values_cpu[i].clone(),
            regions=regions_cpu[i].clone(), head_evaluations=lists["evals"][i], method=method)
    return results

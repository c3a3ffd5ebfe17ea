"""FG-VCE counterfactual search: contributions → regions → iterative region swaps → minimality.

For a batch of misclassified queries (feature maps of class ``true`` predicted as ``pred``) the
search finds, per query, the few regions of the feature map that, replaced by the matching cells
of one correctly classified reference of class ``true``, make the head predict ``true``:

1. references of class ``true`` from the :class:`~fgvce_lightning.engine.bank.ReferenceBank`;
2. candidate reference cells: the top ``candidate_fraction`` by gradient × input evidence;
3. local Shapley contributions of every query cell (``absent`` = its most similar reference cell,
   among the top ``absent_fraction`` of cells by evidence: by default any);
4. regions grown from the contribution map, one reference per region;
5. all queries in lock-step apply their next region, one head call per step, until they flip;
6. minimality pass: drop edits the flip does not need;
7. trim: rank the edited cells by the margin lost when each alone is restored and keep the
   shortest prefix of that ranking that still flips (background cells that a region grown from
   the contribution map swept in go); then recompute the trajectory.

Loops run over steps only; every step is one batched (chunked) head call for all queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ._util import (Head, check_feature_map, evaluate_head, finite_rows, preserved_rng_state,
                    preserved_training_flags)
from .bank import ReferenceBank
from .candidates import (assign_region_references, cell_similarity, gradcam_scores,
                         margin_gradient, match_cells, reference_cell_scores,
                         region_reference_scores, rigid_region_scores, select_candidates)
from .contributions import local_shapley
from .partition import grow_regions
from .results import Edit, Explanation

__all__ = ["SearchConfig", "counterfactual_search", "REGION_ORDERS"]

REGION_ORDERS = ("contribution", "gradcam", "random")
METHOD_NAMES = {"contribution": "fgvce", "gradcam": "gradcam", "random": "random"}
"""``Explanation.method`` for each ``SearchConfig.region_order``."""


@dataclass(frozen=True)
class SearchConfig:
    """Parameters of the counterfactual search.

    Attributes:
        window: odd size of the local Shapley window (players of each cell's game).
        num_samples: Monte Carlo permutations per cell.
        antithetic: pair every permutation with its reverse.
        candidate_fraction: share of the reference cells (by evidence for ``true`` over ``pred``)
            that may replace query cells, in ``(0, 1]``.
        max_edits: most region edits per query (for ``greedy_search``: see its ``max_cells``).
        minimality: drop edits that the flip does not need after the search.
        chunk_size: most feature maps per head call.
        seed: seed of the engine's own generator (the global RNG is never used).
        num_classes: number of classes of the head (default: the bank's).
        region_threshold: ``threshold`` of :func:`grow_regions`.
        max_region_size: ``max_region_size`` of :func:`grow_regions` (``None``: its default).
        max_offset: spatial prior of the matching: a query cell only takes reference cells at
            most this many rows/columns away (``None``: anywhere, pure cosine matching; ``0``
            suits roughly aligned objects).
        reference_lookahead: at every edit step, the region's swaps from the ``L`` references
            that match it best (by summed cosine similarity) are all evaluated in one batched
            call and the one that moves the prediction furthest towards ``true`` is kept
            (``1``: the best-matching reference only, no lookahead). Costs ``L`` evaluations per
            step instead of one.
        rigid_matching: also offer, at every step, the ``reference_lookahead`` best *rigid*
            matches of the region (the reference's cells at the same relative layout, shifted by
            at most ``max_shift`` cells), which keep a part's shape where cell-wise matching may
            scramble it; the lookahead keeps whichever candidate moves the prediction most.
        max_shift: largest rigid shift in cells (``None``: any shift that fits the grid).
        protected_channels: number of trailing channels that are never matched or swapped (a
            vision transformer's class/register tokens carried with the map, see
            :attr:`ModelSplit.prefix_channels`); each query keeps its own.
        region_order: how the regions to swap are ranked: ``"contribution"`` (local Shapley,
            FG-VCE), or the evaluation baselines ``"gradcam"`` (Grad-CAM of ``pred`` over
            ``true`` at the feature map) and ``"random"`` (random cell scores).
        trim: after the search (and the minimality pass), refine the flipped queries' edits cell
            by cell: rank the edited cells by how much the true-class margin drops when that cell
            alone is restored (one batched call over all edited cells), then keep the smallest
            prefix of that ranking that still flips (one batched call over all prefixes). Edits
            keep their regions' order and lose the cells the flip does not need (an edit left
            empty is dropped); costs about two evaluations per edited cell.
        taylor_lookahead: also offer, at every step, the region's swaps from the ``T``
            references with the largest first-order gain: with ``g`` the gradient of
            ``logit_true - logit_pred`` at the query (one gradient pass per query), replacing query
            cell ``u`` by reference cell ``v`` gains about ``g_u · (r_v - q_u)``; every cell takes
            its reference's cell of largest gain (any cell, as the greedy baseline's swaps) and the
            references are ranked by the region's summed gain. It is the linearisation of the
            greedy baseline's criterion, so it copies the reference cells that carry the evidence
            (the parts) rather than the most similar ones. ``0`` disables it; costs ``T``
            evaluations per step and one gradient pass per query.
        absent_fraction: the Shapley baseline: a query cell that is "absent" from a coalition is
            replaced by its most cosine-similar cell among this share of the reference cells (the
            top by evidence, as ``candidate_fraction``). ``1.0`` (default): any cell of any
            reference of the true class, the smallest change that makes the cell look like the
            true class, so a cell's value measures how much its *difference* from the true class
            matters and the ranking points at the query's deviating part. With a small share the
            baseline is always an evidence cell, and since pasting evidence almost anywhere helps
            a pooled head, the ranking spreads over cells that carry no deviating part (measured
            in the README's Parts section). Swaps still use ``candidate_fraction``.
    """

    window: int = 3
    num_samples: int = 2
    antithetic: bool = True
    candidate_fraction: float = 0.1
    max_edits: int = 8
    minimality: bool = True
    chunk_size: int = 1024
    seed: int = 0
    num_classes: Optional[int] = None
    region_threshold: float = 0.5
    max_region_size: Optional[int] = 4
    max_offset: Optional[int] = None
    reference_lookahead: int = 4
    rigid_matching: bool = True
    max_shift: Optional[int] = 2
    protected_channels: int = 0
    region_order: str = "contribution"
    trim: bool = True
    taylor_lookahead: int = 4
    absent_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("window", "num_samples", "max_edits", "chunk_size", "reference_lookahead"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        if (isinstance(self.taylor_lookahead, bool) or not isinstance(self.taylor_lookahead, int)
                or self.taylor_lookahead < 0):
            raise ValueError(f"Expected `taylor_lookahead` to be a non-negative integer, but got "
                             f"{self.taylor_lookahead!r}.")
        if self.window % 2 == 0:
            raise ValueError(f"Expected `window` to be odd (a k×k window centred on the cell), but "
                             f"got {self.window}.")
        for name in ("candidate_fraction", "absent_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"Expected `{name}` to be in (0, 1], but got {value!r}.")
        if self.max_offset is not None and (isinstance(self.max_offset, bool)
                                            or not isinstance(self.max_offset, int)
                                            or self.max_offset < 0):
            raise ValueError(f"Expected `max_offset` to be a non-negative integer or None, but got "
                             f"{self.max_offset!r}.")
        if (isinstance(self.protected_channels, bool) or not isinstance(self.protected_channels, int)
                or self.protected_channels < 0):
            raise ValueError(f"Expected `protected_channels` to be a non-negative integer, but got "
                             f"{self.protected_channels!r}.")
        if self.max_shift is not None and (isinstance(self.max_shift, bool)
                                           or not isinstance(self.max_shift, int)
                                           or self.max_shift < 0):
            raise ValueError(f"Expected `max_shift` to be a non-negative integer or None, but got "
                             f"{self.max_shift!r}.")
        if self.region_order not in REGION_ORDERS:
            raise ValueError(f"Expected `region_order` to be one of {REGION_ORDERS}, but got "
                             f"{self.region_order!r}.")
        if self.num_classes is not None and (isinstance(self.num_classes, bool)
                                             or not isinstance(self.num_classes, int)
                                             or self.num_classes < 2):
            raise ValueError(f"Expected `num_classes` to be an integer >= 2 or None, but got "
                             f"{self.num_classes!r}.")
        for name in ("antithetic", "minimality", "rigid_matching", "trim"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Expected `{name}` to be True or False, but got "
                                 f"{getattr(self, name)!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"Expected `seed` to be an integer in [0, 2**63) (a torch.Generator "
                             f"seed), but got {self.seed!r}.")
        threshold = self.region_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"Expected `region_threshold` to be a number in [0, 1] (the share of "
                             f"a region's strongest contribution a neighbour needs to join it), "
                             f"but got {threshold!r}.")
        size = self.max_region_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"Expected `max_region_size` to be a positive integer or None (the "
                             f"default for the grid), but got {size!r}.")


@dataclass
class _Batch:
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


def _modules_of(head: Head, modules: Sequence[nn.Module]) -> list[nn.Module]:
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


def _prepare(head: Head, queries: torch.Tensor, true: object, pred: object, bank: ReferenceBank,
             config: SearchConfig, method: str) -> _Batch:
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
    return _Batch(index=index, query=query[index], true=t, pred=p,
                  p_true=probs.gather(1, t[:, None]).squeeze(1),
                  p_pred=probs.gather(1, p[:, None]).squeeze(1),
                  refs=refs, ref_ids=ref_ids.to(device), valid=valid.to(device),
                  evals=torch.ones(index.numel(), dtype=torch.long, device=device),
                  num_classes=num_classes, results=results)


def _evaluate(head: Head, feats: torch.Tensor, true: torch.Tensor, pred: torch.Tensor,
              config: SearchConfig, num_classes: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head on ``feats``: ``p_true``, ``p_pred``, ``argmax`` and the true-class margin."""
    logits = evaluate_head(head, feats, config.chunk_size, num_classes)
    probs = logits.softmax(1)
    lt = logits.gather(1, true[:, None]).squeeze(1)
    others = logits.scatter(1, true[:, None], float("-inf")).max(1).values
    return (probs.gather(1, true[:, None]).squeeze(1), probs.gather(1, pred[:, None]).squeeze(1),
            logits.argmax(1), lt - others)


def counterfactual_search(head: Head, queries: torch.Tensor, true: torch.Tensor,
                          pred: torch.Tensor, bank: ReferenceBank,
                          config: SearchConfig = SearchConfig(),
                          generator: Optional[torch.Generator] = None, *,
                          modules: Sequence[nn.Module] = ()) -> list[Explanation]:
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
    with preserved_training_flags(*_modules_of(head, modules)), preserved_rng_state([device]), \
            torch.no_grad():
        batch = _prepare(head, queries, true, pred, bank, config,
                         METHOD_NAMES[config.region_order])
        if batch.index.numel() == 0:
            return batch.results
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(config.seed)
        return _search(head, batch, config, generator)


def _search(head: Head, b: _Batch, config: SearchConfig, generator: torch.Generator
            ) -> list[Explanation]:
    m, c, h, w = b.query.shape
    hw, device = h * w, b.query.device
    num_classes = b.num_classes
    rows = torch.arange(m, device=device)

    cs = c - config.protected_channels                  # channels that are matched and swapped
    if cs < 1:
        raise ValueError(f"Expected `protected_channels` ({config.protected_channels}) to leave at "
                         f"least one channel of the {c} feature channels to swap.")

    # 2. candidate reference cells (one gradient pass per reference map; queries that share a
    #    (true, pred) pair share the passes, but each is charged for all of them)
    scores = reference_cell_scores(head, b.refs, b.valid, b.true, b.pred,
                                   chunk_size=config.chunk_size, channels=cs)
    b.evals += b.valid.sum(1)
    cand = select_candidates(scores, b.valid, config.candidate_fraction, (h, w))

    # 3. matching and the cell ranking (absent = the most similar cell among the
    #    `absent_fraction` of reference cells, over all references)
    unit_q = torch.nn.functional.normalize(b.query[:, :cs], dim=1)     # cosine: normalise once
    unit_r = torch.nn.functional.normalize(b.refs[:, :, :cs], dim=2)
    similarity = cell_similarity(unit_q, unit_r, normalized=True)        # (M, HW, K, HW)
    best_sim, best_cell = match_cells(unit_q, unit_r, cand, config.max_offset,
                                      similarity=similarity)             # (M, HW, K)
    absent_sim, absent_cell = best_sim, best_cell
    if float(config.absent_fraction) != float(config.candidate_fraction):
        absent_cand = select_candidates(scores, b.valid, config.absent_fraction, (h, w))
        absent_sim, absent_cell = match_cells(unit_q, unit_r, absent_cand, config.max_offset,
                                              similarity=similarity)
    top_ref = absent_sim.argmax(2)                                       # (M, HW)
    top_cell = absent_cell.gather(2, top_ref[:, :, None]).squeeze(2)
    refs_flat = b.refs.flatten(3)                                        # (M, K, C, HW)
    qflat = b.query.reshape(m, c, hw)
    t_gain = t_cell = None
    if config.taylor_lookahead:
        grad_q = margin_gradient(head, b.query, b.true, b.pred, chunk_size=config.chunk_size)
        b.evals += 1
        if grad_q is not None and bool(torch.isfinite(grad_q).all()):
            gq = grad_q[:, :cs].reshape(m, cs, hw)
            k_refs = refs_flat.shape[1]
            rr = refs_flat[:, :, :cs].permute(0, 2, 1, 3).reshape(m, cs, k_refs * hw)
            gain = torch.bmm(gq.transpose(1, 2), rr).view(m, hw, k_refs, hw)
            gain = gain - (gq * qflat[:, :cs]).sum(1)[:, :, None, None]
            gain = gain.masked_fill(~b.valid[:, None, :, None], float("-inf"))
            t_gain, t_cell = gain.max(3)                                   # (M, HW, K)
    absent = refs_flat[rows[:, None], top_ref, :, top_cell].transpose(1, 2)   # (M, C, HW)
    absent[:, cs:] = qflat[:, cs:]
    absent = absent.reshape(m, c, h, w)
    if config.region_order == "contribution":
        contrib = local_shapley(head, b.query, absent, b.true, b.pred, window=config.window,
                                num_samples=config.num_samples, antithetic=config.antithetic,
                                chunk_size=config.chunk_size, generator=generator,
                                num_classes=num_classes)
        values = contrib.values.to(device)
        b.evals += contrib.head_evaluations.to(device)
    elif config.region_order == "gradcam":
        values = gradcam_scores(head, b.query, b.true, b.pred, chunk_size=config.chunk_size,
                                channels=cs).to(device)
        b.evals += 1
    else:  # random: query n's scores depend only on the seed, not on the batch
        noise = torch.rand(hw, generator=generator, device=generator.device)
        values = noise.to(device)[None].expand(m, hw).reshape(m, h, w).clone()

    # 4. regions; each region's reference is picked among its L best matches during the search
    regions = grow_regions(values, threshold=config.region_threshold,
                           max_region_size=config.max_region_size).view(m, hw)
    num_regions = regions.max(1).values + 1                              # (M,)
    r_max = int(num_regions.max())
    ref_scores = region_reference_scores(best_sim, regions, r_max)        # (M, R, K)
    region_ref, cell_ref, cell_match, cell_sim = assign_region_references(
        best_sim, best_cell, regions, r_max, scores=ref_scores)
    num_refs = b.refs.shape[1]
    look = min(config.reference_lookahead, num_refs)
    look_score, look_ref = ref_scores.topk(look, dim=2)                   # (M, R, L)
    look_ok = torch.isfinite(look_score)
    if config.rigid_matching:
        rigid, source, rigid_sim = rigid_region_scores(
            unit_q, unit_r, b.valid, regions, r_max, config.max_shift, similarity=similarity)
        num_off = source.shape[0]
        look_rigid = min(config.reference_lookahead, rigid.shape[2])
    cell_ids = torch.arange(hw, device=device)
    look_taylor = 0
    if t_gain is not None and config.taylor_lookahead:
        t_scores = region_reference_scores(t_gain, regions, r_max)        # (M, R, K)
        look_taylor = min(config.taylor_lookahead, num_refs)
        t_top, t_ref = t_scores.topk(look_taylor, dim=2)                   # (M, R, Lt)

    def candidates_at(idx: torch.Tensor, t: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Region ``t``'s candidate swaps: reference, usable, source cell and similarity."""
        a = idx.numel()
        refs_c = look_ref[idx, t]                                        # (A, L)
        expand = refs_c[:, None, :].expand(a, hw, look)
        match_c = best_cell[idx].gather(2, expand)                       # (A, HW, L)
        sim_c = best_sim[idx].gather(2, expand)
        parts = [(refs_c, look_ok[idx, t], match_c, sim_c)]
        if config.rigid_matching:
            score_r, flat = rigid[idx, t].topk(look_rigid, dim=1)        # (A, Lr)
            refs_r, off_r = flat // num_off, flat % num_off
            match_r = source[off_r].transpose(1, 2)                      # (A, HW, Lr)
            sim_r = rigid_sim[idx[:, None, None], off_r[:, None, :], refs_r[:, None, :],
                              cell_ids[None, :, None]]                   # (A, HW, Lr)
            parts.append((refs_r, torch.isfinite(score_r), match_r, sim_r))
        if look_taylor:
            refs_t = t_ref[idx, t]                                       # (A, Lt)
            match_t = t_cell[idx].gather(2, refs_t[:, None, :].expand(a, hw, look_taylor))
            sim_t = similarity[idx[:, None, None], cell_ids[None, :, None], refs_t[:, None, :],
                               match_t]                                  # (A, HW, Lt)
            parts.append((refs_t, torch.isfinite(t_top[idx, t]), match_t, sim_t))
        if len(parts) == 1:
            return parts[0]
        return (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1),
                torch.cat([p[2] for p in parts], 2), torch.cat([p[3] for p in parts], 2))
    repl = refs_flat[rows[:, None], cell_ref, :, cell_match].transpose(1, 2)   # (M, C, HW)
    repl[:, cs:] = qflat[:, cs:]

    def edited(idx: torch.Tensor, cell_mask: torch.Tensor) -> torch.Tensor:
        return torch.where(cell_mask[:, None], repl[idx], qflat[idx]).view(-1, c, h, w)

    # 5. lock-step search over region steps, with a lookahead over each region's references
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
        refs_l, ok_l, match_l, sim_l = candidates_at(idx, t)              # (A,L) (A,L) (A,HW,L)
        nv = refs_l.shape[1]
        feat_l = refs_flat[idx[:, None, None], refs_l[:, None, :], :, match_l]     # (A,HW,L,C)
        feat_l = feat_l.permute(0, 2, 3, 1)                              # (A, L, C, HW)
        base = edited(idx, regions[idx] < t).view(a, 1, c, hw)
        in_region = (regions[idx] == t)[:, None, None, :]                # (A, 1, 1, HW)
        if cs < c:
            feat_l[:, :, cs:] = base[:, :, cs:]
        variants = torch.where(in_region, feat_l, base).reshape(a * nv, c, h, w)
        usable = ok_l.reshape(-1)                      # evaluate only candidates that exist
        owner = torch.arange(a, device=device).repeat_interleave(nv)[usable]
        pt, pp, tm = (torch.full((a * nv,), float("-inf"), device=device) for _ in range(3))
        am = torch.full((a * nv,), -1, dtype=torch.long, device=device)
        pt[usable], pp[usable], am[usable], tm[usable] = _evaluate(
            head, variants[usable], b.true[idx][owner], b.pred[idx][owner], config, num_classes)
        pt, pp, am, tm = (v.view(a, nv) for v in (pt, pp, am, tm))
        b.evals[idx] += ok_l.sum(1)
        best = tm.masked_fill(~ok_l, float("-inf")).argmax(1)           # (A,)
        ar = torch.arange(a, device=device)
        chosen = refs_l[ar, best]                                        # (A,)
        region_ref[idx, t] = chosen
        cells = in_region[:, 0, 0, :]                                    # (A, HW)
        new_match = match_l[ar, :, best]                                 # (A, HW)
        new_sim = sim_l[ar, :, best]
        cell_match[idx] = torch.where(cells, new_match, cell_match[idx])
        cell_sim[idx] = torch.where(cells, new_sim, cell_sim[idx])
        repl[idx] = torch.where(cells[:, None], feat_l[ar, best], repl[idx])
        traj_t[idx, t], traj_p[idx, t], final[idx] = pt[ar, best], pp[ar, best], am[ar, best]
        applied[idx] = t + 1
        success[idx] = am[ar, best] == b.true[idx]
    kept = (torch.arange(r_max, device=device)[None] < applied[:, None])      # (M, R)

    # 6. minimality: drop, one per iteration and query, the edit whose removal keeps the flip
    changed = torch.zeros(m, dtype=torch.bool, device=device)
    if config.minimality:
        kept, changed = _minimality_pass(head, b, config, kept, success, regions, edited)
    # 7. trim: keep the smallest prefix of the edited cells, ranked by their single-cell effect,
    #    that still flips; then the edits the trimmed flip no longer needs go too
    cell_keep = None
    if config.trim:
        cell_keep, trimmed = _trim_pass(head, b, config, kept, success, regions, edited)
        kept = kept & _region_nonempty(cell_keep, regions, r_max)
        if config.minimality and bool(trimmed.any()):
            again, dropped = _minimality_pass(head, b, config, kept, success & trimmed, regions,
                                              edited, cell_keep)
            kept = again
            trimmed = trimmed | dropped
        changed = changed | trimmed
    if bool(changed.any()):
        traj_t, traj_p, final = _replay(head, b, config, kept, changed, regions, edited,
                                        traj_t, traj_p, final, cell_keep)
        success = torch.where(changed, final == b.true, success)
    return _explanations(b, kept, traj_t, traj_p, final, success, regions, region_ref,
                         cell_match, cell_sim, values, METHOD_NAMES[config.region_order],
                         cell_keep)


def _region_nonempty(cell_keep: torch.Tensor, regions: torch.Tensor, r_max: int) -> torch.Tensor:
    """``(M, R)`` bool: whether region ``r`` still has a kept cell."""
    out = torch.zeros(regions.shape[0], r_max, dtype=torch.long, device=regions.device)
    out.scatter_add_(1, regions, cell_keep.long())
    return out > 0


def _trim_pass(head: Head, b: _Batch, config: SearchConfig, kept: torch.Tensor,
               success: torch.Tensor, regions: torch.Tensor, edited
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-level refinement of the flipped queries' edits (two batched head calls).

    1. Every edited cell of every flipped query is restored on its own (the rest of the edits
       applied): the lower the true-class margin without it, the more the flip needs it.
    2. The cells ranked that way, every proper prefix is evaluated; the shortest that still
       predicts ``true`` is kept (all cells when none does).

    Returns ``cell_keep`` ``(M, HW)`` bool (the edited cells to keep; for queries that are not
    trimmed, all cells of their kept regions) and which queries lost cells ``(M,)``.
    """
    m, hw = regions.shape
    device = regions.device
    cells = kept.gather(1, regions)                                       # (M, HW) edited cells
    n_cells = cells.sum(1)
    trimmed = torch.zeros(m, dtype=torch.bool, device=device)
    open_ = success & (n_cells >= 2)
    if not bool(open_.any()):
        return cells, trimmed
    # 1. single-cell restores, one variant per edited cell of every open query
    q, u = (cells & open_[:, None]).nonzero(as_tuple=True)
    variant = cells[q].clone()
    variant[torch.arange(q.numel(), device=device), u] = False
    _, _, _, tm = _evaluate(head, edited(q, variant), b.true[q], b.pred[q], config, b.num_classes)
    b.evals += torch.bincount(q, minlength=m)
    restored = torch.full((m, hw), float("inf"), device=device)
    restored[q, u] = tm
    order = restored.argsort(dim=1, stable=True)          # most needed first; unedited cells last
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(hw, device=device).expand(m, hw))
    # 2. every proper prefix (1 .. n - 1 cells) of every open query
    rows = open_.nonzero().squeeze(1)
    sizes = n_cells[rows] - 1                                             # prefixes per query
    pq = rows.repeat_interleave(sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    k = torch.arange(pq.numel(), device=device) - starts.repeat_interleave(sizes) + 1
    prefix = rank[pq] < k[:, None]
    _, _, am, _ = _evaluate(head, edited(pq, prefix), b.true[pq], b.pred[pq], config,
                            b.num_classes)
    b.evals += torch.bincount(pq, minlength=m)
    shortest = n_cells.clone()
    flipped = am == b.true[pq]
    shortest.scatter_reduce_(0, pq[flipped], k[flipped], reduce="amin")
    trimmed = shortest < n_cells
    cell_keep = cells & ((rank < shortest[:, None]) | ~open_[:, None])
    return cell_keep, trimmed


def _minimality_pass(head: Head, b: _Batch, config: SearchConfig, kept: torch.Tensor,
                     success: torch.Tensor, regions: torch.Tensor, edited,
                     cell_keep: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeatedly drop the kept edit whose single revert keeps the flip with the largest margin.

    All single-revert variants of all successful queries are evaluated in one batched call per
    iteration; an edit applies only its cells in ``cell_keep`` ``(M, HW)`` when given. Returns
    the new ``kept`` mask ``(M, R)`` and which queries changed ``(M,)``.
    """
    m, r_max = kept.shape
    kept = kept.clone()
    changed = torch.zeros(m, dtype=torch.bool, device=kept.device)
    open_ = success & (kept.sum(1) >= 2)
    while bool(open_.any()):
        q, r = (kept & open_[:, None]).nonzero(as_tuple=True)            # one variant per edit
        variant = kept[q].clone()
        variant[torch.arange(q.numel(), device=q.device), r] = False
        cell_mask = variant.gather(1, regions[q])
        if cell_keep is not None:
            cell_mask = cell_mask & cell_keep[q]
        _, _, am, tm = _evaluate(head, edited(q, cell_mask), b.true[q], b.pred[q], config,
                                b.num_classes)
        b.evals += torch.bincount(q, minlength=m)
        score = torch.full((m, r_max), float("-inf"), device=kept.device)
        score[q, r] = torch.where(am == b.true[q], tm, torch.full_like(tm, float("-inf")))
        best = score.max(1)
        drop = best.values > float("-inf")
        kept[drop.nonzero().squeeze(1), best.indices[drop]] = False
        changed |= drop
        open_ = drop & (kept.sum(1) >= 2)
    return kept, changed


def _replay(head: Head, b: _Batch, config: SearchConfig, kept: torch.Tensor,
            changed: torch.Tensor, regions: torch.Tensor, edited, traj_t: torch.Tensor,
            traj_p: torch.Tensor, final: torch.Tensor, cell_keep: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute the trajectory of the kept edits (in order) for the queries that changed; an
    edit applies only its cells in ``cell_keep`` ``(M, HW)`` when given."""
    traj_t, traj_p, final = traj_t.clone(), traj_p.clone(), final.clone()
    traj_t[changed] = float("nan")
    traj_p[changed] = float("nan")
    order = torch.cumsum(kept.long(), 1) - 1                              # rank among kept
    order = torch.where(kept, order, torch.full_like(order, kept.shape[1]))
    cell_rank = order.gather(1, regions)                                  # (M, HW)
    if cell_keep is not None:
        cell_rank = cell_rank.masked_fill(~cell_keep, kept.shape[1])
    num_kept = kept.sum(1)
    for s in range(int(num_kept[changed].max())):
        idx = (changed & (num_kept > s)).nonzero().squeeze(1)
        pt, pp, am, _ = _evaluate(head, edited(idx, cell_rank[idx] <= s), b.true[idx],
                                  b.pred[idx], config, b.num_classes)
        traj_t[idx, s], traj_p[idx, s], final[idx] = pt, pp, am
        b.evals[idx] += 1
    return traj_t, traj_p, final


def _explanations(b: _Batch, kept: torch.Tensor, traj_t: torch.Tensor, traj_p: torch.Tensor,
                  final: torch.Tensor, success: torch.Tensor, regions: torch.Tensor,
                  region_ref: torch.Tensor, cell_match: torch.Tensor, cell_sim: torch.Tensor,
                  values: torch.Tensor, method: str = "fgvce",
                  cell_keep: Optional[torch.Tensor] = None) -> list[Explanation]:
    """Assemble the frozen results (CPU, python scalars) in the caller's order."""
    m, hw = regions.shape
    h, w = b.query.shape[2:]
    if cell_keep is None:
        cell_keep = torch.ones_like(regions, dtype=torch.bool)
    cpu = {k: v.detach().cpu() for k, v in dict(
        cell_keep=cell_keep, kept=kept, traj_t=traj_t, traj_p=traj_p, final=final, success=success, regions=regions,
        region_ref=region_ref, cell_match=cell_match, cell_sim=cell_sim,
        values=values.reshape(m, hw).float(), index=b.index, true=b.true, pred=b.pred,
        p_true=b.p_true, p_pred=b.p_pred, ref_ids=b.ref_ids, evals=b.evals).items()}
    results = list(b.results)
    for i in range(m):
        reg = cpu["regions"][i]
        edits = []
        for step, r in enumerate(cpu["kept"][i].nonzero().squeeze(1).tolist()):
            cells = ((reg == r) & cpu["cell_keep"][i]).nonzero().squeeze(1)
            k = int(cpu["region_ref"][i, r])
            matched = cpu["cell_match"][i, cells]
            edits.append(Edit(
                query_cells=tuple((int(u) // w, int(u) % w) for u in cells),
                reference_slot=k,
                reference_id=tuple(int(x) for x in cpu["ref_ids"][i, k]),
                reference_cells=tuple((int(v) // w, int(v) % w) for v in matched),
                similarity=float(cpu["cell_sim"][i, cells].mean()),
                contribution=float(cpu["values"][i, cells].sum()),
                p_true_after=float(cpu["traj_t"][i, step]),
                p_pred_after=float(cpu["traj_p"][i, step])))
        results[int(cpu["index"][i])] = Explanation(
            query_index=int(cpu["index"][i]), true=int(cpu["true"][i]), pred=int(cpu["pred"][i]),
            success=bool(cpu["success"][i]), final_pred=int(cpu["final"][i]), edits=tuple(edits),
            p_true_before=float(cpu["p_true"][i]), p_pred_before=float(cpu["p_pred"][i]),
            contributions=cpu["values"][i].view(h, w).clone(),
            regions=reg.view(h, w).clone(), head_evaluations=int(cpu["evals"][i]),
            method=method)
    return results

"""Local-window Shapley contributions of feature-map cells (FG-VCE's saliency partition input).

For every query cell ``u`` a small cooperative game is played by the cells of the ``k × k`` window
centred on ``u`` (clipped at the borders). A coalition ``S`` of window cells is turned into a
feature map ``F_S`` that keeps the query's features on ``S``, replaces the window's other cells by
their ``absent`` features (the best-matching reference cells), and leaves every cell outside the
window as in the query. The value of a coalition is the evidence for the mistake,

    v(S) = logit_pred(F_S) - logit_true(F_S),

so a positive contribution ``phi_u`` means that cell ``u`` supports the wrong prediction.

Three estimators:

* :func:`local_shapley` — Monte Carlo over permutations of each window's players (one random order
  of the grid per sample, restricted to each window; antithetic pairs: an order and its reverse),
  every distinct coalition of every query evaluated once, in chunked batched head calls. When the
  head is additive over cells (global pooling + linear, or any sum of per-cell functions) the
  local Shapley value of ``u`` is ``v(all) - v(all but u)`` for every window, which needs only
  ``H·W + 1`` evaluations; the function detects that case and uses the closed form.
* :func:`is_additive_head` — the numerical additivity check on the given queries.
* :func:`exact_local_shapley` — exhaustive enumeration of every window's coalitions: exponential,
  the ground truth for tests on tiny grids.

Randomness comes only from the ``generator`` argument (the global RNG is never touched), and the
random draws do not depend on the batch: the result for query ``n`` depends only on that query and
on the generator's state, so a batch gives the same values as each query on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._util import Head, check_feature_map, evaluate_head, margin

__all__ = ["ContributionResult", "local_shapley", "is_additive_head", "exact_local_shapley"]

@dataclass(frozen=True)
class ContributionResult:
    """Per-cell contributions of a batch of queries.

    Attributes:
        values: ``(N, H, W)`` float32 local Shapley values (evidence for ``pred`` over ``true``).
        head_evaluations: ``(N,)`` int64, feature maps passed through the head for each query
            (the additivity check included).
        exact: whether the values are exact (closed form of an additive head, or enumeration).
    """

    values: torch.Tensor
    head_evaluations: torch.Tensor
    exact: bool


# ----------------------------------------------------------------------------------------------
# input checks and shared machinery
# ----------------------------------------------------------------------------------------------

def _check_inputs(query: object, absent: object, true: object, pred: object
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    query = check_feature_map(query, "query")
    absent = check_feature_map(absent, "absent")
    if absent.shape != query.shape:
        raise ValueError(f"Expected `absent` to have the shape of `query` {tuple(query.shape)}, but "
                         f"got {tuple(absent.shape)}. Give one replacement feature per query cell.")
    n = query.shape[0]
    out = []
    for name, labels in (("true", true), ("pred", pred)):
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"Expected `{name}` to be an int64 torch.Tensor of shape ({n},), but got "
                            f"{type(labels).__name__}.")
        if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"Expected `{name}` to be an integer tensor of shape ({n},) (one class "
                             f"per query), but got shape {tuple(labels.shape)} and dtype "
                             f"{labels.dtype}.")
        if n and int(labels.min()) < 0:
            raise ValueError(f"Expected `{name}` to hold class indices >= 0, but got "
                             f"{int(labels.min())}.")
        out.append(labels.to(device=query.device, dtype=torch.long))
    return query, absent.to(device=query.device, dtype=query.dtype), out[0], out[1]


def _check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"Expected `window` to be an odd positive integer (the k of the k×k window "
                         f"centred on each cell, e.g. 3), but got {window!r}.")
    return window


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
    return value


def _resolve_generator(generator: Optional[torch.Generator], device: torch.device
                       ) -> torch.Generator:
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"Expected `generator` to be a torch.Generator or None, but got "
                        f"{type(generator).__name__}.")
    return generator


def _evaluate_masked(head: Head, query: torch.Tensor, absent: torch.Tensor, true: torch.Tensor,
                     pred: torch.Tensor, masks: torch.Tensor, chunk_size: int,
                     num_classes: Optional[int]) -> torch.Tensor:
    """Margins of every query under every mask, built and evaluated ``chunk_size`` maps at a time.

    ``masks`` ``(U, H, W)`` bool are shared by the queries: a present cell keeps the query's
    features, the others take ``absent``'s. A chunk is a block of whole queries under every mask
    (or, when ``U`` exceeds the chunk, one query under a range of masks), built by one
    broadcasting ``torch.where`` into a buffer reused across chunks: no index tensor and no fresh
    allocation per chunk (2.5–5× faster than gathering the rows on the CPU). Returns ``(N, U)``
    float32.
    """
    num, ch, h, w = query.shape
    u = masks.shape[0]
    out = torch.empty(num, u, dtype=torch.float32, device=query.device)
    if num == 0 or u == 0:
        return out
    top = int(torch.maximum(true, pred).max())
    present = masks.reshape(1, u, 1, h * w)
    q3, a3 = query.reshape(num, 1, ch, h * w), absent.reshape(num, 1, ch, h * w)
    per_query = min(u, chunk_size)                    # masks per block
    queries = max(1, chunk_size // u)                 # queries per block
    buffer = torch.empty(min(queries, num) * per_query * ch * h * w, dtype=query.dtype,
                         device=query.device)
    first = True
    for q0 in range(0, num, queries):
        q1 = min(q0 + queries, num)
        for k0 in range(0, u, per_query):
            k1 = min(k0 + per_query, u)
            nq, nk = q1 - q0, k1 - k0
            feats = buffer[:nq * nk * ch * h * w].view(nq, nk, ch, h * w)
            torch.where(present[:, k0:k1], q3[q0:q1], a3[q0:q1], out=feats)
            logits = evaluate_head(head, feats.view(nq * nk, ch, h, w), chunk_size=chunk_size,
                                   num_classes=num_classes)
            if first and top >= logits.shape[1]:
                raise ValueError(f"Expected the head to return logits for every class in "
                                 f"`true`/`pred` (indices up to {top}), but it returned "
                                 f"{logits.shape[1]} logits. Check the labels and the model split "
                                 "(`head`).")
            first = False
            out[q0:q1, k0:k1] = margin(logits, true[q0:q1].repeat_interleave(nk),
                                       pred[q0:q1].repeat_interleave(nk)).view(nq, nk)
            del logits
    return out


# ----------------------------------------------------------------------------------------------
# additive heads: detection and closed form
# ----------------------------------------------------------------------------------------------

def _additive_closed_form(head: Head, query: torch.Tensor, absent: torch.Tensor,
                          true: torch.Tensor, pred: torch.Tensor, *, generator: torch.Generator,
                          num_pairs: int, rtol: float, atol: float, chunk_size: int,
                          num_classes: Optional[int]
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Check additivity and, when every query passes the first stage, compute the closed form.

    Stage 1 (4 evaluations per query and pair, at most ``4 * num_pairs``): a set function is
    additive (plus a constant) iff it is modular, ``v(A ∪ B) + v(A ∩ B) = v(A) + v(B)``; this is
    tested on random pairs with non-empty ``A \\ B`` and ``B \\ A``, one pair at a time, until a
    query fails one. Stage 2 (``H·W + 2`` evaluations): the closed form
    ``d_u = v(all) - v(all but u)`` and the identity ``v(none) = v(all) - sum_u d_u``.

    Returns:
        ``ok (N,)`` bool, ``values (N, H, W)`` or ``None`` when stage 1 failed for some query, and
        ``evaluations (N,)`` int64.
    """
    n, _, h, w = query.shape
    hw = h * w
    device = query.device
    # Random pairs, the same for every query of the batch. Labels: 0 in both, 1 only in A,
    # 2 only in B, 3 in neither; two random cells are forced into A-only and B-only.
    gdev = generator.device
    labels = torch.randint(0, 4, (num_pairs, hw), generator=generator, device=gdev)
    order = torch.rand(num_pairs, hw, generator=generator, device=gdev).argsort(dim=1)
    rows = torch.arange(num_pairs, device=gdev)
    labels[rows, order[:, 0]] = 1
    labels[rows, order[:, 1]] = 2
    labels = labels.to(device)
    in_a, in_b = labels <= 1, (labels == 0) | (labels == 2)
    sets = torch.stack([in_a, in_b, in_a | in_b, in_a & in_b], dim=1).view(num_pairs, 4, h, w)

    # one pair after the other: the first that some query fails settles it (4 evaluations
    # instead of 4 · num_pairs for most non-additive heads; the same decision)
    ok = torch.ones(n, dtype=torch.bool, device=device)
    evals = torch.zeros(n, dtype=torch.long, device=device)
    for pair in range(num_pairs):
        v = _evaluate_masked(head, query, absent, true, pred, sets[pair], chunk_size, num_classes)
        deviation = (v[:, 2] + v[:, 3] - v[:, 0] - v[:, 1]).abs()
        ok &= deviation <= rtol * v.abs().sum(-1) + atol
        evals += 4
        if not bool(ok.all()):
            return ok, None, evals

    # Stage 2: index hw = all present, hw + 1 = none present, c < hw = all present but c.
    cells = torch.arange(hw, device=device)

    c = torch.arange(hw + 2, device=device)[:, None]
    present = (cells[None] != c) & (c != hw + 1)                           # (HW + 2, HW)
    v = _evaluate_masked(head, query, absent, true, pred, present.view(-1, h, w), chunk_size,
                         num_classes)
    v_all, v_none = v[:, hw], v[:, hw + 1]
    values = v_all[:, None] - v[:, :hw]
    scale = v_all.abs() + v_none.abs() + values.abs().sum(1)
    ok = ok & ((v_all - values.sum(1) - v_none).abs() <= rtol * scale + atol)
    return ok, values.view(n, h, w), evals + hw + 2


def is_additive_head(head: Head, query: torch.Tensor, absent: torch.Tensor, true: torch.Tensor,
                     pred: torch.Tensor, *, num_pairs: int = 1, rtol: float = 1e-4,
                     atol: float = 1e-5, chunk_size: int = 1024,
                     generator: Optional[torch.Generator] = None,
                     num_classes: Optional[int] = None) -> bool:
    """Whether the mistake margin is numerically additive over cells for all given queries.

    Checks modularity ``v(A ∪ B) + v(A ∩ B) = v(A) + v(B)`` on ``num_pairs`` random pairs of cell
    subsets per query (one batched evaluation), then the closed form's identity
    ``v(none) = v(all) - sum_u [v(all) - v(all but u)]``, each within
    ``rtol · (sum of |values| involved) + atol``.

    Args:
        head: maps feature maps ``(B, C, H, W)`` to logits ``(B, K)``.
        query: ``(N, C, H, W)`` query feature maps.
        absent: ``(N, C, H, W)`` what each cell becomes when absent.
        true: ``(N,)`` true classes.
        pred: ``(N,)`` predicted (wrong) classes.
        num_pairs: random subset pairs per query.
        rtol: relative tolerance.
        atol: absolute tolerance.
        chunk_size: most feature maps per head call.
        generator: source of randomness (default: a new generator seeded with 0).
        num_classes: when given, the head must return that many logits.

    Returns:
        ``True`` when every query passes.
    """
    query, absent, true, pred = _check_inputs(query, absent, true, pred)
    _check_positive_int(num_pairs, "num_pairs")
    _check_positive_int(chunk_size, "chunk_size")
    generator = _resolve_generator(generator, query.device)
    with torch.no_grad():
        ok, _, _ = _additive_closed_form(head, query, absent, true, pred, generator=generator,
                                         num_pairs=num_pairs, rtol=rtol, atol=atol,
                                         chunk_size=chunk_size, num_classes=num_classes)
    return bool(ok.all())


# ----------------------------------------------------------------------------------------------
# Monte Carlo local Shapley
# ----------------------------------------------------------------------------------------------

def local_shapley(head: Head, query: torch.Tensor, absent: torch.Tensor, true: torch.Tensor,
                  pred: torch.Tensor, *, window: int = 3, num_samples: int = 4,
                  antithetic: bool = True, chunk_size: int = 1024,
                  generator: Optional[torch.Generator] = None, exact_if_additive: bool = True,
                  num_pairs: int = 1, rtol: float = 1e-4, atol: float = 1e-5,
                  num_classes: Optional[int] = None) -> ContributionResult:
    """Local-window Shapley value of every cell of every query, batched.

    Monte Carlo: sample ``s`` draws one random order of the grid's cells (with ``antithetic``
    every odd sample takes the reverse of the order before it); cell ``u``'s game plays it
    restricted to ``u``'s window, a uniformly random order of the window's players, and
    ``v(Pre_u ∪ {u}) - v(Pre_u)`` is averaged over the samples. The orders are shared by the
    cells and by all queries of the batch, and every distinct coalition is evaluated once: at
    most ``2 · H · W · num_samples`` head evaluations per query, about 14% fewer in practice
    (84 instead of 98 on a 7×7 grid with one sample; with a window covering the grid, the
    ``H · W + 1`` of the chain sampler per order).

    With ``exact_if_additive`` the additivity of the head is checked first (see
    :func:`is_additive_head`; at most ``4 · num_pairs`` evaluations, plus ``H · W + 2`` when it
    passes) and the exact closed form ``v(all) - v(all but u)`` is returned when every query passes.

    Args:
        head: maps feature maps ``(B, C, H, W)`` to logits ``(B, K)``.
        query: ``(N, C, H, W)`` query feature maps.
        absent: ``(N, C, H, W)`` replacement features (``absent[n, :, i, j]`` is what cell
            ``(i, j)`` becomes when absent).
        true: ``(N,)`` true classes.
        pred: ``(N,)`` predicted (wrong) classes.
        window: odd size ``k`` of the ``k × k`` window of players around each cell.
        num_samples: permutations per cell (with ``antithetic``, ``num_samples // 2`` pairs plus
            one plain sample when odd).
        antithetic: pair each permutation with its reverse (lower variance).
        chunk_size: most feature maps built and passed through the head at once.
        generator: source of randomness (default: a new generator seeded with 0); the global RNG
            is never used.
        exact_if_additive: detect additive heads and use the exact closed form.
        num_pairs, rtol, atol: parameters of the additivity check.
        num_classes: when given, the head must return that many logits.

    Returns:
        :class:`ContributionResult` with ``values (N, H, W)``, ``head_evaluations (N,)``, ``exact``.

    Raises:
        TypeError, ValueError: on malformed inputs or a head that does not return ``(B, K)`` logits
            covering ``true`` and ``pred``.
    """
    query, absent, true, pred = _check_inputs(query, absent, true, pred)
    window = _check_window(window)
    num_samples = _check_positive_int(num_samples, "num_samples")
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    generator = _resolve_generator(generator, query.device)
    n, _, h, w = query.shape
    hw, device = h * w, query.device
    evals = torch.zeros(n, dtype=torch.long, device=device)
    with torch.no_grad():
        # the orders are drawn first, so they do not depend on whether the check runs (the
        # coalitions are built only when the check sends the queries to the samples)
        orders = _shapley_orders(hw, num_samples, antithetic, generator, device)
        if exact_if_additive:
            _check_positive_int(num_pairs, "num_pairs")
            ok, values, evals = _additive_closed_form(
                head, query, absent, true, pred, generator=generator, num_pairs=num_pairs,
                rtol=rtol, atol=atol, chunk_size=chunk_size, num_classes=num_classes)
            if values is not None and bool(ok.all()):
                return ContributionResult(values.float().contiguous(), evals.cpu(), True)

        masks, inverse = _shapley_masks(h, w, window, orders)
        u = masks.shape[0]
        v = _evaluate_masked(head, query, absent, true, pred, masks, chunk_size,
                             num_classes)[:, inverse].view(n, hw, num_samples, 2)
        values = (v[..., 1] - v[..., 0]).mean(dim=-1).view(n, h, w)
    evals = evals + u
    return ContributionResult(values.contiguous(), evals.cpu(), False)


def _shapley_orders(hw: int, num_samples: int, antithetic: bool, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """``(S, H·W)`` position of every cell in sample ``s``'s random order of the grid (with
    ``antithetic``, odd samples take the reverse of the order before them)."""
    num_base = (num_samples + 1) // 2 if antithetic else num_samples
    ranks = torch.rand(num_base, hw, generator=generator, device=generator.device)
    ranks = ranks.argsort(dim=1).argsort(dim=1).to(device)                 # (P, HW) positions
    sample = torch.arange(num_samples, device=device)
    pos = ranks[sample // 2 if antithetic else sample]                     # (S, HW)
    if antithetic:
        pos = torch.where((sample % 2 == 1)[:, None], hw - 1 - pos, pos)
    return pos


def _shapley_masks(h: int, w: int, window: int, pos: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct coalitions the Monte Carlo estimate evaluates, shared by every query.

    ``pos`` ``(S, H·W)`` are the samples' orders of the whole grid (:func:`_shapley_orders`);
    cell ``u``'s window game plays each order restricted to its window, which is a uniformly
    random order of the window's players. Coalition ``(u, s, with_u)`` keeps every cell outside
    ``u``'s window, the window cells before ``u`` and, when ``with_u``, ``u`` itself. Orders
    shared by the cells make many coalitions coincide (the full map whenever ``u`` comes last in
    its window; with a window covering the grid, the "with" coalition of one cell is the
    "without" coalition of the next, as in the chain sampler of the global game), so each is
    evaluated once.

    Returns ``masks (U, H, W)`` bool, the distinct "present" maps, and ``inverse (H·W·S·2,)``:
    the mask of coalition ``(u, s, with_u)`` (row-major) is ``masks[inverse[...]]``.
    """
    hw, r, device = h * w, window // 2, pos.device
    cells = torch.arange(hw, device=device)
    ii, jj = cells // w, cells % w
    in_win = ((ii[:, None] - ii[None]).abs() <= r) & ((jj[:, None] - jj[None]).abs() <= r)
    before = pos[None, :, :] < pos.t()[:, :, None]                          # (HW u, S, HW g)
    present = ~in_win[:, None, :] | before                                  # without u
    with_u = present | (cells[:, None] == cells[None])[:, None, :]
    coalitions = torch.stack([present, with_u], dim=2).view(-1, hw)         # (HW·S·2, HW)
    # rows compared as uint8 (an integer type every backend's unique over rows supports)
    masks, inverse = torch.unique(coalitions.to(torch.uint8), dim=0, return_inverse=True)
    return masks.bool().view(-1, h, w), inverse


# ----------------------------------------------------------------------------------------------
# exhaustive enumeration (ground truth on tiny grids)
# ----------------------------------------------------------------------------------------------

def exact_local_shapley(head: Head, query: torch.Tensor, absent: torch.Tensor, true: torch.Tensor,
                        pred: torch.Tensor, *, window: int = 3, chunk_size: int = 4096,
                        max_players: int = 12, num_classes: Optional[int] = None
                        ) -> ContributionResult:
    """Exact local Shapley values by enumerating every coalition of every window.

    Costs ``sum_u 2^{m_u}`` head evaluations per query (``m_u`` players in ``u``'s window): meant
    for tests and small grids. A window that covers the whole grid for every cell (``window >=
    2 · max(H, W) - 1``) gives the ordinary Shapley values of the global game, which sum to
    ``v(all) - v(none)``.

    Args:
        head, query, absent, true, pred, window, chunk_size, num_classes: as in
            :func:`local_shapley`.
        max_players: refuse windows with more players than this (``2^max_players`` coalitions).

    Returns:
        :class:`ContributionResult` with ``exact=True``.
    """
    query, absent, true, pred = _check_inputs(query, absent, true, pred)
    window = _check_window(window)
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    n, _, h, w = query.shape
    hw, device = h * w, query.device
    r = window // 2
    ii, jj = torch.arange(hw, device=device) // w, torch.arange(hw, device=device) % w
    in_win = ((ii[:, None] - ii[None]).abs() <= r) & ((jj[:, None] - jj[None]).abs() <= r)
    sizes = in_win.sum(dim=1)                                    # (HW,) players per cell
    m_max = int(sizes.max())
    if m_max > max_players:
        raise ValueError(f"Expected at most `max_players`={max_players} players per window for the "
                         f"exhaustive enumeration, but a {window}×{window} window on a {h}×{w} grid "
                         f"has {m_max} (2^{m_max} coalitions). Use `local_shapley` instead.")
    # players[c, p]: grid index of c's p-th player (in-window cells first, padded with 0).
    order = torch.sort((~in_win).to(torch.int8), dim=1, stable=True).indices[:, :m_max]
    valid_player = torch.arange(m_max, device=device)[None] < sizes[:, None]
    centre_pos = (order == torch.arange(hw, device=device)[:, None]).int().argmax(dim=1)
    num_sub = 1 << m_max
    bits = (torch.arange(num_sub, device=device)[:, None] >> torch.arange(m_max, device=device)) & 1
    # coalitions of cell c are the codes b < 2^{m_c} (bits only on real players)
    cb = torch.nonzero(torch.arange(num_sub, device=device)[None] < (1 << sizes)[:, None])
    num_coal = cb.shape[0]

    c, b = cb[:, 0], cb[:, 1]
    on = bits[b] * valid_player[c]                               # (coalitions, m_max)
    hits = torch.zeros(num_coal, hw, dtype=on.dtype, device=device)
    hits.scatter_add_(1, order[c], on)
    masks = (~in_win[c] | (hits > 0)).view(-1, h, w)             # shared by every query
    with torch.no_grad():
        v = _evaluate_masked(head, query, absent, true, pred, masks, chunk_size, num_classes)
    table = torch.zeros(n, hw, num_sub, dtype=torch.float64, device=device)
    table[:, cb[:, 0], cb[:, 1]] = v.double()
    codes = torch.arange(num_sub, device=device)
    centre_bit = (1 << centre_pos)[:, None]                      # (HW, 1)
    usable = (codes[None] < (1 << sizes)[:, None]) & ((codes[None] & centre_bit) == 0)
    with_u = codes[None] | centre_bit                            # (HW, 2^m)
    diff = table.gather(2, with_u.expand(n, -1, -1)) - table     # (N, HW, 2^m)
    s = bits.sum(dim=1).double()[None]                           # coalition sizes (1, 2^m)
    m = sizes.double()[:, None]
    log_w = torch.lgamma(s + 1) + torch.lgamma((m - s).clamp(min=1)) - torch.lgamma(m + 1)
    weight = torch.where(usable, log_w.exp(), torch.zeros_like(log_w))
    values = (diff * weight[None]).sum(dim=2).float().view(n, h, w)
    evals = torch.full((n,), num_coal, dtype=torch.long)
    return ContributionResult(values, evals, True)


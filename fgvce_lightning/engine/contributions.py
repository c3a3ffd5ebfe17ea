"""Local-window Shapley contributions of feature-map cells (FG-VCE's saliency partition input).

For every query cell ``u`` a small cooperative game is played by the cells of the ``k × k`` window
centred on ``u`` (clipped at the borders). A coalition ``S`` of window cells is turned into a
feature map ``F_S`` that keeps the query's features on ``S``, replaces the window's other cells by
their ``absent`` features (the best-matching reference cells), and leaves every cell outside the
window as in the query. The value of a coalition is the evidence for the mistake,

    v(S) = logit_pred(F_S) - logit_true(F_S),

so a positive contribution ``phi_u`` means that cell ``u`` supports the wrong prediction.

Three estimators:

* :func:`local_shapley` — Monte Carlo over permutations of each window's players, antithetic pairs
  (a permutation and its reverse), every ``(query, cell, sample)`` evaluated in chunked batched
  head calls. When the head is additive over cells (global pooling + linear, or any sum of per-cell
  functions) the local Shapley value of ``u`` is ``v(all) - v(all but u)`` for every window, which
  needs only ``H·W + 1`` evaluations; the function detects that case and uses the closed form.
* :func:`is_additive_head` — the numerical additivity check on the given queries.
* :func:`exact_local_shapley` — exhaustive enumeration of every window's coalitions: exponential,
  the ground truth for tests on tiny grids.

Randomness comes only from the ``generator`` argument (the global RNG is never touched), and the
random draws do not depend on the batch: the result for query ``n`` depends only on that query and
on the generator's state, so a batch gives the same values as each query on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._util import Head, check_feature_map, evaluate_head, margin

__all__ = ["ContributionResult", "local_shapley", "is_additive_head", "exact_local_shapley"]

MaskFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
                     pred: torch.Tensor, mask_fn: MaskFn, total: int, chunk_size: int,
                     num_classes: Optional[int]) -> torch.Tensor:
    """Margins of ``total`` masked feature maps, built and evaluated ``chunk_size`` at a time.

    ``mask_fn(flat_index (B,))`` returns ``(query_index (B,), present (B, H, W) bool)``; a present
    cell keeps the query's features, the others take ``absent``'s. Returns ``(total,)`` float32.
    """
    device = query.device
    num, ch, h, w = query.shape
    # (2N, C, HW): row 2n is query n's absent map, row 2n + 1 its query map. One gather per chunk
    # builds the masked maps (same result as torch.where(present, query[n], absent[n]) with a
    # third of the temporary memory).
    both = torch.stack([absent, query], dim=1).view(2 * num, ch, h * w)
    out = torch.empty(total, dtype=torch.float32, device=device)
    top = int(torch.maximum(true, pred).max()) if num else 0
    for start in range(0, total, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, total), device=device)
        n, present = mask_fn(idx)
        rows = (2 * n[:, None] + present.reshape(idx.shape[0], -1).long())[:, None]
        feats = both.gather(0, rows.expand(-1, ch, -1)).view(-1, ch, h, w)
        logits = evaluate_head(head, feats, chunk_size=chunk_size, num_classes=num_classes)
        if start == 0 and top >= logits.shape[1]:
            raise ValueError(f"Expected the head to return logits for every class in `true`/`pred` "
                             f"(indices up to {top}), but it returned {logits.shape[1]} logits. "
                             "Check the labels and the model split (`head`).")
        out[start:start + idx.shape[0]] = margin(logits, true[n], pred[n])
        del feats, logits
    return out


def _split_index(idx: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Mixed-radix decomposition of a flat index (row-major over ``sizes``)."""
    parts = []
    for size in reversed(sizes[1:]):
        parts.append(idx % size)
        idx = idx // size
    parts.append(idx)
    return parts[::-1]


# ----------------------------------------------------------------------------------------------
# additive heads: detection and closed form
# ----------------------------------------------------------------------------------------------

def _additive_closed_form(head: Head, query: torch.Tensor, absent: torch.Tensor,
                          true: torch.Tensor, pred: torch.Tensor, *, generator: torch.Generator,
                          num_pairs: int, rtol: float, atol: float, chunk_size: int,
                          num_classes: Optional[int]
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Check additivity and, when every query passes the first stage, compute the closed form.

    Stage 1 (``4 * num_pairs`` evaluations per query): a set function is additive (plus a
    constant) iff it is modular, ``v(A ∪ B) + v(A ∩ B) = v(A) + v(B)``; this is tested on random
    pairs with non-empty ``A \\ B`` and ``B \\ A``. Stage 2 (``H·W + 2`` evaluations): the closed form
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

    def pair_masks(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, p, s = _split_index(idx, (n, num_pairs, 4))
        return q, sets[p, s]

    v = _evaluate_masked(head, query, absent, true, pred, pair_masks, n * num_pairs * 4,
                         chunk_size, num_classes).view(n, num_pairs, 4)
    deviation = (v[..., 2] + v[..., 3] - v[..., 0] - v[..., 1]).abs()
    ok = (deviation <= rtol * v.abs().sum(-1) + atol).all(dim=1)
    evals = torch.full((n,), 4 * num_pairs, dtype=torch.long, device=device)
    if not bool(ok.all()):
        return ok, None, evals

    # Stage 2: index hw = all present, hw + 1 = none present, c < hw = all present but c.
    cells = torch.arange(hw, device=device)

    def closed_masks(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, c = _split_index(idx, (n, hw + 2))
        present = (cells[None] != c[:, None]) & (c[:, None] != hw + 1)
        return q, present.view(-1, h, w)

    v = _evaluate_masked(head, query, absent, true, pred, closed_masks, n * (hw + 2), chunk_size,
                         num_classes).view(n, hw + 2)
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

    Monte Carlo: for each cell ``u`` and sample ``s`` a random order of the window's cells is
    drawn (random ranks; with ``antithetic`` every odd sample uses the reverse order of the sample
    before it, so its predecessors are the window's other cells), and
    ``v(Pre_u ∪ {u}) - v(Pre_u)`` is averaged over the samples. That costs
    ``2 · H · W · num_samples`` head evaluations per query (392 for a 7×7 grid with the defaults).
    The orders are drawn per ``(cell, sample)`` and shared by all queries of the batch.

    With ``exact_if_additive`` the additivity of the head is checked first (see
    :func:`is_additive_head`; ``4 · num_pairs`` evaluations, plus ``H · W + 2`` when it passes) and
    the exact closed form ``v(all) - v(all but u)`` is returned when every query passes.

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
        if exact_if_additive:
            _check_positive_int(num_pairs, "num_pairs")
            ok, values, evals = _additive_closed_form(
                head, query, absent, true, pred, generator=generator, num_pairs=num_pairs,
                rtol=rtol, atol=atol, chunk_size=chunk_size, num_classes=num_classes)
            if values is not None and bool(ok.all()):
                return ContributionResult(values.float().contiguous(), evals.cpu(), True)

        # Random ranks of the k×k window offsets, per (cell, base permutation); restricting them to
        # the offsets inside the grid gives a uniform random order of a clipped window's players.
        num_base = (num_samples + 1) // 2 if antithetic else num_samples
        kk, r = window * window, window // 2
        ranks = torch.rand(hw, num_base, kk, generator=generator, device=generator.device)
        ranks = ranks.argsort(dim=-1).argsort(dim=-1).to(device)          # (HW, P, k·k)
        # per (cell c, grid cell g): is g in c's window, and at which window offset
        cells = torch.arange(hw, device=device)
        di = (cells // w)[None] - (cells // w)[:, None] + r
        dj = (cells % w)[None] - (cells % w)[:, None] + r
        in_win = (di >= 0) & (di < window) & (dj >= 0) & (dj < window)   # (HW, HW)
        offset = di.clamp(0, window - 1) * window + dj.clamp(0, window - 1)

        def mc_masks(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q, c, s, with_u = _split_index(idx, (n, hw, num_samples, 2))
            base = s // 2 if antithetic else s
            rk = ranks[c, base]                                          # (B, k·k)
            key = rk.gather(1, offset[c])                                # (B, HW)
            centre = rk[:, r * window + r, None]
            if antithetic:  # odd samples: reversed order, predecessors come after u
                before = torch.where((s % 2 == 1)[:, None], key > centre, key < centre)
            else:
                before = key < centre
            is_u = (cells[None] == c[:, None]) & (with_u == 1)[:, None]
            present = ~in_win[c] | before | is_u
            return q, present.view(-1, h, w)

        v = _evaluate_masked(head, query, absent, true, pred, mc_masks, n * hw * num_samples * 2,
                             chunk_size, num_classes).view(n, hw, num_samples, 2)
        values = (v[..., 1] - v[..., 0]).mean(dim=-1).view(n, h, w)
    evals = evals + 2 * hw * num_samples
    return ContributionResult(values.contiguous(), evals.cpu(), False)


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

    def enum_masks(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = _split_index(idx, (n, num_coal))
        c, b = cb[k, 0], cb[k, 1]
        on = bits[b] * valid_player[c]                           # (B, m_max)
        hits = torch.zeros(idx.shape[0], hw, dtype=on.dtype, device=device)
        hits.scatter_add_(1, order[c], on)
        return q, (~in_win[c] | (hits > 0)).view(-1, h, w)

    with torch.no_grad():
        v = _evaluate_masked(head, query, absent, true, pred, enum_masks, n * num_coal, chunk_size,
                             num_classes).view(n, num_coal)
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


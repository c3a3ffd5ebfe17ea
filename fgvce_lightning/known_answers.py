"""Known answers: does an explanation name the part that really tells the two classes apart?

The embedded :class:`~fgvce_lightning.datasets.SyntheticBirds` knows, for every pair of species,
which parts differ (:func:`~fgvce_lightning.datasets.synthetic.distinguishing_parts`), and it can
draw every validation image again with one thing changed. That gives two kinds of ground truth:

* **the separating part** of a confusion pair: an explanation of a mistake between two species
  that differ only in the tail should edit the tail (:func:`separating_part_scores`);
* **the cause** of each mistake: redrawn with the separating part's trait exactly at its
  species' variant (no per-sample jitter), a mistake that goes away was caused by that part;
  redrawn without the background blobs and the leaf, one that goes away was caused by the
  *context* (:func:`mistake_causes`). A mistake caused by a blob in the background is explained
  right when the edit lands on the blob, not on the tail: the separating-part rate alone would
  call that explanation wrong.

:func:`separating_part_ceiling` measures what a perfect answer could score on the same mistakes:
the flip rate when only the separating part's cells are swapped, with the same part of a
reference (cells from the ground-truth masks).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .engine._util import Head, evaluate_head
from .parts.annotations import masks_to_cell_parts
from .parts.stats import MIN_PAIR_COUNT, wilson_interval
from .parts.types import BACKGROUND

__all__ = ["Rate", "FirstEdit", "SeparatingScores", "separating_part_scores", "mistake_causes",
           "context_cells", "names_cause", "separating_part_ceiling", "first_edits_from_report",
           "first_edits_from_explanations",
           "format_known_answers", "CAUSES"]

CAUSES = ("part", "both", "context", "unknown")
"""``part``: the exact separating trait fixes the mistake, removing the context does not;
``context``: the other way round; ``both``: either does; ``unknown``: neither alone does."""


@dataclass(frozen=True)
class Rate:
    """``hits`` of ``total``, with its 95% Wilson interval."""

    hits: int
    total: int

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.hits, self.total)

    def __str__(self) -> str:
        if not self.total:
            return "n/a (0)"
        lo, hi = self.interval
        return f"{self.value:.3f} ({self.hits}/{self.total}; 95% {lo:.2f}-{hi:.2f})"


@dataclass(frozen=True)
class FirstEdit:
    """What a known-answer score needs of one explained mistake.

    Attributes:
        true, pred: the classes.
        first_parts: the part names of the first edit's cells (``background`` included).
        cell_parts: per cell of the first edit, its part names.
        cells: the first edit's cells ``(row, col)``.
        parts: the part names of all edits.
        num_edits: how many edits (0: nothing edited).
        query_id: ``(dataloader_idx, batch_idx, position)`` of the sample, when known.
    """

    true: int
    pred: int
    first_parts: frozenset
    cell_parts: tuple[frozenset, ...] = ()
    cells: tuple[tuple[int, int], ...] = ()
    parts: frozenset = field(default_factory=frozenset)
    num_edits: int = 1
    query_id: tuple = ()


@dataclass(frozen=True)
class SeparatingScores:
    """How often the explanations name the separating part.

    Attributes:
        first_edit: the first edit names a separating part.
        first_edit_main: the part most of the first edit's cells carry is a separating one (ties:
            any of the tied parts), stricter for edits of several cells.
        pairs: confusion pairs with at least ``min_pair_count`` explained mistakes whose dominant
            part (the one their edits touch most often) is a separating one.
        edits_unlabelled: edits that carry no part name at all.
        pair_rows: per pair ``(true, pred, count, dominant, separating parts, ok)``, most
            frequent first.
    """

    first_edit: Rate
    first_edit_main: Rate
    pairs: Rate
    edits_unlabelled: Rate
    pair_rows: tuple[tuple, ...] = ()


def separating_part_scores(edits: Sequence[FirstEdit], separating: Callable[[int, int], set],
                           min_pair_count: int = MIN_PAIR_COUNT,
                           unlabelled: tuple[int, int] = (0, 0)) -> SeparatingScores:
    """Score explanations against the parts that tell each pair of classes apart.

    Args:
        edits: one :class:`FirstEdit` per explained mistake.
        separating: ``(true, pred) -> set of part names`` (e.g. ``dataset.distinguishing_parts``).
        min_pair_count: pairs with fewer explained mistakes are left out of ``pairs``.
        unlabelled: ``(edits without any part name, all edits)``, counted by the caller.
    """
    first = main = 0
    pair_parts: dict[tuple[int, int], Counter] = defaultdict(Counter)
    pair_n: Counter = Counter()
    for e in edits:
        sep = set(separating(e.true, e.pred))
        first += bool(e.first_parts & sep)
        counts = Counter(p for cell in e.cell_parts for p in cell)
        if counts:
            top = max(counts.values())
            main += bool({p for p, c in counts.items() if c == top} & sep)
        key = (e.true, e.pred)
        pair_n[key] += 1
        pair_parts[key].update(e.parts)
    rows, ok_pairs, judged = [], 0, 0
    for key in sorted(pair_n, key=lambda k: (-pair_n[k], k)):
        counts = pair_parts[key]
        dominant = min(counts, key=lambda p: (-counts[p], p)) if counts else None
        sep = set(separating(*key))
        ok = dominant in sep
        rows.append((key[0], key[1], pair_n[key], dominant, tuple(sorted(sep)), ok))
        if pair_n[key] >= min_pair_count:
            judged += 1
            ok_pairs += ok
    return SeparatingScores(first_edit=Rate(first, len(edits)), first_edit_main=Rate(main, len(edits)),
                            pairs=Rate(ok_pairs, judged), edits_unlabelled=Rate(*unlabelled),
                            pair_rows=tuple(rows))


def first_edits_from_report(report: dict) -> tuple[list[FirstEdit], tuple[int, int]]:
    """The :class:`FirstEdit` of every explained sample of a ``report.json`` (what the user sees),
    and ``(edits without a part name, all edits)``."""
    out, unlabelled, total = [], 0, 0
    for s in report["samples"]:
        if s.get("skipped_reason") is not None or not s["edits"]:
            continue
        total += len(s["edits"])
        unlabelled += sum(not e["parts"] for e in s["edits"])
        first = s["edits"][0]
        cells = tuple((int(r), int(c)) for r, c in first["query_cells"])
        per_cell = tuple(frozenset(names) for names in first.get("cell_parts") or ())
        out.append(FirstEdit(true=int(s["true"]), pred=int(s["pred"]),
                             first_parts=frozenset(first["parts"]), cell_parts=per_cell,
                             cells=cells,
                             parts=frozenset(p for e in s["edits"] for p in e["parts"]),
                             num_edits=len(s["edits"]),
                             query_id=(int(s["dataloader_idx"]), int(s["batch_idx"]),
                                       int(s["position"]))))
    return out, (unlabelled, total)


def first_edits_from_explanations(explanations: Sequence[Any], labels: torch.Tensor,
                                  names: Sequence[str]) -> tuple[list[FirstEdit], tuple[int, int]]:
    """The :class:`FirstEdit` of every explained query, from the engine's explanations and the
    queries' ``(N, P, H, W)`` bool cell labels (a cell without a part is background)."""
    labels = labels.bool().cpu()
    full = torch.cat([labels, ~labels.any(1, keepdim=True)], 1)               # background last
    all_names = list(names) + [BACKGROUND]

    def cell_names(q: int, r: int, c: int) -> frozenset:
        return frozenset(all_names[k] for k in full[q, :, r, c].nonzero().flatten().tolist())

    def edit_names(cells: Iterable[frozenset]) -> frozenset:
        """As :func:`assign_parts` names an edit: its parts, background only when none."""
        found = frozenset().union(*cells) - {BACKGROUND}
        return found or frozenset({BACKGROUND})

    out, unlabelled, total = [], 0, 0
    for e in explanations:
        if e.skipped or not e.edits:
            continue
        total += len(e.edits)          # every edit has a name (background at least)
        per_cell = tuple(cell_names(e.query_index, r, c) for r, c in e.edits[0].query_cells)
        out.append(FirstEdit(true=int(e.true), pred=int(e.pred),
                             first_parts=edit_names(per_cell), cell_parts=per_cell,
                             cells=tuple(e.edits[0].query_cells),
                             parts=frozenset().union(*(edit_names(
                                 [cell_names(e.query_index, r, c) for r, c in ed.query_cells])
                                 for ed in e.edits)),
                             num_edits=len(e.edits)))
    return out, (unlabelled, total)


# ---------------------------------------------------------------------------- causes
def mistake_causes(model: Callable[[torch.Tensor], torch.Tensor], dataset: Any,
                   indices: Sequence[int], true: Sequence[int], pred: Sequence[int],
                   batch_size: int = 64) -> list[str]:
    """Why each mistake happened, from the images drawn again (one of :data:`CAUSES` each).

    Args:
        model: images ``(N, 3, S, S)`` → logits (run under ``torch.no_grad``, in eval mode).
        dataset: a :class:`~fgvce_lightning.datasets.SyntheticBirds` (anything with its
            ``render(indices, exact_parts=, clutter=, occluder=)`` and ``distinguishing_parts``).
        indices: dataset indices of the mistakes.
        true, pred: their classes.
    """
    indices, true, pred = list(map(int, indices)), list(map(int, true)), list(map(int, pred))
    part_fixed = [False] * len(indices)
    context_fixed = [False] * len(indices)
    by_parts: dict[tuple, list[int]] = defaultdict(list)
    for j, (t, p) in enumerate(zip(true, pred)):
        by_parts[tuple(sorted(dataset.distinguishing_parts(t, p)))].append(j)

    def predicted(rows: list[int], **options: Any) -> list[int]:
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = dataset.render([indices[j] for j in chunk], **options)
            with torch.no_grad():
                out += model(batch["image"]).argmax(1).tolist()
        return out

    for parts, rows in by_parts.items():
        for j, got in zip(rows, predicted(rows, exact_parts=parts)):
            part_fixed[j] = got == true[j]
    everything = list(range(len(indices)))
    for j, got in zip(everything, predicted(everything, clutter=False, occluder=False)):
        context_fixed[j] = got == true[j]
    return [("both" if a and c else "part" if a else "context" if c else "unknown")
            for a, c in zip(part_fixed, context_fixed)]


def context_cells(dataset: Any, indices: Sequence[int], grid: Sequence[int],
                  min_coverage: float = 0.2) -> torch.Tensor:
    """``(N, H, W)`` bool: the feature-grid cells that the background blobs or the leaf cover
    (:func:`masks_to_cell_parts`' rule: at least ``min_coverage`` of the cell, or the cell holding
    most of a blob)."""
    batch = dataset.render([int(i) for i in indices], context=True)
    return masks_to_cell_parts(batch["context"][:, None], tuple(grid), min_coverage)[:, 0]


def names_cause(edits: Sequence[FirstEdit], causes: Sequence[str], context: torch.Tensor,
                separating: Callable[[int, int], set]) -> dict[str, Rate]:
    """Per cause, how often the first edit names it: a separating part for ``part`` (and
    ``both``), a context cell for ``context``; ``"known"`` pools the three."""
    hits: Counter = Counter()
    totals: Counter = Counter()
    for e, cause, ctx in zip(edits, causes, context):
        on_part = bool(e.first_parts & set(separating(e.true, e.pred)))
        on_context = any(bool(ctx[r, c]) for r, c in e.cells)
        hit = on_part if cause in ("part", "both") else on_context if cause == "context" else False
        totals[cause] += 1
        hits[cause] += hit
        if cause != "unknown":
            totals["known"] += 1
            hits["known"] += hit
    return {k: Rate(hits[k], totals[k]) for k in (*CAUSES, "known") if totals[k]}


# ---------------------------------------------------------------------------- ceiling
def separating_part_ceiling(head: Head, queries: torch.Tensor, true: torch.Tensor,
                            query_parts: torch.Tensor, references: Sequence[torch.Tensor],
                            reference_parts: Sequence[torch.Tensor],
                            separating: Iterable[torch.Tensor], chunk_size: int = 1024) -> Rate:
    """The flip rate when only the separating part's cells are swapped with the same part of the
    best reference: what an explanation that names the part could at best achieve.

    Every query cell of a separating part takes the most cosine-similar cell of the same part in
    the reference; every reference of the true class is tried and the query counts as flipped
    when one of them flips it. A query whose separating part is not visible counts as not
    flipped.

    Args:
        head: the classifier head.
        queries: ``(N, C, H, W)``.
        true: ``(N,)``.
        query_parts: ``(N, P, H, W)`` bool ground-truth cell labels (from the masks).
        references: per query, the references of its true class ``(K_n, C, H, W)``.
        reference_parts: per query, their labels ``(K_n, P, H, W)``.
        separating: per query, ``(P,)`` bool, the separating parts.
    """
    flipped = 0
    n = queries.shape[0]
    variants, owners = [], []
    for i, (refs, rparts, sep) in enumerate(zip(references, reference_parts, separating)):
        q = queries[i].flatten(1).float()                                      # (C, HW)
        qcells = query_parts[i][sep].any(0).flatten()                          # (HW,)
        rcells = rparts[:, sep].any(1).flatten(1)                              # (K, HW)
        if not bool(qcells.any()) or refs.shape[0] == 0:
            continue
        r = refs.flatten(2).float()                                            # (K, C, HW)
        sim = torch.einsum("cu,kcv->kuv", F.normalize(q, dim=0), F.normalize(r, dim=1))
        sim = sim.masked_fill(~rcells[:, None, :], -math.inf)
        src = sim.argmax(2)                                                    # (K, HW)
        usable = rcells.any(1)
        swapped = r.gather(2, src[:, None, :].expand_as(r))
        x = torch.where(qcells[None, None] & usable[:, None, None], swapped, q[None])
        variants.append(x[usable])
        owners += [i] * int(usable.sum())
    if variants:
        maps = torch.cat(variants).view(-1, *queries.shape[1:])
        logits = evaluate_head(head, maps, chunk_size)
        owner = torch.tensor(owners)
        ok = logits.argmax(1).cpu() == true.cpu()[owner]
        flipped = int(torch.zeros(n, dtype=torch.bool).index_put_((owner,), ok, accumulate=True)
                      .sum())
    return Rate(flipped, n)


def format_known_answers(scores: SeparatingScores, *, ceiling: Optional[Rate] = None,
                         causes: Optional[dict[str, Rate]] = None,
                         cause_counts: Optional[Counter] = None, class_names=None,
                         title: str = "known answers") -> str:
    """The known-answer lines printed by ``fgvce demo`` and ``fgvce evaluate``."""
    name = (lambda c: class_names[c]) if class_names else str
    lines = [f"{title}:",
             f"  first edit names a separating part       {scores.first_edit}",
             f"  ... the part most of its cells carry      {scores.first_edit_main}",
             f"  pairs (>= {MIN_PAIR_COUNT} mistakes) whose dominant part separates them "
             f"{scores.pairs}",
             f"  edits without any part name              {scores.edits_unlabelled}"]
    if ceiling is not None:
        lines.append(f"  ceiling: separating part alone swapped (masks) flips {ceiling}")
    if cause_counts is not None:
        lines.append("  what caused the mistakes (images drawn again): " + ", ".join(
            f"{k} {cause_counts.get(k, 0)}" for k in CAUSES))
    if causes is not None:
        lines.append("  first edit names the known cause         " + (
            str(causes["known"]) if "known" in causes else "n/a"))
        for k in ("part", "both", "context"):
            if k in causes:
                target = "the separating part" if k != "context" else "a blob or the leaf"
                lines.append(f"    {k:<8} -> {target:<20} {causes[k]}")
    for t, p, count, dominant, sep, ok in scores.pair_rows[:6]:
        mark = "ok" if ok else "--"
        few = "" if count >= MIN_PAIR_COUNT else "  (too few to tell)"
        lines.append(f"  {mark} {name(t)} -> {name(p)}: {count} mistakes, dominant "
                     f"{dominant or BACKGROUND}, separating {'/'.join(sep)}{few}")
    return "\n".join(lines)

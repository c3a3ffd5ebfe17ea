"""Per-part error statistics of one explained epoch, and their history over epochs."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from .types import BACKGROUND, EpochStats, PairStat, PartInfo, PartStat

if TYPE_CHECKING:   # parts must not import reporting at runtime (layering)
    from ..reporting.epoch import ExplainedSample

__all__ = ["compute_epoch_stats", "PartHistory", "wilson_interval", "MIN_PAIR_COUNT"]

MIN_PAIR_COUNT = 5
"""A confusion pair with fewer explained mistakes is marked as too few to name its part."""


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for ``z = 1.96``).

    Unlike the normal approximation it stays inside ``[0, 1]`` and is sensible for the small
    counts of one epoch: 4 of 5 gives ``(0.38, 0.96)``. ``(0, 1)`` when ``trials == 0``.
    """
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"Expected 0 <= successes <= trials, but got {successes} of {trials}.")
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _labels_from_names(cell_parts: list, names: Sequence[str]) -> torch.Tensor:
    """``H×W`` lists of part-name tuples → ``(P, H, W)`` bool (unknown names ignored)."""
    index = {n: k for k, n in enumerate(names)}
    gh, gw = len(cell_parts), len(cell_parts[0]) if cell_parts else 0
    out = torch.zeros(len(names), gh, gw, dtype=torch.bool)
    for i, row in enumerate(cell_parts):
        for j, cell in enumerate(row):
            for name in cell:
                if name in index:
                    out[index[name], i, j] = True
    return out


def compute_epoch_stats(samples: Sequence["ExplainedSample"], parts: Sequence[PartInfo],
                        num_misclassified: int,
                        cell_parts: Optional[Sequence[Optional[torch.Tensor]]] = None,
                        max_examples: int = 3, min_pair_count: int = MIN_PAIR_COUNT) -> EpochStats:
    """Aggregate one epoch's explanations into :class:`EpochStats`.

    Definitions (over the *explained* samples, i.e. not skipped):

    * ``error_share`` of a part: share of explained mistakes whose edits (``edit_parts``) touch it;
      ``count`` is their number. Shares of different parts may sum to more than 1.
    * ``contribution_share``: positive contribution mass (``Explanation.contributions`` clamped
      at 0) on the part's cells, over the total positive mass of all explained mistakes whose cell
      labels and contributions are known. A cell with two parts counts for both; unlabelled cells
      count for none. ``0`` when nothing is known.
    * ``edit_cells``: edited query cells labelled with the part (needs cell labels).
    * every share comes with its 95% Wilson interval (:func:`wilson_interval`);
    * pair stats: per ``(true, pred)``, the number of explained mistakes touching each part,
      ``dominant_parts`` by that count (ties by name), the dominant part's share with its
      interval, whether the pair has ``min_pair_count`` mistakes (``enough``), and up to
      ``max_examples`` sample indices (successful explanations first).
    * ``semantic_consistency``: over the edited cells where the query cell or the reference cell
      carries a part, the share where both carry one in common (Same-KP per cell, as Vandenhende
      et al. 2022 count it; background replaced by background is left out, since it says nothing
      about parts and would reward edits on the background). Samples that only carry edit-level
      names (``reference_parts`` without ``consistent_cells``) are judged per edit instead.
      ``None`` when no sample has reference parts.
    * a part named by an edit but missing from ``parts`` (the background of annotated parts) is
      added at the end of ``parts``.
    * ``flip_rate``: share of explained mistakes that flip to the true class;
      ``mean_edits``: mean number of edits over those (``nan`` if none).

    Args:
        samples: the epoch's explained (and skipped) samples.
        parts: the parts known this epoch (their names key everything).
        num_misclassified: mistakes seen in the epoch (all ranks).
        cell_parts: optional per-sample ``(P, H, W)`` bool labels (aligned with ``samples``),
            used instead of ``ExplainedSample.cell_parts``.
        max_examples: example indices kept per confusion pair.
    """
    if cell_parts is not None and len(cell_parts) != len(samples):
        raise ValueError(f"Expected `cell_parts` to have one entry per sample ({len(samples)}), but "
                         f"got {len(cell_parts)}.")
    if num_misclassified < 0:
        raise ValueError(f"Expected `num_misclassified` >= 0, but got {num_misclassified}.")
    parts = tuple(parts)
    named = {n for s in samples for ep in s.edit_parts for n in ep}
    if BACKGROUND in named and BACKGROUND not in {p.name for p in parts}:
        source = parts[0].source if parts else "annotations"
        parts = parts + (PartInfo(id=len(parts), name=BACKGROUND, source=source),)
    names = [p.name for p in parts]
    explained = [i for i, s in enumerate(samples) if not s.explanation.skipped]
    num_explained = len(explained)
    successes = [i for i in explained if samples[i].explanation.success]
    flip_rate = len(successes) / num_explained if num_explained else 0.0
    mean_edits = (sum(samples[i].explanation.num_edits for i in successes) / len(successes)
                  if successes else math.nan)

    touched: Counter[str] = Counter()
    edit_cells: Counter[str] = Counter()
    mass = torch.zeros(len(names), dtype=torch.float64)
    total_mass = 0.0
    pairs: dict[tuple[int, int], list[int]] = defaultdict(list)
    pair_parts: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    consistent = judged = 0

    for i in explained:
        s = samples[i]
        exp = s.explanation
        parts_hit = {p for ep in s.edit_parts for p in ep}
        touched.update(parts_hit)
        key = (exp.true, exp.pred)
        pairs[key].append(i)
        pair_parts[key].update(parts_hit)
        if len(s.consistent_cells) == exp.num_edits == len(s.judged_cells):
            consistent += sum(s.consistent_cells)
            judged += sum(s.judged_cells)
        elif len(s.reference_parts) == exp.num_edits and len(s.edit_parts) == exp.num_edits:
            for qp, rp in zip(s.edit_parts, s.reference_parts):
                judged += 1
                consistent += bool(set(qp) & set(rp))
        labels = cell_parts[i] if cell_parts is not None else None
        if labels is None and s.cell_parts is not None:
            labels = _labels_from_names(s.cell_parts, names)
        elif labels is not None and BACKGROUND in names and labels.shape[0] == len(names) - 1:
            labels = torch.cat([labels.bool(), ~labels.bool().any(0, keepdim=True)])
        if labels is None or not names:
            continue
        labels = labels.bool().cpu()
        if labels.dim() != 3 or labels.shape[0] != len(names):
            raise ValueError(f"Expected cell part labels of shape (P={len(names)}, H, W) for sample "
                             f"{i}, but got {tuple(labels.shape)}.")
        cells = exp.edited_cells
        if cells:
            idx = torch.as_tensor(cells, dtype=torch.long)
            per_part = labels[:, idx[:, 0], idx[:, 1]].sum(dim=1)
            for k, c in enumerate(per_part.tolist()):
                edit_cells[names[k]] += int(c)
        if exp.contributions is not None and exp.contributions.shape == labels.shape[1:]:
            pos = exp.contributions.detach().cpu().double().clamp_min(0)
            pos = torch.nan_to_num(pos, nan=0.0, posinf=0.0)
            total_mass += float(pos.sum())
            mass += (labels.double() * pos).sum(dim=(1, 2))

    part_stats = [
        PartStat(part=n, error_share=touched[n] / num_explained if num_explained else 0.0,
                 count=touched[n],
                 contribution_share=float(mass[k] / total_mass) if total_mass > 0 else 0.0,
                 edit_cells=edit_cells[n], interval=wilson_interval(touched[n], num_explained))
        for k, n in enumerate(names)
    ]
    part_stats.sort(key=lambda p: (-p.error_share, -p.contribution_share, p.part))

    pair_stats = []
    for (true, pred), idxs in pairs.items():
        counts = pair_parts[(true, pred)]
        dominant = tuple(sorted(counts, key=lambda n: (-counts[n], n)))
        ordered = sorted(idxs, key=lambda j: (not samples[j].explanation.success, j))
        top = counts[dominant[0]] if dominant else 0
        pair_stats.append(PairStat(true=true, pred=pred, count=len(idxs), part_counts=dict(counts),
                                   dominant_parts=dominant,
                                   example_indices=tuple(ordered[:max_examples]),
                                   dominant_share=top / len(idxs),
                                   dominant_interval=wilson_interval(top, len(idxs)),
                                   enough=len(idxs) >= min_pair_count))
    pair_stats.sort(key=lambda p: (-p.count, p.true, p.pred))

    return EpochStats(
        num_misclassified=int(num_misclassified), num_explained=num_explained,
        num_skipped=len(samples) - num_explained, flip_rate=flip_rate, mean_edits=mean_edits,
        parts=tuple(parts), part_stats=tuple(part_stats), pair_stats=tuple(pair_stats),
        semantic_consistency=(consistent / judged) if judged else None,
        consistency_cells=judged, min_pair_count=int(min_pair_count))


class PartHistory:
    """Per-epoch part statistics, for the trend panels (error share of each part over epochs).

    Example::

        history.update(epoch, stats)
        history.series("beak")  # [(epoch, error_share), ...]
    """

    def __init__(self) -> None:
        self._records: dict[int, dict[str, dict[str, float]]] = {}

    def update(self, epoch: int, stats: EpochStats) -> None:
        """Record ``stats`` for ``epoch`` (replacing an earlier record of the same epoch)."""
        self._records[int(epoch)] = {
            p.part: {"error_share": float(p.error_share), "contribution_share":
                     float(p.contribution_share), "count": float(p.count)}
            for p in stats.part_stats}

    def set_record(self, epoch: int, parts: Mapping[str, Mapping[str, float]]) -> None:
        """Record ``{part: {"error_share", "contribution_share", "count"}}`` for ``epoch`` directly
        (e.g. read back from an epoch report)."""
        self._records[int(epoch)] = {
            str(n): {k: float(v[k]) for k in ("error_share", "contribution_share", "count")}
            for n, v in parts.items()}

    @property
    def epochs(self) -> list[int]:
        """Recorded epochs, ascending."""
        return sorted(self._records)

    @property
    def part_names(self) -> list[str]:
        """All part names ever recorded, sorted."""
        return sorted({n for rec in self._records.values() for n in rec})

    def series(self, part: str, key: str = "error_share") -> list[tuple[int, float]]:
        """``(epoch, value)`` for every recorded epoch where ``part`` was known."""
        if key not in ("error_share", "contribution_share", "count"):
            raise ValueError(f"Expected `key` to be one of 'error_share', 'contribution_share', "
                             f"'count', but got {key!r}.")
        return [(e, self._records[e][part][key]) for e in self.epochs if part in self._records[e]]

    def as_dict(self, key: str = "error_share") -> dict[str, list[tuple[int, float]]]:
        """``{part: series(part, key)}`` for every part."""
        return {n: self.series(n, key) for n in self.part_names}

    def __len__(self) -> int:
        return len(self._records)

    def state_dict(self) -> dict[str, Any]:
        return {"records": {e: {n: dict(v) for n, v in rec.items()} for e, rec in self._records.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._records = {int(e): {str(n): {k: float(x) for k, x in v.items()} for n, v in rec.items()}
                         for e, rec in state.get("records", {}).items()}

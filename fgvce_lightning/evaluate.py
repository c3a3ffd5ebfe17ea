"""Offline evaluation of counterfactual strategies on a trained classifier's validation mistakes.

:func:`evaluate_model` runs the model's feature extractor over a validation loader once, fills a
:class:`~fgvce_lightning.engine.bank.ReferenceBank` with the correctly classified maps, picks up
to ``max_queries`` mistakes (a seeded, deterministic subset) and explains the *same* queries with
every strategy:

* ``"fgvce"``: :func:`~fgvce_lightning.engine.search.counterfactual_search` (local Shapley
  contributions, saliency partition), the correspondence restricted by the part labels as the
  monitor does when the batches carry annotations;
* ``"fgvce-features"``: the same with the correspondence from the features alone (data without
  annotations);
* ``"greedy"``: :func:`~fgvce_lightning.engine.greedy.greedy_search` (Goyal et al. 2019);
* ``"gradcam"`` / ``"random"``: the FG-VCE search with Grad-CAM / random region order.

Per strategy it reports the flip rate, edits and cells to flip, head evaluations and seconds per
explanation, the Near-part / Same-part hit rates (cell part labels from the batch's ``masks`` or
``keypoints``), the *distinguishing-part hit rate* when the data set can name the parts that tell
two classes apart (``dataset.distinguishing_parts(true, pred)``, e.g. SyntheticBirds) and the
deletion / insertion AUC of the strategy's cell ranking. :func:`format_table` prints them side by
side. :func:`prototype_purity` scores discovered part prototypes against ground-truth parts.

The CLI glue (``fgvce evaluate --checkpoint PATH``) is :func:`add_evaluate_parser` +
:func:`run_evaluate`.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .engine import (Explanation, ModelSplit, ReferenceBank, SearchConfig, counterfactual_search,
                     greedy_search, split_model)
from .engine._util import evaluate_head, preserved_training_flags
from .engine.correspondence import align_references
from .metrics import (deletion_insertion_auc, edits_to_flip, flip_rate, near_part_hit_rate,
                      same_part_hit_rate)
from ._collect import Collected, collect
from .known_answers import (CAUSES, Rate, SeparatingScores, context_cells,
                            first_edits_from_explanations, mistake_causes, names_cause,
                            separating_part_ceiling, separating_part_scores)
from .parts.assign import assign_parts
from .parts.purity import PurityResult, cell_majority_parts, prototype_purity

__all__ = ["StrategyResult", "EvaluationResult", "PurityResult", "STRATEGIES", "evaluate_model",
           "ground_truth_for",
           "format_table", "prototype_purity", "cell_majority_parts", "add_evaluate_parser",
           "run_evaluate"]

STRATEGIES = ("fgvce", "fgvce-features", "greedy", "gradcam", "random")
_REGION_ORDER = {"fgvce": "contribution", "fgvce-features": "contribution", "gradcam": "gradcam",
                 "random": "random"}


@dataclass(frozen=True)
class StrategyResult:
    """The metrics of one strategy on the evaluation queries (``nan`` where not applicable).

    Attributes:
        name: strategy name (one of :data:`STRATEGIES`).
        num_explained: queries the strategy explained (not skipped).
        flip_rate: share of explained queries whose edits flip the prediction to the true class.
        edits_to_flip: mean number of edits of the flipped queries.
        cells_to_flip: mean number of edited cells of the flipped queries.
        head_evaluations: mean head evaluations per explained query.
        seconds: wall-clock seconds of the whole strategy run (all queries).
        near_part: Near-part hit rate (all replacements; query and reference labels).
        same_part: Same-part hit rate.
        distinguishing_hit: share of explained queries whose first edit touches a cell labelled
            with a part that distinguishes ``true`` from ``pred`` (``separating.first_edit``).
        distinguishing_chance: the same for a random set of cells of the first edit's size
            (hypergeometric, averaged over the explained queries).
        deletion_auc: mean deletion AUC of the strategy's cell ranking (lower is better).
        insertion_auc: mean insertion AUC (higher is better).
        consistency: the report's ``semantic_consistency``: over the edited cells where the query
            or the reference cell carries a part, the share where both carry one in common.
        separating: the separating-part scores (:func:`separating_part_scores`), or ``None``.
        causes: per known cause, how often the first edit names it (:func:`names_cause`).
        explanations: the explanations, in query order.
    """

    name: str
    num_explained: int
    flip_rate: float
    edits_to_flip: float
    cells_to_flip: float
    head_evaluations: float
    seconds: float
    near_part: float
    same_part: float
    distinguishing_hit: float
    distinguishing_chance: float
    deletion_auc: float
    insertion_auc: float
    consistency: float = math.nan
    separating: Optional[SeparatingScores] = None
    causes: dict = field(default_factory=dict)
    explanations: tuple[Explanation, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate_model` measured.

    Attributes:
        strategies: one :class:`StrategyResult` per strategy, in the order asked for.
        num_val: validation samples seen.
        num_mistakes: misclassified validation samples.
        num_queries: mistakes explained by every strategy (the same ones).
        accuracy: validation accuracy of the model.
        bank_size: reference maps in the bank.
        grid: ``(H, W)`` of the feature maps.
        part_names: names of the annotated parts (empty without annotations).
        label_source: ``"masks"``, ``"keypoints"`` or ``None`` (no part annotations).
        distinguishing_cell_share: share of the queries' cells labelled with a distinguishing part
            (the per-cell chance of hitting one); ``nan`` when the data set cannot name them.
        query_indices: positions (in loader order) of the queries.
        bank: the reference bank the strategies used.
        seed: the seed.
        ceiling: the flip rate with only the separating part swapped from the masks (every cell
            the part's mask touches; :func:`separating_part_ceiling`), or ``None``.
        cause_counts: how many queries each cause of :data:`CAUSES` explains, or ``None``.
    """

    strategies: tuple[StrategyResult, ...]
    num_val: int
    num_mistakes: int
    num_queries: int
    accuracy: float
    bank_size: int
    grid: tuple[int, int]
    part_names: tuple[str, ...]
    label_source: Optional[str]
    distinguishing_cell_share: float
    query_indices: tuple[int, ...]
    bank: Optional[ReferenceBank] = field(default=None, repr=False, compare=False)
    seed: int = 0
    ceiling: Optional[Rate] = None
    cause_counts: Optional[dict] = None

    def strategy(self, name: str) -> StrategyResult:
        """The result of strategy ``name``."""
        for s in self.strategies:
            if s.name == name:
                return s
        raise KeyError(f"Expected one of {[s.name for s in self.strategies]}, but got {name!r}.")


def _absent(head: Any, bank: ReferenceBank, queries: torch.Tensor, true: torch.Tensor,
            pred: torch.Tensor, config: SearchConfig) -> torch.Tensor:
    """What each query cell becomes when "absent": its corresponding cell in the best-aligned
    reference of its true class, exactly as the FG-VCE search defines it. The same maps serve every
    ranking, so their AUCs compare the rankings only."""
    n, c, h, w = queries.shape
    refs, _, valid = bank.gather(true.to(bank.device))
    refs, valid = refs.to(queries.device, torch.float32), valid.to(queries.device)
    if refs.shape[1] == 0:
        return queries.clone()
    _, _, aligned = align_references(queries.float(), refs, valid, max_shift=config.max_shift,
                                     mirror=config.mirror, channels=c - config.protected_channels,
                                     keep=1)
    absent = aligned[:, 0].reshape(n, c, h, w)
    none = ~valid.any(1)               # no reference of the class: nothing changes
    return torch.where(none[:, None, None, None], queries, absent)


def _distinguishing(dataset: Any, true: torch.Tensor, pred: torch.Tensor,
                    part_names: Sequence[str]) -> Optional[torch.Tensor]:
    """``(N, P)`` bool: the parts that tell each query's true class from its predicted one."""
    fn = getattr(dataset, "distinguishing_parts", None)
    if not callable(fn) or not part_names:
        return None
    index = {name: k for k, name in enumerate(part_names)}
    out = torch.zeros(true.numel(), len(part_names), dtype=torch.bool)
    for i, (t, p) in enumerate(zip(true.tolist(), pred.tolist())):
        for name in fn(t, p):
            if name in index:
                out[i, index[name]] = True
    return out


def _distinguishing_scores(exps: Sequence[Explanation], dist_cells: torch.Tensor
                           ) -> tuple[float, float]:
    """Hit rate of the first edits on distinguishing cells ``(N, H, W)`` and its size-matched chance."""
    hits, chance = [], []
    hw = dist_cells[0].numel() if len(dist_cells) else 0
    for e in exps:
        if e.skipped:
            continue
        cells = e.edits[0].query_cells if e.edits else ()
        d = dist_cells[e.query_index]
        hits.append(float(any(bool(d[i, j]) for i, j in cells)))
        s, dn = len(cells), int(d.sum())
        chance.append(1.0 - math.comb(hw - dn, s) / math.comb(hw, s) if s else 0.0)
    if not hits:
        return math.nan, math.nan
    return sum(hits) / len(hits), sum(chance) / len(chance)


def _run(name: str, split: ModelSplit, queries: torch.Tensor, true: torch.Tensor,
         pred: torch.Tensor, bank: ReferenceBank, config: SearchConfig,
         modules: Sequence[nn.Module], greedy_max_cells: Optional[int],
         labels: Optional[torch.Tensor], ref_labels: dict) -> list[Explanation]:
    """One strategy on the queries; the FG-VCE searches (but ``fgvce-features``) use the part
    labels to restrict the correspondence, as the monitor does when the data has annotations."""
    if name == "greedy":
        return greedy_search(split.head, queries, true, pred, bank, config,
                             max_cells=greedy_max_cells, modules=modules)
    cfg = SearchConfig(**{**config.__dict__, "region_order": _REGION_ORDER[name]})
    annotated = labels is not None and name != "fgvce-features"
    return counterfactual_search(split.head, queries, true, pred, bank, cfg, modules=modules,
                                 query_parts=labels.to(queries.device) if annotated else None,
                                 reference_parts=ref_labels if annotated else None)


def evaluate_model(model: nn.Module, val_loader: Iterable, *, split: Optional[ModelSplit] = None,
                   layer: Optional[str] = None, at: str = "penultimate", max_queries: int = 64,
                   bank_per_class: int = 64, part_names: Optional[Sequence[str]] = None,
                   seed: int = 0, device: str | torch.device = "cpu",
                   strategies: Sequence[str] = STRATEGIES, config: Optional[SearchConfig] = None,
                   greedy_max_cells: Optional[int] = None, near_radius: int = 0,
                   min_coverage: float = 0.2, auc_steps: Optional[int] = 16,
                   keypoint_radius: float = 1.0, known_answers: bool = True) -> EvaluationResult:
    """Explain the same validation mistakes with every strategy and measure them.

    Args:
        model: the trained classifier (left on its device, its ``training`` flags restored).
        val_loader: validation batches: dicts with ``image``, ``label`` and optionally ``masks``
            ``(B, P, S, S)`` or ``keypoints`` ``(B, P, 3)``, or ``(images, labels)`` pairs.
        split: an explicit :class:`ModelSplit`; default ``split_model(model, layer=, at=)``.
        layer: see :func:`split_model`.
        at: see :func:`split_model`.
        max_queries: most mistakes explained (a seeded random subset, in loader order).
        bank_per_class: reference maps kept per class (the monitor's default; the first correct
            ones in loader order, as the monitor keeps them).
        part_names: names of the annotated parts; default ``dataset.part_names`` or ``part k``.
        seed: seeds the query subset and the searches.
        device: where features, bank and searches live.
        strategies: subset of :data:`STRATEGIES`.
        config: search configuration (default ``SearchConfig(seed=seed)``); ``region_order`` is set
            per strategy.
        greedy_max_cells: ``max_cells`` of the greedy search (default: its own, ``H·W // 2``).
        near_radius: neighbourhood radius of the Near-part hit rate.
        min_coverage: mask coverage for a cell to carry a part.
        auc_steps: steps of the deletion / insertion curves (``None``: one cell per step).
        keypoint_radius: the Near-KP radius of the keypoint labels, in cells.
        known_answers: when the data set names the parts that separate two classes
            (``dataset.distinguishing_parts``), score the explanations against them, measure the
            ceiling (masks needed) and, when it can draw its images again
            (``SyntheticBirds.render``), the cause of every mistake (see
            :mod:`fgvce_lightning.known_answers`; needs an unshuffled loader).

    Returns:
        The :class:`EvaluationResult`.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"Expected `strategies` to be a non-empty subset of {STRATEGIES}, but got "
                         f"{tuple(strategies)!r}.")
    for name, value in (("max_queries", max_queries), ("bank_per_class", bank_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
    device = torch.device(device)
    split = split if split is not None else split_model(model, layer=layer, at=at)
    config = config if config is not None else SearchConfig(seed=seed)
    modules = [model] if isinstance(model, nn.Module) else []
    with preserved_training_flags(*modules), torch.no_grad():
        col, bank = collect(split, val_loader, bank_per_class, device, min_coverage,
                             keypoint_radius)
    feats = torch.cat(col.feats)
    true_all, pred_all, pos_all = torch.cat(col.true), torch.cat(col.pred), torch.cat(col.position)
    g = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(feats.shape[0], generator=g)[:max_queries].sort().values
    queries, true, pred = feats[pick], true_all[pick], pred_all[pick]
    grid = tuple(feats.shape[2:]) if feats.numel() else tuple(bank.feature_shape[1:])

    labels = torch.cat(col.parts)[pick] if col.parts else None
    dataset = getattr(val_loader, "dataset", None)
    names: tuple[str, ...] = ()
    if labels is not None:
        p = labels.shape[1]
        names = tuple(part_names or getattr(dataset, "part_names", None)
                      or [f"part {k}" for k in range(p)])
        if len(names) != p:
            raise ValueError(f"Expected {p} part names (one per annotated part), but got "
                             f"{len(names)}: {names}.")
    dist = _distinguishing(dataset, true, pred, names) if labels is not None else None
    dist_cells = None
    share = math.nan
    if dist is not None and len(true):
        dist_cells = (labels & dist[:, :, None, None]).any(1)                      # (N, H, W)
        share = float(dist_cells.float().mean())

    absent = None
    if len(true) and any(s != "greedy" for s in strategies):
        with preserved_training_flags(*modules):
            absent = _absent(split.head, bank, queries, true.to(device), pred.to(device), config)
    separating = getattr(dataset, "distinguishing_parts", None) if known_answers else None
    ceiling, causes, ctx = None, None, None
    if callable(separating) and len(true):
        with preserved_training_flags(*modules):
            ceiling, causes, ctx = _known_answers(split, bank, col, dataset, queries, true, pred,
                                                  pick, pos_all, names, device)
    results = []
    for name in strategies:
        start = time.perf_counter()
        exps = _run(name, split, queries, true.to(device), pred.to(device), bank, config, modules,
                    greedy_max_cells, labels, col.ref_parts) if len(true) else []
        seconds = time.perf_counter() - start
        done = [e for e in exps if not e.skipped]
        near = same = hit = chance = dele = ins = consistency = math.nan
        scores, cause_rates = None, {}
        if labels is not None and done:
            near = near_part_hit_rate(exps, labels, col.ref_parts, radius=near_radius)
            same = same_part_hit_rate(exps, labels, col.ref_parts)
            judged = assign_parts(exps, names, labels, col.ref_parts)
            cells = sum(sum(a.judged_cells) for a in judged)
            consistency = sum(sum(a.consistent_cells) for a in judged) / cells if cells else math.nan
        if dist_cells is not None:
            hit, chance = _distinguishing_scores(exps, dist_cells)
        if callable(separating) and labels is not None and done:
            firsts, unlabelled = first_edits_from_explanations(exps, labels, names)
            scores = separating_part_scores(firsts, separating, unlabelled=unlabelled)
            if causes is not None:
                order = [e.query_index for e in exps if not e.skipped and e.edits]
                cause_rates = names_cause(firsts, [causes[i] for i in order], ctx[order],
                                          separating)
        ranked = [e for e in done if e.contributions is not None]
        if ranked:
            idx = torch.tensor([e.query_index for e in ranked])
            with preserved_training_flags(*modules):
                d, i = deletion_insertion_auc(
                    split.head, queries[idx], absent[idx],
                    torch.stack([e.contributions for e in ranked]).to(device),
                    true[idx].to(device), pred[idx].to(device), steps=auc_steps)
            dele, ins = float(d.mean()), float(i.mean())
        results.append(StrategyResult(
            name=name, num_explained=len(done), flip_rate=flip_rate(exps),
            edits_to_flip=edits_to_flip(exps), cells_to_flip=edits_to_flip(exps, unit="cells"),
            head_evaluations=(sum(e.head_evaluations for e in done) / len(done)) if done
            else math.nan, seconds=seconds, near_part=near, same_part=same,
            distinguishing_hit=hit, distinguishing_chance=chance, deletion_auc=dele,
            insertion_auc=ins, consistency=consistency, separating=scores, causes=cause_rates,
            explanations=tuple(exps)))
    return EvaluationResult(
        strategies=tuple(results), num_val=col.num_val, num_mistakes=int(feats.shape[0]),
        num_queries=int(len(true)), accuracy=col.num_correct / max(col.num_val, 1),
        bank_size=len(bank), grid=grid, part_names=names, label_source=col.label_source,
        distinguishing_cell_share=share, query_indices=tuple(pos_all[pick].tolist()), bank=bank,
        seed=int(seed), ceiling=ceiling,
        cause_counts=None if causes is None else {k: causes.count(k) for k in CAUSES})


def ground_truth_for(model: nn.Module, val_loader: Iterable, positions: Sequence[int], *,
                     split: Optional[ModelSplit] = None, bank_per_class: int = 64,
                     device: str | torch.device = "cpu", min_coverage: float = 0.2
                     ) -> tuple[Optional[Rate], Optional[list], Optional[torch.Tensor]]:
    """The ceiling and the causes of given validation mistakes (e.g. those a report explained).

    Args:
        model: the trained classifier.
        val_loader: the unshuffled validation loader of a data set that can draw its images again
            (:class:`~fgvce_lightning.datasets.SyntheticBirds`).
        positions: loader-order indices of the mistakes (``batch_idx * batch_size + position``).

    Returns:
        ``(ceiling, causes, context cells)`` as :func:`evaluate_model` measures them, for the
        positions that are mistakes of ``model`` (in the order given); ``None`` where the data
        cannot say.
    """
    device = torch.device(device)
    split = split if split is not None else split_model(model)
    modules = [model] if isinstance(model, nn.Module) else []
    dataset = getattr(val_loader, "dataset", None)
    with preserved_training_flags(*modules), torch.no_grad():
        col, bank = collect(split, val_loader, bank_per_class, device, min_coverage, 1.0)
        where = {int(p): k for k, p in enumerate(torch.cat(col.position).tolist())}
        pick = torch.tensor([where[int(p)] for p in positions if int(p) in where],
                            dtype=torch.long)
        feats = torch.cat(col.feats)
        names = tuple(getattr(dataset, "part_names", ()) or ())
        return _known_answers(split, bank, col, dataset, feats[pick], torch.cat(col.true)[pick],
                              torch.cat(col.pred)[pick], pick, torch.cat(col.position), names,
                              device)


def _known_answers(split: ModelSplit, bank: ReferenceBank, col: Collected, dataset: Any,
                   queries: torch.Tensor, true: torch.Tensor, pred: torch.Tensor,
                   pick: torch.Tensor, positions: torch.Tensor, names: Sequence[str],
                   device: torch.device) -> tuple[Optional[Rate], Optional[list], Optional[torch.Tensor]]:
    """The ceiling (from the masks) and the causes of the picked mistakes (``None`` each when the
    data cannot give them)."""
    ceiling = None
    if col.mask_parts and names:
        index = {n: k for k, n in enumerate(names)}
        masks = torch.cat(col.mask_parts)[pick]
        refs, ref_parts, seps = [], [], []
        for t, p in zip(true.tolist(), pred.tolist()):
            maps, ids = bank.get(t)
            refs.append(maps.to(device))
            ref_parts.append(torch.stack([col.ref_mask_parts[tuple(i)] for i in ids.tolist()])
                             if len(ids) else torch.zeros(0, *masks.shape[1:], dtype=torch.bool))
            sep = torch.zeros(len(names), dtype=torch.bool)
            for part in dataset.distinguishing_parts(t, p):
                if part in index:
                    sep[index[part]] = True
            seps.append(sep)
        ceiling = separating_part_ceiling(split.head, queries, true.to(device), masks, refs,
                                          ref_parts, seps)
    causes = ctx = None
    if callable(getattr(dataset, "render", None)):
        try:
            indices = positions[pick].tolist()
            causes = mistake_causes(lambda x: evaluate_head(split.head, split.features(x.to(device))),
                                    dataset, indices, true.tolist(), pred.tolist())
            ctx = context_cells(dataset, indices, tuple(queries.shape[2:]))
        except TypeError:            # a render() without the counterfactual options
            causes = ctx = None
    return ceiling, causes, ctx


_ROWS = (
    ("explained", "num_explained", "{:d}"),
    ("flip rate", "flip_rate", "{:.3f}"),
    ("edits to flip", "edits_to_flip", "{:.2f}"),
    ("cells to flip", "cells_to_flip", "{:.2f}"),
    ("head evals / explanation", "head_evaluations", "{:.0f}"),
    ("seconds (all queries)", "seconds", "{:.1f}"),
    ("Near-part hit rate", "near_part", "{:.3f}"),
    ("Same-part hit rate", "same_part", "{:.3f}"),
    ("semantic consistency (cells)", "consistency", "{:.3f}"),
    ("first edit names separating part", "distinguishing_hit", "{:.3f}"),
    ("  chance, same edit size", "distinguishing_chance", "{:.3f}"),
    ("  most of its cells' part", lambda s: s.separating and s.separating.first_edit_main, "rate"),
    ("pairs >= 5: dominant separates", lambda s: s.separating and s.separating.pairs, "count"),
    ("first edit names known cause", lambda s: s.causes.get("known"), "rate"),
    ("  cause part / both", lambda s: _pooled(s.causes, ("part", "both")), "rate"),
    ("  cause context (blob, leaf)", lambda s: s.causes.get("context"), "rate"),
    ("deletion AUC (lower=better)", "deletion_auc", "{:.3f}"),
    ("insertion AUC (higher=better)", "insertion_auc", "{:.3f}"),
)


def format_table(result: EvaluationResult) -> str:
    """The strategies' metrics side by side (``-`` where not applicable), with a header."""
    names = [s.name for s in result.strategies]
    label_w = max(len(r[0]) for r in _ROWS) + 2
    col_w = max(9, *(len(n) + 2 for n in names))
    lines = [
        f"validation: {result.num_val} samples, accuracy {result.accuracy:.3f}, "
        f"{result.num_mistakes} mistakes; {result.num_queries} explained by every strategy "
        f"(seed {result.seed})",
        f"reference bank: {result.bank_size} maps; feature grid {result.grid[0]}x{result.grid[1]}; "
        f"part labels: {result.label_source or 'none'}",
    ]
    if not math.isnan(result.distinguishing_cell_share):
        lines.append(f"cells carrying a distinguishing part (per-cell chance): "
                     f"{result.distinguishing_cell_share:.3f}")
    lines.append("")
    lines.append("metric".ljust(label_w) + "".join(n.rjust(col_w) for n in names))
    lines.append("-" * (label_w + col_w * len(names)))
    for label, attr, fmt in _ROWS:
        cells = []
        for s in result.strategies:
            value = attr(s) if callable(attr) else getattr(s, attr)
            if fmt in ("rate", "count"):
                text = "-" if not value or not value.total else (
                    f"{value.hits}/{value.total}" if fmt == "count" else f"{value.value:.3f}")
            else:
                text = "-" if isinstance(value, float) and math.isnan(value) else fmt.format(value)
            cells.append(text.rjust(col_w))
        lines.append(label.ljust(label_w) + "".join(cells))
    if result.ceiling is not None:
        lines.append(f"\nceiling: the separating part's cells alone (from the masks), swapped with "
                     f"the same part of the best reference, flip {result.ceiling}")
    if result.cause_counts:
        lines.append("causes (each mistake drawn again with the separating trait exact / without "
                     "the blobs and the leaf): " + ", ".join(
                         f"{k} {result.cause_counts[k]}" for k in CAUSES))
    return "\n".join(lines)


def _pooled(rates: dict, keys: Sequence[str]) -> Optional[Rate]:
    found = [rates[k] for k in keys if k in rates]
    return Rate(sum(r.hits for r in found), sum(r.total for r in found)) if found else None


# ---------------------------------------------------------------------- CLI glue
def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to an ``argparse`` subparsers object and return it.

    ``fgvce evaluate --checkpoint PATH [--data synthetic] [--num-val N] [--max-queries N]
    [--seed S]``; its handler is :func:`run_evaluate` (also set as ``handler`` default).
    """
    parser = subparsers.add_parser(
        "evaluate", help="compare FG-VCE with greedy / Grad-CAM / random swaps on a checkpoint",
        description="Load a DemoClassifier checkpoint, explain its validation mistakes on "
                    "SyntheticBirds with every strategy and print the metrics side by side.")
    parser.add_argument("--checkpoint", required=True, help="path of a DemoClassifier .ckpt")
    parser.add_argument("--data", choices=("synthetic",), default="synthetic",
                        help="validation data (default: synthetic, the demo's SyntheticBirds)")
    from ._argtypes import positive_int as _positive

    parser.add_argument("--num-val", type=_positive, default=500,
                        help="validation images (default: 500, as the demo)")
    parser.add_argument("--max-queries", type=_positive, default=64,
                        help="mistakes explained by every strategy (default: 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="data and search seed (default: 0, the demo's)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated subset of {','.join(STRATEGIES)}")
    parser.set_defaults(handler=run_evaluate)
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``fgvce evaluate``: print the table and return the exit code (0 ok, 2 bad input)."""
    import sys
    from pathlib import Path

    from torch.utils.data import DataLoader

    from .datasets.synthetic import SyntheticBirds
    from .demo import DemoClassifier

    path = Path(args.checkpoint)
    if not path.is_file():
        print(f"fgvce evaluate: expected --checkpoint to be a DemoClassifier checkpoint file, but "
              f"{str(path)!r} does not exist.", file=sys.stderr)
        return 2
    strategies = tuple(s.strip() for s in str(getattr(args, "strategies", ",".join(STRATEGIES)))
                       .split(",") if s.strip())
    if not strategies or any(s not in STRATEGIES for s in strategies):
        print(f"fgvce evaluate: expected --strategies from {STRATEGIES}, but got {strategies}.",
              file=sys.stderr)
        return 2
    device = getattr(args, "device", "cpu")
    module = DemoClassifier.load_from_checkpoint(str(path), map_location=device)
    module.eval()
    num_classes = int(module.hparams.num_classes)
    # the demo's validation set: make_dataloaders(num_val, seed=seed, batch_size=16, num_classes)
    val = SyntheticBirds(args.num_val, num_classes=num_classes, seed=args.seed, split="val")
    loader = DataLoader(val, batch_size=16, shuffle=False)
    result = evaluate_model(module, loader, max_queries=args.max_queries, seed=args.seed,
                            device=device, strategies=strategies)
    print(f"fgvce evaluate: {path} on SyntheticBirds val ({args.num_val} images, seed {args.seed})")
    print(format_table(result))
    return 0

"""One evaluation run's explanation, the same whether it runs on the training thread or on the
background thread: :func:`explain_run`.

Per run: :func:`fit_prototypes` once (rank 0 refits the discovered parts; DDP broadcast), then per
dataloader :func:`search_local` → :func:`make_samples` → :func:`gather` (DDP) →
:func:`build_result`. Under DDP exactly ``1 + num_loaders`` collectives run per explained run on
every rank, whatever happened locally: local failures are caught and recorded before them, so
ranks never wait on each other forever. The :class:`~fgvce_lightning.monitor.schedule.Deadline`
bounds the search (checked between chunks of queries) and skips what is left when it expires.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from ..engine._util import preserved_rng_state, preserved_training_flags
from ..engine.bank import ReferenceBank
from ..engine.results import Explanation
from ..engine.search import SearchConfig
from ..parts import PartInfo, PartPrototypes, assign_parts, compute_epoch_stats
from ..reporting.epoch import EpochResult, ExplainedSample
from .batches import pictures
from .collector import Collector
from .config import MonitorConfig
from .schedule import Deadline, RunInfo

__all__ = ["ExplainContext", "LocalResult", "explain_run", "fit_prototypes", "search_local",
           "make_samples", "gather", "build_result", "warn_failure"]

_PROTOTYPE_CELLS = 8192   # most bank feature maps' cells the part prototypes are fitted on per run


@dataclass
class ExplainContext:
    """What every step reads: the options, the search's configuration (with the split's
    protected channels) and the discovered part prototypes (shared with a background job under
    ``lock``)."""

    config: MonitorConfig
    search: SearchConfig
    prototypes: PartPrototypes
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class LocalResult:
    """What one rank found for one dataloader: explanations of its kept mistakes (search order)
    and its failures."""

    explanations: list[Explanation] = field(default_factory=list)
    num_misclassified: int = 0
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    budget_hit: bool = False


def warn_failure(failures: list[str], what: str, err: BaseException) -> None:
    """Warn about a failed step (training continues) and record it for the report."""
    message = f"{what} failed: {type(err).__name__}: {err}"
    warnings.warn(f"CounterfactualMonitor: {message} (training continues; counted in the report).",
                  RuntimeWarning, stacklevel=3)
    failures.append(message)


def _search_fn(strategy: str) -> Callable:
    if strategy == "greedy":
        from ..engine.greedy import greedy_search
        return greedy_search
    from ..engine.search import counterfactual_search
    return counterfactual_search


@contextlib.contextmanager
def _preserved_grads(module: torch.nn.Module) -> Iterator[None]:
    """Restore every parameter's ``.grad`` object (and ``requires_grad``) afterwards."""
    saved = [(p, p.grad, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, grad, requires in saved:
            p.grad = grad
            p.requires_grad_(requires)


def search_local(ctx: ExplainContext, collector: Optional[Collector], run: RunInfo,
                 module: torch.nn.Module, head: Callable[[torch.Tensor], torch.Tensor],
                 deadline: Deadline) -> LocalResult:
    """Explain this rank's kept mistakes of one dataloader in chunks of ``explain_batch_size``,
    stopping when the ``deadline`` expires. Never raises.

    Args:
        head: ``(N, C, H, W) -> (N, K)`` float32 logits (the precision already applied).
        module: the model ``head`` belongs to (its training flags and gradients are restored).
    """
    if collector is None:
        return LocalResult()
    out = LocalResult(num_misclassified=collector.num_misclassified,
                      failures=list(collector.failures))
    store = collector.stores
    if store.mistakes.size == 0:
        return out
    start = time.perf_counter()
    config = ctx.config
    try:
        device = store.bank.device
        queries = store.mistakes.get("features")
        true, pred = store.mistakes.get("true"), store.mistakes.get("pred")
        generator = torch.Generator(device=device).manual_seed(config.seed + run.current_epoch)
        search = _search_fn(config.strategy)
        n, step = queries.shape[0], config.explain_batch_size
        labels = store.mistakes.get("parts") if config.strategy == "fgvce" else None
        with preserved_training_flags(module), preserved_rng_state([device]), \
                _preserved_grads(module), torch.no_grad():
            for offset in range(0, n, step):
                if offset > 0 and deadline.expired():
                    out.budget_hit = True
                    break
                q = queries[offset:offset + step].to(store.feature_dtype)
                t, p = true[offset:offset + step].to(device), pred[offset:offset + step].to(device)
                kwargs = {}
                if labels is not None:   # annotated parts restrict the correspondence
                    kwargs = {"query_parts": labels[offset:offset + step].to(device),
                              "reference_parts": lambda key: store.extras.lookup_id("parts", key)}
                explanations = search(head, q, t, p, store.bank, ctx.search, generator=generator,
                                      modules=(module,), **kwargs)
                out.explanations.extend(dataclasses.replace(e, query_index=offset + e.query_index)
                                        for e in explanations)
    except Exception as err:  # noqa: BLE001 - an explanation failure never stops training
        warn_failure(out.failures, f"explaining {store.mistakes.size} mistakes", err)
        out.explanations = []
    out.elapsed_s = time.perf_counter() - start
    return out


def part_channels(search: SearchConfig, maps: torch.Tensor) -> torch.Tensor:
    """The channels that describe a cell: without a transformer's prefix (class-token) channels,
    which are the same in every cell of an image and would make prototypes cluster by image."""
    protected = search.protected_channels
    return (maps[:, :maps.shape[1] - protected] if protected else maps).float()


def _prototype_cells(search: SearchConfig, bank: ReferenceBank) -> torch.Tensor:
    """A class-balanced sample of the bank's feature maps for fitting the prototypes."""
    c, h, w = bank.feature_shape
    per_class = max(1, math.ceil(_PROTOTYPE_CELLS / (h * w) / bank.num_classes))
    maps = [bank.get(k)[0][:per_class] for k in range(bank.num_classes)]
    return part_channels(search, torch.cat(maps))


def fit_prototypes(ctx: ExplainContext, collectors: Mapping[int, Collector], run: RunInfo,
                   failures: list[str], notes: list[str], deadline: Deadline) -> None:
    """Rank 0 refits the part prototypes on the bank of the first dataloader that uses them
    (unless the ``deadline`` has expired: then last run's are kept, noted); all ranks then share
    rank 0's prototypes (one broadcast under DDP, whatever the part source)."""
    protos = ctx.prototypes
    store = next((c.stores for _, c in sorted(collectors.items())
                  if c.stores.part_source == "prototypes"), None)
    if run.is_global_zero and store is not None:
        try:
            if deadline.expired():
                notes.append(f"the part prototypes were not refitted: {deadline.why()}")
            else:
                with preserved_rng_state([store.bank.device]), ctx.lock:
                    protos.update(_prototype_cells(ctx.search, store.bank))
        except Exception as err:  # noqa: BLE001
            warn_failure(failures, "fitting the part prototypes", err)
    if run.world_size > 1:
        state = protos.state_dict() if run.is_global_zero else None
        state = run.strategy.broadcast(state, src=0)
        if not run.is_global_zero and state is not None:
            try:
                protos.load_state_dict(state)
            except Exception as err:  # noqa: BLE001
                warn_failure(failures, "loading rank 0's part prototypes", err)


def parts_of(ctx: ExplainContext, collector: Collector) -> tuple[PartInfo, ...]:
    """The parts of a dataloader's explanations: annotated ones, or the discovered prototypes."""
    store = collector.stores
    if store.part_source in ("keypoints", "masks"):
        names = ctx.config.part_names or [f"part {k}" for k in range(store.num_annotated)]
        return tuple(PartInfo(id=k, name=n, source=store.part_source) for k, n in enumerate(names))
    if store.part_source == "prototypes" and ctx.prototypes.fitted:
        return ctx.prototypes.parts()
    return ()


def _prototype_reference_labels(ctx: ExplainContext, collector: Collector,
                                exps: list[Explanation]) -> dict[tuple, torch.Tensor]:
    """Part-id maps of every reference an edit used, keyed by reference id."""
    out: dict[tuple, torch.Tensor] = {}
    by_class: dict[int, torch.Tensor] = {}
    for exp in exps:
        for e in exp.edits:
            if e.reference_slot < 0 or tuple(e.reference_id) in out:
                continue
            if exp.true not in by_class:
                by_class[exp.true] = collector.stores.bank.get(exp.true)[0]
            maps = by_class[exp.true]
            if e.reference_slot < maps.shape[0]:
                out[tuple(e.reference_id)] = ctx.prototypes.assign(part_channels(
                    ctx.search, maps[e.reference_slot:e.reference_slot + 1]))[0].cpu()
    return out


def make_samples(ctx: ExplainContext, collector: Optional[Collector], run: RunInfo,
                 local: LocalResult) -> tuple[list[ExplainedSample], tuple[PartInfo, ...]]:
    """Attach query ids, thumbnails, reference thumbnails and part names. Never raises."""
    if collector is None:
        return [], ()
    if not local.explanations:
        return [], parts_of(ctx, collector)
    store, exps = collector.stores, local.explanations
    ids, thumbs = store.mistakes.get("ids"), store.mistakes.get("thumb")
    parts: tuple[PartInfo, ...] = ()
    assignments = None
    try:
        with ctx.lock:
            parts = parts_of(ctx, collector)
            names = [p.name for p in parts]
            if parts and store.part_source == "prototypes":
                query_labels = ctx.prototypes.assign(
                    part_channels(ctx.search, store.mistakes.get("features"))).cpu()
                reference_labels: Any = _prototype_reference_labels(ctx, collector, exps)
            elif parts:
                query_labels = store.mistakes.get("parts")
                reference_labels = lambda key: store.extras.lookup_id("parts", key)  # noqa: E731
            if parts:
                assignments = assign_parts(exps, names, query_labels, reference_labels)
    except Exception as err:  # noqa: BLE001
        warn_failure(local.failures, "labelling the edited cells with parts", err)
        assignments, parts = None, ()
    samples = []
    for k, exp in enumerate(exps):
        refs = tuple(_picture(store.extras.lookup_id("thumb", e.reference_id)) for e in exp.edits)
        a = assignments[k] if assignments is not None else None
        samples.append(ExplainedSample(
            explanation=exp, query_id=tuple(int(v) for v in ids[exp.query_index].tolist()),
            thumbnail=_picture(thumbs[exp.query_index]) if thumbs is not None else None,
            reference_thumbnails=refs,
            edit_parts=a.edit_parts if a is not None else (),
            reference_parts=a.reference_parts if a is not None else (),
            cell_parts=a.cell_parts if a is not None else None,
            consistent_cells=a.consistent_cells if a is not None else (),
            judged_cells=a.judged_cells if a is not None else (),
            rank=int(run.global_rank)))
    return samples, parts


def _picture(thumb: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A kept float16 thumbnail as the ``uint8`` picture the reports draw (``None`` stays)."""
    return None if thumb is None else pictures(thumb)


def gather(run: RunInfo, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's payload (one ``all_gather_object`` under DDP; ``[payload]`` otherwise)."""
    if run.world_size <= 1 or not torch.distributed.is_available() \
            or not torch.distributed.is_initialized():
        return [payload]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, payload)
    return [p for p in out if p is not None]


def _payload(collector: Optional[Collector], run: RunInfo, local: LocalResult,
             samples: list[ExplainedSample], parts: tuple[PartInfo, ...]) -> dict[str, Any]:
    """The picklable per-rank record that :func:`gather` exchanges."""
    store = None if collector is None else collector.stores
    return {"rank": int(run.global_rank), "samples": samples, "parts": parts,
            "num_misclassified": local.num_misclassified, "failures": list(local.failures),
            "skipped": [] if collector is None else list(collector.skipped),
            "elapsed_s": local.elapsed_s, "budget_hit": local.budget_hit,
            "grid": None if store is None else tuple(store.bank.feature_shape[1:]),
            "input_size": None if store is None else tuple(store.input_size)}


def build_result(ctx: ExplainContext, run: RunInfo, payloads: list[dict[str, Any]],
                 dataloader_idx: int = 0, notes: tuple[str, ...] = (),
                 stopped: str = "the time budget was spent") -> EpochResult:
    """Merge the ranks' payloads into the run's :class:`EpochResult` (statistics included);
    ``stopped`` says why a rank's search stopped early, if one did."""
    samples = [s for p in payloads for s in p["samples"]]
    many = len(payloads) > 1
    failures = [f"rank {p['rank']}: {f}" if many else f for p in payloads for f in p["failures"]]
    parts = next((p["parts"] for p in payloads if p["parts"]), ())
    num_misclassified = sum(int(p["num_misclassified"]) for p in payloads)
    try:
        stats = compute_epoch_stats(samples, parts, num_misclassified)
    except Exception as err:  # noqa: BLE001
        warn_failure(failures, "computing the part statistics", err)
        stats = compute_epoch_stats(samples, (), num_misclassified)
    shaped = next((p for p in payloads if p.get("grid")), None)  # a rank may have seen no batch
    skipped = sorted({tuple(s) for p in payloads for s in p["skipped"]})
    if any(p["budget_hit"] for p in payloads):
        notes = (*notes, f"not every kept mistake was explained: {stopped}")
    return EpochResult(epoch=int(run.current_epoch), global_step=int(run.global_step),
                       feature_grid=tuple(shaped["grid"]) if shaped else (1, 1),
                       input_size=tuple(shaped["input_size"]) if shaped else (1, 1),
                       samples=tuple(samples), stats=stats, class_names=ctx.config.class_names,
                       failures=tuple(failures),
                       elapsed_s=max((float(p["elapsed_s"]) for p in payloads), default=0.0),
                       method=ctx.config.strategy, stage=run.stage,
                       dataloader_idx=int(dataloader_idx), skipped_batches=tuple(skipped),
                       notes=tuple(notes))


def explain_run(ctx: ExplainContext, collectors: Mapping[int, Collector], run: RunInfo,
                module: torch.nn.Module, heads: Mapping[int, Callable[[torch.Tensor], torch.Tensor]],
                deadline: Deadline, notes: tuple[str, ...] = ()) -> list[EpochResult]:
    """Explain every dataloader of one evaluation run; one :class:`EpochResult` per dataloader
    (``range(run.num_loaders)``, also those this rank has no batch of). Never raises.

    Args:
        collectors: the run's collections by dataloader (stored: every set is in the stores).
        module: the model the heads belong to.
        heads: per dataloader, the head as the search calls it
            (:meth:`~fgvce_lightning.monitor.capture.HeadPrecision.head`).
        deadline: the run's time budget and stop request.
        notes: for the first dataloader's report (e.g. earlier explanations that were lost).
    """
    failures: list[str] = []
    run_notes = list(notes)
    fit_prototypes(ctx, collectors, run, failures, run_notes, deadline)
    results = []
    for dl in range(run.num_loaders):
        collector = collectors.get(dl)
        local = LocalResult()
        if collector is not None and dl in heads:
            local = search_local(ctx, collector, run, module, heads[dl], deadline)
        elif collector is not None:
            local = LocalResult(num_misclassified=collector.num_misclassified,
                                failures=list(collector.failures))
        if dl == 0:
            local.failures[:0] = failures
        samples, parts = make_samples(ctx, collector, run, local)
        payloads = gather(run, _payload(collector, run, local, samples, parts))
        results.append(build_result(ctx, run, payloads, dl, tuple(run_notes) if dl == 0 else (),
                                    stopped=deadline.why()))
    return results

"""Where and when an evaluation run is explained: here, or on a background thread.

:func:`explain_and_publish` is the one implementation of an explained run's steps (store the sets
still waiting, :func:`~fgvce_lightning.monitor.explain.explain_run`, then rank 0 publishes), used
as it is by the synchronous path (on the training thread, with DDP's collectives) and by the
background path (a :class:`~fgvce_lightning.monitor.threads.BackgroundJob` against a frozen copy
of the model, single process). :class:`Runner` picks the model the head is evaluated on, starts
and finishes the background job, and stops it early on an interrupt.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..engine._util import global_rng_left_alone, preserved_rng_state, preserved_training_flags
from ..engine.split import ModelSplit
from ..reporting.epoch import EpochResult
from .capture import HeadPrecision
from .collector import Collector
from .explain import ExplainContext, explain_run
from .pending import BatchSet
from .publish import Publisher
from .schedule import Deadline, RunInfo
from .threads import BackgroundJob, FrozenModel

__all__ = ["Outcome", "explain_and_publish", "Runner"]


@dataclass(frozen=True)
class Outcome:
    """An explained run: per dataloader, its result and report directory (``None``: not written,
    or not rank 0), and the wall time of the whole explanation."""

    run: RunInfo
    results: tuple[tuple[EpochResult, Optional[Path]], ...]
    elapsed_s: float


def explain_and_publish(ctx: ExplainContext, collectors: Mapping[int, Collector],
                        held: Mapping[int, Sequence[BatchSet]], run: RunInfo,
                        module: torch.nn.Module, split: ModelSplit, precision: HeadPrecision,
                        publisher: Optional[Publisher], stop: Optional[threading.Event] = None,
                        notes: tuple[str, ...] = ()) -> Outcome:
    """One explained run, wherever it runs: the sets still waiting are stored (in order), every
    dataloader is explained, and rank 0 writes the reports and panels. ``time_budget_s`` counts
    from after the storing; ``stop`` ends it early, keeping what is finished. Never raises."""
    for dl, sets in held.items():
        collectors[dl].store_sets(sets)
    deadline = Deadline(ctx.config.time_budget_s, stop)
    heads = {dl: precision.head(split.head, c.stores.feature_dtype) for dl, c in collectors.items()}
    results = explain_run(ctx, collectors, run, module, heads, deadline, notes)
    if publisher is None or not run.is_global_zero:
        return Outcome(run, tuple((r, None) for r in results), deadline.elapsed())
    strips = next((dl for dl, c in sorted(collectors.items())
                   if c.stores.part_source == "prototypes"), None)
    published = tuple(publisher.publish(r, run, ctx, collectors.get(r.dataloader_idx), deadline,
                                        strips=r.dataloader_idx == strips) for r in results)
    return Outcome(run, published, deadline.elapsed())


class Runner:
    """Runs the explained runs of one monitor.

    Args:
        split_options: how the live model was split (for the frozen copy).
        background: ``"auto"``, ``True`` or ``False`` (see ``CounterfactualMonitor``).
        head_precision: ``"model"`` or ``"float32"``.
        low_priority, switch_interval_s: passed to :class:`BackgroundJob`.
    """

    def __init__(self, split_options: dict[str, Any], background: Any = "auto",
                 head_precision: str = "model", low_priority: bool = True,
                 switch_interval_s: Optional[float] = None) -> None:
        self.split_options = split_options
        self.background = background
        self.float32 = head_precision == "float32"
        self.low_priority = low_priority
        self.switch_interval_s = switch_interval_s
        self.job: Optional[BackgroundJob] = None
        self.job_run: Optional[RunInfo] = None
        self.frozen: Optional[FrozenModel] = None
        self.frozen_error: Optional[str] = None     # why no copy could be made (then synchronous)
        self.last_background_s: Optional[float] = None

    def reset(self) -> None:
        """A new model: forget the copy and why there was none."""
        self.frozen, self.frozen_error = None, None

    # ------------------------------------------------------------------ the model
    def wants_background(self, fitting: bool, world_size: int,
                         global_dtype: Optional[str] = None) -> bool:
        """Whether this run is to be explained in the background (:meth:`model_for` may still
        fall back to the synchronous path): never under DDP (the collectives must stay on the
        training thread) nor under a precision that sets torch's default dtype (``global_dtype``:
        ``"bf16-true"``, ``"16-true"``, ``"64-true"``)."""
        if self.background is not False and fitting and self.frozen_error is None:
            why = ("under DDP the explanation runs synchronously (its collectives must stay on "
                   "the training thread)" if world_size > 1 else
                   f"with precision={global_dtype!r} the explanation runs synchronously (Lightning "
                   "sets torch's process-wide default dtype during every forward)"
                   if global_dtype else None)
            if why is not None:
                self.frozen_error = why
                if self.background is True:
                    warnings.warn(f"CounterfactualMonitor(background=True): {why}.",
                                  RuntimeWarning, stacklevel=3)
        return (self.background is not False and fitting and world_size == 1
                and self.frozen_error is None)

    def model_for(self, pl_module: torch.nn.Module, split: ModelSplit, background: bool,
                  precision: HeadPrecision, probe: Callable[[], Optional[torch.Tensor]]
                  ) -> tuple[torch.nn.Module, ModelSplit, bool]:
        """The model the search evaluates: ``(module, split, in_background)``. A frozen copy in
        the background, or a float32 copy for ``head_precision="float32"`` when the model is not
        float32; else the live model. ``probe()`` gives two feature maps to check a copy on."""
        needs_cast = self.float32 and any(
            t.is_floating_point() and t.dtype != torch.float32
            for t in (*pl_module.parameters(), *pl_module.buffers()))
        if not (background or needs_cast):
            return pl_module, split, False
        frozen = self._frozen(pl_module, split, precision, probe, background,
                              torch.float32 if self.float32 else None)
        if frozen is None:
            return pl_module, split, False
        return frozen.module, frozen.split, background

    def _frozen(self, pl_module: torch.nn.Module, split: ModelSplit, precision: HeadPrecision,
                probe: Callable[[], Optional[torch.Tensor]], background: bool,
                dtype: Optional[torch.dtype]) -> Optional[FrozenModel]:
        if self.frozen is not None and self.frozen.dtype == dtype and self.frozen.refresh():
            return self.frozen
        try:
            with preserved_rng_state([pl_module.device]):   # splitting may run a probe forward
                frozen = FrozenModel(pl_module, self.split_options, split, dtype=dtype)
            feats = probe()
            if feats is not None:
                _check_copy(frozen, split, pl_module, precision, feats)
        except Exception as err:  # noqa: BLE001 - fall back to the live model, say why once
            self.frozen_error = f"{type(err).__name__}: {err}"
            self.frozen = None
            message = (f"CounterfactualMonitor: explaining synchronously at the end of each "
                       f"validation epoch, not in the background: {err}." if background else
                       f"CounterfactualMonitor(head_precision='float32'): evaluating the live "
                       f"head, not a float32 copy of it: {err}.")
            if self.background is True or self.float32:
                warnings.warn(message, RuntimeWarning, stacklevel=4)
            else:
                from lightning.pytorch.utilities import rank_zero_info
                rank_zero_info(message)
            return None
        self.frozen = frozen
        return frozen

    # ------------------------------------------------------------------ the background job
    def start(self, body: Callable[[threading.Event], Outcome], run: RunInfo,
              device: Optional[torch.device]) -> None:
        """Run ``body(stop)`` on a background thread (nothing it does touches the global RNG)."""
        def work(stop: threading.Event) -> Outcome:
            with global_rng_left_alone():
                return body(stop)

        self.job = BackgroundJob(work, device=device, low_priority=self.low_priority,
                                 switch_interval_s=self.switch_interval_s)
        self.job_run = run

    @property
    def running(self) -> bool:
        return self.job is not None

    def done(self) -> bool:
        return self.job is not None and self.job.done()

    def finish(self, timeout: Optional[float] = None, cancel: bool = False
               ) -> tuple[Optional[RunInfo], Any]:
        """Wait for the background job (at most ``timeout`` s; ``cancel``: ask it to stop first,
        keeping what it finished): ``(its run, its Outcome, an exception, or None if it did not
        end in time)``; ``(None, None)`` when there is no job."""
        job, run = self.job, self.job_run
        self.job, self.job_run = None, None
        if job is None:
            return None, None
        if cancel:
            job.cancel()
        out = job.wait(timeout)
        if isinstance(out, Outcome):
            self.last_background_s = out.elapsed_s
        return run, out


def _check_copy(frozen: FrozenModel, split: ModelSplit, pl_module: torch.nn.Module,
                precision: HeadPrecision, feats: torch.Tensor) -> None:
    """Raise unless the copy's head gives the live head's logits on ``feats`` (within the
    precision of the two dtypes)."""
    live_head = precision.as_model().head(split.head, feats.dtype)
    mine_head = precision.head(frozen.split.head, feats.dtype)
    with torch.inference_mode(False), torch.no_grad(), preserved_rng_state([feats.device]), \
            preserved_training_flags(pl_module):
        live = live_head(feats)
        mine = mine_head(feats)
    tol = 1e-5 if frozen.dtype is None else 2e-2 * float(live.abs().max().clamp_min(1.0))
    if not (isinstance(mine, torch.Tensor) and mine.shape == live.shape
            and torch.allclose(mine, live, rtol=1e-4 if frozen.dtype is None else 2e-2, atol=tol)):
        raise ValueError("the copied model's head does not reproduce the live head's logits")

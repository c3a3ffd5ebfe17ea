"""``CounterfactualMonitor``: explain the validation mistakes of a training run, part by part.

A thin adapter of Lightning's hooks onto the monitor's steps: :mod:`.capture` (hooks, batches,
precision) → :mod:`.collector` / :mod:`.stores` (bank, reservoir) → :mod:`.runner` (here or in the
background; :mod:`.explain` is the same for both) → :mod:`.publish` (scalars, panels, reports);
:mod:`.state` is what goes into checkpoints. See ``docs/monitor.md`` for why it is built this way.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from ..engine.search import SearchConfig
from ..parts import PartPrototypes
from .checks import dry_check, split_for
from .config import Mechanisms, MonitorConfig, check_seed, make_search_config
from .explain import ExplainContext
from .runner import Outcome, Runner, explain_and_publish
from .schedule import RunInfo, explains
from .session import Session
from .state import MonitorState, take_lost, unmark_lost

__all__ = ["CounterfactualMonitor"]

#: seconds an interrupted run waits for a background explanation to write what it has finished
INTERRUPT_WAIT_S = 30.0


class CounterfactualMonitor(Callback):
    r"""Explain the model's validation mistakes with fine-grained counterfactuals while it trains.

    What runs when: during every explained validation epoch, the user's own ``validation_step``
    runs untouched while forward hooks capture the split point's feature maps and the logits;
    correct samples fill a per-class reference bank, mistakes a reservoir. At the epoch's end up
    to ``max_samples`` mistakes per dataloader are explained, their edited cells labelled with
    parts, and the statistics logged and written to ``<report_dir>/epoch_<NNN>/``. While fitting
    on one process the explanation runs on a background thread against a frozen copy of the
    model, so the next training epoch starts at once.

    Args:
        layer: name of the split layer (``features`` = everything up to and including it), passed to
            :func:`~fgvce_lightning.engine.split.split_model`; ``None`` = automatic.
        features: explicit ``x -> F`` callable (with ``head``).
        head: explicit ``F -> logits`` callable (with ``features``).
        num_classes: number of classes; ``None`` = inferred from the head's logits.
        every_n_epochs: explain the validation runs ``0, n, 2n, ...`` of a fit (counted as runs,
            so it composes with ``check_val_every_n_epoch`` and ``val_check_interval``).
        max_samples: most mistakes explained per run and dataloader (all processes together).
        time_budget_s: seconds one explanation may take, search, parts and drawing included
            (checked between chunks of ``explain_batch_size`` queries and between drawings;
            ``report.json`` is always written; what was cut is noted in it); ``None`` = no limit.
        memory_budget_mb: memory for the reference bank, the mistake reservoir, their thumbnails
            and part labels and the validation batches waiting to be stored (two sets of 1/16 of
            it, at most 32 MiB each, at least one batch), shared equally by the dataloaders. The
            per-class bank size follows from it, capped at ``max_references_per_class``; from
            the second epoch on the bank's slots go to the classes that occurred. ``None``
            (default): 3072, which keeps 36 references per class of a 200-class ResNet-50 at
            224 px (8 at 448), or a quarter of the host's available memory when that is less.
        bank_device: ``"host"`` (default): the bank lives in host memory (pinned when training
            on a GPU), the search copies only its queries' true classes to the device;
            ``"model"``: on the model's device (no copies, but GPU memory).
        max_references_per_class: most references kept per class (``None`` = as many as the budget
            allows): the first correctly classified samples of each class in the epoch.
        bank_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` storage of the feature maps.
        thumbnail_size: side in pixels of the thumbnail kept for every kept image.
        report_dir: where reports go; ``None`` = ``<trainer.log_dir>/fgvce``. Created and checked
            (a probe file) in ``setup``.
        report_html: also write ``report.html`` (with figures and pictures; the slow part).
        search: a :class:`~fgvce_lightning.engine.search.SearchConfig`; or give its fields as
            keyword arguments (``window=3``, ``max_edits=8``, ...), not both.
        strategy: ``"fgvce"`` (saliency partition) or ``"greedy"`` (Goyal et al. cell swaps).
        batch_parser: ``batch -> (x, y)`` (or a dict with ``image``/``label`` and optional
            ``keypoints``/``masks``) for batches that are neither a tuple ``(x, y, ...)`` nor such a
            dict.
        part_source: ``"auto"`` (keypoints, else masks from the batch dict, else discovered
            prototypes), ``"keypoints"``, ``"masks"``, ``"prototypes"`` or ``"none"``.
        part_names: names of the annotated parts (by index) or of the prototypes.
        num_parts: number of discovered part prototypes.
        class_names: class names for the reports (one per logit).
        log_images: number of explained samples drawn to TensorBoard per run and dataloader.
        explain_batch_size: queries searched together.
        seed: seed of the monitor's own random generators (the global RNG is never used).
        prefix: prefix of the logged scalar tags.
        background: ``"auto"`` (default) or ``True``: while fitting on one process, explain on a
            background thread against a frozen copy of the model (one copy of the weights);
            ``False``: explain at the end of the validation epoch. Under DDP, in
            ``trainer.validate``/``test`` and with an explicit ``head`` callable that is not an
            ``nn.Module``, the explanation runs synchronously.
        head_precision: ``"model"`` (default): the search evaluates the head as the model runs
            it (under the trainer's autocast for ``16-mixed``/``bf16-mixed``; on maps in the
            features' dtype for ``*-true``); ``"float32"``: on a float32 copy of the head, without
            autocast.
        explain_test: also explain ``trainer.test``'s mistakes into ``<report_dir>/test_<NNN>/``
            (off by default: ``test`` is often a final measurement that should not take longer).
        switch_interval_s: opt-in: while the monitor's threads work, set Python's (process-wide)
            thread switch interval to this (e.g. ``2e-4``; restored afterwards) so the training
            thread waits less for the GIL. ``None`` (default): never changed.
        **search_options: :class:`SearchConfig` fields.

    Logged scalars (through ``log_metrics`` of every logger; ``P`` = ``prefix``, ``P/test`` for
    a test run, ``/dataloader_<k>`` appended for a second or later dataloader):
    ``P/flip_rate``, ``P/mean_edits``, ``P/explained``, ``P/misclassified``, ``P/skipped``,
    ``P/explained_fraction``, ``P/semantic_consistency``, ``P/failures``, ``P/skipped_batches``,
    ``P/explain_time_s``, ``P/part_error_share/<part>``, ``P/part_contribution_share/<part>``. A
    ``TensorBoardLogger`` also gets images, figures, text, part strips and a custom-scalars layout.

    The model, its training flags, the global RNG and the optimizer are left exactly as they were:
    a seeded run trains to identical weights with and without the monitor. A failure while
    explaining, or a batch that cannot be collected, is warned about and reported; it never stops
    training. Under DDP every process explains its own share, statistics are gathered and rank 0
    writes. ``state_dict`` keeps the counters, the histories and the part prototypes.
    """

    def __init__(self, *, layer: Optional[str] = None, features: Optional[Callable] = None,
                 head: Optional[Callable] = None, num_classes: Optional[int] = None,
                 every_n_epochs: int = 1, max_samples: int = 64, time_budget_s: Optional[float] = None,
                 memory_budget_mb: Optional[float] = None,
                 max_references_per_class: Optional[int] = 64,
                 bank_dtype: str | torch.dtype = "float32", bank_device: str = "host",
                 thumbnail_size: int = 64,
                 report_dir: Optional[str | os.PathLike] = None, report_html: bool = True,
                 search: Optional[SearchConfig] = None,
                 strategy: str = "fgvce", batch_parser: Optional[Callable[[Any], Any]] = None,
                 part_source: str = "auto", part_names: Optional[Sequence[str]] = None,
                 num_parts: int = 8, class_names: Optional[Sequence[str]] = None, log_images: int = 8,
                 explain_batch_size: int = 16, seed: int = 0, prefix: str = "fgvce",
                 background: bool | str = "auto", head_precision: str = "model",
                 explain_test: bool = False, switch_interval_s: Optional[float] = None,
                 _mechanisms: Optional[Mechanisms] = None, **search_options: Any) -> None:
        super().__init__()
        check_seed(seed)                   # (before the search's config, which it seeds)
        self.config = MonitorConfig(
            layer=layer, features=features, head=head, num_classes=num_classes,
            every_n_epochs=every_n_epochs, max_samples=max_samples, time_budget_s=time_budget_s,
            memory_budget_mb=memory_budget_mb, max_references_per_class=max_references_per_class,
            bank_dtype=bank_dtype, bank_device=bank_device, thumbnail_size=thumbnail_size,
            report_dir=report_dir,
            report_html=report_html, search=make_search_config(search, search_options,
                                                               num_classes, seed),
            strategy=strategy, batch_parser=batch_parser, part_source=part_source,
            part_names=part_names, num_parts=num_parts, class_names=class_names,
            log_images=log_images, explain_batch_size=explain_batch_size, seed=seed, prefix=prefix,
            background=background, head_precision=head_precision, explain_test=explain_test,
            switch_interval_s=switch_interval_s, mechanisms=_mechanisms or Mechanisms())
        prototypes = PartPrototypes(num_parts=num_parts, seed=seed)
        if self.config.part_names is not None and part_source == "prototypes":
            prototypes.set_names(list(self.config.part_names))
        self._ctx = ExplainContext(self.config, self.config.search, prototypes)
        self._runner = self._new_runner()
        self._session: Optional[Session] = None
        self.state = MonitorState()
        self.last_report: Optional[os.PathLike] = None
        self._said_test = False

    def _new_runner(self) -> Runner:
        c = self.config
        return Runner(c.split_options, c.background, c.head_precision,
                      low_priority=c.mechanisms.low_priority, switch_interval_s=c.switch_interval_s)

    # ------------------------------------------------------------------ what users read
    @property
    def search_config(self) -> SearchConfig:
        """The search's configuration (with the split's protected channels once set up)."""
        return self._ctx.search

    history = property(lambda self: self.state.history, doc="Part statistics by epoch.")
    step_history = property(lambda self: self.state.step_history,
                            doc="Part statistics by global step (every explained validation).")
    summaries = property(lambda self: self.state.summaries, doc="One summary per explained run.")
    last_result = property(lambda self: self.state.last_result, doc="The last explained run.")
    num_explained_epochs = property(lambda self: self.state.num_explained_epochs)
    total_failures = property(lambda self: self.state.total_failures)
    last_background_s = property(lambda self: self._runner.last_background_s,
                                 doc="Wall time of the last background explanation.")

    @property
    def report_root(self) -> Optional[str]:
        """The directory the reports go to (known once ``setup`` ran)."""
        return None if self._session is None else self._session.root

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the stores of every dataloader and the buffers batches wait in."""
        return 0 if self._session is None else self._session.memory_bytes

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.config.prefix, strategy=self.config.strategy)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Split the model, check the split against the search options and create and probe the
        report directory (fails fast on a bad configuration)."""
        self._finish()
        session = self._session
        if session is None or session.owner is not pl_module:
            if session is not None:
                session.release()
            session = self._session = Session(self.config, split_for(pl_module, self.config),
                                              pl_module)
            self._runner.reset()
        prefix = int(getattr(session.split, "prefix_channels", 0) or 0)
        if prefix and self._ctx.search.protected_channels != prefix:
            # a vision transformer's class/register tokens ride along as trailing channels: the
            # search must keep each query's own tokens (never match or swap them)
            self._ctx.search = dataclasses.replace(self._ctx.search, protected_channels=prefix)
        session.open(trainer)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # no sanity check ran (num_sanity_val_steps=0): check the configuration on one batch of
        # the validation loader now, before any training (the first point where the loader and
        # the model on its device, in its precision, are both there)
        session = self._session
        if session is not None and not any(k == "val" for k, _ in session.checked):
            dry_check(trainer, pl_module, self.config, self._ctx.search, session.capture)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._runner.done():            # logged while training goes on
            self._finish()

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._session is not None:
            self._session.release()
        self._finish()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        if self._session is not None:
            self._session.release(timeout=INTERRUPT_WAIT_S)
        # stop the background explanation at its next check: it writes what it has finished
        self._finish(timeout=INTERRUPT_WAIT_S, cancel=True,
                     reason=f"interrupted ({type(exception).__name__}) before it was written")

    # ------------------------------------------------------------------ evaluation epochs
    def _stage(self, trainer: "pl.Trainer", kind: str) -> str:
        if kind == "test":
            return "test"
        return "fit" if trainer.state.fn == TrainerFn.FITTING else "validate"

    def _epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", kind: str) -> None:
        self._finish()                     # the stores are about to be reused
        session = self._session
        if session is None:
            return
        stage = self._stage(trainer, kind)
        explain = False
        if not trainer.sanity_checking:
            explain = explains(stage, self.state.validation_runs, self.config.every_n_epochs,
                               self.config.explain_test)
            if stage == "fit":
                self.state.validation_runs += 1
            if stage == "test" and not explain and not self._said_test:
                self._said_test = True
                rank_zero_info("CounterfactualMonitor: the test mistakes are not explained; pass "
                               "`explain_test=True` to explain them into <report_dir>/test_<NNN>/.")
        world = int(getattr(trainer, "world_size", 1) or 1)
        hold = explain and self._runner.wants_background(stage == "fit", world,
                                                         session.precision.global_dtype)
        session.start_epoch(trainer, pl_module, kind, stage, explain, hold)

    def _epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        session = self._session
        if session is None:
            return
        world = int(getattr(trainer, "world_size", 1) or 1)
        wanted = self._runner.wants_background(session.stage == "fit", world,
                                               session.precision.global_dtype)
        ended = session.end_epoch(trainer, wanted)
        if ended is None:
            return
        run, held = ended
        background = wanted and session.has_work(held)
        module, split, background = self._runner.model_for(
            pl_module, session.split, background, session.search_precision,
            lambda: session.probe(held))
        if not background:
            for dl, sets in held.items():
                session.collectors[dl].store_sets(sets)
            held = {}
        notes = (*self.state.notes, *take_lost(session.root if run.is_global_zero else None))
        self.state.notes = []

        def body(stop: Optional[threading.Event]) -> Outcome:
            return self._explain(run, module, split, held, stop, notes)

        if background:
            store = next(iter(session.collectors.values()), None)
            self._runner.start(body, run, device=None if store is None else store.stores.bank.device)
            return
        with torch.inference_mode(False):
            self._record(body(None))

    def _explain(self, run: RunInfo, module: torch.nn.Module, split: Any, held: dict,
                 stop: Optional[threading.Event] = None, notes: tuple = ()) -> Outcome:
        """One run's explanation (:func:`explain_and_publish`), here or on the background thread."""
        session = self._session
        return explain_and_publish(self._ctx, session.collectors, held, run, module, split,
                                   session.search_precision, session.publisher, stop, notes)

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_start(trainer, pl_module, "test")

    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                  batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._session is not None:
            self._session.batch_start(pl_module, dataloader_idx)

    on_test_batch_start = on_validation_batch_start

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._session is not None:
            self._session.batch_end(trainer, pl_module, batch, batch_idx, dataloader_idx,
                                    self._ctx.search)

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_end(trainer, pl_module)

    on_test_epoch_end = on_validation_epoch_end

    # ------------------------------------------------------------------ results
    def _record(self, outcome: Outcome) -> None:
        """Add an explained run to the state and, on rank 0, log its scalars (training thread)."""
        publisher = self._session.publisher if self._session is not None else None
        path = self.state.record_outcome(outcome, self.config.prefix, publisher)
        if path is not None:
            self.last_report = path

    def _finish(self, timeout: Optional[float] = None, cancel: bool = False,
                reason: str = "it did not finish in time") -> None:
        """Wait for the background explanation and record it (training thread). Never raises."""
        run, out = self._runner.finish(timeout, cancel)
        if run is None:
            return
        root = self._session.root if self._session is not None and run.is_global_zero else None
        if isinstance(out, Outcome):
            self._record(out)
            if root is not None:
                unmark_lost(root, run.report_name())       # (if an interrupt gave up on it)
        else:
            self.state.record_unfinished(run, out, root, f"{reason} ({timeout or 0:.0f} s)")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._runner.done():
            self._finish()                 # a finished background run belongs in the checkpoint
        with self._ctx.lock:
            prototypes = self._ctx.prototypes.state_dict()
        pending = []
        run = self._runner.job_run
        if run is not None and self._session is not None and self._session.root is not None:
            # still being explained: a resumed run reads it back from its report
            pending.append({"epoch": run.current_epoch, "global_step": run.global_step,
                            "name": run.report_name(),
                            "report_root": os.path.abspath(self._session.root)})
        return self.state.state_dict(prototypes, pending)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.load_state_dict(state_dict)
        if state_dict.get("prototypes") is not None:
            with self._ctx.lock:
                self._ctx.prototypes.load_state_dict(state_dict["prototypes"])

    def __getstate__(self) -> dict[str, Any]:
        """Picklable state (``ddp_spawn`` sends the callback to its workers): the session (hooks,
        stores, threads) and the runner stay behind; the part prototypes travel as numpy arrays
        (tensors made here would be shared through file descriptors freed before they are read)."""
        protos = {k: v.numpy() if isinstance(v, torch.Tensor) else v
                  for k, v in self._ctx.prototypes.state_dict().items()}
        state = self.__dict__.copy()
        state.update(_session=None, _runner=None,
                     _ctx=(self._ctx.config, self._ctx.search, protos))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        config, search, protos = state.pop("_ctx")
        self.__dict__.update(state)
        prototypes = PartPrototypes(num_parts=config.num_parts, seed=config.seed)
        prototypes.load_state_dict({k: torch.from_numpy(v) if hasattr(v, "__array__") else v
                                    for k, v in protos.items()})
        self._ctx = ExplainContext(config, search, prototypes)
        self._runner = self._new_runner()

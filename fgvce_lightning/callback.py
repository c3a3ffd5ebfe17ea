"""``CounterfactualMonitor``: explain the validation mistakes of a training run, part by part.

During validation a forward hook on the split point captures the feature maps that the user's own
``validation_step`` computes (no second forward pass); logits come from the head. Correctly
classified samples fill a per-class reference bank (emptied at every validation epoch's start:
the first ones of each class in the epoch are kept), mistakes a reservoir sample. At the end of
every ``every_n_epochs``-th validation epoch the monitor explains up to ``max_samples`` mistakes
with the counterfactual search, labels the edited cells with parts, aggregates per-part error
statistics, logs them and writes an epoch report. While fitting on one process this runs on a
background thread against a frozen copy of the model (``background="auto"``), so training goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from . import _monitor_steps as steps
from . import _background
from ._background import BackgroundJob, FrozenModel, SerialWorker
from .collection import ParsedBatch, parse_batch
from .engine._util import (check_feature_map, global_rng_left_alone, preserved_rng_state,
                           preserved_training_flags)
from .engine.search import SearchConfig
from .engine.split import WRAPPER_ATTRIBUTES, ModelSplit, locate_hook_module, split_model
from .parts import PartHistory, PartPrototypes
from .reporting.epoch import EpochResult

__all__ = ["CounterfactualMonitor"]

_STRATEGIES = ("fgvce", "greedy")
_PART_SOURCES = ("auto", "keypoints", "masks", "prototypes", "none")
_BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STATE_VERSION = 1


def _positive_int(value: Any, name: str, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer{' or None' if allow_none else ''}, "
                         f"but got {value!r}.")
    return value


@contextlib.contextmanager
def _model_call(module: torch.nn.Module) -> Iterator[None]:
    """Run (part of) the user's model during collection: training flags as they are, the global
    RNG restored afterwards (a head with dropout in train mode would draw from it)."""
    with preserved_training_flags(module, eval_mode=False), preserved_rng_state([module.device]):
        yield


class CounterfactualMonitor(Callback):
    r"""Explain the model's validation mistakes with fine-grained counterfactuals while it trains.

    Args:
        layer: name of the split layer (``features`` = everything up to and including it), passed to
            :func:`~fgvce_lightning.engine.split.split_model`; ``None`` = automatic.
        features: explicit ``x -> F`` callable (with ``head``).
        head: explicit ``F -> logits`` callable (with ``features``).
        num_classes: number of classes; ``None`` = inferred from the head's logits.
        every_n_epochs: explain the validation epochs ``0, n, 2n, ...``.
        max_samples: most mistakes explained per epoch (all processes together).
        time_budget_s: stop explaining after this many seconds (checked between chunks of
            ``explain_batch_size`` queries); ``None`` = no limit.
        memory_budget_mb: memory for the reference bank and the mistake buffer (on the model's
            device; thumbnails and part labels, on the CPU, are counted too), and for the
            validation batches waiting to be stored: after the first, batches are copied into
            reusable buffers and stored several at a time (cheaper than one by one), up to 1/16
            of the budget (at most 32 MiB; a larger batch is stored alone; two such buffers
            are kept from epoch to epoch, more while fitting with the background explanation
            and no collection thread, when full sets wait for it in what the capped bank leaves
            of the budget). The per-class bank size follows from it, capped at
            ``max_references_per_class``.
        max_references_per_class: most references kept per class (``None`` = as many as the budget
            allows): the first correctly classified samples of each class in the validation
            epoch (the model does not change during it; later ones are not copied at all). More
            references cost search time, not only memory.
        bank_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` storage of the feature maps.
        thumbnail_size: side in pixels of the thumbnail kept for every kept image (in float16,
            6 bytes a pixel; made ``uint8`` when drawn); smaller images are kept at their own
            size (the pictures are scaled when drawn).
        report_dir: where epoch reports go; ``None`` = ``<trainer.log_dir>/fgvce``.
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
        class_names: class names for the reports.
        log_images: number of explained samples drawn to TensorBoard per epoch.
        explain_batch_size: queries searched together (the time budget is checked between them).
        seed: seed of the monitor's own random generators (the global RNG is never used).
        prefix: prefix of the logged scalar tags.
        background: ``"auto"`` (default) or ``True``: while fitting on one process, explain on a
            background thread (its own CUDA stream on a GPU) against a frozen copy of the model, so
            the next training epoch does not wait for it; the epoch's scalars, history and
            ``last_result`` arrive when the next validation epoch starts (or the fit ends), its
            TensorBoard panels and report as soon as they are ready. Costs one copy of the model's
            weights. ``False``: explain synchronously at the end of the validation epoch. Under DDP,
            in ``trainer.validate`` and with an explicit ``head`` callable that is not an
            ``nn.Module``, the explanation always runs synchronously. Unless ``False``, the
            bookkeeping of the collection (reservoir, bank, thumbnails, part labels) also runs on
            a thread of its own, in batch order, where it has a core to itself (on a GPU, or when
            torch's threads leave a CPU core free).
        **search_options: :class:`SearchConfig` fields.

    Logged scalars (through ``log_metrics`` of every logger; ``P`` = ``prefix``): ``P/flip_rate``,
    ``P/mean_edits``, ``P/explained``, ``P/misclassified``, ``P/skipped``, ``P/explained_fraction``,
    ``P/semantic_consistency``, ``P/failures``, ``P/explain_time_s``, ``P/part_error_share/<part>``,
    ``P/part_contribution_share/<part>``. A ``TensorBoardLogger`` also gets images, figures, text
    and a custom-scalars layout. Reports: ``<report_dir>/epoch_<NNN>/{report.json,report.html,edits.csv}``.

    The model, its training flags, the global RNG and the optimizer are left exactly as they were:
    a seeded run trains to identical weights with and without the monitor. A failure while
    explaining is logged as a warning and counted in the report; it never stops training.
    Under DDP every process explains its own share, statistics are gathered and rank 0 writes.

    ``state_dict`` keeps the epoch counter, the per-epoch history and the part prototypes; not the
    reference bank (hundreds of MB; it is refilled by the next validation epoch anyway). An epoch
    still being explained in the background when a checkpoint is written is not in that
    checkpoint's history (its report is written all the same).
    """

    def __init__(self, *, layer: Optional[str] = None, features: Optional[Callable] = None,
                 head: Optional[Callable] = None, num_classes: Optional[int] = None,
                 every_n_epochs: int = 1, max_samples: int = 64, time_budget_s: Optional[float] = None,
                 memory_budget_mb: float = 512.0, max_references_per_class: Optional[int] = 64,
                 bank_dtype: str | torch.dtype = "float32", thumbnail_size: int = 64,
                 report_dir: Optional[str | os.PathLike] = None, report_html: bool = True,
                 search: Optional[SearchConfig] = None,
                 strategy: str = "fgvce", batch_parser: Optional[Callable[[Any], Any]] = None,
                 part_source: str = "auto", part_names: Optional[Sequence[str]] = None,
                 num_parts: int = 8, class_names: Optional[Sequence[str]] = None, log_images: int = 8,
                 explain_batch_size: int = 16, seed: int = 0, prefix: str = "fgvce",
                 background: bool | str = "auto", **search_options: Any) -> None:
        super().__init__()
        if (features is None) != (head is None):
            raise ValueError("Expected `features` and `head` to be given together (both callables) or "
                             f"not at all, but got features={features!r}, head={head!r}.")
        self.split_options = {"layer": layer, "features": features, "head": head}
        self.num_classes = _positive_int(num_classes, "num_classes", allow_none=True)
        self.every_n_epochs = _positive_int(every_n_epochs, "every_n_epochs")
        self.max_samples = _positive_int(max_samples, "max_samples")
        if time_budget_s is not None and not (isinstance(time_budget_s, (int, float))
                                              and time_budget_s > 0):
            raise ValueError(f"Expected `time_budget_s` to be a positive number of seconds or None, "
                             f"but got {time_budget_s!r}.")
        self.time_budget_s = time_budget_s
        if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) \
                or not memory_budget_mb > 0:
            raise ValueError(f"Expected `memory_budget_mb` to be a positive number, but got "
                             f"{memory_budget_mb!r}.")
        self.memory_budget_mb = float(memory_budget_mb)
        self.max_references_per_class = _positive_int(max_references_per_class,
                                                      "max_references_per_class", allow_none=True)
        if isinstance(bank_dtype, torch.dtype):
            bank_dtype = str(bank_dtype).replace("torch.", "")
        if bank_dtype not in _BANK_DTYPES:
            raise ValueError(f"Expected `bank_dtype` to be one of {list(_BANK_DTYPES)}, but got "
                             f"{bank_dtype!r}.")
        self.bank_dtype = _BANK_DTYPES[bank_dtype]
        self.thumbnail_size = _positive_int(thumbnail_size, "thumbnail_size")
        self.report_dir = None if report_dir is None else os.fspath(report_dir)
        self.report_html = bool(report_html)
        if strategy not in _STRATEGIES:
            raise ValueError(f"Expected `strategy` to be one of {list(_STRATEGIES)}, but got {strategy!r}.")
        self.strategy = strategy
        self.search_config = self._make_search_config(search, search_options, self.num_classes, seed)
        if batch_parser is not None and not callable(batch_parser):
            raise TypeError(f"Expected `batch_parser` to be a callable, but got "
                            f"{type(batch_parser).__name__}.")
        self.batch_parser = batch_parser
        if part_source not in _PART_SOURCES:
            raise ValueError(f"Expected `part_source` to be one of {list(_PART_SOURCES)}, but got "
                             f"{part_source!r}.")
        self.part_source = part_source
        self.part_names = None if part_names is None else [str(n) for n in part_names]
        if self.part_names is not None and len(set(self.part_names)) != len(self.part_names):
            raise ValueError(f"Expected distinct `part_names`, but got {self.part_names}.")
        self.num_parts = _positive_int(num_parts, "num_parts")
        if self.part_names is not None and part_source == "prototypes" and len(self.part_names) != num_parts:
            raise ValueError(f"Expected {num_parts} `part_names` (one per prototype, `num_parts`), "
                             f"but got {len(self.part_names)}.")
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        if isinstance(log_images, bool) or not isinstance(log_images, int) or log_images < 0:
            raise ValueError(f"Expected `log_images` to be a non-negative integer, but got {log_images!r}.")
        self.log_images = log_images
        self.explain_batch_size = _positive_int(explain_batch_size, "explain_batch_size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an integer, but got {seed!r}.")
        self.seed = seed
        if not isinstance(prefix, str) or not prefix or prefix.strip("/") != prefix:
            raise ValueError(f"Expected `prefix` to be a non-empty string without leading or "
                             f"trailing '/', but got {prefix!r}.")
        self.prefix = prefix
        if background not in ("auto", True, False):
            raise ValueError(f"Expected `background` to be 'auto', True or False, but got {background!r}.")
        self.background = background

        # run state (not in the checkpoint except where noted in state_dict)
        self._split: Optional[ModelSplit] = None
        self._split_owner: Optional[torch.nn.Module] = None
        self._report_root: Optional[str] = None
        self._hook_handle: Any = None
        self._captured: Optional[torch.Tensor] = None
        self._logit_handles: list = []
        self._captured_logits: Optional[torch.Tensor] = None
        self._hooked: Optional[tuple] = None   # (split, logit hooks?, module) the hooks are on
        self._armed = False            # between a batch's start and end: the hooks capture
        # None: not yet checked this epoch; True: the model's own output equals head(F), reuse it;
        # False: it does not (another output format, test-time augmentation, ...), recompute
        self._reuse_logits: Optional[bool] = None
        self._fallback_warned = False
        self._locate_tried = False
        self._checked = False          # first batch validated (config errors raise there)
        self._active = False           # collecting in this validation epoch
        self._store: Optional[steps.Stores] = None
        self._reporters: dict[int, Any] = {}
        self.last_report: Optional[os.PathLike] = None
        self._num_misclassified = 0
        self._collect_failures: list[str] = []
        self._job: Optional[BackgroundJob] = None
        self._collector: Optional[SerialWorker] = None    # the collection thread (started lazily)
        self._pending = steps.PendingBatches()   # batches waiting to be stored together
        self._threaded = False         # this epoch's batches are stored on the collection thread
        # sets of waiting batches held, in order, for the background explanation to store
        # (`_hold`: this epoch, while the memory budget has room for them)
        self._held: list[steps.BatchSet] = []
        self._hold = False
        self._job_sets: list[steps.BatchSet] = []   # the held sets handed to the background job
        self._job_run: Optional[steps.RunInfo] = None
        self.last_background_s: Optional[float] = None   # wall time of the last background epoch
        self._frozen: Optional[FrozenModel] = None
        self._frozen_error: Optional[str] = None    # why no frozen copy could be made (then synchronous)
        self._proto_lock = threading.Lock()       # the prototypes, shared with a background job
        self._prototypes = PartPrototypes(num_parts=self.num_parts, seed=seed)
        if self.part_names is not None and part_source == "prototypes":
            self._prototypes.set_names(self.part_names)
        # checkpointed state
        self.history = PartHistory()
        self.summaries: list[dict[str, Any]] = []
        self.num_explained_epochs = 0
        self.total_failures = 0
        self.last_result: Optional[EpochResult] = None

    @staticmethod
    def _make_search_config(search: Optional[SearchConfig], options: Mapping[str, Any],
                            num_classes: Optional[int], seed: int) -> SearchConfig:
        valid = [f.name for f in dataclasses.fields(SearchConfig)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"Expected keyword arguments of CounterfactualMonitor or SearchConfig "
                            f"fields {valid}, but got unknown {unknown}.")
        if search is not None:
            if not isinstance(search, SearchConfig):
                raise TypeError(f"Expected `search` to be a SearchConfig, but got {type(search).__name__}.")
            if options:
                raise ValueError(f"Expected either `search=SearchConfig(...)` or its fields as keyword "
                                 f"arguments, but got both (search and {sorted(options)}).")
            config = search
        else:
            options = dict(options)
            options.setdefault("seed", seed)
            try:
                config = SearchConfig(**options)
            except (TypeError, ValueError) as err:
                raise ValueError(f"Invalid search options {dict(options)}: {err}") from err
        if num_classes is not None and getattr(config, "num_classes", None) is None:
            config = dataclasses.replace(config, num_classes=num_classes)
        return config

    # ------------------------------------------------------------------ lifecycle
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, strategy=self.strategy)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Resolve the model split and the report directory (fails fast on a bad configuration)."""
        self._finish_background()
        if self._split is not None and self._split_owner is pl_module:
            split = self._split            # again (e.g. repeated trainer.validate): keep the hook
        else:
            split = None
            self._frozen, self._frozen_error = None, None
        try:
            self._split = split if split is not None else split_model(pl_module, **self.split_options)
        except (TypeError, ValueError, AttributeError, KeyError) as err:
            raise type(err)(
                f"CounterfactualMonitor could not split {type(pl_module).__name__} into features and "
                f"head: {err} Pass `layer='<module name>'` (a layer whose output is a (N, C, H, W) "
                "feature map) or `features=`/`head=` callables to CounterfactualMonitor.") from err
        prefix = int(getattr(self._split, "prefix_channels", 0) or 0)
        if prefix and self.search_config.protected_channels != prefix:
            # a vision transformer's class/register tokens ride along as trailing channels: the
            # search must keep each query's own tokens (never match or swap them)
            self.search_config = dataclasses.replace(self.search_config, protected_channels=prefix)
        self._locate_tried = self._locate_tried if split is not None else (
            self._split.tap_module is not None)
        self._split_owner = pl_module
        # `trainer.log_dir` broadcasts under DDP: every rank must call it, here, together.
        log_dir = trainer.log_dir
        root = self.report_dir if self.report_dir is not None else os.path.join(
            log_dir if log_dir is not None else trainer.default_root_dir, "fgvce")
        self._report_root = root

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish_background()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # a background explanation that has finished is logged now, while training goes on,
        # not at the next validation epoch's start (which would wait for it anyway)
        if self._job is not None and self._job.done():
            self._finish_background()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hook()
        self._active = False
        self._pending.clear()              # (a validation epoch that ended has stored them)
        self._release_held()
        self._drain_collection()
        self._finish_background()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        self._remove_hook()
        self._active = False
        self._pending.clear()
        self._release_held()
        # the run is failing: give the threads a little time, then leave them behind
        self._drain_collection(timeout=30.0)
        self._finish_background(timeout=30.0)

    def _should_explain(self, trainer: "pl.Trainer") -> bool:
        if trainer.sanity_checking:
            return False
        fn = trainer.state.fn
        if fn == TrainerFn.VALIDATING:
            return True
        return fn == TrainerFn.FITTING and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._drain_collection()
        self._finish_background()          # the stores are about to be reused
        self._active = self._should_explain(trainer) or (trainer.sanity_checking and not self._checked)
        # the per-batch bookkeeping goes to the collection thread where it has a core of its own:
        # on a GPU, or on a CPU whose cores torch's threads do not all use (measured in
        # benchmarks/bench_callback.py: on a CPU it slows the forward when they do)
        self._threaded = self.background is not False and (
            pl_module.device.type != "cpu" or _background.spare_cpu())
        # without a collection thread, while fitting with the background explanation, the full
        # sets wait for it too (as the budget allows) instead of being stored on the loop
        self._release_held()
        self._hold = not self._threaded and self._background_wanted(trainer)
        if self._reuse_logits:
            self._reuse_logits = None      # check the model's output against the head again
        self._num_misclassified = 0
        self._collect_failures = []
        self._pending.clear()
        if self._store is not None:
            self._store.reset(reseed=trainer.current_epoch)

    # ------------------------------------------------------------------ collection
    def _remove_hook(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        for handle in self._logit_handles:
            handle.remove()
        self._logit_handles = []
        self._hooked = None
        self._armed = False
        self._captured = None
        self._captured_logits = None

    def _register_hooks(self, pl_module: "pl.LightningModule") -> None:
        """Forward hooks on the split point (feature maps) and, unless they are recomputed, on
        the model (logits). They stay for the validation epoch and capture only between a
        batch's start and end (``_armed``): other forwards in between are left alone."""
        split = self._split

        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            # first call of the batch only; a detached copy (the forward may modify its output in
            # place later), made outside inference mode so it can be stored and searched later
            if self._armed and self._captured is None:
                with torch.inference_mode(False), torch.no_grad():
                    out = split.features_from_tap(output)
                    if isinstance(out, torch.Tensor):
                        out = out.detach()
                        # straight into the rows the batch will wait in, when there is room
                        slot = self._pending.slot(out) if out.dim() == 4 else None
                        self._captured = out.clone() if slot is None else slot.copy_(out)

        self._hook_handle = split.tap_module.register_forward_hook(hook)
        logits = self._reuse_logits is not False
        if logits:
            # the logits of the user's own forward (the outermost module call that returns a
            # (B, K) tensor), so the head need not run a second time
            def logit_hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
                if self._armed and isinstance(output, torch.Tensor) and output.dim() == 2:
                    with torch.inference_mode(False), torch.no_grad():
                        self._captured_logits = output.detach().clone()

            owners = [pl_module, *(getattr(pl_module, a, None) for a in WRAPPER_ATTRIBUTES)]
            seen: set[int] = set()
            for owner in owners:
                if isinstance(owner, torch.nn.Module) and id(owner) not in seen:
                    seen.add(id(owner))
                    self._logit_handles.append(owner.register_forward_hook(logit_hook))
        self._hooked = (split, logits, pl_module)

    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                  batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active or self._split is None or self._split.tap_module is None:
            self._remove_hook()
            return
        hooked = self._hooked
        if (hooked is None or hooked[0] is not self._split or hooked[2] is not pl_module
                or hooked[1] != (self._reuse_logits is not False)):
            self._remove_hook()          # (first batch, or the split / the logits check changed)
            self._register_hooks(pl_module)
        self._captured = self._captured_logits = None
        self._armed = True

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        captured, captured_logits = self._captured, self._captured_logits
        self._armed = False
        self._captured = self._captured_logits = None
        if not self._active:
            self._remove_hook()
            return
        if self._collector is not None and self._collector.errors:
            self._drain_collection()       # the queued batches are skipped; warn, stop this epoch
            return
        try:
            # the global RNG is guarded where the model runs (`_model_call`); the stores draw
            # from their own generators
            with torch.inference_mode(False), torch.no_grad():
                prepared = self._collect(trainer, pl_module, batch, captured, captured_logits)
                if prepared is not None:
                    store, feats, logits, parsed = prepared
                    if self._checked:
                        self._queue_batch(store, feats, logits, parsed, dataloader_idx, batch_idx)
                    else:
                        # the first batch is stored at once, here, so that a configuration
                        # error raises
                        # (buffers sized as the later batches will use them)
                        self._pending.push(feats, logits, store.needed(parsed), dataloader_idx,
                                           batch_idx, defer_thumbnails=self._threaded)
                        taken = self._pending.take()
                        try:
                            self._pending.cast_thumbnails(taken)
                            self._store_batch(store, taken)
                        finally:
                            self._pending.release(taken)
            self._checked = True
        except Exception as err:  # noqa: BLE001 - configuration errors raise, later ones are counted
            if not self._checked:
                raise
            self._stop_collecting([err], batch_idx)
        if trainer.sanity_checking:
            self._active = False   # one sanity batch checks the configuration; nothing is kept

    def _queue_batch(self, store: "steps.Stores", feats: torch.Tensor, logits: torch.Tensor,
                     parsed: ParsedBatch, dataloader_idx: int, batch_idx: int) -> None:
        """Hold the batch with the waiting ones, storing those first when there is no room for it
        (a set holds the stores' ``pending_bytes``; a larger batch is a set of its own) and them
        with it once the set is full, inline or on the collection thread, in batch order."""
        store.check_shapes(feats, logits, parsed)
        parsed = store.needed(parsed)
        # with a collection thread, the images' thumbnails are cast there, not here
        defer = self._threaded
        if not self._pending.fits(feats, logits, parsed, defer):
            self._flush_pending()
        self._pending.push(feats, logits, parsed, dataloader_idx, batch_idx, defer)
        if self._pending.full:
            self._flush_pending()

    def _take_pending(self) -> Optional["steps.BatchSet"]:
        """The waiting batches as one set (views of the buffers: no copy), or ``None``."""
        if not len(self._pending) or self._store is None:
            self._pending.clear()
            return None
        with torch.inference_mode(False), torch.no_grad():
            return self._pending.take()

    def _store_taken(self, taken: "steps.BatchSet") -> None:
        """Store a taken set and give its buffers back (a failure propagates to the caller)."""
        try:
            with torch.inference_mode(False), torch.no_grad():
                self._pending.cast_thumbnails(taken)
            self._store_batch(self._store, taken)
        finally:
            self._pending.release(taken)

    def _flush_pending(self) -> None:
        """Store the waiting batches: on the collection thread when this epoch uses it, else
        here (a failure propagates to the caller)."""
        taken = self._take_pending()
        if taken is None:
            return
        if self._hold:
            if self._room_to_hold(taken):
                self._held.append(taken)
                self._pending.keep = max(self._pending.keep, len(self._held) + self._pending._KEEP)
                return
            # no room for more: this epoch's sets are stored here from now on, the held ones
            # first (the stores must see the batches in order)
            self._hold = False
            held, self._held = self._held, []
            self._store_sets([*held, taken])
            return
        if self._threaded:
            # the bookkeeping runs on the collection thread, in batch order, while the
            # validation loop goes on
            self._collection_worker().submit(lambda: self._store_taken(taken))
        else:
            self._store_taken(taken)

    def _room_to_hold(self, taken: "steps.BatchSet") -> bool:
        """Whether the memory budget holds ``taken`` and the sets held before it until the epoch's
        end, and buffers as large for the next set: in the two sets' share of the budget and what
        the bank leaves over (:meth:`Stores.build <steps.Stores.build>`)."""
        size = taken.slab.nbytes if taken.slab is not None else 0
        store = self._store
        return (len(self._held) + 2) * size <= 2 * store.pending_bytes + store.spare_bytes

    def _release_held(self) -> None:
        """Give the held sets' buffers back without storing them."""
        held, self._held = self._held, []
        for taken in held:
            self._pending.release(taken)

    def _collection_worker(self) -> SerialWorker:
        if self._collector is None:
            self._collector = SerialWorker(max_pending=1)   # (Stores.build counts its memory)
        return self._collector

    def _stop_collecting(self, errors: Sequence[BaseException], batch_idx: Optional[int] = None) -> None:
        """Warn about failed collection (on the training thread), count it and stop for this epoch."""
        where = f" at batch {batch_idx}" if batch_idx is not None else ""
        for err in errors:
            message = f"collection failed{where}: {type(err).__name__}: {err}"
            warnings.warn(f"CounterfactualMonitor: {message}; no more samples are collected this "
                          "epoch.", RuntimeWarning, stacklevel=3)
            self._collect_failures.append(message)
        if self._collector is not None and errors is self._collector.errors:
            self._collector.errors = []
        self._pending.clear()
        self._active = False

    def _drain_collection(self, timeout: Optional[float] = None) -> None:
        """Wait for the collection thread's queued batches; report its failures. Never raises."""
        worker = self._collector
        if worker is None:
            return
        if not worker.drain(timeout):
            warnings.warn(f"CounterfactualMonitor: the collection thread did not finish in "
                          f"{timeout:.0f} s.", RuntimeWarning, stacklevel=3)
        if worker.errors:
            self._stop_collecting(worker.errors)

    def _collect(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                 captured: Optional[torch.Tensor],
                 captured_logits: Optional[torch.Tensor] = None) -> Optional[tuple]:
        """The batch's features and logits, on the training thread (it may run the model); returns
        ``(stores, feats, logits, parsed)``, or ``None`` while sanity checking."""
        parsed = parse_batch(batch, self.batch_parser)
        feats = self._features_for(parsed, captured, pl_module)
        logits = None
        usable = (captured_logits is not None and captured is not None
                  and captured_logits.shape[0] == feats.shape[0])
        if usable and self._reuse_logits is None:
            # checked once per epoch, on two samples: reuse the model's own output only where
            # it is head(F)
            with _model_call(pl_module):
                probe = self._split.head(feats[:2])
            mine = captured_logits[:2]
            self._reuse_logits = (isinstance(probe, torch.Tensor) and probe.shape == mine.shape
                                  and bool(torch.allclose(mine.float(), probe.float(),
                                                          rtol=1e-4, atol=1e-4)))
        if usable and self._reuse_logits:
            logits = captured_logits
        if logits is None:
            with _model_call(pl_module):
                logits = self._split.head(feats)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != feats.shape[0]:
            raise ValueError(f"Expected the head to return logits of shape ({feats.shape[0]}, "
                             f"num_classes), but got {getattr(logits, 'shape', type(logits).__name__)}. "
                             "Check the model split (`layer`/`features`/`head`).")
        if self._store is None:
            self._store = self._build_stores(trainer, pl_module, parsed, feats, logits)
            self._pending = steps.PendingBatches(self._store.pending_bytes,
                                                 self._store.thumbnail_size)
        if trainer.sanity_checking:
            self._store.check(feats, logits, parsed)
            return None
        return self._store, feats, logits, parsed

    def _store_batch(self, store: "steps.Stores", batch: "steps.BatchSet") -> None:
        """Check the batch against the stores and keep it: correct samples in the bank, mistakes
        in the reservoir (on the collection thread after the first batch)."""
        if self._collector is not None and self._collector.errors:
            return                         # an earlier batch failed: collect nothing more
        with torch.inference_mode(False), torch.no_grad():
            store.check(batch.feats, batch.logits, batch)
            pred = batch.logits.argmax(1)
            wrong = pred != batch.labels.to(pred.device)
            self._num_misclassified += int(wrong.sum())
            store.add(batch, pred, wrong)

    def _locate_hook(self, pl_module: "pl.LightningModule", images: torch.Tensor) -> None:
        """For splits without a hook module (e.g. ``forward_features``), find the module whose
        output is the feature map, once, so later batches are captured without a second forward."""
        self._locate_tried = True
        found = None
        for owner in (pl_module, *(getattr(pl_module, a, None) for a in WRAPPER_ATTRIBUTES)):
            if not isinstance(owner, torch.nn.Module):
                continue
            try:
                found = locate_hook_module(owner, self._split, images[:2])
            except Exception:  # noqa: BLE001 - e.g. a LightningModule without `forward`
                found = None
            if found is not None:
                break
        if found is None:
            warnings.warn("CounterfactualMonitor: no module of the model outputs the split's feature "
                          "maps, so they are recomputed with a second forward pass of `features` "
                          "during validation (slower). Split at a module (`layer=`) to avoid it.",
                          RuntimeWarning, stacklevel=3)
            self._fallback_warned = True
            return
        self._split = dataclasses.replace(self._split, hook_module=found, tap_module=found,
                                          tap_transform=None)

    def _features_for(self, parsed: ParsedBatch, captured: Optional[torch.Tensor],
                      pl_module: "pl.LightningModule") -> torch.Tensor:
        b = parsed.images.shape[0]
        hooked = self._split.tap_module is not None   # a hook was registered for this batch
        if not self._locate_tried:
            with _model_call(pl_module):
                self._locate_hook(pl_module, parsed.images)
        if captured is None or captured.dim() != 4 or captured.shape[0] != b:
            if captured is not None:
                raise ValueError(
                    f"Expected the split module to output feature maps of shape ({b}, C, H, W) for "
                    f"the validation batch, but it produced {tuple(captured.shape)}. Split at a "
                    "layer with a spatial output (`layer=`).")
            if hooked and not self._fallback_warned:
                warnings.warn("CounterfactualMonitor: the split module was not called by "
                              "`validation_step`; recomputing the features with a second forward "
                              "pass.", RuntimeWarning, stacklevel=3)
                self._fallback_warned = True
            with _model_call(pl_module):
                captured = self._split.features(parsed.images.to(pl_module.device))
        feats = check_feature_map(captured, "features").detach()
        return feats

    def _build_stores(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                      parsed: ParsedBatch, feats: torch.Tensor, logits: torch.Tensor) -> "steps.Stores":
        num_classes = logits.shape[1]
        if self.num_classes is not None and num_classes != self.num_classes:
            raise ValueError(f"Expected the head to return `num_classes`={self.num_classes} logits, "
                             f"but got {num_classes}. Fix `num_classes` or the model split.")
        source = self.part_source
        if source == "auto":
            source = ("keypoints" if parsed.keypoints is not None else
                      "masks" if parsed.masks is not None else "prototypes")
        if source in ("keypoints", "masks") and getattr(parsed, source) is None:
            raise ValueError(f"Expected the validation batch to carry `{source}` (part_source="
                             f"{source!r}), but it has none. Use part_source='prototypes' or 'auto'.")
        num_annotated = 0
        if source in ("keypoints", "masks"):
            num_annotated = getattr(parsed, source).shape[1]
            if self.part_names is not None and len(self.part_names) != num_annotated:
                raise ValueError(f"Expected {num_annotated} `part_names` (the batch's {source} have "
                                 f"{num_annotated} parts), but got {len(self.part_names)}.")
        per_rank = math.ceil(self.max_samples / max(1, trainer.world_size))
        thumb = min(self.thumbnail_size, max(parsed.images.shape[-2:]))   # never enlarged
        # what the batch takes as it waits to be stored
        batch_bytes = feats.shape[0] * steps.PendingBatches.row_bytes(
            feats, logits, steps.Stores.needed_for(parsed, source), thumb,
            defer_thumbnails=self._threaded)
        return steps.Stores.build(
            num_classes=num_classes, feature_shape=tuple(feats.shape[1:]),
            input_size=tuple(parsed.images.shape[-2:]), device=pl_module.device,
            dtype=self.bank_dtype, mistakes=per_rank, budget_bytes=int(self.memory_budget_mb * 2 ** 20),
            max_per_class=self.max_references_per_class, thumbnail_size=thumb,
            feature_dtype=feats.dtype, part_source=source, num_annotated=num_annotated,
            seed=self.seed, batch_bytes=batch_bytes)

    # ------------------------------------------------------------------ explanation
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Explain the kept mistakes, gather (DDP), compute statistics, log and report (rank 0);
        on a background thread when :meth:`_frozen_for` gives a frozen copy of the model."""
        self._remove_hook()
        # the sets not yet stored (`held`, in batch order): stored by the background explanation
        # before it starts, not here on the validation loop, or here when explaining here
        held, self._held = self._held, []
        if self._active:
            try:
                if self._threaded and not self._background_wanted(trainer):
                    self._flush_pending()  # (after the others, on the collection thread)
                else:
                    last = self._take_pending()
                    if last is not None:
                        held.append(last)
            except Exception as err:  # noqa: BLE001 - counted like any failed collection
                self._stop_collecting([err])
        self._pending.clear()
        self._active = False
        failures = len(self._collect_failures)
        self._drain_collection()           # every batch of the epoch but `held` is in the stores
        if held and len(self._collect_failures) > failures:
            for taken in held:             # collection failed on the thread: stop there
                self._pending.release(taken)
            held = []
        if not self._should_explain(trainer) or self._split is None:
            self._store_held(held)
            return
        run = steps.RunInfo.of(trainer)
        frozen = self._frozen_for(trainer, pl_module, held)
        if frozen is not None:
            self._job = BackgroundJob(lambda: self._explain_background(run, frozen, held),
                                      device=self._store.bank.device if self._store else None)
            self._job_run = run
            self._job_sets = held
            return
        self._store_held(held)
        with torch.inference_mode(False):
            local = steps.search_local(self, run, pl_module, self._split.head)
            steps.sync_prototypes(self, run, local.failures)           # collective 1 (DDP)
            samples, parts = steps.make_samples(self, run, local)
            payload = steps.payload_of(self, run, local, samples, parts)
            payloads = steps.gather(run, payload)                      # collective 2 (DDP)
            result = steps.build_result(self, run, payloads, run.current_epoch)
        self._record(run, result)
        if run.is_global_zero:
            steps.publish(self, run, result)

    def _record(self, run: "steps.RunInfo", result: EpochResult) -> None:
        self.last_result = result
        self.history.update(result.epoch, result.stats)
        self.summaries.append(steps.summary(result))
        self.num_explained_epochs += 1
        self.total_failures += len(result.failures)

    # ------------------------------------------------------------------ background explanation
    def _frozen_for(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                    held: Sequence["steps.BatchSet"] = ()) -> Optional[FrozenModel]:
        """The frozen copy of the model to explain against in the background (weights refreshed
        from the live model), or ``None`` to explain synchronously (as when nothing is to be
        explained: no mistake kept, and no waiting batches ``held`` for the background)."""
        if (self.background is True and trainer.state.fn == TrainerFn.FITTING
                and int(getattr(trainer, "world_size", 1) or 1) > 1 and self._frozen_error is None):
            self._frozen_error = "DDP"
            warnings.warn("CounterfactualMonitor(background=True): under DDP the explanation "
                          "runs synchronously (its collectives must stay on the training "
                          "thread).", RuntimeWarning, stacklevel=3)
        if not self._background_wanted(trainer) or self._store is None or (
                self._store.mistakes.size == 0 and not held):
            return None
        if self._frozen is not None and self._frozen.refresh():
            return self._frozen
        try:
            with preserved_rng_state([pl_module.device]):   # splitting may run a probe forward
                frozen = FrozenModel(pl_module, self.split_options, self._split)
            self._check_frozen(frozen, pl_module, held)
        except Exception as err:  # noqa: BLE001 - fall back to the synchronous path, say why once
            self._frozen_error = f"{type(err).__name__}: {err}"
            self._frozen = None
            message = (f"CounterfactualMonitor: explaining synchronously at the end of each "
                       f"validation epoch, not in the background: {err}.")
            if self.background is True:
                warnings.warn(message, RuntimeWarning, stacklevel=3)
            else:
                rank_zero_info(message)
            return None
        self._frozen = frozen
        return frozen

    def _check_frozen(self, frozen: FrozenModel, pl_module: "pl.LightningModule",
                      held: Sequence["steps.BatchSet"] = ()) -> None:
        """Raise unless the copy's head gives the live head's logits on two kept mistakes (or
        two waiting samples ``held``, when none is kept yet)."""
        if self._store.mistakes.size:
            feats = self._store.mistakes.get("features")[:2].to(self._store.feature_dtype)
        else:
            feats = held[0].feats[:2]
        with torch.inference_mode(False), torch.no_grad(), preserved_rng_state([feats.device]), \
                preserved_training_flags(pl_module):
            live = self._split.head(feats)
            mine = frozen.split.head(feats)
        if not (isinstance(mine, torch.Tensor) and mine.shape == live.shape
                and torch.allclose(mine.float(), live.float(), rtol=1e-4, atol=1e-5)):
            raise ValueError("the copied model's head does not reproduce the live head's logits")

    def _store_sets(self, sets: Sequence["steps.BatchSet"]) -> None:
        """Store taken sets in order; on a failure the sets after it are given back unstored and
        the failure propagates."""
        for i, taken in enumerate(sets):
            try:
                self._store_taken(taken)
            except BaseException:
                for rest in sets[i + 1:]:
                    self._pending.release(rest)
                raise

    def _store_held(self, held: Sequence["steps.BatchSet"]) -> None:
        """Store held sets in order (here, or on the background thread before it explains); a
        failure is counted and the sets after it are left out, as collection stops there."""
        try:
            self._store_sets(held)
        except Exception as err:  # noqa: BLE001 - counted like any failed collection
            self._stop_collecting([err])

    def _background_wanted(self, trainer: "pl.Trainer") -> bool:
        """Whether this epoch is to be explained in the background (:meth:`_frozen_for` may still
        fall back to the synchronous path)."""
        return (self.background is not False and trainer.state.fn == TrainerFn.FITTING
                and int(getattr(trainer, "world_size", 1) or 1) == 1
                and self._frozen_error is None and self._split is not None
                and self._should_explain(trainer))

    def _explain_background(self, run: "steps.RunInfo", frozen: FrozenModel,
                            held: Sequence["steps.BatchSet"] = ()
                            ) -> tuple[EpochResult, Optional[os.PathLike], float]:
        """One epoch's explanation on the background thread (single process), after storing the
        epoch's sets of batches still waiting (``held``, in order). Never touches the live model, the global RNG
        or the loggers' scalar paths; never raises."""
        start = time.perf_counter()
        with global_rng_left_alone():
            self._store_held(held)
            local = steps.search_local(self, run, frozen.module, frozen.split.head)
            with self._proto_lock:
                steps.sync_prototypes(self, run, local.failures)
                samples, parts = steps.make_samples(self, run, local)
            payload = steps.payload_of(self, run, local, samples, parts)
            result = steps.build_result(self, run, [payload], run.current_epoch)
            report = steps.publish_panels(self, run, result) if run.is_global_zero else None
        return result, report, time.perf_counter() - start

    def _finish_background(self, timeout: Optional[float] = None) -> None:
        """Wait for the background explanation (at most ``timeout`` s) and, on the training
        thread, log its scalars and add it to the history. Never raises."""
        job, self._job = self._job, None
        self._job_sets = []
        if job is None:
            return
        out = job.wait(timeout)
        if out is None:
            warnings.warn("CounterfactualMonitor: the background explanation did not finish in "
                          f"{timeout:.0f} s; its epoch is left out of the history.", RuntimeWarning,
                          stacklevel=2)
            return
        run = self._job_run
        if isinstance(out, BaseException):
            warnings.warn(f"CounterfactualMonitor: the background explanation of epoch "
                          f"{run.current_epoch} failed: {type(out).__name__}: {out} (training "
                          "continues).", RuntimeWarning, stacklevel=2)
            self.total_failures += 1
            return
        result, report, self.last_background_s = out
        self._record(run, result)
        if run.is_global_zero:
            steps.log_scalars(self, run, result)
            if report is not None:
                self.last_report = report

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict[str, Any]:
        """Picklable state (``ddp_spawn`` sends the callback to its workers): the per-run stores,
        hooks and writers stay behind, and the part prototypes travel as their state dict
        (a ``torch.Generator`` does not survive torch's shared-memory pickling)."""
        # tensors made here would be shared with the workers through file descriptors and freed
        # before they are read: send them as numpy arrays
        protos = {k: v.numpy() if isinstance(v, torch.Tensor) else v
                  for k, v in self._prototypes.state_dict().items()}
        state = self.__dict__.copy()
        state.update(_store=None, _hook_handle=None, _captured=None, _logit_handles=[],
                     _captured_logits=None, _hooked=None, _armed=False,
                     _pending=steps.PendingBatches(), _reporters={}, _split=None,
                     _split_owner=None, _locate_tried=False, _job=None, _collector=None, _frozen=None,
                     _held=[], _job_sets=[],
                     _proto_lock=None, _prototypes=protos)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        protos = {k: torch.from_numpy(v) if hasattr(v, "__array__") else v
                  for k, v in state["_prototypes"].items()}
        self.__dict__.update(state)
        self._proto_lock = threading.Lock()
        self._prototypes = PartPrototypes(num_parts=self.num_parts, seed=self.seed)
        self._prototypes.load_state_dict(protos)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the reference bank, the mistake buffer, their thumbnails/labels and the
        buffers that validation batches wait in."""
        # (the sets held for the background explanation, and those it is storing, included)
        waiting = self._pending.bytes_with(*self._held, *self._job_sets)
        return (0 if self._store is None else self._store.memory_bytes) + waiting

    def state_dict(self) -> dict[str, Any]:
        if self._job is not None and self._job.done():
            self._finish_background()      # a finished background epoch belongs in the checkpoint
        with self._proto_lock:
            prototypes = self._prototypes.state_dict()
        pending = []
        if self._job is not None and self._job_run is not None and self._report_root is not None:
            # still being explained: a resumed run reads it back from its report
            pending.append({"epoch": self._job_run.current_epoch,
                            "global_step": self._job_run.global_step,
                            "report_root": os.path.abspath(self._report_root)})
        return {
            "version": _STATE_VERSION,
            "num_explained_epochs": self.num_explained_epochs,
            "total_failures": self.total_failures,
            "history": self.history.state_dict(),
            "summaries": [dict(s) for s in self.summaries],
            "prototypes": prototypes,
            "pending": pending,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_explained_epochs = int(state_dict.get("num_explained_epochs", 0))
        self.total_failures = int(state_dict.get("total_failures", 0))
        self.history.load_state_dict(state_dict.get("history", {}))
        self.summaries = [dict(s) for s in state_dict.get("summaries", [])]
        if state_dict.get("prototypes") is not None:
            self._prototypes.load_state_dict(state_dict["prototypes"])
        for pending in state_dict.get("pending", []):
            self._recover_epoch(pending)

    def _recover_epoch(self, pending: Mapping[str, Any]) -> None:
        """Add an epoch that was still being explained in the background when the checkpoint was
        written to the history, from the report it wrote; warn when there is none."""
        import glob
        import json

        epoch, step = int(pending["epoch"]), int(pending["global_step"])
        report = None
        for path in sorted(glob.glob(os.path.join(glob.escape(str(pending["report_root"])),
                                                  f"epoch_{epoch:03d}*", "report.json"))):
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, ValueError):
                continue
            if int(data.get("epoch", -1)) == epoch and int(data.get("global_step", -1)) == step:
                report = data
        if report is None:
            warnings.warn(f"CounterfactualMonitor: epoch {epoch} was still being explained when the "
                          f"checkpoint was written and no report of it (global step {step}) is in "
                          f"{pending['report_root']}; the resumed history skips it.",
                          RuntimeWarning, stacklevel=3)
            return
        nan = float("nan")
        parts = {p["part"]: p for p in report.get("part_stats", [])}
        self.history.set_record(epoch, parts)
        self.summaries.append({
            "epoch": epoch, "global_step": step,
            "num_misclassified": int(report.get("num_misclassified", 0)),
            "num_explained": int(report.get("num_explained", 0)),
            "num_skipped": int(report.get("num_skipped", 0)),
            "flip_rate": nan if report.get("flip_rate") is None else float(report["flip_rate"]),
            "mean_edits": nan if report.get("mean_edits") is None else float(report["mean_edits"]),
            "failures": len(report.get("failures", [])),
            "elapsed_s": float(report.get("elapsed_s", 0.0)),
            "part_error_share": {n: float(p["error_share"]) for n, p in parts.items()}})
        self.summaries.sort(key=lambda s: s["epoch"])
        self.num_explained_epochs += 1
        self.total_failures += len(report.get("failures", []))

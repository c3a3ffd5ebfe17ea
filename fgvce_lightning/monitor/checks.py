"""The checks that need the model: against a dataloader's first batch, or a dry forward.

:func:`build_stores` checks a batch against the configuration (number of classes, class names,
protected channels, part annotations and names, the memory budget against the feature size) and
sizes the stores. :func:`dry_check` runs those checks on one batch of the validation loader
before training starts, when no sanity check will (``num_sanity_val_steps=0``), so a
configuration error never costs a training epoch. Both raise ``ValueError``/``TypeError`` that say
what to change.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from ..engine._util import preserved_training_flags
from ..engine.search import SearchConfig
from ..engine.split import ModelSplit, split_model
from .batches import ParsedBatch, parse_batch
from .capture import Capture, HeadPrecision, check_logits
from .config import MonitorConfig
from .pending import PendingBatches
from .stores import Stores, plan_stores

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["split_for", "build_stores", "dry_check", "first_loader"]


def split_for(pl_module: torch.nn.Module, config: MonitorConfig) -> ModelSplit:
    """The model's split, or an error that lists the ways to split it."""
    try:
        return split_model(pl_module, **config.split_options)
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise type(err)(
            f"CounterfactualMonitor could not split {type(pl_module).__name__} into features and "
            f"head: {err} Pass `layer='<module name>'` (a layer whose output is a (N, C, H, W) "
            "feature map) or `features=`/`head=` callables to CounterfactualMonitor.") from err


def _part_source(config: MonitorConfig, parsed: ParsedBatch) -> tuple[str, int]:
    source = config.part_source
    if source == "auto":
        source = ("keypoints" if parsed.keypoints is not None else
                  "masks" if parsed.masks is not None else "prototypes")
    if source in ("keypoints", "masks") and getattr(parsed, source) is None:
        raise ValueError(f"Expected the validation batch to carry `{source}` (part_source="
                         f"{source!r}), but it has none. Use part_source='prototypes' or 'auto'.")
    num_annotated = 0
    if source in ("keypoints", "masks"):
        num_annotated = getattr(parsed, source).shape[1]
        if config.part_names is not None and len(config.part_names) != num_annotated:
            raise ValueError(f"Expected {num_annotated} `part_names` (the batch's {source} have "
                             f"{num_annotated} parts), but got {len(config.part_names)}.")
    return source, num_annotated


def build_stores(config: MonitorConfig, search: SearchConfig, parsed: ParsedBatch,
                 feats: torch.Tensor, logits: torch.Tensor, *, device: torch.device,
                 world_size: int = 1, num_loaders: int = 1, defer_thumbnails: bool = False,
                 allocate: bool = True) -> Optional[Stores]:
    """Check a dataloader's first batch against the configuration and size its stores (a
    ``1 / num_loaders`` share of the budget); ``allocate=False`` only checks.

    Args:
        parsed: the batch; feats: its ``(B, C, H, W)`` feature maps; logits: its ``(B, K)`` logits.

    Raises:
        ValueError: naming the option to change.
    """
    num_classes = logits.shape[1]
    if config.num_classes is not None and num_classes != config.num_classes:
        raise ValueError(f"Expected the head to return `num_classes`={config.num_classes} logits, "
                         f"but got {num_classes}. Fix `num_classes` or the model split.")
    if config.class_names is not None and len(config.class_names) != num_classes:
        raise ValueError(f"Expected {num_classes} `class_names` (one per logit of the head), but "
                         f"got {len(config.class_names)}.")
    channels = feats.shape[1]
    if search.protected_channels >= channels:
        raise ValueError(f"Expected `protected_channels` to be smaller than the feature maps' "
                         f"{channels} channels (it counts trailing channels that are never "
                         f"swapped), but got {search.protected_channels}.")
    labels = parsed.labels
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"Expected labels in [0, {num_classes}) (the head's classes), but the "
                         f"first batch has labels in [{int(labels.min())}, {int(labels.max())}]. "
                         "Check `num_classes` and the model split.")
    source, num_annotated = _part_source(config, parsed)
    thumb = min(config.thumbnail_size, max(parsed.images.shape[-2:]))   # never enlarged
    batch_bytes = feats.shape[0] * PendingBatches.row_bytes(
        feats, logits, Stores.needed_for(parsed, source), thumb, defer_thumbnails=defer_thumbnails)
    sizes = dict(num_classes=num_classes, feature_shape=tuple(feats.shape[1:]),
                 dtype=config.bank_dtype, mistakes=math.ceil(config.max_samples / max(1, world_size)),
                 budget_bytes=int(config.budget_mb * 2 ** 20) // max(1, num_loaders),
                 max_per_class=config.max_references_per_class, thumbnail_size=thumb,
                 num_annotated=num_annotated, batch_bytes=batch_bytes,
                 batch_size=int(feats.shape[0]),
                 pending_max_bytes=None if config.mechanisms.waiting_sets else 0)
    if not allocate:
        plan_stores(**sizes)
        return None
    return Stores.build(**sizes, input_size=tuple(parsed.images.shape[-2:]), device=device,
                        feature_dtype=feats.dtype, part_source=source, seed=config.seed,
                        bank_device=torch.device("cpu") if config.bank_device == "host" else None)


def first_loader(loaders: Any) -> Any:
    """The first dataloader of ``trainer.val_dataloaders`` (a loader, a sequence or a mapping of
    them), or ``None``."""
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return first_loader(loaders[0]) if loaders else None
    if isinstance(loaders, dict):
        return first_loader(next(iter(loaders.values()))) if loaders else None
    return loaders


@contextlib.contextmanager
def _everything_preserved(loader: Any, device: torch.device) -> Iterator[None]:
    """Restore the global RNGs (torch, CUDA, Python, NumPy) and the loader's own generators:
    drawing a batch must not change what the training draws later."""
    generators = [g for g in (getattr(loader, "generator", None),
                              getattr(getattr(loader, "sampler", None), "generator", None))
                  if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in generators]
    python = random.getstate()
    try:
        import numpy
        np_state = numpy.random.get_state()
    except ImportError:          # numpy is a dependency of torch's; be safe anyway
        numpy, np_state = None, None
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        random.setstate(python)
        if numpy is not None:
            numpy.random.set_state(np_state)
        for g, state in zip(generators, states):
            g.set_state(state)


def dry_check(trainer: "pl.Trainer", pl_module: "pl.LightningModule", config: MonitorConfig,
              search: SearchConfig, capture: Capture) -> bool:
    """One dry forward of the first validation batch through the split (eval mode, no grad,
    every RNG and training flag restored) and :func:`build_stores`' checks on it; ``False`` when
    there is no validation batch to check yet.

    Raises:
        ValueError, TypeError: a configuration error, before any training.
    """
    loader = first_loader(trainer.val_dataloaders)
    if loader is None:
        return False
    device = pl_module.device
    with _everything_preserved(loader, device):
        try:
            batch = next(iter(loader))
        except StopIteration:
            return False
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module.on_before_batch_transfer(batch, 0)
        batch = pl_module.transfer_batch_to_device(batch, device, 0)
        batch = pl_module.on_after_batch_transfer(batch, 0)
        parsed = parse_batch(batch, config.batch_parser)
        with preserved_training_flags(pl_module), torch.no_grad(), \
                trainer.precision_plugin.forward_context():
            feats = capture.split.features(parsed.images.to(device))
        feats = feats.detach()
        logits = HeadPrecision.of(trainer).head(capture.split.head, feats.dtype)
        with preserved_training_flags(pl_module), torch.no_grad():
            out = check_logits(logits(feats), feats.shape[0])
        build_stores(config, search, parsed, feats, out, device=device,
                     world_size=int(getattr(trainer, "world_size", 1) or 1),
                     num_loaders=len(trainer.num_val_batches) or 1, allocate=False)
    return True

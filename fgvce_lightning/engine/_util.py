"""Small helpers shared by the engine modules: chunked head calls, state guards, input checks."""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Iterator, Optional

import torch
from torch import nn

__all__ = [
    "Head",
    "evaluate_head",
    "margin",
    "preserved_training_flags",
    "preserved_rng_state",
    "global_rng_left_alone",
    "check_feature_map",
    "finite_rows",
    "copy_rows",
]

Head = Callable[[torch.Tensor], torch.Tensor]
"""A head maps feature maps ``(B, C, H, W)`` to logits ``(B, num_classes)``."""


_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(torch, "OutOfMemoryError", None),
                getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if e is not None)

_chunk_caps: dict[tuple, int] = {}
"""Largest chunk that fitted, per (device, feature-map shape), learnt from out-of-memory errors."""


def evaluate_head(head: Head, features: torch.Tensor, chunk_size: int = 1024,
                  num_classes: Optional[int] = None) -> torch.Tensor:
    """Run ``head`` on ``features`` in chunks and return float32 logits.

    Chunks bound the peak memory of expensive heads (a transformer block, say). When a chunk runs
    out of accelerator memory it is halved and retried, and the smaller size is remembered for
    feature maps of that shape on that device, so later calls start there.

    Args:
        head: the classifier head.
        features: ``(B, C, H, W)`` feature maps.
        chunk_size: most feature maps per head call (bounds peak memory).
        num_classes: when given, the logits must have this many columns.

    Returns:
        ``(B, K)`` float32 logits on ``features.device``.

    Raises:
        ValueError: when the head does not return ``(B, K)`` logits (or not ``num_classes`` of them).
        torch.OutOfMemoryError: when even a single feature map does not fit.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` to be a positive integer, but got {chunk_size}.")
    key = (str(features.device), *features.shape[1:])
    size = min(chunk_size, _chunk_caps.get(key, chunk_size))
    outs = []
    start = 0
    while start < features.shape[0]:
        chunk = features[start:start + size]
        try:
            out = head(chunk)
        except _OOM_ERRORS:
            if size == 1:
                raise
            size = max(1, size // 2)
            _chunk_caps[key] = size
            if features.is_cuda:
                torch.cuda.empty_cache()
            continue
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != chunk.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"Expected the head to return logits of shape ({chunk.shape[0]}, num_classes) for "
                f"feature maps of shape {tuple(chunk.shape)}, but got {shape}. Check the model split "
                "(`features`/`head`) or pass explicit callables.")
        if num_classes is not None and out.shape[1] != num_classes:
            raise ValueError(
                f"Expected the head to return {num_classes} class logits, but got {out.shape[1]}. "
                "Check `num_classes` and the model split.")
        outs.append(out.float())
        start += chunk.shape[0]
    if not outs:
        return torch.zeros(0, num_classes or 0, device=features.device)
    return torch.cat(outs)


def margin(logits: torch.Tensor, true: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Evidence for the mistake: ``logit_pred - logit_true`` per row.

    Args:
        logits: ``(B, K)``.
        true: ``(B,)`` true classes.
        pred: ``(B,)`` (wrongly) predicted classes.
    """
    return logits.gather(1, pred[:, None]).squeeze(1) - logits.gather(1, true[:, None]).squeeze(1)


@contextlib.contextmanager
def preserved_training_flags(*modules: Optional[nn.Module], eval_mode: bool = True) -> Iterator[None]:
    """Put ``modules`` (and all their children) in eval mode and restore every flag afterwards.

    Restores each submodule's own ``training`` flag, also when the body raises.
    """
    saved = [(m, m.training) for mod in modules if isinstance(mod, nn.Module) for m in mod.modules()]
    try:
        if eval_mode:
            for m, _ in saved:
                m.training = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag


_rng_guard = threading.local()


@contextlib.contextmanager
def global_rng_left_alone() -> Iterator[None]:
    """Make :func:`preserved_rng_state` a no-op on this thread, for code running beside the
    training on another thread: restoring the global RNG from there would rewind the draws the
    training made meanwhile. Code under it must not draw from the global RNG at all (the engine
    draws from its own generators only; tests check that)."""
    before = getattr(_rng_guard, "off", False)
    _rng_guard.off = True
    try:
        yield
    finally:
        _rng_guard.off = before


@contextlib.contextmanager
def preserved_rng_state(devices: Optional[list[torch.device]] = None) -> Iterator[None]:
    """Save the global CPU (and CUDA, for ``devices``) RNG state and restore it afterwards
    (nothing at all under :func:`global_rng_left_alone`)."""
    if getattr(_rng_guard, "off", False):
        yield
        return
    cpu_state = torch.get_rng_state()
    cuda_states = []
    if torch.cuda.is_available():
        for dev in devices or []:
            dev = torch.device(dev)
            if dev.type == "cuda":
                cuda_states.append((dev, torch.cuda.get_rng_state(dev)))
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        for dev, state in cuda_states:
            torch.cuda.set_rng_state(state, dev)


def check_feature_map(features: object, name: str = "features") -> torch.Tensor:
    """Check that ``features`` is a spatial feature map ``(N, C, H, W)`` and return it.

    Raises:
        TypeError: when it is not a tensor.
        ValueError: when it is not 4-D with a spatial grid.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor of shape (N, C, H, W), but got "
                        f"{type(features).__name__}.")
    if features.dim() != 4:
        hint = (" The split point produces non-spatial features (e.g. after global pooling or the "
                "flatten of a classifier); split the model earlier, at a layer whose output is a "
                "(N, C, H, W) feature map.") if features.dim() == 2 else ""
        raise ValueError(f"Expected `{name}` to be a spatial feature map of shape (N, C, H, W), but "
                         f"got shape {tuple(features.shape)}.{hint}")
    if features.shape[2] * features.shape[3] < 2:
        raise ValueError(f"Expected `{name}` to have a spatial grid of at least 2 cells, but got "
                         f"H×W = {features.shape[2]}×{features.shape[3]}. Split the model earlier.")
    return features


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: which rows of ``x`` (``(B, ...)`` floating point) hold only finite values.

    Exact, and cheaper than ``torch.isfinite(x).flatten(1).all(1)`` (which takes several passes
    over ``x``): a row's float32 sum is finite only if every value is (NaN and ±inf propagate), so
    one reduction settles all rows with a finite sum; the others (a NaN/inf, or an overflowing
    sum of huge values) are checked value by value.
    """
    flat = x.flatten(1)
    ok = torch.isfinite(flat.sum(1, dtype=torch.float32))
    if not bool(ok.all()):
        doubt = (~ok).nonzero().squeeze(1)
        ok[doubt] = torch.isfinite(flat[doubt]).all(1)
    return ok


def _words(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(N, ...)`` as ``(N, W)`` 8-byte words when its rows allow, else ``(N, -1)``.

    Row copies (``index_copy_``, ``index_put_``) of byte-sized elements (uint8 thumbnails) go
    element by element on the CPU: as int64 words the same bytes copy about 7 times faster.
    """
    flat = t.view(t.shape[0], math.prod(t.shape[1:]))    # (callers pass contiguous tensors)
    if t.element_size() < 8 and flat.shape[1] * t.element_size() % 8 == 0:
        try:
            return flat.view(torch.int64)
        except RuntimeError:         # misaligned storage offset: copy as it is
            pass
    return flat


def copy_rows(dest: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """``dest[index] = src`` for rows (``index`` without repeats), as 8-byte words where possible."""
    src = src.detach().to(device=dest.device, dtype=dest.dtype).contiguous()
    index = index.to(dest.device)
    if not dest.is_contiguous():     # (a reshape could copy: write through dest itself)
        dest.index_copy_(0, index, src)
        return
    target, rows = _words(dest), _words(src)
    if target.dtype != rows.dtype:   # (only one of them could be viewed as words)
        width = math.prod(dest.shape[1:])
        target, rows = dest.view(dest.shape[0], width), src.view(src.shape[0], width)
    target.index_copy_(0, index, rows)


def copy_kept_rows(dest: torch.Tensor, slots: torch.Tensor, src: torch.Tensor,
                   kept: torch.Tensor) -> None:
    """``dest[slots] = src[kept]`` for increasing row indices ``kept`` of ``src``.

    ``dest``'s last row is a spare that no slot names: when most rows of ``src`` are kept they are
    copied straight from it (the others to the spare row) instead of being gathered first, which
    saves a pass over them; few kept rows are gathered.
    """
    n = src.shape[0]
    if kept.numel() == n:                          # every row, in order
        copy_rows(dest, slots, src)
    elif 2 * kept.numel() < n:                     # few rows: gather them
        copy_rows(dest, slots, src.index_select(0, kept.to(src.device)))
    else:                                          # most rows: the rest to the spare row
        index = torch.full((n,), dest.shape[0] - 1, dtype=torch.int64, device=dest.device)
        copy_rows(dest, index.index_copy_(0, kept.to(dest.device), slots.to(dest.device)), src)

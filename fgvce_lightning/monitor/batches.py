"""What the monitor reads from a validation batch, and the small copies of its images it keeps.

* :func:`parse_batch` turns a batch (tuple ``(x, y, ...)``, dict or anything a user-supplied
  parser understands) into images, labels and optional part annotations.
* :func:`small_images` keeps a small float16 copy of every kept image (one cheap pass over the
  images); :func:`pictures` makes the few that are drawn ``uint8``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

__all__ = ["ParsedBatch", "parse_batch", "small_images", "pictures"]

_IMAGE_KEYS = ("image", "images", "x", "input", "inputs", "img", "pixel_values")
_LABEL_KEYS = ("label", "labels", "y", "target", "targets")


@dataclass(frozen=True)
class ParsedBatch:
    """The parts of a validation batch the callback uses.

    Attributes:
        images: ``(B, 3, H, W)`` (or ``(B, C, H, W)``) input images.
        labels: ``(B,)`` int64 true classes.
        keypoints: ``(B, P, 3)`` part keypoints ``(x, y, visible)`` in pixels, or ``None``.
        masks: ``(B, P, H, W)`` bool part masks, or ``None``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    keypoints: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None


def _first_key(batch: Mapping, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    return None


def parse_batch(batch: Any, batch_parser: Optional[Callable[[Any], Any]] = None) -> ParsedBatch:
    """Extract images, labels and optional annotations from a validation batch.

    Args:
        batch: a tuple/list ``(x, y, ...)``, a dict with an image key (one of ``image``, ``images``,
            ``x``, ``input``, ``inputs``, ``img``, ``pixel_values``) and a label key (``label``,
            ``labels``, ``y``, ``target``, ``targets``) plus optional ``keypoints``/``masks``, or
            anything ``batch_parser`` understands.
        batch_parser: optional user function ``batch -> (x, y)`` or ``batch -> dict`` (same keys as
            above) or ``batch -> ParsedBatch``.

    Returns:
        The parsed batch.

    Raises:
        TypeError: when the batch has no recognisable images and labels.
    """
    if batch_parser is not None:
        batch = batch_parser(batch)
        if isinstance(batch, ParsedBatch):
            return batch
    keypoints = masks = None
    if isinstance(batch, Mapping):
        images, labels = _first_key(batch, _IMAGE_KEYS), _first_key(batch, _LABEL_KEYS)
        keypoints, masks = batch.get("keypoints"), batch.get("masks")
        where = f"a dict with keys {sorted(map(str, batch.keys()))}"
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
        where = f"a {type(batch).__name__} of length {len(batch)}"
    else:
        images = labels = None
        where = f"a {type(batch).__name__}"
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise TypeError(
            f"Expected the validation batch to hold images of shape (B, C, H, W) as a tuple (x, y) or "
            f"a dict with one of the keys {list(_IMAGE_KEYS)}, but got {where}. Pass "
            "`batch_parser=lambda batch: (x, y)` to CounterfactualMonitor.")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(
            f"Expected the validation batch to hold integer class labels of shape ({images.shape[0]},) "
            f"(dict keys {list(_LABEL_KEYS)}), but got {got} in {where}. Pass "
            "`batch_parser=lambda batch: (x, y)` to CounterfactualMonitor.")
    if not isinstance(keypoints, torch.Tensor) or keypoints.dim() != 3:
        keypoints = None
    if not isinstance(masks, torch.Tensor) or masks.dim() != 4:
        masks = None
    return ParsedBatch(images, labels.long(), keypoints, masks)


def small_images(images: torch.Tensor, size: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The images as the monitor keeps them until they are drawn: RGB, ``size`` x ``size``, float16.

    When the images already have that size this is one pass over them (a cast), against six for
    min-max normalised ``uint8`` pictures: on the demo model (2 CPU threads) it took the
    monitor's thumbnails from 13-16 to 3-5 ms per validation epoch of 1000 images (six
    alternating runs). :func:`pictures` makes the few that are drawn ``uint8``. float16 keeps
    11 significant bits, a thousandth of an image's largest magnitude: far below one of a
    picture's 256 levels unless the image is a small variation on a large offset. Values beyond
    float16's range (65504) saturate.

    Args:
        images: ``(B, C, H, W)`` images (any normalisation); 1-channel images are repeated to
            RGB, only the first 3 channels of others are kept.
        size: side of the square image kept (resized bilinearly, antialiased when shrinking).
        out: optional ``(B, 3, size, size)`` float16 tensor to write them into (e.g. a slice of
            the thumbnails of several batches: the cast then writes them where they go).

    Returns:
        ``(B, 3, size, size)`` float16 tensor on the images' device (``out`` when given;
        ``images`` itself is never modified).
    """
    with torch.no_grad():
        x = images.detach()[:, :3]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (size, size):
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > size)
        if out is None:
            return x.to(torch.float16)
        if out.shape != (x.shape[0], 3, size, size) or out.dtype != torch.float16:
            raise ValueError(f"Expected `out` to be a float16 tensor of shape "
                             f"{(x.shape[0], 3, size, size)}, but got {out.dtype} {tuple(out.shape)}.")
        return out.copy_(x)


def pictures(small: torch.Tensor) -> torch.Tensor:
    """``uint8`` CPU pictures of kept images (:func:`small_images`), each min-max normalised.

    Args:
        small: ``(B, 3, h, w)`` images or one ``(3, h, w)`` image, any float dtype.

    Returns:
        The same shape in ``uint8``: each image's minimum is 0, its maximum 255; NaN counts as 0
        and infinities as float16's extremes.
    """
    with torch.no_grad():
        x = small.detach().float()
        one = x.dim() == 3
        x = torch.nan_to_num(x[None] if one else x, nan=0.0, posinf=65504.0, neginf=-65504.0)
        flat = x.flatten(1)
        lo, hi = flat.amin(1), flat.amax(1)
        scale = 255.0 / (hi - lo).clamp_min(1e-8)
        # (x - lo) * scale rounded, as the truncation of values in [0.5, 255.5] (through int16:
        # several times faster than straight to uint8 on the CPU)
        offset = (0.5 - lo * scale).view(-1, 1, 1, 1)
        x = x.mul_(scale.view(-1, 1, 1, 1)).add_(offset).to(torch.int16).to(torch.uint8).cpu()
        return x[0] if one else x

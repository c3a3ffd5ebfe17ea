"""An epoch's pictures, drawn and encoded once: TensorBoard and ``report.html`` share them.

The TensorBoard panels and the HTML report of an epoch show the same sample panels and the same
two figures. :func:`epoch_images` hands both the same :class:`EpochImages` for the same result
object, which draws each picture and encodes each PNG or JPEG the first time it is asked for.

Figures are PNG (flat colours, thin text: lossless and small). PNG is written with zlib's
run-length strategy (``Z_RLE``): on the sample panels a quarter of the default strategy's time
for files about 1 % larger (the figures come out about 15 % larger, a few KB). Sample panels
(photographs scaled up, with coloured outlines) are also JPEG at quality 88 without chroma
subsampling (the outlines keep their colour): a third of the PNG's bytes and a tenth of its
encoding time, which counts twice because TensorBoard's event writer checksums every byte it
writes in pure Python (about 0.12 s a MB).
"""

from __future__ import annotations

import io
import threading
import time
from typing import Any, Callable, Optional

import torch

from .epoch import EpochResult
from .figures import epoch_figure_images
from .images import sample_panel

__all__ = ["EpochImages", "epoch_images", "encode_png", "encode_jpeg"]

_Z_RLE = 3
"""zlib's ``Z_RLE`` strategy (Pillow's ``compress_type``)."""


def _check_image(image: object) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 \
            or image.shape[0] != 3:
        raise ValueError(f"Expected `image` to be a (3, H, W) uint8 tensor, but got "
                         f"{getattr(image, 'dtype', type(image).__name__)} "
                         f"{tuple(getattr(image, 'shape', ()))}.")
    return image


def _encode(image: torch.Tensor, fmt: str, **options: object) -> bytes:
    from PIL import Image

    array = _check_image(image).detach().cpu().permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format=fmt, **options)
    return buffer.getvalue()


def encode_png(image: torch.Tensor) -> bytes:
    """Encode a ``(3, H, W)`` uint8 image as PNG (lossless; zlib's run-length strategy).

    Raises:
        ValueError: when ``image`` is not a ``(3, H, W)`` uint8 tensor.
    """
    return _encode(image, "PNG", compress_type=_Z_RLE)


def encode_jpeg(image: torch.Tensor, quality: int = 88) -> bytes:
    """Encode a ``(3, H, W)`` uint8 image as JPEG, without chroma subsampling (4:4:4: thin
    coloured lines keep their colour; for photographs: ~3× smaller than PNG).

    Raises:
        ValueError: when ``image`` is not a ``(3, H, W)`` uint8 tensor or ``quality`` is not in
            1..100.
    """
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"Expected `quality` to be an int in 1..100, but got {quality!r}.")
    return _encode(image, "JPEG", quality=quality, subsampling=0)


class EpochImages:
    """The pictures of one epoch result, each drawn and encoded on first use.

    Args:
        result: the epoch result.
        panel_size: side of each sample's image panels in pixels.

    Attributes:
        timings: seconds spent so far drawing ``"figures"``, drawing ``"sample panels"`` and
            ``"encoding"`` (PNG and JPEG), whoever asked first.
    """

    def __init__(self, result: EpochResult, panel_size: int = 160) -> None:
        if not isinstance(result, EpochResult):
            raise TypeError(f"Expected `result` to be an EpochResult, but got "
                            f"{type(result).__name__}.")
        if not isinstance(panel_size, int) or panel_size < 32:
            raise ValueError(f"Expected `panel_size` to be an int >= 32, but got {panel_size!r}.")
        self.result = result
        self.panel_size = panel_size
        self.timings: dict[str, float] = {}
        self._lock = threading.RLock()
        self._memo: dict[tuple, object] = {}

    def _once(self, key: tuple, piece: str, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._memo:
                start = time.perf_counter()
                self._memo[key] = make()
                self.timings[piece] = self.timings.get(piece, 0.0) + time.perf_counter() - start
            return self._memo[key]

    def figures(self) -> dict[str, torch.Tensor]:
        """``{"part_errors", "confusion_parts"}`` ``(3, H, W)`` uint8 images, whichever exist
        (:func:`~fgvce_lightning.reporting.figures.epoch_figure_images`)."""
        return self._once(("figures",), "figures", lambda: epoch_figure_images(self.result))

    def figure_png(self, name: str) -> bytes:
        """The PNG of figure ``name`` (a key of :meth:`figures`).

        Raises:
            KeyError: when the epoch has no such figure.
        """
        figures = self.figures()
        if name not in figures:
            raise KeyError(f"Expected one of the epoch's figures {sorted(figures)}, but got "
                           f"{name!r}.")
        return self._once(("figure_png", name), "encoding", lambda: encode_png(figures[name]))

    def panel(self, index: int) -> Optional[torch.Tensor]:
        """Sample ``index``'s panels side by side
        (:func:`~fgvce_lightning.reporting.images.sample_panel`), or ``None``.

        Raises:
            IndexError: when ``index`` is not a sample of the result.
        """
        if not isinstance(index, int) or not 0 <= index < len(self.result.samples):
            raise IndexError(f"Expected a sample index in 0..{len(self.result.samples) - 1}, but "
                             f"got {index!r}.")
        return self._once(("panel", index), "sample panels", lambda: sample_panel(
            self.result.samples[index], self.result.feature_grid, size=self.panel_size))

    def panel_png(self, index: int) -> Optional[bytes]:
        """The PNG of :meth:`panel` (``None`` without a panel)."""
        panel = self.panel(index)
        return None if panel is None else self._once(("panel_png", index), "encoding",
                                                     lambda: encode_png(panel))

    def panel_jpeg(self, index: int) -> Optional[bytes]:
        """The JPEG of :meth:`panel` (``None`` without a panel)."""
        panel = self.panel(index)
        return None if panel is None else self._once(("panel_jpeg", index), "encoding",
                                                     lambda: encode_jpeg(panel))


_last: list[Optional[EpochImages]] = [None]
_last_lock = threading.Lock()


def epoch_images(result: EpochResult, panel_size: int = 160) -> EpochImages:
    """The :class:`EpochImages` of ``result``: the same object for the same result object and
    panel size as the previous call (so the TensorBoard panels and ``report.html`` of an epoch
    draw and encode every picture once), else a new one (which replaces it)."""
    with _last_lock:
        last = _last[0]
        if last is None or last.result is not result or last.panel_size != panel_size:
            last = _last[0] = EpochImages(result, panel_size)
        return last

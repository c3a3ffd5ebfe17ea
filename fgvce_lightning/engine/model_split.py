"""The result of a model split, shared by :mod:`.split` and :mod:`.transformers`.

:class:`ModelSplit` is what :func:`~fgvce_lightning.engine.split.split_model` returns; the two
helpers build its ``features`` / ``head`` callables. Kept apart from :mod:`.split` so that the
transformer splits can use them without importing :mod:`.split` (which dispatches to them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from ._util import check_feature_map

__all__ = ["ModelSplit", "SPLIT_OPTIONS", "WRAPPER_ATTRIBUTES"]

SPLIT_OPTIONS = (
    "(1) define `forward_features(x)` returning a (N, C, H, W) map and `forward_head(features)` "
    "returning logits on the model (the timm convention); "
    "(2) use a known torchvision family (ResNet/ResNeXt/WideResNet, ConvNeXt, EfficientNet, "
    "MobileNetV2/V3, VGG, DenseNet, RegNet, VisionTransformer, SwinTransformer); "
    "(3) pass `layer=\"<module or node name>\"` to split the traced graph (torch.fx) after that "
    "layer; "
    "(4) pass explicit `features=` and `head=` callables.")
"""The four ways to split a model, quoted by every error of this module."""

WRAPPER_ATTRIBUTES = ("model", "net", "backbone", "network", "classifier", "module", "_orig_mod")
"""Attributes of a wrapper module (e.g. a LightningModule) searched for the classifier it wraps."""


@dataclass(frozen=True)
class ModelSplit:
    """A classifier split into a spatial feature extractor and a head.

    Attributes:
        features: ``x (N, 3, H, W) -> F (N, C, h, w)``; checks that its output is a spatial map.
        head: ``F (N, C, h, w) -> logits (N, K)``. Never modifies ``F`` in place.
        hook_module: a module whose forward *output* is exactly ``F`` during the model's own
            forward, so a forward hook can capture ``F`` without a second forward; ``None`` when
            no such module exists (then use ``tap_module``/``tap_transform`` or call ``features``).
            Hooks should ``detach().clone()`` what they capture: later in-place operations of the
            model's forward may otherwise change it.
        description: human-readable description of the split.
        tap_module: a module whose output, passed through :meth:`features_from_tap`, is ``F``
            (defaults to ``hook_module``). Set for some splits without a ``hook_module``, e.g.
            vision transformers whose blocks output tokens.
        tap_transform: maps ``tap_module``'s output to ``F``; ``None`` means identity.
        prefix_channels: the trailing ``prefix_channels`` channels of ``F`` are per-image state
            (e.g. a vision transformer's class token) broadcast over every cell, not spatial
            evidence. An engine should leave them unedited and out of similarity measures; the
            head stays well defined if it does not (see :mod:`.transformers`). ``0`` for CNNs.
    """

    features: Callable[[Tensor], Tensor] = field(repr=False)
    head: Callable[[Tensor], Tensor] = field(repr=False)
    hook_module: Optional[nn.Module] = field(repr=False)
    description: str
    tap_module: Optional[nn.Module] = field(default=None, repr=False)
    tap_transform: Optional[Callable[[Tensor], Tensor]] = field(default=None, repr=False)
    prefix_channels: int = 0

    def __post_init__(self) -> None:
        if self.tap_module is None and self.tap_transform is None and self.hook_module is not None:
            object.__setattr__(self, "tap_module", self.hook_module)
        if self.prefix_channels < 0:
            raise ValueError(f"Expected `prefix_channels` to be >= 0, but got {self.prefix_channels}.")

    def __call__(self, x: Tensor) -> Tensor:
        """Logits ``head(features(x))``, shape ``(N, K)``."""
        return self.head(self.features(x))

    def features_from_tap(self, output: Tensor) -> Tensor:
        """Turn the output of ``tap_module`` (captured by a forward hook) into ``F (N, C, h, w)``."""
        return output if self.tap_transform is None else self.tap_transform(output)


class _Pipeline:
    """Apply named steps (modules or functions) in order; not an ``nn.Module`` on purpose."""

    def __init__(self, steps: Sequence[tuple[str, Callable[[Tensor], Tensor]]]) -> None:
        self.steps = tuple(steps)

    def __call__(self, x: Tensor) -> Tensor:
        for _, step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return " -> ".join(name for name, _ in self.steps) or "identity"


class _CheckedFeatures:
    """Wrap a features callable so its output is checked to be a spatial ``(N, C, H, W)`` map."""

    def __init__(self, fn: Callable[[Tensor], Tensor], description: str) -> None:
        self.fn = fn
        self.description = description

    def __call__(self, x: Tensor) -> Tensor:
        out = self.fn(x)
        try:
            return check_feature_map(out, "features")
        except ValueError as err:
            raise ValueError(f"{err} Split used: {self.description}. Other ways to split: "
                             f"{SPLIT_OPTIONS}") from None

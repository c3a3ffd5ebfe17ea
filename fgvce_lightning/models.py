"""``SmallCNN``: the demo classifier, split into ``forward_features`` and a non-linear ``forward_head``.

Pure torch (no Lightning): the Lightning wrapper lives in :mod:`fgvce_lightning.demo`.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small CNN for ``S×S`` images (``S`` divisible by 8) with features on an ``S/8`` grid.

    ``forward(x) == forward_head(forward_features(x))``. The head is a 3×3 conv + BN + ReLU before
    global average pooling and a linear layer, so a cell's effect on the logits depends on its
    neighbours: local Shapley values are meaningful (a pooling + linear head would be additive).

    Layout for 64×64 inputs, ``width = w``: conv(3→w) @64 → pool → conv(w→2w) @32 → pool →
    conv(2w→4w), conv(4w→4w) @16 → pool → features ``(N, 4w, 8, 8)``.

    Args:
        num_classes: number of classes.
        width: channels of the first stage; features have ``4 * width`` channels.
        in_channels: input channels.
        dropout: dropout before the linear classifier.
    """

    def __init__(self, num_classes: int, width: int = 32, in_channels: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        if num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be at least 2, but got {num_classes}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` to be in [0, 1), but got {dropout!r}.")
        self.num_classes, self.width = num_classes, width
        self.feature_channels = 4 * width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width), nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 4 * width), _conv_bn_relu(4 * width, 4 * width), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            _conv_bn_relu(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(4 * width, num_classes),
        )

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(N, C_in, S, S)`` → feature maps ``(N, 4 * width, S/8, S/8)``."""
        if x.dim() != 4:
            raise ValueError(f"Expected images of shape (N, C, H, W), but got {tuple(x.shape)}.")
        return self.features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """Feature maps ``(N, 4 * width, h, w)`` → logits ``(N, num_classes)``."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(N, C_in, S, S)`` → logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


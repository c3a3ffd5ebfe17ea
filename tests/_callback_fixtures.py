"""Tiny models and planted data for the callback tests (importable by spawned DDP workers)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

NUM_CLASSES = 4
SIZE = 16
PART_NAMES = ("top", "bottom")


class TinyNet(nn.Module):
    """16×16 input → 8×4×4 feature map (timm convention) → non-linear head with dropout."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(4))
        self.mix = nn.Conv2d(8, 8, 1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(F.relu(self.mix(f)).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _unpack(batch):
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


class TinyClassifier(L.LightningModule):
    def __init__(self, num_classes: int = NUM_CLASSES, lr: float = 0.05) -> None:
        super().__init__()
        self.net = TinyNet(num_classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = _unpack(batch)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = _unpack(batch)
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def planted_data(n: int, seed: int, num_classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose class is a bright patch in one of ``num_classes`` places (weak signal)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (n,), generator=g)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    for c in range(num_classes):
        r, col = (c // 2) * 8, (c % 2) * 8
        x[y == c, :, r:r + 8, col:col + 8] += 1.0
    return x, y


def loaders(n_train: int = 64, n_val: int = 64, batch_size: int = 16):
    xt, yt = planted_data(n_train, 1)
    xv, yv = planted_data(n_val, 2)
    train = DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=batch_size)
    return train, val


class KeypointDataset(Dataset):
    """Dict items with two keypoints (top/bottom half centre), like SyntheticBirds."""

    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = planted_data(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        kp = torch.tensor([[8.0, 3.0, 1.0], [8.0, 12.0, 1.0]])
        return {"image": self.x[i], "label": self.y[i], "keypoints": kp}


class PlantedModel(L.LightningModule):
    """Hand-set 3-class model: features = 4×4 average pool of the image, logits = channel means
    through a small non-linear head; the class is the brightest channel."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3) * 4)
            self.fc.bias.zero_()

    def forward_features(self, x):
        return self.pool(x)

    def forward_head(self, f):
        return self.fc(torch.tanh(f).mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)


def planted_val(n: int = 32) -> TensorDataset:
    """Sample ``i`` shows class ``i % 3``; labels are wrong exactly where ``i % 4 == 0``.

    With a DistributedSampler over 2 ranks (no shuffle) rank 0 gets the even indices (mistakes and
    correct samples), rank 1 the odd ones (no mistake at all).
    """
    g = torch.Generator().manual_seed(0)
    shown = torch.arange(n) % 3
    x = 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    x[torch.arange(n), shown] += 1.0
    y = shown.clone()
    wrong = torch.arange(n) % 4 == 0
    y[wrong] = (shown[wrong] + 1) % 3
    return TensorDataset(x, y)


class PooledNet(nn.Module):
    """Like :class:`TinyNet`, but its head pools the map to 2x2 (the planted quadrants), so it
    takes any input size."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(4))
        self.mix = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 2 * 2, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.mix(f)), 2).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PooledClassifier(TinyClassifier):
    """A :class:`TinyClassifier` on :class:`PooledNet`, validating on several dataloaders."""

    def __init__(self, num_classes: int = NUM_CLASSES, lr: float = 0.05) -> None:
        super().__init__(num_classes, lr)
        self.net = PooledNet(num_classes)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = _unpack(batch)
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = _unpack(batch)
        self.log("test_loss", F.cross_entropy(self(x), y))


def resized(loader: DataLoader, size: int) -> DataLoader:
    """The same samples at ``size`` x ``size`` pixels (the planted patches scale with them)."""
    x, y = loader.dataset.tensors
    x = F.interpolate(x, size=(size, size), mode="nearest")
    return DataLoader(TensorDataset(x, y), batch_size=loader.batch_size)

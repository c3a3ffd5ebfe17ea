"""Fine-tune a torchvision ResNet-50 on CUB-200-2011 and explain its validation mistakes part by part.

CUB-200-2011 must already be on disk (nothing is downloaded); ``--root`` is the ``CUB_200_2011``
folder or its parent. Its 15 part keypoints (left/right merged: 12 parts) travel with every batch
under ``"keypoints"``, so every edited feature cell is named after the bird part it covers
(``beak``, ``wing``, ...) and the epoch reports count which parts the mistakes come from.

    python examples/cub_resnet50.py --root ~/data/CUB_200_2011 --weights resnet50_imagenet.pth
    python examples/cub_resnet50.py --root ~/data --torchvision-weights   # if already in the torch hub cache
    tensorboard --logdir runs/cub_resnet50

Weights: ``--weights PATH`` loads an ImageNet ``state_dict`` saved with ``torch.save`` (the 1000-way
``fc`` is replaced); ``--torchvision-weights`` uses ``ResNet50_Weights.IMAGENET1K_V2`` only if the
file is already in the torch hub cache (this script never downloads); neither = from scratch.

The model split is automatic: features = ResNet-50 up to ``layer4[:-1]`` (a 7×7×2048 map at 224
pixels), head = ``layer4[-1]`` + pooling + ``fc``, a non-linear head. With 200 classes the reference
bank is the large part of the monitor's memory: it keeps float16 maps under ``--bank-mb``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
import torchvision
from torch.nn import functional as nnf
from torch.utils.data import DataLoader

from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.datasets import CUB200


def _batches(text: str) -> int | float:
    """Lightning's ``limit_*_batches``: an int counts batches, a float is a fraction."""
    return float(text) if "." in text else int(text)


def build_resnet50(num_classes: int, weights: Optional[str] = None,
                   torchvision_weights: bool = False) -> torch.nn.Module:
    """A ResNet-50 with a ``num_classes``-way ``fc``, from a local state dict, the torch hub cache or
    from scratch. Never downloads."""
    if weights is not None and torchvision_weights:
        raise ValueError("Expected at most one of `--weights PATH` and `--torchvision-weights`, but got both.")
    model = torchvision.models.resnet50(weights=None)
    state = None
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"Expected `--weights` to be a local state_dict file, but {weights!r} "
                                    "does not exist.")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    elif torchvision_weights:
        url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not cached.is_file():
            raise FileNotFoundError(f"Expected the torchvision ResNet-50 weights in the torch hub cache at "
                                    f"{cached}, but they are not there. This example never downloads: put "
                                    "the file there, or pass `--weights PATH`, or train from scratch.")
        state = torch.load(cached, map_location="cpu", weights_only=True)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise ValueError(f"Expected a torchvision ResNet-50 state_dict, but got missing keys "
                             f"{sorted(missing)[:5]} and unexpected keys {sorted(unexpected)[:5]}.")
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


class CUBClassifier(L.LightningModule):
    """ResNet-50 (``self.model``) trained with SGD + cosine decay; a lower learning rate for the
    pretrained backbone than for the new ``fc``."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.01, backbone_lr_scale: float = 0.1,
                 weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.model = model
        self.lr, self.backbone_lr_scale, self.weight_decay = lr, backbone_lr_scale, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        loss = nnf.cross_entropy(logits, batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        n = len(batch["label"])
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=n, on_epoch=True, on_step=stage == "train")
        self.log(f"{stage}_acc", acc, prog_bar=True, batch_size=n, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_epoch_start(self) -> None:
        dataset = self.trainer.train_dataloader.dataset
        if hasattr(dataset, "set_epoch"):       # a new random crop / flip every epoch
            dataset.set_epoch(self.current_epoch)

    def configure_optimizers(self) -> Any:
        head = list(self.model.fc.parameters())
        body = [p for n, p in self.model.named_parameters() if not n.startswith("fc.")]
        optimizer = torch.optim.SGD([{"params": body, "lr": self.lr * self.backbone_lr_scale},
                                     {"params": head, "lr": self.lr}],
                                    momentum=0.9, weight_decay=self.weight_decay, nesterov=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main(argv: Optional[Sequence[str]] = None) -> CounterfactualMonitor:
    parser = argparse.ArgumentParser(description="ResNet-50 on CUB-200-2011 with CounterfactualMonitor.")
    parser.add_argument("--root", required=True, help="the CUB_200_2011 folder or its parent")
    parser.add_argument("--weights", default=None, help="local ImageNet state_dict of a torchvision ResNet-50")
    parser.add_argument("--torchvision-weights", action="store_true",
                        help="IMAGENET1K_V2 weights from the torch hub cache (never downloaded)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--limit-batches", type=_batches, default=1.0,
                        help="train/val batches per epoch (int) or fraction (float)")
    parser.add_argument("--every-n-epochs", type=int, default=5, help="explain every n-th validation epoch")
    parser.add_argument("--max-samples", type=int, default=64, help="mistakes explained per explained epoch")
    parser.add_argument("--time-budget-s", type=float, default=600.0, help="explanation time per epoch")
    parser.add_argument("--bank-mb", type=float, default=2048.0, help="memory of the reference bank")
    parser.add_argument("--references-per-class", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=256, help="feature maps per head call")
    parser.add_argument("--no-html", action="store_true", help="write report.json/edits.csv only")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true", help="e.g. 16-mixed / bf16-mixed on a GPU")
    parser.add_argument("--output-dir", default="runs/cub_resnet50")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_set = CUB200(args.root, split="train", image_size=args.image_size, crop="random", hflip=True,
                       seed=args.seed)
    val_set = CUB200(args.root, split="test", image_size=args.image_size, crop="center")
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers)
    train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > args.batch_size, **common)
    val_loader = DataLoader(val_set, shuffle=False, **common)   # unshuffled: report ids = dataset indices

    model = CUBClassifier(build_resnet50(train_set.num_classes, args.weights, args.torchvision_weights),
                          lr=args.lr, backbone_lr_scale=0.1 if (args.weights or args.torchvision_weights) else 1.0)
    monitor = CounterfactualMonitor(
        every_n_epochs=args.every_n_epochs, max_samples=args.max_samples, time_budget_s=args.time_budget_s,
        memory_budget_mb=args.bank_mb, bank_dtype="float16", max_references_per_class=args.references_per_class,
        part_source="keypoints", part_names=train_set.part_names, class_names=train_set.class_names,
        report_html=not args.no_html, explain_batch_size=8, chunk_size=args.chunk_size, seed=args.seed)
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[monitor], default_root_dir=args.output_dir,
                        accelerator=args.accelerator, devices=1, precision=args.precision,
                        limit_train_batches=args.limit_batches, limit_val_batches=args.limit_batches,
                        log_every_n_steps=min(50, max(1, len(train_loader))))
    trainer.fit(model, train_loader, val_loader)
    print(f"last epoch report: {monitor.last_report}")
    return monitor


if __name__ == "__main__":
    main()

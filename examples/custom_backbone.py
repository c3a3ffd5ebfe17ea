"""Your own architecture: tell ``CounterfactualMonitor`` where the feature map is.

A model the monitor does not know (no ``forward_features``/``forward_head``, not a torchvision or
timm family) needs one of two hints:

* ``features=`` / ``head=`` callables, ``x -> F (N, C, h, w)`` and ``F -> logits``, with
  ``layer=`` naming the module whose output is ``F`` so that the monitor captures ``F`` with a
  forward hook during your own ``validation_step`` (no second forward pass)::

      CounterfactualMonitor(features=model.backbone, head=model.classifier, layer="backbone")

* or only ``layer=``: the monitor traces the model with torch.fx and splits after that module::

      CounterfactualMonitor(layer="backbone.stage3")

Keep at least one non-linear layer with spatial extent in the head (here a 3×3 conv block): after
a plain pooling + linear head every cell acts alone.

    python examples/custom_backbone.py --split callables
    python examples/custom_backbone.py --split layer
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch import nn
from torch.nn import functional as nnf

from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.datasets import make_dataloaders


def _batches(text: str) -> int | float:
    """Lightning's ``limit_*_batches``: an int counts batches, a float is a fraction."""
    return float(text) if "." in text else int(text)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class PartNet(L.LightningModule):
    """``backbone`` (three stride-2 stages, features on an ``S/8`` grid) and ``classifier``
    (3×3 conv block, attention-like spatial weighting, linear)."""

    def __init__(self, num_classes: int = 8, width: int = 24, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential()
        self.backbone.add_module("stage1", nn.Sequential(_block(3, width), nn.MaxPool2d(2)))
        self.backbone.add_module("stage2", nn.Sequential(_block(width, 2 * width), nn.MaxPool2d(2)))
        self.backbone.add_module("stage3", nn.Sequential(_block(2 * width, 4 * width), nn.MaxPool2d(2)))
        self.classifier = nn.ModuleDict({
            "mix": _block(4 * width, 4 * width),
            "attend": nn.Conv2d(4 * width, 1, 1),
            "fc": nn.Linear(4 * width, num_classes),
        })

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` feature maps -> ``(N, num_classes)`` logits."""
        x = self.classifier["mix"](features)
        weights = self.classifier["attend"](x).flatten(1).softmax(dim=1)          # (N, h*w)
        pooled = torch.einsum("nch,nh->nc", x.flatten(2), weights)
        return self.classifier["fc"](pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        loss = nnf.cross_entropy(logits, batch["label"])
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=len(logits))
        self.log(f"{stage}_acc", (logits.argmax(1) == batch["label"]).float().mean(), prog_bar=True,
                 batch_size=len(logits))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def make_monitor(model: PartNet, split: str, **options: Any) -> CounterfactualMonitor:
    """The two ways of pointing the monitor at ``model``'s feature map."""
    if split == "callables":
        return CounterfactualMonitor(features=model.backbone, head=model.head, layer="backbone", **options)
    if split == "layer":
        return CounterfactualMonitor(layer="backbone.stage3", **options)
    raise ValueError(f"Expected `split` to be 'callables' or 'layer', but got {split!r}.")


def main(argv: Optional[Sequence[str]] = None) -> CounterfactualMonitor:
    parser = argparse.ArgumentParser(description="A custom backbone + head with CounterfactualMonitor.")
    parser.add_argument("--split", choices=("callables", "layer"), default="callables")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64, help="a multiple of 8, >= 32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit-batches", type=_batches, default=1.0,
                        help="train/val batches per epoch (int) or fraction (float)")
    parser.add_argument("--max-samples", type=int, default=64, help="mistakes explained per epoch")
    parser.add_argument("--no-html", action="store_true", help="write report.json/edits.csv only")
    parser.add_argument("--output-dir", default="runs/custom_backbone")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_loader, val_loader = make_dataloaders(args.num_train, args.num_val, batch_size=args.batch_size,
                                                seed=args.seed, image_size=args.image_size)
    data = train_loader.dataset
    model = PartNet(num_classes=data.num_classes)
    monitor = make_monitor(model, args.split, max_samples=args.max_samples, report_html=not args.no_html,
                           part_names=data.part_names, class_names=data.class_names)
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[monitor], default_root_dir=args.output_dir,
                        limit_train_batches=args.limit_batches, limit_val_batches=args.limit_batches,
                        accelerator="auto", devices=1, log_every_n_steps=1)
    trainer.fit(model, train_loader, val_loader)
    print(f"last epoch report: {monitor.last_report}")
    return monitor


if __name__ == "__main__":
    main()

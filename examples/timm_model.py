"""A timm model on SyntheticBirds with ``CounterfactualMonitor``.

timm models follow the ``forward_features`` / ``forward_head`` convention, and the monitor uses it:
features = ``forward_features(x)`` (the last stage's map), head = ``forward_head`` (global pooling +
classifier). Such a head is *additive* over the cells (a sum of per-cell terms): the contributions
then have an exact closed form and every cell acts alone. To keep a non-linear head — cells that
matter together, as on a real bird — split one block earlier with ``layer=``:

    python examples/timm_model.py                                  # forward_features / forward_head
    python examples/timm_model.py --layer model.layer4.0           # head = layer4[1] + pool + fc (FX)
    python examples/timm_model.py --model convnext_atto --layer model.stages.3.blocks.0

``layer`` names a module of the LightningModule (the timm model is its ``model`` attribute); the
monitor traces the model with torch.fx and splits after that module. No weights are downloaded
(``pretrained=False``); load your own with ``timm.create_model(..., pretrained_cfg_overlay=dict(file=PATH))``.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import lightning as L
import timm
import torch
from torch.nn import functional as nnf

from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.datasets import make_dataloaders


def _batches(text: str) -> int | float:
    """Lightning's ``limit_*_batches``: an int counts batches, a float is a fraction."""
    return float(text) if "." in text else int(text)


class TimmClassifier(L.LightningModule):
    """Any timm classifier (``self.model``) trained with AdamW."""

    def __init__(self, name: str = "resnet18", num_classes: int = 8, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model(name, pretrained=False, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

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
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)


def main(argv: Optional[Sequence[str]] = None) -> CounterfactualMonitor:
    parser = argparse.ArgumentParser(description="A timm model on SyntheticBirds with CounterfactualMonitor.")
    parser.add_argument("--model", default="resnet18", help="any timm model name (pretrained=False)")
    parser.add_argument("--layer", default=None,
                        help="split after this module (e.g. model.layer4.0) for a non-linear head; "
                             "default: forward_features / forward_head")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=128, help=">= 32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit-batches", type=_batches, default=1.0,
                        help="train/val batches per epoch (int) or fraction (float)")
    parser.add_argument("--max-samples", type=int, default=64, help="mistakes explained per epoch")
    parser.add_argument("--no-html", action="store_true", help="write report.json/edits.csv only")
    parser.add_argument("--output-dir", default="runs/timm_model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_loader, val_loader = make_dataloaders(args.num_train, args.num_val, batch_size=args.batch_size,
                                                seed=args.seed, image_size=args.image_size)
    data = train_loader.dataset
    model = TimmClassifier(args.model, num_classes=data.num_classes)
    monitor = CounterfactualMonitor(layer=args.layer, max_samples=args.max_samples, report_html=not args.no_html,
                                    part_names=data.part_names, class_names=data.class_names)
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[monitor], default_root_dir=args.output_dir,
                        limit_train_batches=args.limit_batches, limit_val_batches=args.limit_batches,
                        accelerator="auto", devices=1, log_every_n_steps=1)
    trainer.fit(model, train_loader, val_loader)
    print(f"last epoch report: {monitor.last_report}")
    return monitor


if __name__ == "__main__":
    main()

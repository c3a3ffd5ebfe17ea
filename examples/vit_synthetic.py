"""A tiny vision transformer trained from scratch on SyntheticBirds with ``CounterfactualMonitor``.

The monitor splits a ViT after its second-to-last encoder block: the patch tokens form the feature
map on the patch grid (``image_size / patch_size`` cells a side) and the head keeps the last block,
the final norm and the classifier — a non-linear head in which patches interact through attention.
The class token is carried along as extra channels (``ModelSplit.prefix_channels``) that every
edit leaves as they are, so an edited query keeps its own class token and only patches are swapped.

    python examples/vit_synthetic.py                      # torchvision VisionTransformer, 8x8 patches
    python examples/vit_synthetic.py --timm               # the same shape as a timm VisionTransformer

Transformers learn slowly from little data: expect many mistakes (and many explanations) in the
first epochs. Swin models (torchvision or timm) are split the same way, on their last stage's grid.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch import nn
from torch.nn import functional as nnf
from torchvision.models import VisionTransformer

from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.datasets import make_dataloaders


def _batches(text: str) -> int | float:
    """Lightning's ``limit_*_batches``: an int counts batches, a float is a fraction."""
    return float(text) if "." in text else int(text)


def tiny_vit(image_size: int, num_classes: int, patch_size: int = 8, depth: int = 4, dim: int = 96,
             heads: int = 3, use_timm: bool = False) -> nn.Module:
    """A small randomly initialised ViT (torchvision, or timm with ``use_timm``)."""
    if image_size % patch_size:
        raise ValueError(f"Expected `image_size` to be a multiple of the patch size {patch_size}, but got "
                         f"{image_size}.")
    if use_timm:
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        return TimmViT(img_size=image_size, patch_size=patch_size, embed_dim=dim, depth=depth,
                       num_heads=heads, mlp_ratio=2.0, num_classes=num_classes)
    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=depth, num_heads=heads,
                             hidden_dim=dim, mlp_dim=2 * dim, num_classes=num_classes)


class ViTClassifier(L.LightningModule):
    """A ViT (``self.model``) trained with AdamW, warm-up-free cosine decay and label smoothing."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        loss = nnf.cross_entropy(logits, batch["label"], label_smoothing=0.1)
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=len(logits))
        self.log(f"{stage}_acc", (logits.argmax(1) == batch["label"]).float().mean(), prog_bar=True,
                 batch_size=len(logits))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main(argv: Optional[Sequence[str]] = None) -> CounterfactualMonitor:
    parser = argparse.ArgumentParser(description="A tiny ViT on SyntheticBirds with CounterfactualMonitor.")
    parser.add_argument("--timm", action="store_true", help="a timm VisionTransformer instead of torchvision's")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64, help="a multiple of --patch-size, >= 32")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit-batches", type=_batches, default=1.0,
                        help="train/val batches per epoch (int) or fraction (float)")
    parser.add_argument("--max-samples", type=int, default=64, help="mistakes explained per epoch")
    parser.add_argument("--no-html", action="store_true", help="write report.json/edits.csv only")
    parser.add_argument("--output-dir", default="runs/vit_synthetic")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_loader, val_loader = make_dataloaders(args.num_train, args.num_val, batch_size=args.batch_size,
                                                seed=args.seed, image_size=args.image_size)
    data = train_loader.dataset
    vit = tiny_vit(args.image_size, data.num_classes, args.patch_size, args.depth, args.dim, args.heads,
                   use_timm=args.timm)
    model = ViTClassifier(vit)
    monitor = CounterfactualMonitor(max_samples=args.max_samples, report_html=not args.no_html,
                                    part_names=data.part_names, class_names=data.class_names)
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[monitor], default_root_dir=args.output_dir,
                        limit_train_batches=args.limit_batches, limit_val_batches=args.limit_batches,
                        accelerator="auto", devices=1, log_every_n_steps=1)
    trainer.fit(model, train_loader, val_loader)
    print(f"last epoch report: {monitor.last_report}")
    return monitor


if __name__ == "__main__":
    main()

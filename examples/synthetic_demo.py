"""The shortest user story: train a small CNN on SyntheticBirds and let ``CounterfactualMonitor``
explain its validation mistakes, part by part, after every validation epoch.

    python examples/synthetic_demo.py                     # 5 epochs, about 2 minutes on a CPU
    tensorboard --logdir runs/synthetic_demo              # fgvce/* scalars, images, part figures
    # epoch reports: runs/synthetic_demo/lightning_logs/version_*/fgvce/epoch_*/report.{html,json}

``DemoClassifier`` exposes ``forward_features``/``forward_head`` (the timm convention), so the
monitor splits the model by itself; the batches are dicts with ``keypoints``, so the edited cells
are named after the bird's parts.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import lightning as L

from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.datasets import make_dataloaders
from fgvce_lightning.demo import DemoClassifier


def _batches(text: str) -> int | float:
    """Lightning's ``limit_*_batches``: an int counts batches, a float is a fraction."""
    return float(text) if "." in text else int(text)


def main(argv: Optional[Sequence[str]] = None) -> CounterfactualMonitor:
    parser = argparse.ArgumentParser(description="SmallCNN on SyntheticBirds with CounterfactualMonitor.")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64, help="a multiple of 8, >= 32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit-batches", type=_batches, default=1.0,
                        help="train/val batches per epoch (int) or fraction (float)")
    parser.add_argument("--max-samples", type=int, default=64, help="mistakes explained per epoch")
    parser.add_argument("--no-html", action="store_true", help="write report.json/edits.csv only")
    parser.add_argument("--output-dir", default="runs/synthetic_demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train_loader, val_loader = make_dataloaders(args.num_train, args.num_val, batch_size=args.batch_size,
                                                seed=args.seed, image_size=args.image_size)
    model = DemoClassifier(num_classes=8)
    data = train_loader.dataset
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

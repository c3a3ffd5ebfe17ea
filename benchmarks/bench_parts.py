"""Benchmark: do the explanations name the part that tells the species apart, or the true cause?

Trains the demo :class:`~fgvce_lightning.demo.DemoClassifier` on :class:`SyntheticBirds` (default
2000 train images, 8 species that differ in bill, wing bar and tail), then

1. explains the same validation mistakes with FG-VCE, the greedy cell-swap baseline (Goyal et al.
   2019), and the FG-VCE search with Grad-CAM / random region order
   (:func:`fgvce_lightning.evaluate.evaluate_model`) and prints flip rate, edits, head evaluations,
   Near/Same-part hit rates, the per-cell semantic consistency, the known answers (how often the
   first edit names a separating part, the part most of its cells carry, the pairs whose
   dominant part separates them, how often the first edit names the mistake's *cause* found by
   drawing the image again), the ceiling (only the separating part swapped, from the masks) and
   the deletion / insertion AUC of each cell ranking; part labels as the monitor makes them
   (keypoints, Near-KP radius one cell);
2. fits discovered part prototypes (:class:`PartPrototypes`, cosine k-means) on the reference
   bank's cells, assigns every validation cell a prototype and measures their purity against the
   ground-truth part masks (a cell's part = the label covering most of it, background included),
   with per-part best-cluster precision / recall.

Repeated for every ``--seeds`` value (a freshly trained model and its own data each time); a
closing table gives the distinguishing-part hit rates of every seed side by side.

    python benchmarks/bench_parts.py                  # 3 seeds, about 8 minutes on 2 CPU cores
    python benchmarks/bench_parts.py --seeds 0 --epochs 3 --max-queries 32
"""

from __future__ import annotations

import argparse
import ast
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from fgvce_lightning.datasets import PART_NAMES, SyntheticBirds
from fgvce_lightning.demo import train_demo
from fgvce_lightning.engine import split_model
from fgvce_lightning.engine._util import preserved_training_flags
from fgvce_lightning.engine.config import SearchConfig
from fgvce_lightning.evaluate import (STRATEGIES, cell_majority_parts, evaluate_model,
                                      format_table, prototype_purity)
from fgvce_lightning.parts import PartPrototypes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10, the demo's)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=2000,
                        help="validation images (default 2000: about 150-200 mistakes to explain)")
    parser.add_argument("--max-queries", type=int, default=200)
    parser.add_argument("--bank-per-class", type=int, default=64)
    parser.add_argument("--prototypes", type=int, default=len(PART_NAMES) + 1,
                        help="number of discovered prototypes (default: parts + background)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one trained model (and data set) per seed")
    parser.add_argument("--search", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="SearchConfig fields, e.g. num_samples=1 window=5")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated subset of {','.join(STRATEGIES)}")
    return parser.parse_args()


def search_config(args: argparse.Namespace, seed: int) -> SearchConfig:
    """``SearchConfig(seed=seed)`` with the ``--search`` fields (Python literals)."""
    fields = {}
    for item in args.search:
        name, _, value = item.partition("=")
        fields[name] = ast.literal_eval(value)
    return SearchConfig(seed=seed, **fields)


@torch.no_grad()
def _val_features(module: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    split = split_model(module)
    feats, masks = [], []
    with preserved_training_flags(module):
        for batch in loader:
            feats.append(split.features(batch["image"]))
            masks.append(batch["masks"])
    return torch.cat(feats), torch.cat(masks)


SUMMARY = (
    ("first edit names a separating part", lambda s: s.separating.first_edit),
    ("  the part most of its cells carry", lambda s: s.separating.first_edit_main),
    ("pairs (>= 5) whose dominant part separates", lambda s: s.separating.pairs),
    ("first edit names the known cause", lambda s: s.causes.get("known")),
)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = [run_seed(args, seed) for seed in args.seeds]
    print("\n=== known answers per seed (hits/total) ===")
    names = [s.name for s in rows[0][1].strategies]
    width = max(10, *(len(n) + 2 for n in names))
    print(f"{'':44}" + "".join(f"{n:>{width}}" for n in names))
    for seed, result in rows:
        print(f"seed {seed} (accuracy {result.accuracy:.3f}, {result.num_queries} mistakes; ceiling "
              f"{result.ceiling}; causes {result.cause_counts})")
        for label, get in SUMMARY:
            cells = []
            for s in result.strategies:
                rate = get(s)
                cells.append(f"{rate.hits}/{rate.total}" if rate is not None and rate.total
                             else "-")
            print(f"  {label:<42}" + "".join(f"{c:>{width}}" for c in cells))
        print(f"  {'semantic consistency (cells)':<42}" + "".join(
            f"{s.consistency:>{width}.3f}" for s in result.strategies))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


def run_seed(args: argparse.Namespace, seed: int):
    """Train, explain with every strategy, measure; returns ``(seed, result)``."""
    start = time.perf_counter()
    print(f"\n##### seed {seed} #####")
    with tempfile.TemporaryDirectory() as root:
        _, module = train_demo(max_epochs=args.epochs, num_train=args.num_train,
                               num_val=500, seed=seed, enable_progress_bar=False,
                               default_root_dir=root, logger=False, enable_checkpointing=False)
    trained = time.perf_counter()
    print(f"trained DemoClassifier for {args.epochs} epochs on {args.num_train} SyntheticBirds "
          f"images in {trained - start:.0f} s (torch threads: 1)\n")

    val = SyntheticBirds(args.num_val, num_classes=8, seed=seed, split="val")
    loader = DataLoader(val, batch_size=16, shuffle=False)
    result = evaluate_model(module, loader, max_queries=args.max_queries,
                            bank_per_class=args.bank_per_class, seed=seed,
                            config=search_config(args, seed),
                            strategies=tuple(args.strategies.split(",")))
    print(format_table(result))
    print(f"\n(evaluation {time.perf_counter() - trained:.0f} s)")

    # discovered prototypes vs ground-truth parts
    feats, masks = _val_features(module, loader)
    bank = result.bank
    bank_maps = torch.cat([bank.get(c)[0] for c in range(bank.num_classes)])
    protos = PartPrototypes(num_parts=args.prototypes, seed=seed)
    protos.fit(bank_maps)
    clusters = protos.assign(feats)
    truth = cell_majority_parts(masks, tuple(feats.shape[2:]))
    names = PART_NAMES + ("background",)
    purity = prototype_purity(clusters, truth, args.prototypes, names)
    print(f"\ndiscovered prototypes: {args.prototypes} cosine k-means clusters fitted on the "
          f"{bank_maps.shape[0]} bank maps ({bank_maps.shape[0] * truth[0].numel()} cells), "
          f"assigned to all {truth.numel()} validation cells")
    print(f"purity {purity.purity:.3f}  (majority-label baseline {purity.majority_baseline:.3f})")
    share = torch.bincount(truth.flatten(), minlength=len(names)).double() / truth.numel()
    print(f"{'part':<12}{'cells':>8}{'best cluster':>14}{'precision':>11}{'recall':>9}")
    for k, name in enumerate(names):
        print(f"{name:<12}{share[k]:>8.3f}{purity.best_cluster[k]:>14d}"
              f"{purity.precision[k]:>11.3f}{purity.recall[k]:>9.3f}")
    bird = truth != len(PART_NAMES)
    fg = prototype_purity(clusters[bird], truth[bird], args.prototypes, names)
    print(f"on the bird's {int(bird.sum())} cells only ({bird.float().mean():.1%} of all): purity "
          f"{fg.purity:.3f} (majority-part baseline {fg.majority_baseline:.3f})")
    return seed, result


if __name__ == "__main__":
    main()

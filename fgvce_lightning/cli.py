"""The ``fgvce`` command line.

``fgvce evaluate --checkpoint PATH`` runs the engine over a demo checkpoint's validation mistakes and
prints the metrics of the main search and of the baselines side by side.

``fgvce demo`` trains the demo :class:`~fgvce_lightning.models.SmallCNN` on
:class:`~fgvce_lightning.datasets.SyntheticBirds` for a few epochs on the CPU with a
:class:`~fgvce_lightning.callback.CounterfactualMonitor` attached, then prints where the TensorBoard
logs and the epoch reports are and how to open them. Also available as
``python -m fgvce_lightning demo``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ._argtypes import positive_int

__all__ = ["main", "build_parser", "run_demo"]


def build_parser() -> argparse.ArgumentParser:
    """The ``fgvce`` argument parser (subcommand ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="fgvce", description="Part-level counterfactual explanations of a classifier's "
                                  "validation mistakes, while it trains (FG-VCE).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo", help="train a small CNN on synthetic birds with the CounterfactualMonitor",
        description="Train SmallCNN on SyntheticBirds for a few epochs with the "
                    "CounterfactualMonitor on, then print where the TensorBoard logs and the "
                    "reports are.")
    demo.add_argument("--epochs", type=positive_int, default=10, help="training epochs (default: 10)")
    demo.add_argument("--output-dir", default="runs/fgvce-demo",
                      help="where logs, checkpoints and reports go (default: runs/fgvce-demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--max-samples", type=positive_int, default=64,
                      help="mistakes explained per epoch (default: 64)")
    demo.add_argument("--accelerator", default="cpu",
                      help="Lightning accelerator: cpu, gpu, mps, auto (default: cpu)")
    demo.add_argument("--num-train", type=positive_int, default=2000, help=argparse.SUPPRESS)
    demo.add_argument("--num-val", type=positive_int, default=500, help=argparse.SUPPRESS)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from .evaluate import add_evaluate_parser

    add_evaluate_parser(sub)
    return parser


def run_demo(epochs: int = 10, output_dir: str | os.PathLike = "runs/fgvce-demo", seed: int = 0,
             max_samples: int = 64, accelerator: str = "cpu", num_train: int = 2000,
             num_val: int = 500, progress: bool = True) -> dict[str, Optional[Path]]:
    """Train the demo with the monitor and return where its outputs are.

    Returns:
        ``{"tensorboard": <TensorBoard log dir>, "reports": <report dir>, "latest_report":
        <latest report.html (or report.json)>, "summary": <last epoch summary>,
        "known_answers": <the last report scored against the parts that separate the species,
        as text, or None>}``.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from .callback import CounterfactualMonitor
    from .datasets import PART_NAMES, SyntheticBirds
    from .demo import train_demo

    output_dir = Path(output_dir)
    num_classes = 8
    class_names = SyntheticBirds(1, num_classes=num_classes, seed=seed).class_names
    monitor = CounterfactualMonitor(max_samples=max_samples, part_names=PART_NAMES,
                                    class_names=class_names, seed=seed)
    logger = TensorBoardLogger(save_dir=os.fspath(output_dir), name="lightning_logs")
    _, module = train_demo(max_epochs=epochs, num_train=num_train, num_val=num_val,
                           callbacks=[monitor], default_root_dir=output_dir, seed=seed,
                           accelerator=accelerator, enable_progress_bar=progress,
                           num_classes=num_classes, logger=logger)
    reports = Path(monitor.report_root) if monitor.report_root else None
    latest = None
    if monitor.last_report is not None:
        latest = Path(monitor.last_report) / "report.html"
        if not latest.is_file():
            latest = Path(monitor.last_report) / "report.json"
    known = None
    if monitor.last_report is not None and (Path(monitor.last_report) / "report.json").is_file():
        known = known_answers_text(Path(monitor.last_report) / "report.json", module,
                                   num_val=num_val, seed=seed, num_classes=num_classes)
    return {"tensorboard": Path(logger.log_dir), "reports": reports, "latest_report": latest,
            "summary": monitor.summaries[-1] if monitor.summaries else None,
            "known_answers": known}


def known_answers_text(report_path: Path, module, *, num_val: int, seed: int,
                       num_classes: int = 8, batch_size: int = 16) -> str:
    """The demo's last report scored against what SyntheticBirds knows: which part separates
    each pair of species, what a perfect answer could flip, and what caused each mistake."""
    import json

    from torch.utils.data import DataLoader

    from .datasets import SyntheticBirds
    from .evaluate import ground_truth_for
    from .known_answers import (CAUSES, first_edits_from_report, format_known_answers,
                                names_cause, separating_part_scores)

    report = json.loads(Path(report_path).read_text())
    val = SyntheticBirds(num_val, num_classes=num_classes, seed=seed, split="val")
    edits, unlabelled = first_edits_from_report(report)
    scores = separating_part_scores(edits, val.distinguishing_parts, unlabelled=unlabelled)
    positions = [e.query_id[1] * batch_size + e.query_id[2] for e in edits]
    ceiling, causes, context = ground_truth_for(
        module, DataLoader(val, batch_size=batch_size, shuffle=False), positions)
    rates, counts = None, None
    if causes is not None and len(causes) == len(edits):
        rates = names_cause(edits, causes, context, val.distinguishing_parts)
        counts = {k: causes.count(k) for k in CAUSES}
    return format_known_answers(scores, ceiling=ceiling, causes=rates, cause_counts=counts,
                                title=f"Known answers, epoch {report['epoch']} "
                                      f"({len(edits)} explained mistakes; SyntheticBirds knows "
                                      "which part separates each pair of species)")


def _demo(args: argparse.Namespace) -> int:
    print(f"fgvce demo: training SmallCNN on SyntheticBirds for {args.epochs} epoch(s) on "
          f"{args.accelerator}, explaining up to {args.max_samples} validation mistakes per epoch.",
          flush=True)
    start = time.perf_counter()
    out = run_demo(epochs=args.epochs, output_dir=args.output_dir, seed=args.seed,
                   max_samples=args.max_samples, accelerator=args.accelerator,
                   num_train=args.num_train, num_val=args.num_val, progress=not args.no_progress)
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    summary = out["summary"]
    if summary is not None:
        top = sorted(summary["part_error_share"].items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{name} {share:.0%}" for name, share in top) or "n/a"
        print(f"Last explained epoch {summary['epoch']}: {summary['num_explained']} of "
              f"{summary['num_misclassified']} mistakes explained, flip rate "
              f"{summary['flip_rate']:.0%}; parts behind the mistakes: {parts}.")
    if out.get("known_answers"):
        print(out["known_answers"])
    print(f"TensorBoard logs: {out['tensorboard']}")
    print(f"  open them with:  tensorboard --logdir {out['tensorboard'].parent}")
    print(f"Epoch reports:    {out['reports']}")
    if out["latest_report"] is not None:
        print(f"  latest report:   {out['latest_report'].resolve()}")
    else:
        print("  (no report was written: see the warnings above)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fgvce`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "evaluate":
        from .evaluate import run_evaluate

        return run_evaluate(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Explanation time against the number of discovered parts (``num_parts`` = 8, 64, 256, 1000).

The demo's ``SmallCNN`` (trained ``--train-epochs`` by the demo's recipe) explains
``--max-samples`` mistakes of a SyntheticBirds validation set with discovered part prototypes
(``part_source="prototypes"``), a TensorBoard logger and ``report.html``: ``trainer.validate``
explains synchronously, so the monitor's validation epoch end is the whole explanation (search,
prototype fit, part labels, panels, part strips, report). Each setting runs ``--repeats`` times
in turn (drift of the machine's speed affects all alike); medians. Also timed on their own: the
prototype fit (``PartPrototypes.update``) and the strips (``PartPrototypes.patch_strips``)::

    python benchmarks/bench_num_parts.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.datasets.synthetic import make_dataloaders
from fgvce_lightning.demo import train_demo
from fgvce_lightning.parts import PartPrototypes


def _timed(cls, name: str, log: list) -> None:
    """Wrap ``cls.name`` to append its wall times to ``log`` (in place)."""
    inner = getattr(cls, name)

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            log.append(time.perf_counter() - start)
    setattr(cls, name, timed)


class _EpochEnd(L.Callback):
    """Placed around the monitor: the time of its validation epoch end."""

    def __init__(self) -> None:
        self.start, self.times = 0.0, []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.start = time.perf_counter()


class _After(L.Callback):
    def __init__(self, clock: _EpochEnd) -> None:
        self.clock = clock

    def on_validation_epoch_end(self, trainer, pl_module):
        self.clock.times.append(time.perf_counter() - self.clock.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="8,64,256,1000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=1000)
    parser.add_argument("--train-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="bench_num_parts_")
    _, model = train_demo(max_epochs=args.train_epochs, num_train=args.num_train,
                          num_val=args.num_val, seed=0, enable_progress_bar=False,
                          default_root_dir=root, logger=False, enable_checkpointing=False,
                          limit_val_batches=0)
    _, val = make_dataloaders(args.num_train, args.num_val, batch_size=32, seed=0)
    fits, strips = [], []
    _timed(PartPrototypes, "update", fits)
    _timed(PartPrototypes, "patch_strips", strips)
    parts = [int(k) for k in args.parts.split(",")]
    rows: dict = {k: {"total": [], "search": [], "fit": [], "strips": [], "explained": 0}
                  for k in parts}
    for repeat in range(args.repeats):
        for k in parts:
            monitor = CounterfactualMonitor(max_samples=args.max_samples, num_parts=k,
                                            part_source="prototypes", report_html=True,
                                            report_dir=f"{root}/r_{k}_{repeat}")
            clock = _EpochEnd()
            trainer = L.Trainer(logger=TensorBoardLogger(root, name=f"tb_{k}_{repeat}"),
                                callbacks=[clock, monitor, _After(clock)], enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=root)
            fits.clear(), strips.clear()
            trainer.validate(model, val, verbose=False)
            result = monitor.last_result
            row = rows[k]
            row["total"].append(clock.times[-1])
            row["search"].append(result.elapsed_s)
            row["fit"].append(sum(fits))
            row["strips"].append(sum(strips))
            row["explained"] = result.stats.num_explained
    med = statistics.median
    base = med(rows[parts[0]]["total"])
    print(f"torch threads={torch.get_num_threads()}, {args.num_val} validation images, "
          f"{args.max_samples} mistakes explained, medians of {args.repeats} runs each")
    print(f"{'num_parts':>9} {'explanation s':>13} {'ratio':>6} {'search s':>8} "
          f"{'prototype fit s':>15} {'part strips s':>13} {'explained':>9}")
    for k in parts:
        row = rows[k]
        total = med(row["total"])
        print(f"{k:>9} {total:>13.2f} {total / base:>6.2f} {med(row['search']):>8.2f} "
              f"{med(row['fit']):>15.2f} {med(row['strips']):>13.2f} {row['explained']:>9}")


if __name__ == "__main__":
    main()

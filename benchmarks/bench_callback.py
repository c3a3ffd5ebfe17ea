"""Cost of the CounterfactualMonitor: validation-epoch time with and without it, and its memory.

Same model (the demo's SmallCNN, trained as ``fgvce demo`` trains it: 10 epochs on 2000 images, about
0.9 accuracy), same SyntheticBirds validation set (1000 images, so that more than ``--max-samples``
mistakes are there to explain), same process:

1. ``N`` validation epochs *without* the monitor (``trainer.validate``, timed by a probe callback)
   and, alternating with them epoch by epoch,
2. ``N`` validation epochs *with* it (explaining ``--max-samples`` mistakes per epoch), timing
   separately the collection (first batch start → the last batch stored, inline or by the
   monitor's collection thread) and the explanation (the monitor's epoch end: search, parts, statistics,
   TensorBoard, report);
3. the memory the monitor holds (bank + buffers bytes) and the process RSS (or
   ``torch.cuda.max_memory_allocated`` on GPU) after each of the ``N`` epochs: it must stay flat.

Prints a table and the ratios (collection-only and total), e.g.::

    python benchmarks/bench_callback.py --epochs 20 --max-samples 64

``trainer.validate`` always explains synchronously. While *fitting*, the monitor explains in the
background by default (a frozen copy of the model on a worker thread) so the next training epoch
does not wait: step 4 (``--fit-epochs``, 0 to skip) trains the same seeded model without the
monitor, with it in the background and with it synchronous (``background=False``), those three
fits ``--fit-repeats`` times in turn (so that drift of the machine's speed affects all three
alike), and prints the median over every repeat's epochs 1.. of the validation-epoch time (from
the first callback's epoch start, so it includes any wait for the previous epoch's background
explanation, to the last callback's epoch end) and of the whole-epoch wall time (training +
validation), each as a ratio to the run without the monitor, and the ratio per repeat.

Each of the monitor's mechanisms can be measured on and off (``--ab``): every name adds one fit
per repeat with that mechanism off (``switch_interval``: with the opt-in
``switch_interval_s=2e-4`` on), all else as the default. ``--model resnet18`` measures a
torchvision ResNet-18 (random weights, never downloaded; ``--image-size 112``) instead of the
demo CNN; ``--skip-validate`` goes straight to the fit comparison. A/B of every mechanism on
both models, at 1 and 2 torch threads::

    python benchmarks/bench_callback.py --threads 1 --skip-validate --ab all
    python benchmarks/bench_callback.py --threads 1 --skip-validate --ab all --model resnet18 \
        --image-size 112 --num-train 512 --num-val 256 --fit-epochs 4
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from fgvce_lightning import CounterfactualMonitor
from fgvce_lightning.datasets import PART_NAMES
from fgvce_lightning.datasets.synthetic import make_dataloaders
from fgvce_lightning.demo import DemoClassifier, train_demo
from fgvce_lightning.monitor import Mechanisms

#: ``--ab`` names: the private switches of ``Mechanisms`` (measured off), and the opt-in switch
#: interval (measured on)
MECHANISMS = ("waiting_sets", "held_sets", "collection_thread", "low_priority", "reuse_logits",
              "switch_interval")


def _ab_runs(names) -> list:
    """The fit runs of ``--ab``: ``(name, CounterfactualMonitor keyword arguments)``."""
    runs = []
    for name in names:
        if name == "switch_interval":
            runs.append(("switch_interval", {"switch_interval_s": 2e-4}))
        else:
            runs.append((f"no_{name}", {"_mechanisms": Mechanisms(**{name: False})}))
    return runs


class ResNetClassifier(L.LightningModule):
    """A torchvision ResNet-18 with random weights, trained like the demo (AdamW, one cycle)."""

    def __init__(self, num_classes: int = 8, lr: float = 1e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        import torchvision

        self.save_hyperparameters()
        self.model = torchvision.models.resnet18(weights=None, num_classes=num_classes)

    def forward(self, x):
        return self.model(x)

    _step = DemoClassifier._step
    training_step = DemoClassifier.training_step
    validation_step = DemoClassifier.validation_step
    configure_optimizers = DemoClassifier.configure_optimizers


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class _Clock(L.Callback):
    """Placed before the monitor: marks the epoch start and the end of collection."""

    def __init__(self, monitor: "CounterfactualMonitor | None" = None) -> None:
        self.start = self.collected = 0.0
        self.monitor = monitor

    def on_validation_epoch_start(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.monitor is not None:
            # the last batches still wait to be stored, or are on the monitor's collection thread:
            # collection ends when they are stored (the monitor's own epoch end would do it next)
            for collector in self.monitor._session.collectors.values():
                collector.finish(for_job=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.collected = time.perf_counter()


class _Stop(L.Callback):
    """Placed after the monitor: marks the end of the epoch (explanation included)."""

    def __init__(self) -> None:
        self.end = 0.0

    def on_validation_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()


class _EpochClock(L.Callback):
    """Validation-epoch time (first callback's start → last callback's end; needs a twin placed
    after the monitor) and whole-epoch wall time (train epoch start → next train epoch start)."""

    def __init__(self) -> None:
        self.val_start, self.val, self.epoch_start, self.epochs = 0.0, [], None, []

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        now = self._now()
        if self.epoch_start is not None:
            self.epochs.append(now - self.epoch_start)
        self.epoch_start = now

    def on_fit_end(self, trainer, pl_module):          # after the monitor's last wait
        self.epochs.append(self._now() - self.epoch_start)

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val_start = self._now()


class _EpochClockEnd(L.Callback):
    def __init__(self, clock: _EpochClock) -> None:
        self.clock = clock

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.clock.val.append(self.clock._now() - self.clock.val_start)


def _fit_once(args, model, train, val, root: str, name: str, options, repeat: int) -> dict:
    """One seeded fit of a copy of ``model`` (with a monitor made with ``options``, unless
    ``None``); per-epoch validation and whole-epoch times."""
    L.seed_everything(1, verbose=False)
    clock = _EpochClock()
    callbacks = [clock]
    monitor = None
    if options is not None:
        monitor = CounterfactualMonitor(max_samples=args.max_samples, part_names=PART_NAMES,
                                        report_html=args.report_html, log_images=args.log_images,
                                        report_dir=os.path.join(root, f"fit_{name}_{repeat}"),
                                        **options)
        callbacks.append(monitor)
        hook_s = _time_hooks(monitor, ("on_validation_epoch_start", "on_validation_epoch_end",
                                       "on_validation_batch_start", "on_validation_batch_end"))
        epoch_hooks = _EpochSums(hook_s, ("on_validation_batch_start", "on_validation_batch_end"))
        callbacks.append(epoch_hooks)
    callbacks.append(_EpochClockEnd(clock))
    logger = TensorBoardLogger(root, name=f"fit_{name}_{repeat}")
    trained = copy.deepcopy(model)
    L.Trainer(max_epochs=args.fit_epochs, logger=logger, enable_checkpointing=True,
              accelerator=args.accelerator, devices=1, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=os.path.join(root, f"{name}_{repeat}"),
              num_sanity_val_steps=0, callbacks=callbacks).fit(trained, train, val)
    return {"weights": [p.detach().clone() for p in trained.parameters()],
            "val": clock.val[1:], "epoch": clock.epochs[1:],       # epoch 0 builds the stores
            "explained_epochs": monitor.num_explained_epochs if monitor else 0,
            "background_s": monitor.last_background_s if monitor else None,
            "epoch_start": hook_s["on_validation_epoch_start"][1:] if monitor else [],
            "epoch_end": hook_s["on_validation_epoch_end"][1:] if monitor else [],
            "batch_hooks": epoch_hooks.sums[1:] if monitor else []}


def _low(values: list) -> float:
    """The lower quartile: other tenants of a shared machine only ever add time, in bursts that
    move a median of 15-20 epochs; the fastest quarter is what the code itself costs."""
    return statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) > 1 else values[0]


def fit_benchmark(args, model, train, val, root: str) -> dict:
    """Train copies of ``model`` without / with the monitor (background, synchronous),
    ``--fit-repeats`` times in turn, so that drift of the machine's speed affects all alike."""
    med = statistics.median
    runs = [("without", None), ("background", {})]
    if not args.no_sync:
        runs.append(("synchronous", {"background": False}))
    runs += _ab_runs(args.ab)
    pooled: dict = {name: [] for name, _ in runs}
    shuffle_state = train.generator.get_state()
    for repeat in range(args.fit_repeats):
        for name, options in runs:
            train.generator.set_state(shuffle_state)            # the same batches in every run
            pooled[name].append(_fit_once(args, model, train, val, root, name, options, repeat))
    reference = pooled["without"][0]["weights"]
    same = all(all(torch.equal(a, b) for a, b in zip(reference, run["weights"]))
               for name in pooled for run in pooled[name])
    out: dict = {}
    for name, fits in pooled.items():
        def cat(key: str) -> list:
            return [v for fit in fits for v in fit[key]]
        out[name] = {"val_s": med(cat("val")), "epoch_s": med(cat("epoch")),
                     "val_low_s": _low(cat("val")), "epoch_low_s": _low(cat("epoch")),
                     "val_per_repeat": [med(fit["val"]) for fit in fits],
                     "epoch_per_repeat": [med(fit["epoch"]) for fit in fits],
                     "val_per_epoch": [fit["val"] for fit in fits],
                     "epoch_per_epoch": [fit["epoch"] for fit in fits],
                     "explained_epochs": fits[-1]["explained_epochs"],
                     "background_s": fits[-1]["background_s"],
                     "monitor_epoch_start_s": med(cat("epoch_start")) if fits[0]["epoch_start"] else 0.0,
                     "monitor_epoch_end_s": med(cat("epoch_end")) if fits[0]["epoch_end"] else 0.0,
                     "monitor_batch_hooks_s": med(cat("batch_hooks")) if fits[0]["batch_hooks"] else 0.0}
    base = out["without"]
    n = len(base["val_per_epoch"][0])
    print(f"\nfit: {args.fit_epochs} epochs x {args.fit_repeats} repeats per run, {args.num_train} "
          f"training / {args.num_val} validation images, {args.max_samples} mistakes explained per "
          f"epoch (medians over epochs 1..{n} of every repeat; weights identical in all "
          f"{len(runs) * args.fit_repeats} fits: {same})")
    print(f"{'run':>22} {'val epoch s':>11} {'ratio':>6} {'whole epoch s':>13} {'ratio':>6} "
          f"{'explained':>9} {'bg explain s':>12}")
    for name, row in out.items():
        row["val_ratio"] = row["val_s"] / base["val_s"]
        row["epoch_ratio"] = row["epoch_s"] / base["epoch_s"]
        row["val_ratio_per_repeat"] = [a / b for a, b in zip(row["val_per_repeat"], base["val_per_repeat"])]
        row["val_low_ratio"] = row["val_low_s"] / base["val_low_s"]
        row["epoch_low_ratio"] = row["epoch_low_s"] / base["epoch_low_s"]
        bg = "" if row["background_s"] is None else f"{row['background_s']:.2f}"
        print(f"{name:>22} {row['val_s']:>11.3f} {row['val_ratio']:>6.3f} {row['epoch_s']:>13.3f} "
              f"{row['epoch_ratio']:>6.3f} {row['explained_epochs']:>9} {bg:>12}")
    for name, row in out.items():
        print(f"{name:>22} lower quartiles: validation epoch {row['val_low_s']:.3f} s (ratio "
              f"{row['val_low_ratio']:.3f}), whole epoch {row['epoch_low_s']:.3f} s (ratio "
              f"{row['epoch_low_ratio']:.3f})")
    for name, row in out.items():
        print(f"{name:>22} validation-epoch ratio per repeat: "
              + " ".join(f"{v:.3f}" for v in row["val_ratio_per_repeat"]))
    for name, row in out.items():
        for r, (vals, whole) in enumerate(zip(row["val_per_epoch"], row["epoch_per_epoch"])):
            print(f"{name:>22} repeat {r}: validation " + " ".join(f"{v:.3f}" for v in vals)
                  + " | whole " + " ".join(f"{v:.3f}" for v in whole))
    for name in (n for n, _ in runs[1:]):
        print(f"{name:>22}: the monitor's validation epoch start (waits for the previous epoch's "
              f"background explanation) {out[name]['monitor_epoch_start_s'] * 1e3:.1f} ms, its epoch "
              f"end (stores the last batches; explains or starts the background job) "
              f"{out[name]['monitor_epoch_end_s'] * 1e3:.1f} ms, its batch hooks "
              f"{out[name]['monitor_batch_hooks_s'] * 1e3:.1f} ms per validation epoch (medians)")
    out["weights_identical"] = same
    return out


class _EpochSums(L.Callback):
    """Per validation epoch: the summed times of the hooks ``names`` recorded by :func:`_time_hooks`."""

    def __init__(self, times: dict, names) -> None:
        self.times, self.names, self.sums = times, names, []

    def on_validation_epoch_start(self, trainer, pl_module):
        for name in self.names:
            self.times[name].clear()

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.sums.append(sum(sum(self.times[name]) for name in self.names))


def _time_hooks(monitor, names) -> dict:
    """Wrap the monitor's hooks ``names`` to record their wall times (in place)."""
    times: dict = {name: [] for name in names}
    for name in names:
        inner = getattr(monitor, name)

        def timed(*args, _inner=inner, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                times[_name].append(time.perf_counter() - start)
        setattr(monitor, name, timed)
    return times


def _model_and_data(args, root: str):
    """The model measured (the demo CNN trained by the demo's recipe, or a ResNet-18 with
    random weights, trained ``--train-epochs`` if asked) and the data loaders."""
    dataset = {"image_size": args.image_size}
    started = time.perf_counter()
    if args.model == "demo":
        _, model = train_demo(max_epochs=max(1, args.train_epochs), num_train=args.num_train,
                              num_val=args.num_val, seed=0, accelerator=args.accelerator,
                              enable_progress_bar=False, default_root_dir=root, logger=False,
                              enable_checkpointing=False, limit_val_batches=0,
                              dataset_kwargs=dataset)
    else:
        L.seed_everything(0, verbose=False)
        model = ResNetClassifier()
        if args.train_epochs > 0:
            train, _ = make_dataloaders(args.num_train, args.num_val, batch_size=args.batch_size,
                                        seed=0, **dataset)
            L.Trainer(max_epochs=args.train_epochs, accelerator=args.accelerator, devices=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=root).fit(model, train)
    print(f"{args.model} model at {args.image_size} px ({args.train_epochs} training epochs, "
          f"{args.num_train} images) ready in {time.perf_counter() - started:.0f} s")
    L.seed_everything(0, verbose=False)
    train, val = make_dataloaders(args.num_train, args.num_val, batch_size=args.batch_size, seed=0,
                                  **dataset)
    return model, train, val


def validate_benchmark(args, model, val, root: str, device: str) -> dict:
    """Steps 1-3: ``trainer.validate`` without and with the monitor, alternating."""
    common = dict(accelerator=args.accelerator, devices=1, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=root)
    # warm-up (allocator, lazy imports), then the two alternately, epoch by epoch, so that drift
    # of the machine's speed affects both alike
    base_clock, base_stop = _Clock(), _Stop()
    base_trainer = L.Trainer(logger=False, callbacks=[base_clock, base_stop], **common)
    base_trainer.validate(model, val, verbose=False)
    monitor = CounterfactualMonitor(max_samples=args.max_samples, part_names=PART_NAMES,
                                    report_html=args.report_html, log_images=args.log_images,
                                    background="auto" if args.collection == "thread" else False)
    clock, stop = _Clock(monitor), _Stop()
    logger = TensorBoardLogger(root, name="tb")
    trainer = L.Trainer(logger=logger, callbacks=[clock, monitor, stop], **common)
    base, collect, total, explain, held, rss, gpu, on_loop = [], [], [], [], [], [], [], []
    searched, pieces = [], []
    batch_hooks = ("on_validation_batch_start", "on_validation_batch_end")
    hook_s = _time_hooks(monitor, batch_hooks)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.epochs):
        base_trainer.validate(model, val, verbose=False)
        base.append(base_stop.end - base_clock.start)
        for name in batch_hooks:
            hook_s[name].clear()
        trainer.validate(model, val, verbose=False)
        on_loop.append(sum(sum(hook_s[name]) for name in batch_hooks))
        collect.append(clock.collected - clock.start)
        total.append(stop.end - clock.start)
        explain.append(stop.end - clock.collected)
        held.append(monitor.memory_bytes)
        searched.append(monitor.last_result.elapsed_s)
        pieces.append(dict(monitor._session.publisher.timings))
        rss.append(_rss_mb())
        if device == "cuda":
            gpu.append(torch.cuda.max_memory_allocated() / 2 ** 20)
    last = monitor.last_result

    med = statistics.median
    used = "thread" if monitor._session.worker is not None else "inline"   # the monitor decides
    print(f"torch threads={torch.get_num_threads()}  collection={used}  device={device}  val images={args.num_val}  batch={args.batch_size}  "
          f"epochs={args.epochs}  max_samples={args.max_samples}  "
          f"bank capacity/class={monitor._session.collectors[0].stores.bank.capacity_per_class}")
    print(f"mistakes per epoch: {last.stats.num_misclassified}, explained {last.stats.num_explained} "
          f"(skipped {last.stats.num_skipped}), flip rate {last.stats.flip_rate:.2f}, "
          f"search time {last.elapsed_s:.2f} s")
    print(f"{'epoch':>5} {'base s':>8} {'collect s':>9} {'explain s':>9} {'total s':>8} "
          f"{'held MB':>8} {'RSS MB':>8}" + (f" {'GPU peak MB':>11}" if gpu else ""))
    for i in range(args.epochs):
        print(f"{i:>5} {base[i]:>8.3f} {collect[i]:>9.3f} {explain[i]:>9.3f} {total[i]:>8.3f} "
              f"{held[i] / 2 ** 20:>8.2f} {rss[i]:>8.1f}" + (f" {gpu[i]:>11.1f}" if gpu else ""))
    numbers = {
        "baseline_s": med(base), "collect_s": med(collect),
        "explain_s": med(explain), "total_s": med(total),
        "collection_ratio": med(collect) / med(base), "total_ratio": med(total) / med(base),
        "baseline_low_s": _low(base), "collect_low_s": _low(collect),
        "collection_low_ratio": _low(collect) / _low(base),
        "batch_hooks_s": med(on_loop), "num_batches": len(val),
        "held_mb_first_last": [held[0] / 2 ** 20, held[-1] / 2 ** 20],
        "rss_mb_second_last": [rss[1] if len(rss) > 1 else rss[0], rss[-1]],
        "gpu_peak_mb_first_last": [gpu[0], gpu[-1]] if gpu else None,
    }
    print(f"median validation epoch: baseline {numbers['baseline_s']:.3f} s | with monitor: "
          f"collection {numbers['collect_s']:.3f} s (ratio {numbers['collection_ratio']:.3f}), "
          f"explanation {numbers['explain_s']:.3f} s, total {numbers['total_s']:.3f} s "
          f"(ratio {numbers['total_ratio']:.3f})")
    print(f"lower quartiles: baseline {numbers['baseline_low_s']:.3f} s | collection "
          f"{numbers['collect_low_s']:.3f} s (ratio {numbers['collection_low_ratio']:.3f})")
    print(f"the monitor's batch hooks on the validation loop (capture; the bookkeeping where it "
          f"runs inline): {numbers['batch_hooks_s'] * 1e3:.1f} ms per epoch, "
          f"{numbers['batch_hooks_s'] * 1e3 / len(val):.2f} ms per batch (median)")
    names = sorted({k for p in pieces for k in p})
    publishing = {k: med([p.get(k, 0.0) for p in pieces]) for k in names}
    numbers["search_s"], numbers["publish_s"] = med(searched), publishing
    print(f"the explanation's epoch end, median: search {med(searched):.3f} s; publishing "
          + ", ".join(f"{k} {v:.3f} s" for k, v in publishing.items())
          + f" (together {sum(publishing.values()):.3f} s, "
          f"{sum(publishing.values()) / max(med(searched), 1e-9):.2f}x the search)")
    print(f"memory held by the monitor: {held[0] / 2 ** 20:.2f} MB → {held[-1] / 2 ** 20:.2f} MB; "
          f"RSS epoch 1 → {args.epochs - 1}: {numbers['rss_mb_second_last'][0]:.1f} → "
          f"{numbers['rss_mb_second_last'][1]:.1f} MB")
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="validation epochs per setting")
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=1000)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--train-epochs", type=int, default=10,
                        help="epochs of the demo's training recipe before measuring")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--report-html", action="store_true", help="also write report.html")
    parser.add_argument("--log-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (1 avoids oversubscription on a busy machine)")
    parser.add_argument("--fit-epochs", type=int, default=6,
                        help="epochs of the fit comparison (step 4); 0 skips it")
    parser.add_argument("--fit-repeats", type=int, default=3,
                        help="times the three fits of step 4 run, in turn")
    parser.add_argument("--collection", choices=["thread", "inline"], default="thread",
                        help="validate mode: per-batch bookkeeping on the monitor's collection "
                             "thread (the default, background='auto') or inline on the validation "
                             "loop (background=False)")
    parser.add_argument("--model", choices=["demo", "resnet18"], default="demo",
                        help="the demo's SmallCNN, or a torchvision ResNet-18 (random weights)")
    parser.add_argument("--image-size", type=int, default=64,
                        help="SyntheticBirds image side (e.g. 112 for the ResNet-18)")
    parser.add_argument("--ab", default="", type=lambda v: list(MECHANISMS) if v == "all" else
                        [m for m in v.split(",") if m],
                        help=f"comma-separated mechanisms to A/B in the fit comparison (one more "
                             f"fit each per repeat), or 'all': {', '.join(MECHANISMS)}")
    parser.add_argument("--no-sync", action="store_true",
                        help="leave the synchronous (background=False) fit out of step 4")
    parser.add_argument("--skip-validate", action="store_true",
                        help="skip steps 1-3 (trainer.validate with and without the monitor)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    root = tempfile.mkdtemp(prefix="bench_callback_")
    model, train, val = _model_and_data(args, root)
    device = "cuda" if torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda") else "cpu"
    numbers: dict = {"device": device, "model": args.model}
    if not args.skip_validate:
        numbers.update(validate_benchmark(args, model, val, root, device))
    if args.fit_epochs > 0:
        numbers["fit"] = fit_benchmark(args, model, train, val, root)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=1)


if __name__ == "__main__":
    main()

"""CUB-size figures: a 200-class ResNet-50 (random weights) split at the penultimate block.

For every input size (224 and 448 by default) the script prints:

* references per class under the monitor's defaults (``memory_budget_mb``,
  ``max_references_per_class``, ``thumbnail_size``, 64 mistakes, a validation batch of 64), and
  what the bank takes (``plan_stores``, the numbers the monitor allocates);
* one search over ``--queries`` misclassified queries (the backbone's maps of random images, the
  head's prediction as ``pred`` and another class as ``true``) against a bank that holds, for the
  queries' true classes, as many references as the defaults give (the bank is allocated at its
  full default size, in host memory): seconds, explanations/s, head evaluations per explanation
  (mean, max), flip rate;
* the search's peak extra memory: on the CPU the growth of the process's peak RSS during the
  search (``/proc/self/clear_refs`` resets the peak first), on a GPU
  ``torch.cuda.max_memory_allocated`` above what was allocated before; with the default
  ``search_memory_mb`` and, for comparison, without a budget (``search_memory_mb=None``: all
  queries at once, ``chunk_size`` maps per head call).

Random weights flip few queries: this is the search's worst case (every query runs all its edit
steps), as in the issue that asked for these figures.

    python benchmarks/bench_scale.py                         # CPU
    python benchmarks/bench_scale.py --device cuda --queries 128
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time

import torch
import torchvision

from fgvce_lightning.engine.bank import ReferenceBank
from fgvce_lightning.engine.search import SearchConfig, counterfactual_search
from fgvce_lightning.engine.split import split_model
from fgvce_lightning.monitor.config import DEFAULT_MEMORY_BUDGET_MB, MonitorConfig
from fgvce_lightning.monitor.stores import plan_stores

NUM_CLASSES = 200
_MB = 2 ** 20


class TimedHead(torch.nn.Module):
    """The head, with the wall time of its calls added up (synchronised on a GPU)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head, self.seconds = head, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        out = self.head(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - start
        return out


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or peak-RSS growth on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")                  # reset the peak RSS to the current RSS
            except OSError:
                pass
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.bytes = _rss_kb("VmHWM") * 1024 - self.base


def defaults_plan(grid: int, dtype: torch.dtype = torch.float32):
    c = MonitorConfig()
    feature_shape = (2048, grid, grid)
    batch_bytes = 64 * 2048 * grid * grid * 4
    return plan_stores(num_classes=NUM_CLASSES, feature_shape=feature_shape, dtype=dtype,
                       mistakes=c.max_samples, budget_bytes=int(DEFAULT_MEMORY_BUDGET_MB * _MB),
                       max_per_class=c.max_references_per_class, thumbnail_size=c.thumbnail_size,
                       num_annotated=0, batch_bytes=batch_bytes, batch_size=64)


def run(size: int, args, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES).eval().to(device)
    split = split_model(model)
    with torch.no_grad():
        probe = split.features(torch.rand(1, 3, size, size, device=device))
    grid = probe.shape[-1]
    plan = defaults_plan(grid)
    bf16 = defaults_plan(grid, torch.bfloat16)
    per_map = 2048 * grid * grid * 4
    print(f"\n== {size} px: feature map {tuple(probe.shape[1:])}, {per_map / _MB:.2f} MB a map "
          f"(float32); split {split.description if hasattr(split, 'description') else ''}")
    print(f"defaults: {plan.capacity} references per class (bfloat16 bank: {bf16.capacity}); "
          f"bank {plan.slots * per_map / _MB:.0f} MB for {plan.slots} maps, in host memory")

    bank = ReferenceBank(NUM_CLASSES, plan.capacity, tuple(probe.shape[1:]),
                         num_rows=plan.slots // plan.capacity, pin_memory=True)
    true_classes = torch.randperm(NUM_CLASSES, generator=gen)[:args.classes]

    def maps(n: int) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, n, args.batch):
                k = min(args.batch, n - start)
                images = torch.rand(k, 3, size, size, generator=gen).to(device)
                out.append(split.features(images).float().cpu())
        return torch.cat(out)

    t0 = time.perf_counter()
    refs = maps(args.classes * plan.capacity)
    bank.add(refs, true_classes.repeat_interleave(plan.capacity))
    queries = maps(args.queries).to(device)
    with torch.no_grad():
        pred = split.head(queries).argmax(1).cpu()
    true = true_classes[torch.arange(args.queries) % args.classes]
    true = torch.where(true == pred, true_classes[(torch.arange(args.queries) + 1) % args.classes],
                       true)
    print(f"bank filled for {args.classes} true classes ({len(bank)} maps) and {args.queries} "
          f"queries in {time.perf_counter() - t0:.1f} s")

    print(f"{'search':<26}{'seconds':>9}{'head s':>8}{'expl/s':>9}{'evals mean':>12}"
          f"{'evals max':>11}{'flip':>7}{'peak MB':>10}")
    head = TimedHead(split.head)
    for label, budget in (("search_memory_mb=1024", 1024.0), ("no budget (before)", None)):
        if budget is None and args.skip_unbudgeted:
            continue
        config = dataclasses.replace(SearchConfig(num_classes=NUM_CLASSES), search_memory_mb=budget)
        if device.type == "cuda":
            counterfactual_search(head, queries[:2], true[:2].to(device),
                                  pred[:2].to(device), bank, config)        # warm-up
        head.seconds = 0.0
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            exps = counterfactual_search(head, queries, true.to(device), pred.to(device),
                                         bank, config)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        evals = torch.tensor([e.head_evaluations for e in exps], dtype=torch.float)
        flips = sum(e.success for e in exps) / len(exps)
        print(f"{label:<26}{seconds:>9.2f}{head.seconds:>8.2f}{len(exps) / seconds:>9.2f}"
              f"{evals.mean():>12.0f}"
              f"{evals.max():>11.0f}{flips:>7.3f}{peak.bytes / _MB:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--classes", type=int, default=4, help="true classes of the queries")
    parser.add_argument("--batch", type=int, default=16, help="images per backbone call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-unbudgeted", action="store_true",
                        help="do not run the search without a budget (it may not fit)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"pid {os.getpid()}")
    for size in args.sizes:
        run(size, args, device)


if __name__ == "__main__":
    main()

"""Benchmark our cell contribution maps against captum's ``ShapleyValueSampling``.

Both explain the same mistakes of the same model with the same game: the players are the cells of
the feature map, an "absent" cell takes the features of a reference image of the true class, and
the value of a coalition is the mistake margin ``logit_pred - logit_true`` of the head. Ours is
:func:`fgvce_lightning.engine.contributions.local_shapley`, with its default local 3×3 window and
with a window that covers the whole grid (the global game captum plays). Captum gets a forward
function that returns that margin per row, the query maps as inputs, the reference maps as
baselines and a feature mask with one index per cell, broadcast over channels.

Everything runs in one process on the same queries: wall time per query, head evaluations per
query (ours: the counted rows that passed through the head; captum: rows passed to its forward
function), and agreement of the maps: Spearman rank correlation per query (averaged) and top-5
cell overlap, between every pair of methods and against a high-sample captum reference (whose
two independent halves also give its own split-half agreement, i.e. how exact the reference is).

Model: the demo's :class:`~fgvce_lightning.models.SmallCNN` (8×8×128 features for 64-pixel inputs,
head conv3×3 + BN + ReLU + pool + linear), randomly initialised with its BatchNorm statistics
calibrated on synthetic birds (``--train-steps`` trains it a little first). Queries are validation
birds the model gets wrong (true = label, pred = argmax); the absent features of each come from
another bird of the true class.

    python benchmarks/bench_captum.py                    # CPU defaults (1 thread), ~30 s
    python benchmarks/bench_captum.py --device cuda --queries 64 --ref-samples 400

Needs captum (``pip install captum``, or the project's ``bench`` extra).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from fgvce_lightning.datasets.synthetic import SyntheticBirds
from fgvce_lightning.engine._util import margin
from fgvce_lightning.engine.contributions import local_shapley
from fgvce_lightning.models import SmallCNN

try:
    from captum.attr import ShapleyValueSampling
except ImportError as err:  # pragma: no cover - exercised only without captum
    raise ImportError("bench_captum.py needs captum: `pip install captum` (or install the "
                      "project's `bench` extra).") from err

__all__ = [
    "CountingHead",
    "MethodResult",
    "captum_cell_shapley",
    "spearman",
    "topk_overlap",
    "make_queries",
    "run_benchmark",
    "format_report",
    "main",
]

Head = Callable[[Tensor], Tensor]


class CountingHead:
    """Wraps a head and counts the feature maps (rows) that pass through it."""

    def __init__(self, head: Head) -> None:
        self.head, self.rows, self.calls = head, 0, 0

    def __call__(self, features: Tensor) -> Tensor:
        self.rows += features.shape[0]
        self.calls += 1
        return self.head(features)

    def reset(self) -> None:
        self.rows, self.calls = 0, 0


@dataclass(frozen=True)
class MethodResult:
    """One method's maps and cost on the benchmark's queries.

    Attributes:
        name: row label.
        values: ``(N, H, W)`` contributions (evidence for ``pred`` over ``true``).
        seconds: wall time for the whole batch of queries (fastest of the repeats).
        cpu_seconds: CPU time of this process (all threads) for the batch (fastest repeat).
        evals_per_query: head evaluations per query (counted rows / N).
        forward_calls: head (forward function) calls for the whole batch.
    """

    name: str
    values: Tensor
    seconds: float
    cpu_seconds: float
    evals_per_query: float
    forward_calls: int


# ----------------------------------------------------------------------------------------------
# captum with the same game
# ----------------------------------------------------------------------------------------------

def captum_cell_shapley(head: Head, query: Tensor, absent: Tensor, true: Tensor, pred: Tensor, *,
                        n_samples: int, chunk_size: int = 1024, seed: int = 0
                        ) -> tuple[Tensor, CountingHead]:
    """Global Shapley values of the cells with captum's ``ShapleyValueSampling``.

    The forward function returns ``margin = logit_pred - logit_true`` per row (``target=None``),
    the baselines are ``absent`` and the feature mask gives every cell one index shared by all
    channels, so the game is the one :func:`local_shapley` plays with a window covering the grid.
    ``perturbations_per_eval`` is chosen so that a forward call sees about ``chunk_size`` rows (at
    most one whole permutation), like our chunked head calls. Captum draws its permutations with
    ``torch.randperm`` from the global RNG: it is seeded with ``seed`` (and restored afterwards).

    Args:
        head: feature maps ``(B, C, H, W)`` → logits ``(B, K)``.
        query: ``(N, C, H, W)`` query feature maps (captum's inputs).
        absent: ``(N, C, H, W)`` what each cell becomes when absent (captum's baselines).
        true: ``(N,)`` true classes.
        pred: ``(N,)`` predicted classes.
        n_samples: random permutations (each costs ``H·W`` evaluations per query, plus one
            initial evaluation of the baselines).
        chunk_size: target rows per forward call.
        seed: seed of captum's permutations.

    Returns:
        ``values (N, H, W)`` float32 and the :class:`CountingHead` that counted the evaluations.
    """
    n, _, h, w = query.shape
    counter = CountingHead(head)

    def forward(features: Tensor, t: Tensor, p: Tensor) -> Tensor:
        return margin(counter(features).float(), t, p)

    # (1, 1, H, W): captum broadcasts the mask over examples and channels
    mask = torch.arange(h * w, device=query.device).view(1, 1, h, w)
    per_eval = max(1, min(h * w, chunk_size // max(n, 1)))
    with torch.random.fork_rng(devices=[query.device] if query.device.type == "cuda" else []):
        torch.manual_seed(seed)
        attr = ShapleyValueSampling(forward).attribute(
            query, baselines=absent, target=None, additional_forward_args=(true, pred),
            feature_mask=mask, n_samples=n_samples, perturbations_per_eval=per_eval)
    # every channel of a cell carries the cell's value; read it from channel 0
    return attr[:, 0].float(), counter


# ----------------------------------------------------------------------------------------------
# agreement metrics
# ----------------------------------------------------------------------------------------------

def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..M-1 along the last dim, ties broken by position (continuous maps rarely tie)."""
    return x.argsort(dim=-1).argsort(dim=-1).double()


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of two batches of maps, per row.

    Args:
        a, b: ``(N, H, W)`` (or ``(N, M)``) maps.

    Returns:
        ``(N,)`` float64 in ``[-1, 1]``.
    """
    if a.shape != b.shape:
        raise ValueError(f"Expected maps of the same shape, but got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    ra, rb = _ranks(a.flatten(1)), _ranks(b.flatten(1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


def topk_overlap(a: Tensor, b: Tensor, k: int = 5) -> Tensor:
    """Share of the ``k`` highest cells of ``a`` that are among the ``k`` highest of ``b``, per row.

    Returns:
        ``(N,)`` float64 in ``[0, 1]``.
    """
    a, b = a.flatten(1), b.flatten(1)
    k = min(k, a.shape[1])
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (top_a & top_b).sum(1).double() / k


# ----------------------------------------------------------------------------------------------
# model and queries
# ----------------------------------------------------------------------------------------------

def _render_birds(count: int, num_classes: int, image_size: int, seed: int, split: str
                  ) -> dict[str, Tensor]:
    """``count`` synthetic birds of ``split`` as one batch dict (``image``, ``label``, ...)."""
    data = SyntheticBirds(count, num_classes=num_classes, image_size=image_size, seed=seed,
                          split=split, cache=False)
    return data.render(range(count))


def _build_model(num_classes: int, width: int, image_size: int, train_steps: int, seed: int,
                 device: torch.device) -> tuple[SmallCNN, float]:
    """SmallCNN with random weights (seeded), BatchNorm statistics calibrated on a train batch.

    With ``train_steps`` it is first trained with Adam on batches of 64 synthetic birds.
    Returns the model (eval mode, on ``device``) and the seconds spent training.
    """
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, width=width).to(device)
    batch = _render_birds(max(256, 64 * min(train_steps, 16)), num_classes, image_size, seed,
                          "train")
    images, labels = batch["image"].to(device), batch["label"].to(device)
    start = time.perf_counter()
    if train_steps > 0:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        gen = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            idx = torch.randint(0, images.shape[0], (64,), generator=gen).to(device)
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - start
    # calibrate BatchNorm (cumulative average over the batch) so random features are well scaled
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(images[:256])
    model.eval()
    return model, train_s


def make_queries(model: SmallCNN, num_queries: int, *, num_classes: int, image_size: int,
                 seed: int, device: torch.device, pool_size: int = 256
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Misclassified validation birds and, for each, the feature map of a bird of its true class.

    The absent map of a query is that of another validation bird labelled ``true``, preferably
    one the model classifies correctly (as the reference bank would hold).

    Returns:
        ``query (N, C, H, W)``, ``absent (N, C, H, W)``, ``true (N,)``, ``pred (N,)`` and the
        model's accuracy on the pool.
    """
    batch = _render_birds(pool_size, num_classes, image_size, seed, "val")
    images, labels = batch["image"].to(device), batch["label"].to(device)
    with torch.no_grad():
        feats = torch.cat([model.forward_features(x) for x in images.split(128)])
        pred = torch.cat([model.forward_head(f) for f in feats.split(128)]).argmax(1)
    correct = pred == labels
    wrong = (~correct).nonzero().squeeze(1)
    if wrong.numel() < num_queries:
        raise ValueError(f"Expected at least {num_queries} misclassified birds in a pool of "
                         f"{pool_size}, but the model gets only {wrong.numel()} wrong. Ask for "
                         "fewer `--queries` or fewer `--train-steps`.")
    wrong = wrong[:num_queries]
    true = labels[wrong]
    # a reference per query: same label, not the query; correctly classified ones first
    same = (labels[None] == true[:, None]) & (torch.arange(pool_size, device=device)[None]
                                              != wrong[:, None])
    if not bool(same.any(1).all()):
        raise ValueError("Expected another bird of every query's true class in the pool; "
                         "increase the pool size.")
    score = same.float() * (1.0 + correct.float()[None])
    ref = score.argmax(1)
    accuracy = float(correct.float().mean())
    return feats[wrong], feats[ref], true, pred[wrong], accuracy


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], tuple[Tensor, CountingHead]]
           ) -> tuple[Tensor, CountingHead, float, float]:
    """Run ``fn`` once; its result, wall seconds and CPU seconds (all threads of this process)."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    values, counter = fn()
    _sync(device)
    return values, counter, time.perf_counter() - wall, time.process_time() - cpu


def run_benchmark(*, device: str = "cpu", queries: int = 8, seed: int = 0, width: int = 32,
                  image_size: int = 64, num_classes: int = 8, train_steps: int = 0,
                  window: int = 3, num_samples: int = 4,
                  captum_samples: Optional[Sequence[int]] = None, ref_samples: int = 64,
                  chunk_size: int = 1024, repeats: int = 2) -> dict:
    """Run every method on the same queries; return maps, costs and agreement figures.

    Args:
        device: where the model and every computation live.
        queries: misclassified birds explained.
        seed: seed of the model, the data, our generator and captum's permutations.
        width: SmallCNN width (features have ``4 * width`` channels).
        image_size: input size (the grid is ``image_size / 8``).
        num_classes: synthetic species.
        train_steps: Adam steps before the benchmark (0: random weights).
        window, num_samples: our default local game and its Monte Carlo samples.
        captum_samples: captum's ``n_samples`` settings (default: the one matching our default's
            head evaluations per query, and four times that).
        ref_samples: permutations of the captum reference (two independent halves).
        chunk_size: rows per head call, for both libraries.
        repeats: timed runs of each compared method, round-robin (the fastest counts; the
            reference runs once).

    Returns:
        A dict with ``setup`` (strings and numbers), ``methods`` (list of :class:`MethodResult`,
        reference last), ``pairwise`` (name pair → (mean Spearman, mean top-5 overlap)),
        ``reference_split_half`` ((Spearman, top-5) of the two halves).
    """
    dev = torch.device(device)
    model, train_s = _build_model(num_classes, width, image_size, train_steps, seed, dev)
    query, absent, true, pred, accuracy = make_queries(
        model, queries, num_classes=num_classes, image_size=image_size, seed=seed, device=dev)
    n, c, h, w = query.shape
    hw = h * w
    head = model.forward_head
    global_window = 2 * max(h, w) - 1

    def ours(win: int) -> Callable[[], tuple[Tensor, CountingHead]]:
        def call() -> tuple[Tensor, CountingHead]:
            counter = CountingHead(head)
            gen = torch.Generator(device=dev).manual_seed(seed)
            res = local_shapley(counter, query, absent, true, pred, window=win,
                                num_samples=num_samples, chunk_size=chunk_size, generator=gen)
            if int(res.head_evaluations.sum()) != counter.rows:
                raise RuntimeError(f"local_shapley reported {int(res.head_evaluations.sum())} head "
                                   f"evaluations but {counter.rows} rows went through the head.")
            return res.values, counter
        return call

    def captum(samples: int, seed_offset: int = 0) -> Callable[[], tuple[Tensor, CountingHead]]:
        return lambda: captum_cell_shapley(head, query, absent, true, pred, n_samples=samples,
                                           chunk_size=chunk_size, seed=seed + seed_offset)

    ours_evals = 2 * hw * num_samples
    if captum_samples is None:
        matched = max(1, round(ours_evals / hw))
        captum_samples = (matched, 4 * matched)
    # warm-up (allocator, kernels, captum imports) on one query, not timed
    with torch.no_grad():
        local_shapley(head, query[:1], absent[:1], true[:1], pred[:1], window=window,
                      num_samples=2, chunk_size=chunk_size)
        captum_cell_shapley(head, query[:1], absent[:1], true[:1], pred[:1], n_samples=1,
                            chunk_size=chunk_size)

    specs = [(f"ours local k={window}, S={num_samples}", ours(window)),
             (f"ours global k={global_window}, S={num_samples}", ours(global_window))]
    specs += [(f"captum S={s}", captum(s)) for s in captum_samples]
    # Round-robin repeats, fastest run of each method: a burst of load from other processes on
    # a shared machine then slows one run of one method, not all runs of it.
    best: dict[str, tuple[float, float]] = {}
    outputs: dict[str, tuple[Tensor, CountingHead]] = {}
    for _ in range(repeats):
        for name, fn in specs:
            values, counter, seconds, cpu = _timed(dev, fn)
            wall0, cpu0 = best.get(name, (math.inf, math.inf))
            best[name] = (min(wall0, seconds), min(cpu0, cpu))
            outputs[name] = (values, counter)
    methods = [MethodResult(name, outputs[name][0].cpu(), best[name][0], best[name][1],
                            outputs[name][1].rows / n, outputs[name][1].calls)
               for name, _ in specs]

    # reference: two independent halves (different permutation seeds), averaged
    half = max(1, ref_samples // 2)
    v1, c1, s1, cpu1 = _timed(dev, captum(half, seed_offset=1000))
    v2, c2, s2, cpu2 = _timed(dev, captum(half, seed_offset=2000))
    v1, v2 = v1.cpu(), v2.cpu()
    methods.append(MethodResult(f"captum reference S={2 * half}", (v1 + v2) / 2, s1 + s2,
                                cpu1 + cpu2, (c1.rows + c2.rows) / n, c1.calls + c2.calls))

    pairwise = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            pairwise[(a.name, b.name)] = (float(spearman(a.values, b.values).mean()),
                                          float(topk_overlap(a.values, b.values).mean()))
    with torch.no_grad():
        logits = head(query)
        base = float(margin(logits, true, pred).mean())
    setup = {
        "device": str(dev), "threads": torch.get_num_threads(), "queries": n,
        "grid": (h, w), "channels": c, "model": f"SmallCNN(width={width}, classes={num_classes})",
        "train_steps": train_steps, "train_seconds": train_s, "pool_accuracy": accuracy,
        "mean_margin": base, "captum_samples": tuple(captum_samples),
        "ref_samples": 2 * half, "chunk_size": chunk_size,
    }
    return {"setup": setup, "methods": methods, "pairwise": pairwise,
            "reference_split_half": (float(spearman(v1, v2).mean()),
                                     float(topk_overlap(v1, v2).mean()))}


def format_report(result: dict) -> str:
    """The benchmark's printed report: setup line, cost/agreement table, pairwise matrix, ratios."""
    setup, methods, pairwise = result["setup"], result["methods"], result["pairwise"]
    ref = methods[-1]
    base = methods[0]
    lines = [
        f"{setup['model']} on {setup['device']} ({setup['threads']} threads), features "
        f"{setup['channels']}x{setup['grid'][0]}x{setup['grid'][1]}, {setup['train_steps']} train "
        f"steps, pool accuracy {setup['pool_accuracy']:.2f}; {setup['queries']} misclassified "
        f"queries, mean margin logit_pred-logit_true {setup['mean_margin']:.3f}; "
        f"{setup['chunk_size']} rows per head call",
        "",
    ]
    header = (f"{'method':<26} {'ms/query':>9} {'cpu ms/q':>9} {'x ours':>7} {'evals/query':>12} "
              f"{'calls':>6} "
              f"{'rho vs ref':>10} {'top5 vs ref':>11}")
    lines += [header, "-" * len(header)]
    for m in methods:
        if m is ref:
            rho, top = result["reference_split_half"]
            agree = f"{rho:>10.3f} {top:>11.2f}  (split halves)"
        else:
            rho, top = pairwise[(m.name, ref.name)]
            agree = f"{rho:>10.3f} {top:>11.2f}"
        lines.append(f"{m.name:<26} {1000 * m.seconds / setup['queries']:>9.1f} "
                     f"{1000 * m.cpu_seconds / setup['queries']:>9.1f} "
                     f"{m.seconds / base.seconds:>7.2f} {m.evals_per_query:>12.0f} "
                     f"{m.forward_calls:>6} {agree}")
    lines += ["", "pairwise agreement, mean Spearman rho (upper) / top-5 overlap (lower):"]
    short = [f"[{i}]" for i in range(len(methods))]
    lines.append(" " * 6 + "".join(f"{s:>8}" for s in short))
    for i, a in enumerate(methods):
        cells = []
        for j, b in enumerate(methods):
            if i == j:
                cells.append(f"{'-':>8}")
            elif i < j:
                cells.append(f"{pairwise[(a.name, b.name)][0]:>8.3f}")
            else:
                cells.append(f"{pairwise[(b.name, a.name)][1]:>8.2f}")
        lines.append(f"{short[i]:<6}" + "".join(cells) + f"   {a.name}")
    # ratios at (nearly) matched budgets
    lines.append("")
    for m in methods[2:-1]:
        for ours_m in methods[:2]:
            rho, top = pairwise[(ours_m.name, m.name)]
            lines.append(
                f"{m.name} vs {ours_m.name}: time x{m.seconds / ours_m.seconds:.2f}, "
                f"evals x{m.evals_per_query / ours_m.evals_per_query:.2f}, rho {rho:.3f}, "
                f"top-5 {top:.2f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=32, help="SmallCNN width (demo default 32)")
    parser.add_argument("--image-size", type=int, default=64, help="input size; grid = size / 8")
    parser.add_argument("--train-steps", type=int, default=0, help="Adam steps (0: random init)")
    parser.add_argument("--window", type=int, default=3, help="our local window k")
    parser.add_argument("--num-samples", type=int, default=4, help="our samples per cell")
    parser.add_argument("--captum-samples", type=int, nargs="+", default=None,
                        help="captum n_samples settings (default: budget-matched and 4x)")
    parser.add_argument("--ref-samples", type=int, default=64,
                        help="captum permutations of the reference (two halves)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per compared method, round-robin (fastest counts)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default). 1 by default: on a loaded "
                             "machine, multi-threaded runs of captum's many small per-cell tensor "
                             "ops stall at thread barriers and distort the time ratios")
    args = parser.parse_args(argv)
    for name in ("queries", "width", "num_samples", "ref_samples", "chunk_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"expected --{name.replace('_', '-')} to be positive, got "
                         f"{getattr(args, name)}")
    if args.captum_samples is not None and min(args.captum_samples) < 1:
        parser.error(f"expected --captum-samples to be positive, got {args.captum_samples}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        result = run_benchmark(device=args.device, queries=args.queries, seed=args.seed,
                               width=args.width, image_size=args.image_size,
                               train_steps=args.train_steps, window=args.window,
                               num_samples=args.num_samples, captum_samples=args.captum_samples,
                               ref_samples=args.ref_samples, chunk_size=args.chunk_size,
                               repeats=args.repeats)
    finally:
        torch.set_num_threads(threads)
    print(format_report(result))
    print(f"\ntotal {time.perf_counter() - start:.1f}s")
    return result


if __name__ == "__main__":
    main()

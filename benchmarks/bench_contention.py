"""What a busy second thread costs a training step, and what the monitor's short GIL turns win back.

The monitor's background explanation and its collection thread run Python between their tensor
operations (drawing panels, encoding PNGs, writing the report, bookkeeping). A thread waiting for
the GIL waits up to the interpreter's switch interval (5 ms by default) before the holder is asked
to let go, and the training thread takes the GIL back after every operation it calls. The monitor
can shorten the interval while its threads work (opt-in: ``CounterfactualMonitor(switch_interval_s=2e-4)``,
``fgvce_lightning.monitor.threads.short_gil_turns``).

This script times training steps of the demo's ``SmallCNN`` (batch 32, 64×64 images, SGD) on the
calling thread, in rounds so that drift of the machine's speed affects every setting alike:

* ``alone``: nothing else runs;
* ``python thread``: beside a thread that runs pure Python, default switch interval;
* ``python thread, short turns``: the same inside ``short_gil_turns`` (what the monitor does);
* ``torch thread``: beside a thread that multiplies 512×512 matrices (the GIL is released during
  the kernels: what is left is the hardware's contention for the cores and memory).

Run it with one torch thread (the default here) so that the second core is free::

    python benchmarks/bench_contention.py --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time

import torch

from fgvce_lightning.monitor.threads import SWITCH_INTERVAL_S, short_gil_turns
from fgvce_lightning.models import SmallCNN


def _busy_python(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _busy_torch(stop: threading.Event) -> None:
    a = torch.randn(512, 512)
    while not stop.is_set():
        a @ a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps per setting and round")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SmallCNN(num_classes=8, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 8, (32,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    settings = {"alone": (None, contextlib.nullcontext),
                "python thread": (_busy_python, contextlib.nullcontext),
                "python thread, short turns": (_busy_python, short_gil_turns),
                "torch thread": (_busy_torch, contextlib.nullcontext)}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(3):
        step()                                     # warm-up
    for _ in range(args.rounds):
        for name, (busy, turns) in settings.items():
            stop = threading.Event()
            other = threading.Thread(target=busy, args=(stop,), daemon=True) if busy else None
            with turns():
                if other is not None:
                    other.start()
                    time.sleep(0.05)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - start) / args.steps)
                stop.set()
                if other is not None:
                    other.join()
    base = statistics.median(times["alone"])
    print(f"torch threads={torch.get_num_threads()}  default switch interval "
          f"{sys.getswitchinterval() * 1e3:.1f} ms, short turns {SWITCH_INTERVAL_S * 1e3:.1f} ms  "
          f"({args.rounds} rounds of {args.steps} steps, medians)")
    print(f"{'training step':>28} {'ms':>7} {'ratio':>6}")
    for name, values in times.items():
        value = statistics.median(values)
        print(f"{name:>28} {value * 1e3:>7.1f} {value / base:>6.2f}")


if __name__ == "__main__":
    main()

"""The monitor's threads, kept off the training's critical path.

:class:`FrozenModel` is a private copy of the model (weights refreshed in place each explained
epoch) whose head a background search evaluates: the training keeps updating the live weights
meanwhile, so the search must not read them. It also gives the float32 copy of the head for
``head_precision="float32"``. :class:`BackgroundJob` runs one epoch's explanation on a daemon
thread (on its own CUDA stream on a GPU) and can be asked to stop early. :class:`SerialWorker`
runs the per-batch bookkeeping of the collection, in order, on a thread of its own.
:func:`short_gil_turns` is the *opt-in* (``switch_interval_s=``) shortening of the interpreter's
thread switch interval while those threads work: nothing else here changes process-wide settings.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import torch

from ..engine.split import ModelSplit, split_model

__all__ = ["FrozenModel", "BackgroundJob", "SerialWorker", "spare_cpu", "short_gil_turns",
           "SWITCH_INTERVAL_S"]

#: a short thread switch interval (s), as measured in ``benchmarks/bench_contention.py``;
#: CPython's default is 0.005
SWITCH_INTERVAL_S = 2e-4

_turns_lock = threading.Lock()
_turns_users = 0
_turns_saved: Optional[float] = None
_turns_value: Optional[float] = None


@contextlib.contextmanager
def short_gil_turns(interval: Optional[float] = SWITCH_INTERVAL_S) -> Iterator[None]:
    """Set the interpreter's thread switch interval to ``interval`` seconds while the body runs
    (``None``: leave it alone). Re-entrant across threads: the first to enter saves the
    interval, the last to leave puts it back unless someone else changed it meanwhile; an
    interval already shorter is left as it is.

    A thread that waits for the GIL waits up to the switch interval (5 ms by default) before it
    asks the holder to let go, and a training thread takes the GIL back after every tensor
    operation, so a monitor thread running Python (drawing, bookkeeping) can cost it up to 5 ms
    each time. This is a process-wide setting: the monitor changes it only when asked to
    (``CounterfactualMonitor(switch_interval_s=...)``).
    """
    global _turns_users, _turns_saved, _turns_value
    if interval is None:
        yield
        return
    with _turns_lock:
        if _turns_users == 0:
            current = sys.getswitchinterval()
            _turns_saved = current if current > interval else None
            _turns_value = interval
            if _turns_saved is not None:
                sys.setswitchinterval(interval)
        _turns_users += 1
    try:
        yield
    finally:
        with _turns_lock:
            _turns_users -= 1
            if _turns_users == 0 and _turns_saved is not None:
                # put it back unless the user set their own meanwhile (switch intervals are kept
                # in microseconds, so compare loosely)
                if abs(sys.getswitchinterval() - _turns_value) < 1e-6:
                    sys.setswitchinterval(_turns_saved)
                _turns_saved = None


def _strip_hooks(module: torch.nn.Module) -> None:
    """Drop the hooks copied along with the model: a user's hook must not fire from our thread."""
    for m in module.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            hooks = getattr(m, name, None)
            if hasattr(hooks, "clear"):
                hooks.clear()


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


class FrozenModel:
    """A deep copy of ``module`` in eval mode without gradients, split like the live model.

    Args:
        module: the live model (a ``LightningModule`` drops its trainer when copied).
        split_options: the ``layer``/``features``/``head`` options the live model was split with.
            Explicit callables cannot be re-pointed at a copy unless the head is an ``nn.Module``.
        live_split: the live model's split (its ``prefix_channels`` and hook are kept).
        dtype: cast the copy's floating-point parameters and buffers to this dtype (``None``:
            keep the model's).

    Raises:
        ValueError: when the head cannot be copied (an explicit non-module head, a model that
            does not deep-copy); the caller then explains on the live model.
    """

    def __init__(self, module: torch.nn.Module, split_options: dict[str, Any],
                 live_split: ModelSplit, dtype: Optional[torch.dtype] = None) -> None:
        head = split_options.get("head")
        if head is not None:
            if not isinstance(head, torch.nn.Module):
                raise ValueError("the explicit `head` callable is not an nn.Module, so its weights "
                                 "cannot be copied away from the training")
            source: torch.nn.Module = head
        else:
            source = module
        try:
            frozen = copy.deepcopy(source)
        except Exception as err:  # noqa: BLE001 - e.g. a compiled module or an uncopyable attribute
            raise ValueError(f"the model could not be copied ({type(err).__name__}: {err})") from err
        _strip_hooks(frozen)
        frozen.eval()
        frozen.requires_grad_(False)
        if dtype is not None:
            frozen.to(dtype)
        if head is not None:
            split = ModelSplit(live_split.features, frozen, None, live_split.description + " (frozen copy)",
                               prefix_channels=live_split.prefix_channels)
        else:
            split = split_model(frozen, **split_options)
            if split.prefix_channels != live_split.prefix_channels:
                raise ValueError("the copy's split differs from the live model's")
        live, mine = _tensors(source), _tensors(frozen)
        if list(live) != list(mine):
            raise ValueError("the copy's parameters and buffers differ from the live model's")
        self.module = frozen
        self.split = split
        self.dtype = dtype
        self._pairs = [(mine[k], live[k]) for k in live]
        self._dtypes = [(m.dtype, v.dtype) for m, v in self._pairs]

    @property
    def nbytes(self) -> int:
        """Bytes held by the copy's parameters and buffers."""
        seen: set[int] = set()
        total = 0
        for t, _ in self._pairs:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def refresh(self) -> bool:
        """Copy the live weights and buffers in place (cast to the copy's dtypes); ``False`` when
        their shapes, dtypes or devices changed (build a new copy then)."""
        for (mine, live), (mine_dtype, live_dtype) in zip(self._pairs, self._dtypes):
            if (mine.shape != live.shape or mine.device != live.device or mine.dtype != mine_dtype
                    or live.dtype != live_dtype):
                return False
        with torch.no_grad():
            for mine, live in self._pairs:
                mine.copy_(live)
        return True


class BackgroundJob:
    """Run ``fn(stop)`` on a daemon thread; :meth:`wait` returns its result (``fn`` must not
    raise: an exception that escapes anyway is returned as the result so the caller can count
    it). ``stop`` is a :class:`threading.Event` that :meth:`cancel` sets: ``fn`` checks it
    between its steps and winds down.

    On a CUDA ``device`` the thread works on its own stream, after the work the training queued
    so far on the current stream (the inputs it reads), and synchronises that stream before
    reporting done. With ``low_priority`` (Linux) the thread lowers its own scheduling priority
    (``nice`` +10, inherited by the threads its kernels start), so on a busy CPU the training's
    threads come first. ``switch_interval_s`` applies :func:`short_gil_turns` while it works.
    """

    def __init__(self, fn: Callable[[threading.Event], Any], device: Optional[torch.device] = None,
                 name: str = "fgvce-explain", low_priority: bool = True,
                 switch_interval_s: Optional[float] = None) -> None:
        self._result: Any = None
        self._fn = fn
        self._stream = None
        self._ready = None
        self._low_priority = low_priority
        self._interval = switch_interval_s
        self.stop = threading.Event()
        if device is not None and torch.device(device).type == "cuda":
            device = torch.device(device)
            self._stream = torch.cuda.Stream(device=device)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(device))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @staticmethod
    def _lower_priority() -> None:
        # not SCHED_IDLE: a thread that is descheduled while it holds the GIL stalls the training
        # thread too (measured: the demo's whole epoch 2.0x at 2 torch threads, against 1.7x)
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
        except (AttributeError, OSError):   # not Linux, or not permitted: run at normal priority
            pass

    def _run(self) -> None:
        if self._low_priority:
            self._lower_priority()
        try:
            with short_gil_turns(self._interval):
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        self._stream.wait_event(self._ready)
                        self._result = self._fn(self.stop)
                    self._stream.synchronize()
                else:
                    self._result = self._fn(self.stop)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, never raised here
            self._result = err

    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        """Ask ``fn`` to stop at its next check (it keeps what it has finished)."""
        self.stop.set()

    def wait(self, timeout: Optional[float] = None) -> Any:
        """Block until the job ends (or ``timeout`` seconds pass: then ``None``)."""
        self._thread.join(timeout)
        return None if self._thread.is_alive() else self._result


def spare_cpu() -> bool:
    """Whether a CPU core is left over by torch's intra-op threads (the collection thread then
    runs beside the validation forward instead of competing with it for every core)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:         # not Linux
        cpus = os.cpu_count() or 1
    return torch.get_num_threads() < cpus


class SerialWorker:
    """Run submitted tasks one at a time, in submission order, on one daemon thread.

    At most ``max_pending`` tasks wait: :meth:`submit` blocks beyond that, which bounds the
    memory that waiting tasks hold (their batch's tensors). A task must not raise; one that does
    anyway is recorded in :attr:`errors` and the next task runs. On a GPU a task runs on the CUDA
    stream that was current when it was submitted, so its kernels are ordered after the work
    that produced its inputs, and any host synchronisation it does blocks the worker, not the
    training thread.

    Args:
        max_pending: most tasks submitted but not finished.
        name: the thread's name.
        switch_interval_s: :func:`short_gil_turns` while a task runs (``None``: not changed).
    """

    def __init__(self, max_pending: int = 4, name: str = "fgvce-collect",
                 switch_interval_s: Optional[float] = None) -> None:
        if max_pending < 1:
            raise ValueError(f"Expected `max_pending` to be a positive integer, but got {max_pending}.")
        self.max_pending = int(max_pending)
        self.name = name
        self.errors: list[BaseException] = []
        self._interval = switch_interval_s
        self._tasks: collections.deque = collections.deque()
        self._unfinished = 0
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closing = False

    def submit(self, fn: Callable[[], Any]) -> None:
        """Queue ``fn()`` (after every earlier task); wait while ``max_pending`` are unfinished."""
        stream = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stream = torch.cuda.current_stream()
        with self._cond:
            while self._unfinished >= self.max_pending:
                self._cond.wait()
            self._tasks.append((fn, stream))
            self._unfinished += 1
            self._closing = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._closing:
                    self._cond.wait()
                if not self._tasks:          # closed with nothing left to run: the thread ends
                    return
                fn, stream = self._tasks.popleft()
            try:
                with short_gil_turns(self._interval):
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            fn()
                    else:
                        fn()
            except BaseException as err:  # noqa: BLE001 - recorded for the training thread
                self.errors.append(err)
            finally:
                with self._cond:
                    self._unfinished -= 1
                    self._cond.notify_all()

    def close(self, timeout: Optional[float] = None) -> bool:
        """Let the thread finish the submitted tasks and end (at most ``timeout`` s); ``True``
        if it has ended. A later :meth:`submit` starts a new thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    @property
    def pending(self) -> int:
        """Tasks submitted and not finished."""
        with self._cond:
            return self._unfinished

    def drain(self, timeout: Optional[float] = None) -> bool:
        """Wait until every submitted task has finished (at most ``timeout`` s); ``True`` if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._unfinished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

"""When an epoch is explained, under which name it is reported, and for how long it may take.

* :func:`explains`: which validation runs are explained (``every_n_epochs`` counts validation
  runs while fitting, so it works with any ``check_val_every_n_epoch`` / ``val_check_interval``);
* :class:`RunInfo`: the trainer's counters frozen when an epoch ends (a background explanation
  must not see them move on), with the report's name and the scalars' prefix;
* :class:`Deadline`: ``time_budget_s`` for one explanation (search, parts and drawing), and the
  request to stop early on an interrupt.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["explains", "validates_by_step", "RunInfo", "Deadline", "STAGES"]

#: ``fit``: a validation while fitting; ``validate``: ``trainer.validate``; ``test``: ``trainer.test``
STAGES = ("fit", "validate", "test")


def explains(stage: str, run_index: int, every_n_epochs: int, explain_test: bool) -> bool:
    """Whether a (non-sanity) evaluation run is explained: the validation runs ``0, n, 2n, ...``
    of a fit (``run_index`` counts them), every ``trainer.validate``, and ``trainer.test`` when
    ``explain_test``."""
    if stage == "fit":
        return run_index % every_n_epochs == 0
    if stage == "test":
        return explain_test
    return True


def validates_by_step(trainer: "pl.Trainer") -> bool:
    """Whether the trainer may validate more than once per training epoch (``val_check_interval``
    below one epoch, or validation every N steps across epochs): reports are then named by step."""
    if getattr(trainer, "check_val_every_n_epoch", 1) is None:
        return True
    try:
        return float(trainer.val_check_batch) < float(trainer.num_training_batches)
    except (TypeError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class RunInfo:
    """What the monitor's steps read from the trainer, frozen at the end of an evaluation epoch.

    It has the trainer's attribute names (``current_epoch``, ``global_step``, ``global_rank``,
    ``world_size``, ``is_global_zero``, ``loggers``, ``strategy``), so the steps take either.

    Attributes:
        stage: one of :data:`STAGES`.
        num_loaders: the evaluation dataloaders of the run (each is explained on its own).
        by_step: reports are named by global step too (:func:`validates_by_step`).
    """

    current_epoch: int
    global_step: int
    global_rank: int = 0
    world_size: int = 1
    is_global_zero: bool = True
    loggers: tuple = ()
    strategy: Any = None
    stage: str = "validate"
    num_loaders: int = 1
    by_step: bool = False

    @classmethod
    def of(cls, trainer: "pl.Trainer", stage: str, num_loaders: int = 1) -> "RunInfo":
        return cls(current_epoch=int(trainer.current_epoch), global_step=int(trainer.global_step),
                   global_rank=int(trainer.global_rank),
                   world_size=int(getattr(trainer, "world_size", 1) or 1),
                   is_global_zero=bool(trainer.is_global_zero), loggers=tuple(trainer.loggers),
                   strategy=trainer.strategy, stage=stage, num_loaders=max(1, int(num_loaders)),
                   by_step=stage == "fit" and validates_by_step(trainer))

    def report_name(self, dataloader_idx: int = 0) -> str:
        """``epoch_<NNN>`` (``test_<NNN>`` for a test run; ``NNN`` is the current epoch), then
        ``_step_<SSSSSSS>`` when validating several times an epoch, then ``_dataloader_<k>`` for
        the second and later of several dataloaders."""
        name = f"{'test' if self.stage == 'test' else 'epoch'}_{self.current_epoch:03d}"
        if self.by_step:
            name += f"_step_{self.global_step:07d}"
        if dataloader_idx:
            name += f"_dataloader_{dataloader_idx}"
        return name

    def prefix(self, prefix: str, dataloader_idx: int = 0) -> str:
        """The scalars' tag prefix: ``P`` for the first validation dataloader, ``P/test`` for a
        test run, ``/dataloader_<k>`` appended for the later dataloaders."""
        out = f"{prefix}/test" if self.stage == "test" else prefix
        return f"{out}/dataloader_{dataloader_idx}" if dataloader_idx else out

    def describe(self) -> str:
        what = "test of epoch" if self.stage == "test" else "epoch"
        return f"{what} {self.current_epoch} (global step {self.global_step})"


class Deadline:
    """``time_budget_s`` of one explanation, from its start, and an early stop (an interrupt).

    Args:
        budget_s: seconds allowed (``None``: no limit).
        stop: set when the explanation is to stop at its next check (``None``: never).
    """

    def __init__(self, budget_s: Optional[float] = None, stop: Optional[threading.Event] = None) -> None:
        self.budget_s = budget_s
        self.stop = stop
        self.start = time.perf_counter()

    @property
    def stopped(self) -> bool:
        """Whether an early stop was requested."""
        return self.stop is not None and self.stop.is_set()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        """Whether to stop now: the budget is spent, or a stop was requested."""
        return self.stopped or (self.budget_s is not None and self.elapsed() > self.budget_s)

    def why(self) -> str:
        """Why :meth:`expired`: for the notes of the report."""
        if self.stopped:
            return "interrupted"
        return "no limit" if self.budget_s is None else f"time budget ({self.budget_s:g} s) spent"

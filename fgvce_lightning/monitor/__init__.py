"""The monitor: the Lightning callback and its steps, in the order data flows through them.

* :mod:`.capture` — forward hooks on the split point and the model; the head's precision;
* :mod:`.batches`, :mod:`.pending`, :mod:`.collector` — batches parsed, waiting in reusable
  buffers, stored in order (inline, on the collection thread, or by the background job);
* :mod:`.stores`, :mod:`.buffers` — the reference bank, the mistake reservoir, thumbnails and part
  labels, sized from the memory budget;
* :mod:`.explain`, :mod:`.runner` — one explained run's steps (the same on the training thread and
  on the background thread), and where and when they run;
* :mod:`.publish` — scalars, TensorBoard panels and reports; :mod:`.state` — checkpoints;
* :mod:`.config`, :mod:`.checks`, :mod:`.schedule`, :mod:`.session` — options, checks, schedules
  and the per-epoch flow; :mod:`.callback` — :class:`CounterfactualMonitor`, which maps
  Lightning's hooks onto them.
"""

from .callback import CounterfactualMonitor
from .config import Mechanisms

__all__ = ["CounterfactualMonitor", "Mechanisms"]

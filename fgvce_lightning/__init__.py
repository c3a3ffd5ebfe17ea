"""fgvce_lightning: part-level counterfactual explanations of a fine-grained classifier's mistakes,
computed while it trains (FG-VCE, Zhang, Yin & Lee, CVPR 2025) — as a PyTorch Lightning callback.

The callback (:class:`CounterfactualMonitor`) is imported lazily so that ``fgvce_lightning.engine``
stays importable — and fast to import — without Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CounterfactualMonitor": "fgvce_lightning.monitor",
    "ReferenceBank": "fgvce_lightning.engine.bank",
    "SearchConfig": "fgvce_lightning.engine.search",
    "counterfactual_search": "fgvce_lightning.engine.search",
    "greedy_search": "fgvce_lightning.engine.greedy",
    "split_model": "fgvce_lightning.engine.split",
    "ModelSplit": "fgvce_lightning.engine.split",
    "local_shapley": "fgvce_lightning.engine.contributions",
    "grow_regions": "fgvce_lightning.engine.partition",
    "Edit": "fgvce_lightning.engine.results",
    "Explanation": "fgvce_lightning.engine.results",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fgvce_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

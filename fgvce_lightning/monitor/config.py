"""The monitor's options, checked once, when it is constructed.

:class:`MonitorConfig` holds every constructor argument of
:class:`~fgvce_lightning.monitor.callback.CounterfactualMonitor`, validated and normalised;
:class:`Mechanisms` holds the private switches of its cost-saving machinery, so that each can be
measured on and off (``benchmarks/bench_callback.py --ab``). What needs the model (the split,
the number of classes, the budget against the feature size) is checked later, against the first
batch or a dry forward (:mod:`.checks`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from ..engine.search import SearchConfig

__all__ = ["MonitorConfig", "Mechanisms", "make_search_config", "check_seed"]

STRATEGIES = ("fgvce", "greedy")
PART_SOURCES = ("auto", "keypoints", "masks", "prototypes", "none")
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEAD_PRECISIONS = ("model", "float32")
BANK_DEVICES = ("host", "model")
#: the stores' default budget: a 200-class ResNet-50 keeps 36 float32 references per class at
#: 224 px (2048×7×7 maps) and 8 at 448 px (2048×14×14), in host memory (benchmarks/bench_scale.py)
DEFAULT_MEMORY_BUDGET_MB = 3072.0


def available_memory_bytes() -> Optional[int]:
    """The host memory available to new allocations (``MemAvailable``; ``None`` if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget_mb() -> float:
    """:data:`DEFAULT_MEMORY_BUDGET_MB`, or a quarter of the available host memory when that is
    less (at least 64 MB): the bank must never be what pushes a training machine into swap or
    the out-of-memory killer."""
    available = available_memory_bytes()
    if available is None:
        return DEFAULT_MEMORY_BUDGET_MB
    return float(max(64.0, min(DEFAULT_MEMORY_BUDGET_MB, available / 4 / 2 ** 20)))


@dataclass(frozen=True)
class Mechanisms:
    """Private switches of the machinery that keeps the monitor off the validation loop; all on
    by default. Each can be turned off alone to measure what it is worth
    (``CounterfactualMonitor(_mechanisms=Mechanisms(held_sets=False))``); results are the same
    either way (tested), only where and when the work happens changes.

    Attributes:
        waiting_sets: validation batches wait in reusable buffers and are stored several at a
            time (off: each batch is stored on its own as it comes).
        held_sets: while fitting with the background explanation and no collection thread, the
            sets that fill during the epoch wait for the background job to store them (off: they
            are stored on the validation loop as they fill; the epoch's last set still waits).
        collection_thread: sets are stored on a thread of their own where it has a core (on a
            GPU, or when torch's threads leave a CPU core free; off: never).
        low_priority: the background explanation's thread lowers its priority (``nice`` +10).
        reuse_logits: the model's own output is used as the logits when it equals ``head(F)``
            (checked each epoch; off: the head runs on every batch's features).
    """

    waiting_sets: bool = True
    held_sets: bool = True
    collection_thread: bool = True
    low_priority: bool = True
    reuse_logits: bool = True


def _positive_int(value: Any, name: str, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer{' or None' if allow_none else ''}, "
                         f"but got {value!r}.")
    return value


def _positive_number(value: Any, name: str, unit: str, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"Expected `{name}` to be a positive, finite number of {unit}"
                         f"{' or None' if allow_none else ''}, but got {value!r}.")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Expected `{name}` to be True or False, but got {value!r}.")
    return value


def _choice(value: Any, name: str, choices: tuple) -> Any:
    if not isinstance(value, (str, bool)) or value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {list(choices)}, but got {value!r}.")
    return value


def _names(value: Any, name: str) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"Expected `{name}` to be a sequence of names or None, but got {value!r}.")
    names = tuple(str(n) for n in value)
    if len(set(names)) != len(names):
        raise ValueError(f"Expected distinct `{name}`, but got {list(names)}.")
    return names


def check_seed(seed: Any) -> int:
    """Raise unless ``seed`` is an integer in ``[0, 2**63)``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"Expected `seed` to be an integer in [0, 2**63) (it seeds the "
                         f"monitor's own torch.Generator objects), but got {seed!r}.")
    return seed


def make_search_config(search: Optional[SearchConfig], options: Mapping[str, Any],
                       num_classes: Optional[int], seed: int) -> SearchConfig:
    """The :class:`SearchConfig` from ``search=`` or from its fields given as keyword arguments
    (``seed`` defaults to the monitor's), with ``num_classes`` filled in when known."""
    valid = [f.name for f in dataclasses.fields(SearchConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"Expected keyword arguments of CounterfactualMonitor or SearchConfig "
                        f"fields {valid}, but got unknown {unknown}.")
    if search is not None:
        if not isinstance(search, SearchConfig):
            raise TypeError(f"Expected `search` to be a SearchConfig, but got {type(search).__name__}.")
        if options:
            raise ValueError(f"Expected either `search=SearchConfig(...)` or its fields as keyword "
                             f"arguments, but got both (search and {sorted(options)}).")
        config = search
    else:
        options = dict(options)
        options.setdefault("seed", seed)
        try:
            config = SearchConfig(**options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Invalid search options {dict(options)}: {err}") from err
    if num_classes is not None and config.num_classes is None:
        config = dataclasses.replace(config, num_classes=num_classes)
    return config


@dataclass(frozen=True)
class MonitorConfig:
    """Every option of the monitor, validated (see ``CounterfactualMonitor`` for their meaning).

    Raises:
        ValueError, TypeError: at construction, naming the option, what was expected and what
            to do instead.
    """

    layer: Optional[str] = None
    features: Optional[Callable] = None
    head: Optional[Callable] = None
    num_classes: Optional[int] = None
    every_n_epochs: int = 1
    max_samples: int = 64
    time_budget_s: Optional[float] = None
    memory_budget_mb: Optional[float] = None
    max_references_per_class: Optional[int] = 64
    bank_dtype: Any = "float32"
    bank_device: str = "host"
    thumbnail_size: int = 64
    report_dir: Optional[Any] = None
    report_html: bool = True
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    strategy: str = "fgvce"
    batch_parser: Optional[Callable[[Any], Any]] = None
    part_source: str = "auto"
    part_names: Optional[tuple[str, ...]] = None
    num_parts: int = 8
    class_names: Optional[tuple[str, ...]] = None
    log_images: int = 8
    explain_batch_size: int = 16
    seed: int = 0
    prefix: str = "fgvce"
    background: Any = "auto"
    head_precision: str = "model"
    explain_test: bool = False
    switch_interval_s: Optional[float] = None
    mechanisms: Mechanisms = dataclasses.field(default_factory=Mechanisms)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if (self.features is None) != (self.head is None):
            raise ValueError("Expected `features` and `head` to be given together (both callables) or "
                             f"not at all, but got features={self.features!r}, head={self.head!r}.")
        for name in ("features", "head", "batch_parser"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"Expected `{name}` to be a callable, but got {type(value).__name__}.")
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise ValueError(f"Expected `layer` to be a module name or None, but got {self.layer!r}.")
        put("num_classes", _positive_int(self.num_classes, "num_classes", allow_none=True))
        for name in ("every_n_epochs", "max_samples", "thumbnail_size", "num_parts",
                     "explain_batch_size"):
            _positive_int(getattr(self, name), name)
        put("max_references_per_class", _positive_int(self.max_references_per_class,
                                                      "max_references_per_class", allow_none=True))
        put("time_budget_s", _positive_number(self.time_budget_s, "time_budget_s", "seconds",
                                              allow_none=True))
        put("memory_budget_mb", _positive_number(self.memory_budget_mb, "memory_budget_mb", "MB",
                                                 allow_none=True))
        put("switch_interval_s", _positive_number(self.switch_interval_s, "switch_interval_s",
                                                  "seconds", allow_none=True))
        dtype = self.bank_dtype
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).replace("torch.", "")
        if not isinstance(dtype, str) or dtype not in BANK_DTYPES:
            raise ValueError(f"Expected `bank_dtype` to be one of {list(BANK_DTYPES)}, but got "
                             f"{self.bank_dtype!r}.")
        put("bank_dtype", BANK_DTYPES[dtype])
        put("report_dir", self._report_dir(self.report_dir))
        for name in ("report_html", "explain_test"):
            _bool(getattr(self, name), name)
        _choice(self.strategy, "strategy", STRATEGIES)
        _choice(self.part_source, "part_source", PART_SOURCES)
        if not isinstance(self.background, (str, bool)) or self.background not in ("auto", True, False):
            raise ValueError(f"Expected `background` to be 'auto', True or False, but got "
                             f"{self.background!r}.")
        _choice(self.head_precision, "head_precision", HEAD_PRECISIONS)
        _choice(self.bank_device, "bank_device", BANK_DEVICES)
        put("part_names", _names(self.part_names, "part_names"))
        put("class_names", _names(self.class_names, "class_names"))
        if self.part_names is not None and self.part_source == "prototypes" \
                and len(self.part_names) != self.num_parts:
            raise ValueError(f"Expected {self.num_parts} `part_names` (one per prototype, `num_parts`), "
                             f"but got {len(self.part_names)}.")
        if self.part_source in ("auto", "prototypes") and self.num_parts < 2:
            raise ValueError(f"Expected `num_parts` >= 2 (one discovered part is the background), "
                             f"but got {self.num_parts}.")
        if self.class_names is not None and self.num_classes is not None \
                and len(self.class_names) != self.num_classes:
            raise ValueError(f"Expected {self.num_classes} `class_names` (`num_classes`), but got "
                             f"{len(self.class_names)}.")
        if isinstance(self.log_images, bool) or not isinstance(self.log_images, int) or self.log_images < 0:
            raise ValueError(f"Expected `log_images` to be a non-negative integer, but got "
                             f"{self.log_images!r}.")
        check_seed(self.seed)
        if not isinstance(self.prefix, str) or not self.prefix or self.prefix.strip("/") != self.prefix:
            raise ValueError(f"Expected `prefix` to be a non-empty string without leading or "
                             f"trailing '/', but got {self.prefix!r}.")
        if not isinstance(self.search, SearchConfig):
            raise TypeError(f"Expected `search` to be a SearchConfig, but got {type(self.search).__name__}.")
        if not isinstance(self.mechanisms, Mechanisms):
            raise TypeError(f"Expected `_mechanisms` to be a Mechanisms, but got "
                            f"{type(self.mechanisms).__name__}.")

    @staticmethod
    def _report_dir(value: Any) -> Optional[str]:
        if value is None:
            return None
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"Expected `report_dir` to be a path (str or os.PathLike) or None (the "
                            f"logger's directory), but got {type(value).__name__} {value!r}.")
        path = os.fspath(value)
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"Expected `report_dir` to be a non-empty path or None (the logger's "
                             f"directory), but got {value!r}. Use report_dir='.' for the current "
                             "directory.")
        return path

    @property
    def budget_mb(self) -> float:
        """``memory_budget_mb``, or the default (:func:`default_memory_budget_mb`) when ``None``."""
        return self.memory_budget_mb if self.memory_budget_mb is not None \
            else default_memory_budget_mb()

    @property
    def split_options(self) -> dict[str, Any]:
        """The arguments of :func:`~fgvce_lightning.engine.split.split_model`."""
        return {"layer": self.layer, "features": self.features, "head": self.head}

"""The old import path of the monitor: ``from fgvce_lightning.callback import CounterfactualMonitor``
keeps working (the monitor lives in :mod:`fgvce_lightning.monitor`)."""

from .monitor.callback import CounterfactualMonitor

__all__ = ["CounterfactualMonitor"]

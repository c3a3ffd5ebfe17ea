"""argparse value types shared by the ``fgvce`` subcommands (:mod:`.cli`, :mod:`.evaluate`)."""

from __future__ import annotations

import argparse

__all__ = ["positive_int"]


def positive_int(value: str) -> int:
    """argparse type: a positive integer, with a message that says what was given."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {value!r}")
    return number

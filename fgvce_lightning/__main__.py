"""``python -m fgvce_lightning demo``: the ``fgvce`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

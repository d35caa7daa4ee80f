"""``python -m selfref``: the ``selfref`` command (what ``torchrun -m selfref`` runs per rank)."""

from __future__ import annotations

import sys

from selfref.cli import main

if __name__ == "__main__":
    sys.exit(main())

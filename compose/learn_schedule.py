"""Command line of `compose.ld3`: `python -m compose.learn_schedule --help` (learn an N-step schedule, write JSON)."""

from __future__ import annotations

from .ld3 import main

if __name__ == "__main__":
    main()

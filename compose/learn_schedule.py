"""The learned-schedule command moved to the `compose` command line: `compose learn-schedule --help` (without
installing: `python -m pipelines.cli learn-schedule --help`). It loads diffusers folders, which `compose` never
imports; this module only points there. The API is `compose.ld3.learn_schedule`.
"""

from __future__ import annotations

import sys

MESSAGE = (
    "python -m compose.learn_schedule has moved: run `compose learn-schedule ...` (or, without installing, "
    "`python -m pipelines.cli learn-schedule ...`) with the same arguments."
)


def main(argv: list[str] | None = None) -> int:
    """Point to the command line (exit status 2)."""
    print(MESSAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `compose` command line: `compose batch jobs.jsonl --out DIR` (see `pipelines.batch`).

Without installing: `python -m pipelines.cli batch ...`; on several processes:
`torchrun --nproc_per_node 2 -m pipelines.cli batch ...`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import batch

    p = argparse.ArgumentParser(prog="compose", description="diffusion-compose command line")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("batch", help="run a JSONL / CSV file of composition jobs into a folder (resumable)")
    batch.add_arguments(b)
    args = p.parse_args(argv)
    if args.command == "batch":
        return batch.main_batch(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())

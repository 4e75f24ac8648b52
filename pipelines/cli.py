"""The `compose` command line: `compose batch jobs.jsonl --out DIR` (see `pipelines.batch`).

Without installing: `python -m pipelines.cli batch ...`; on several processes:
`torchrun --nproc_per_node 2 -m pipelines.cli batch ...`.

Parsing the command line imports neither torch nor diffusers (`compose --help` answers in a fraction of a second;
`benchmarks/bench_cli_help.py` measures it): `pipelines.batch` and `pipelines.jobs` import them when a command runs.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The `compose` argument parser (no heavy import)."""
    from . import batch

    p = argparse.ArgumentParser(prog="compose", description="diffusion-compose command line")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("batch", help="run a JSONL / CSV file of composition jobs into a folder (resumable)")
    batch.add_arguments(b)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "batch":
            from . import batch

            return batch.main_batch(args)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while starting up (the batch itself reports rows done / total)
        print("interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `compose` command line: `compose batch jobs.jsonl --out DIR` (see `pipelines.batch`) and
`compose learn-schedule --model ... --nfe N --out FILE` (LD3, see `pipelines.learn_schedule`).

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
    from . import batch, learn_schedule

    p = argparse.ArgumentParser(prog="compose", description="diffusion-compose command line")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("batch", help="run a JSONL / CSV file of composition jobs into a folder (resumable)")
    batch.add_arguments(b)
    ls = sub.add_parser(
        "learn-schedule", help=learn_schedule.DESCRIPTION[0].lower() + learn_schedule.DESCRIPTION[1:-1]
    )
    learn_schedule.add_arguments(ls)
    ls.set_defaults(usage_error=ls.error)  # argument errors found when it runs read as the parser's own
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "batch":
            from . import batch

            return batch.main_batch(args)
        if args.command == "learn-schedule":
            from . import learn_schedule

            rest = list(sys.argv[1:] if argv is None else argv)
            learn_schedule.run(args, args.usage_error, rest[rest.index("learn-schedule") + 1 :])
            return 0
        return 2
    except KeyboardInterrupt:  # Ctrl-C while starting up (the batch itself reports rows done / total)
        print("interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

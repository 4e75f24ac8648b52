"""CPU time of `compose --help` against importing torch (issue 24.5).

    python benchmarks/bench_cli_help.py [--repeat 5]

Each command runs in a fresh interpreter `--repeat` times; the table gives the median CPU seconds (user + system of
the child, from `resource.getrusage(RUSAGE_CHILDREN)`) and the median wall seconds. `compose ...` runs as
`python -m pipelines.cli ...` (what the console script calls), so the figures do not depend on the install.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
COMMANDS = [
    ("compose --help", [PY, "-m", "pipelines.cli", "--help"]),
    ("compose batch --help", [PY, "-m", "pipelines.cli", "batch", "--help"]),
    ('python -c "import torch"', [PY, "-c", "import torch"]),
    ('python -c "import diffusers"', [PY, "-c", "import diffusers"]),
    ('python -c "pass"', [PY, "-c", "pass"]),
]


def measure(cmd: list[str], repeat: int) -> tuple[float, float]:
    """Median CPU seconds and median wall seconds of `cmd` over `repeat` runs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cpu, wall = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        wall.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return statistics.median(cpu), statistics.median(wall)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    print(f"{'command':<30} {'CPU s':>7} {'wall s':>7}   (median of {args.repeat}, {os.cpu_count()} cores)")
    for name, cmd in COMMANDS:
        cpu, wall = measure(cmd, args.repeat)
        print(f"{name:<30} {cpu:7.2f} {wall:7.2f}")


if __name__ == "__main__":
    main()

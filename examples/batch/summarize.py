"""Print a batch run's manifest as a markdown table (one line per row; failed rows with their message).

    python examples/batch/summarize.py outputs/batch/manifest.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.batch import read_records  # noqa: E402


def table(records: list[dict]) -> str:
    """The markdown table of a manifest's records."""
    lines = [
        "| line | id | operator | terms | images | mean kappa per term | images won | s/img |",
        "|---:|---|---|---|---:|---|---|---:|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['line']} | {r['id']} | error: {r['error']} | | | | | |")
            continue
        p, s = r["params"], r["summary"]
        kappa = " / ".join(f"{v:.2f}" for v in s["kappa_mean"])
        won = " / ".join(str(v) for v in s.get("images_won", [])) or "-"
        lines.append(
            f"| {r['line']} | {r['id']} | {p['operator'] or '-'} {p['method']} | {'; '.join(s['terms'])} | "
            f"{p['images']} | {kappa} | {won} | {r['timings']['s_per_image']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest")
    args = p.parse_args()
    records = read_records(Path(args.manifest))
    if not records:
        raise SystemExit(f"{args.manifest}: no records (run `compose batch ... --out DIR` first).")
    print(table(records))


if __name__ == "__main__":
    main()

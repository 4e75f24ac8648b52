"""Print a batch run's manifest as a markdown table (one line per row; failed rows with their message), or list the
images that miss a concept and write the rows that redraw them.

    python examples/batch/summarize.py outputs/batch/manifest.jsonl
    python examples/batch/summarize.py outputs/batch/manifest.jsonl --below 0
    python examples/batch/summarize.py outputs/batch/manifest.jsonl --below 0 --rerun redo.jsonl --candidates 4
    compose batch redo.jsonl --out outputs/batch-redo

`--below X` lists every image whose min lift over its terms (the manifest's `lift.per_image`, nats: log q_term -
log q_ref of the image, `pipelines.verify`) is below X, worst first: an image with a term's lift at or below 0 is no
more likely under that term than under its reference, the sign of a concept that did not make it. `--rerun FILE`
writes one job row per listed image: the row's parameters, that image's seed, one image and `--candidates` K
candidates kept by their lift (best of K), ids `<id>-<i>-best<K>`. The lift is noisy (docs/MATH.md section 9): read
a threshold as a filter to look at, not a verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.batch import read_records  # noqa: E402


def table(records: list[dict]) -> str:
    """The markdown table of a manifest's records."""
    lines = [
        "| line | id | operator | terms | images | mean kappa per term | images won | mean lift per term | s/img |",
        "|---:|---|---|---|---:|---|---|---|---:|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['line']} | {r['id']} | error: {r['error']} | | | | | | |")
            continue
        p, s = r["params"], r["summary"]
        kappa = " / ".join(f"{v:.2f}" for v in s["kappa_mean"])
        won = " / ".join(str(v) for v in s.get("images_won", [])) or "-"
        lift = " / ".join(f"{v:.2f}" for v in s.get("lift_mean", [])) or "-"
        lines.append(
            f"| {r['line']} | {r['id']} | {p['operator'] or '-'} {p['method']} | {'; '.join(s['terms'])} | "
            f"{p['images']} | {kappa} | {won} | {lift} | {r['timings']['s_per_image']:.2f} |"
        )
    return "\n".join(lines)


def image_lifts(records: list[dict]) -> list[dict]:
    """One entry per image of the finished rows that have a lift: the row's id and line, the image's index, file and
    seed, the lift terms, its lift per term, its min lift and its score (the pipeline's rule), the candidate kept."""
    out = []
    for r in records:
        lift = r.get("lift") or {}
        if r.get("status") != "ok" or not lift.get("per_image"):
            continue  # a failed row, a manifest of an earlier version, or a row without a lift
        for i, values in enumerate(lift["per_image"]):
            out.append(
                {
                    "id": r["id"],
                    "line": r["line"],
                    "image": i,
                    "file": r["files"][i],
                    "seed": r["image_seeds"][i],
                    "terms": lift["terms"],
                    "lift": values,
                    "min_lift": min(values),
                    "score": lift["score"][i] if lift.get("score") else None,
                    "kept": lift["kept"][i] if lift.get("kept") else None,
                    "estimator": lift["estimator"],
                }
            )
    return out


def below(records: list[dict], threshold: float) -> list[dict]:
    """The images whose min lift over the terms is below `threshold`, worst (lowest) first."""
    return sorted((e for e in image_lifts(records) if e["min_lift"] < threshold), key=lambda e: e["min_lift"])


def images_table(entries: list[dict]) -> str:
    """A markdown table of `image_lifts` entries."""
    lines = ["| file | seed | min lift | lift per term | kept | estimator |", "|---|---:|---:|---|---:|---|"]
    for e in entries:
        per = "; ".join(f"{t}: {v:.2f}" for t, v in zip(e["terms"], e["lift"], strict=True))
        kept = "-" if e["kept"] is None else e["kept"]
        lines.append(f"| {e['file']} | {e['seed']} | {e['min_lift']:.2f} | {per} | {kept} | {e['estimator']} |")
    return "\n".join(lines)


def rerun_rows(records: list[dict], entries: list[dict], candidates: int) -> list[dict]:
    """A job row per entry: its row's parameters (unset ones left out), the image's seed, one image, `candidates`
    candidates chosen by their lift (the row's lift estimator unless it was 'none': then the default)."""
    by_id = {r["id"]: r for r in records}
    rows = []
    for e in entries:
        params = {k: v for k, v in by_id[e["id"]]["params"].items() if v is not None}
        params.pop("select", None)
        if params.get("lift") == "none":
            params.pop("lift")
        params.update(id=f"{e['id'][:80]}-{e['image']}-best{candidates}", seed=e["seed"], images=1)
        params["candidates"] = candidates
        rows.append(params)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest")
    p.add_argument("--below", type=float, default=None, help="list the images whose min lift (nats) is below this")
    p.add_argument("--rerun", default=None, help="with --below: write a job row per listed image to this JSONL file")
    p.add_argument("--candidates", type=int, default=4, help="with --rerun: candidates per redrawn image")
    args = p.parse_args()
    records = read_records(Path(args.manifest))
    if not records:
        raise SystemExit(f"{args.manifest}: no records (run `compose batch ... --out DIR` first).")
    if args.below is None:
        if args.rerun is not None:
            raise SystemExit("--rerun writes the images listed by --below; give --below too.")
        print(table(records))
        return
    if args.candidates < 2:
        raise SystemExit(f"--candidates={args.candidates}: give at least 2 (the best of them is kept).")
    entries = below(records, args.below)
    print(images_table(entries))
    print(f"\n{len(entries)} of {len(image_lifts(records))} images with a lift have a min lift below {args.below:g}.")
    if args.rerun is not None:
        rows = rerun_rows(records, entries, args.candidates)
        Path(args.rerun).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} rows written to {args.rerun}: `compose batch {args.rerun} --out DIR` redraws them.")


if __name__ == "__main__":
    main()

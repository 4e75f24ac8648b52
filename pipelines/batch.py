"""Scripted prompt batches: `compose batch jobs.jsonl --out DIR` (also CSV), on one or many processes.

Input: one job per JSONL line (or CSV row; lists as '|'-separated text or JSON) with the fields of
`pipelines.jobs.FIELDS`: models, prompts, operator, weights, seed, steps, schedule, guidance, images, ... A
malformed row is reported with its line number (on stderr and in the manifest) and skipped; the others run.

Output in DIR: `images/<id>_<i>.png` (the job's parameters in the PNG text chunk "parameters") and
`manifest.jsonl`, one record per row, in line order: status "ok" (parameters, seed of every image, file names,
kappa / log q summaries, timings) or "error" (the message). A row's id is its `id` field or `line<N>`.

Atomic and resumable: images are written to a temporary name and renamed; a row's record is appended (one write,
flushed to disk) only after all its images are in place. A run that is killed and restarted reads the manifest,
drops a torn last line, keeps every finished row whose parameters are unchanged and runs the rest: no finished row
is lost or duplicated. Rows that failed are retried.

Many processes: `torchrun --nproc_per_node N -m pipelines.cli batch ...` (or `accelerate launch`) splits the
pending rows over the processes with `accelerate.PartialState`; each appends to manifest.rank<r>.jsonl and the main
process merges them into manifest.jsonl at the end (or at the start of the next run if this one was killed).
Seeds are per row and per image (image i of a row uses seed + i), never per rank, so the images do not depend on
the number of processes or on --batch-size.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .jobs import FIELDS, Job, JobResult, Limits, PipelineCache, parse_job, run_job

MANIFEST = "manifest.jsonl"
IMAGES = "images"


# ---------------------------------------------------------------------- reading jobs
def read_rows(path: str | os.PathLike) -> list[tuple[int, dict | None, str | None]]:
    """(line number, raw row or None, error or None) for every job row of a .jsonl / .json / .csv file.

    JSONL: blank lines and lines starting with '#' are skipped. CSV: a header row names the fields; a cell that
    starts with '[' is read as JSON (e.g. `[]` for no prompts, `[1, 3]` for weights).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"jobs file {str(path)!r} does not exist; give a .jsonl or .csv file.")
    rows: list[tuple[int, dict | None, str | None]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                return rows
            unknown = sorted(set(reader.fieldnames) - set(FIELDS))
            if unknown:
                raise ValueError(f"{path}: unknown column(s) {unknown}; the fields are {list(FIELDS)}.")
            line = reader.line_num
            for rec in reader:
                start, line = line + 1, reader.line_num
                if None in rec:
                    rows.append((start, None, f"line {start}: more cells than columns in the header."))
                    continue
                raw: dict[str, Any] = {}
                err = None
                for k, v in rec.items():
                    v = (v or "").strip()
                    if v == "":
                        continue
                    if v.startswith("["):
                        try:
                            v = json.loads(v)
                        except json.JSONDecodeError as e:
                            err = f"line {start}: column {k!r} is not valid JSON ({e.msg})."
                    raw[k] = v
                rows.append((start, None if err else raw, err))
        return rows
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise ValueError(f"jobs file {str(path)!r}: use a .jsonl (one JSON object per line) or .csv file.")
    with open(path) as fh:
        for i, text in enumerate(fh, start=1):
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                rows.append((i, None, f"line {i}: not valid JSON ({e.msg} at column {e.colno})."))
                continue
            rows.append((i, raw, None))
    return rows


def plan(rows, limits: Limits) -> tuple[list[tuple[int, Job]], list[dict]]:
    """Parse every row: (line, Job) for the good ones, error records (with line numbers) for the others."""
    jobs: list[tuple[int, Job]] = []
    errors: list[dict] = []
    seen: dict[str, int] = {}
    for line, raw, err in rows:
        row_id = None
        if err is None:
            try:
                job = parse_job(raw, limits)
                job.id = job.id or f"line{line}"
                row_id = job.id
                if row_id in seen:
                    raise ValueError(
                        f"id={row_id!r} is already used on line {seen[row_id]}; give each row its own id."
                    )
                seen[row_id] = line
                jobs.append((line, job))
                continue
            except ValueError as e:
                err = f"line {line}: {e}"
        if row_id is None and isinstance(raw, dict) and raw.get("id"):
            row_id = str(raw["id"])
        errors.append({"id": row_id or f"line{line}", "line": line, "status": "error", "error": err})
    return jobs, errors


# ---------------------------------------------------------------------- the manifest
def read_records(path: Path) -> list[dict]:
    """The complete records of a JSONL manifest; a torn (partly written) line is dropped."""
    if not path.is_file():
        return []
    out = []
    with open(path) as fh:
        for text in fh:
            if not text.endswith("\n"):
                break  # a torn last line from a killed write
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def append_record(path: Path, record: dict) -> None:
    """Append one record as one write, flushed to disk."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def merge_manifest(out: Path) -> list[dict]:
    """Merge manifest.jsonl and the per-rank files into manifest.jsonl (line order, one record per id).

    The latest record of an id wins (the per-rank files are newer than manifest.jsonl). When an error replaces a
    finished row (its parameters were edited and the new ones failed) the finished record is kept inside the error
    record as "previous", with its file names: nothing written is lost from the manifest.
    """
    main = out / MANIFEST
    parts = sorted(out.glob("manifest.rank*.jsonl"))
    by_id: dict[str, dict] = {}
    for path in [main, *parts]:
        for rec in read_records(path):
            old = by_id.get(rec.get("id")) or {}
            previous = old if old.get("status") == "ok" else old.get("previous")
            if rec.get("status") != "ok" and previous:
                rec = {**rec, "previous": previous}
            by_id[rec.get("id")] = rec
    records = sorted(by_id.values(), key=lambda r: (r.get("line", 0), str(r.get("id"))))
    if records or main.exists():
        _atomic_write_text(main, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    for p in parts:
        p.unlink()
    return records


# ---------------------------------------------------------------------- running
def save_images(result: JobResult, job: Job, out: Path) -> list[str]:
    """Write the images atomically with the parameters in the PNG text chunk; return their paths (relative)."""
    from PIL.PngImagePlugin import PngInfo

    folder = out / IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(result.images):
        name = f"{job.id}_{i}.png"
        meta = PngInfo()
        meta.add_text("parameters", json.dumps({**job.params(), "image_index": i, "image_seed": job.seed + i}))
        meta.add_text("Software", "diffusion-compose")
        tmp = folder / f".{name}.tmp{os.getpid()}"
        image.save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, folder / name)
        names.append(f"{IMAGES}/{name}")
    return names


def run_row(pipes: PipelineCache, job: Job, batch_size: int | None, on_images=None) -> JobResult:
    """Run one job in chunks of at most `batch_size` images (image i keeps seed + i)."""
    t0 = time.perf_counter()
    pipe = pipes.get(job.models)
    load_s = time.perf_counter() - t0
    step = batch_size or job.images
    parts = []
    for start in range(0, job.images, step):
        sub = replace(job, seed=job.seed + start, images=min(step, job.images - start))
        parts.append(run_job(pipe, sub))
        if on_images is not None:
            on_images(sub.images)
    res = JobResult(
        images=[im for p in parts for im in p.images],
        kappa=torch.cat([p.kappa for p in parts], dim=1),
        log_q=torch.cat([p.log_q for p in parts], dim=1),
        timesteps=parts[0].timesteps,
        terms=parts[0].terms,
        seconds=sum(p.seconds for p in parts),
    )
    res.extra["load_s"] = load_s
    return res


def run_batch(
    jobs_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_size: int | None = None,
    limits: Limits | None = None,
    progress: bool = True,
    state: Any = None,
) -> dict[str, int]:
    """Run every row of `jobs_path` into `out_dir` (resuming); return {"ok", "failed", "skipped", "ran"} counts."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    state = state or PartialState(cpu=not torch.cuda.is_available())
    out = Path(out_dir)
    rows = read_rows(jobs_path)  # every rank reads the same file: the same plan everywhere
    jobs, errors = plan(rows, limits or Limits())
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / IMAGES).glob(".*.tmp*"):  # half-written images of a killed run
            stale.unlink()
        merge_manifest(out)
    state.wait_for_everyone()
    done = {r["id"]: r for r in read_records(out / MANIFEST) if r.get("status") == "ok"}
    pending = [(line, job) for line, job in jobs if done.get(job.id, {}).get("key") != job.key()]
    skipped = len(jobs) - len(pending)
    if state.num_processes > 1:
        target = out / f"manifest.rank{state.process_index}.jsonl"
    else:
        target = out / MANIFEST
    if state.is_main_process:
        for rec in errors:
            print(f"skipping {rec['error']}", file=sys.stderr)
            append_record(target, rec)
    pipes = PipelineCache(device=state.device)
    ran = failed = 0
    with state.split_between_processes(pending) as mine:
        total = sum(job.images for _, job in mine)
        bar = tqdm(total=total, unit="img", disable=not (progress and state.is_main_process), dynamic_ncols=True)
        bar.set_description(f"rank {state.process_index}/{state.num_processes}: {len(mine)} rows")
        for line, job in mine:
            try:
                res = run_row(pipes, job, batch_size, on_images=bar.update)
                t0 = time.perf_counter()
                files = save_images(res, job, out)
                record = {
                    "id": job.id,
                    "line": line,
                    "status": "ok",
                    "key": job.key(),
                    "params": job.params(),
                    "image_seeds": [job.seed + i for i in range(job.images)],
                    "files": files,
                    "summary": res.summary(),
                    "timings": {
                        "load_s": round(res.extra["load_s"], 4),
                        "sample_s": round(res.seconds, 4),
                        "save_s": round(time.perf_counter() - t0, 4),
                        "s_per_image": round(res.seconds / job.images, 4),
                    },
                    "rank": state.process_index,
                }
                ran += 1
            except Exception as err:  # noqa: BLE001 -- one bad row must not stop the batch; its record says why
                if not isinstance(err, ValueError):
                    traceback.print_exc()
                msg = str(err) if isinstance(err, ValueError) else f"internal error: {type(err).__name__}: {err}"
                print(f"skipping line {line} (id {job.id}): {msg}", file=sys.stderr)
                record = {"id": job.id, "line": line, "status": "error", "error": f"line {line}: {msg}"}
                failed += 1
            append_record(target, record)
        bar.close()
    state.wait_for_everyone()
    counts = {"ran": ran, "skipped": skipped, "failed": failed + len(errors)}
    if state.is_main_process:
        records = merge_manifest(out)
        current = {job.id for _, job in jobs} | {r["id"] for r in errors}
        counts["ok"] = sum(1 for r in records if r["status"] == "ok" and r["id"] in current)
        counts["failed"] = sum(1 for r in records if r["status"] == "error" and r["id"] in current)
        print(
            f"{counts['ok']} rows ok ({skipped} already done), {counts['failed']} failed; manifest: {out / MANIFEST}",
            file=sys.stderr,
        )
    return counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", help="a .jsonl file (one job per line) or a .csv file with a header row")
    p.add_argument("--out", required=True, help="output folder (images/ and manifest.jsonl); rerun to resume")
    p.add_argument("--batch-size", type=int, default=None, help="at most this many images per pipeline call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps)
    p.add_argument("--max-images", type=int, default=Limits.max_images)
    p.add_argument("--max-terms", type=int, default=Limits.max_terms)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_batch(args: argparse.Namespace) -> int:
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    limits = Limits(max_steps=args.max_steps, max_images=args.max_images, max_terms=args.max_terms)
    try:
        counts = run_batch(
            args.jobs, args.out, batch_size=args.batch_size, limits=limits, progress=not args.no_progress
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if counts["failed"] else 0


__all__ = ["add_arguments", "main_batch", "merge_manifest", "plan", "read_records", "read_rows", "run_batch"]

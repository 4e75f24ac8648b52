"""Scripted prompt batches: `compose batch jobs.jsonl --out DIR` (also CSV), on one or many processes.

Input: one job per JSONL line (or CSV row; lists as '|'-separated text or JSON) with the fields of
`pipelines.jobs.FIELDS`: models, prompts, operator, weights, seed, steps, schedule, guidance, images, ... A
malformed row is reported with its line number (on stderr and in the manifest) and skipped; the others run.

Output in DIR: `images/<id>_<i>.png` (the job's parameters in the PNG text chunk "parameters") and
`manifest.jsonl`, one record per row, in line order: status "ok" (parameters, seed of every image, file names,
kappa / log q summaries, per-image concept scores, timings) or "error" (the message). A row's id is its `id` field or
`line<N>`.

Concept scores: a row's `lift` (and `candidates`, `select`) fields reach the pipeline's (`pipelines.verify`), and an ok
record's "lift" holds, for image i (its `files[i]`): `per_image[i]`, its lift per term of `terms` (log q_term -
log q_ref, nats, 3 decimals; how much more likely the image is under the term than under its reference), `score[i]`,
the score the pipeline ranks candidates by (`rule`: the min over the terms, the max for operator "or"), and with
candidates > 1 `kept[i]`, the candidate kept, and `candidate_scores[i]`, every candidate's score; plus `estimator`
("tracked": free, a weak detector on pixel models; "renoise": 3 x (terms + references) extra network rows per
candidate), `candidates` and `rows_per_image` (the rows the lift cost per image). `per_image` is null where no lift was
computed (lift "none", operator "product_smc", "tracked" without guidance). To find the images that miss a concept:

    python examples/batch/summarize.py DIR/manifest.jsonl --below 0                  # min lift < 0, worst first
    python examples/batch/summarize.py DIR/manifest.jsonl --below 0 --rerun redo.jsonl --candidates 4
    compose batch redo.jsonl --out DIR2                                              # best of 4 for each of them

(in Python, that script's `image_lifts(records)` is one entry per image: file, seed, lift per term, min lift, score,
kept candidate). Candidates are sampled in full: they count as images against --max-images (images x candidates) and
--batch-size (sampled images per call).

Atomic and resumable: images are written to a temporary name and renamed; a row's record is appended (one write,
flushed to disk) only after all its images are in place. A run that is killed and restarted reads the manifest,
drops a torn last line, keeps every finished row whose parameters are unchanged (`Job.key`: the parameters that change
the images; `lift` alone does not, so a finished row keeps the lift it was recorded with) and whose image files are
all there and readable at their recorded size, and runs the rest (a finished row with a missing or damaged image runs
again): no finished row is lost or duplicated. Rows that failed are retried. Ctrl-C stops with one line (rows done /
total, rerun to resume) and exit status 130.

Hostile rows: any error of one row (from parsing, from a schedule file, from sampling; whatever its type) is recorded
for that row and the others run; the limits (`--max-steps` ...) apply to the steps a schedule file brings too; ids
are checked (characters, at most 100) before anything runs. One runner per output folder: the main process holds an
exclusive lock (`flock`) on `DIR/.lock` for the whole run, released by the kernel when the process ends, so a killed
runner leaves no stale lock; a second runner on the same folder stops at once, naming the first (pid, host, start).

Many processes: `torchrun --nproc_per_node N -m pipelines.cli batch ...` (or `accelerate launch`) splits the
pending rows over the processes with `accelerate.PartialState`; each appends to manifest.rank<r>.jsonl and the main
process merges them into manifest.jsonl at the end (or at the start of the next run if this one was killed).
Seeds are per row and per image (image i of a row uses seed + i), never per rank, so the images do not depend on
the number of processes; with another --batch-size they are the same up to rounding (CPU kernels round differently
for different batch sizes: at most a level or two out of 255 in a few pixels).

torch, diffusers and accelerate are imported when a batch runs, not to parse the command line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from .jobs import (
    FIELDS,
    Deadline,
    Job,
    JobResult,
    Limits,
    PipelineCache,
    check_prompt_tokens,
    parse_job,
    run_job,
    show,
)

MANIFEST = "manifest.jsonl"
IMAGES = "images"
LOCK = ".lock"


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
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.DictReader(fh)
            try:
                fieldnames = reader.fieldnames
            except csv.Error as e:
                raise ValueError(
                    f"{path}: the header row cannot be read ({e}); give a header naming the fields."
                ) from None
            if fieldnames is None:
                return rows
            unknown = sorted(set(fieldnames) - set(FIELDS))
            if unknown:
                raise ValueError(f"{path}: unknown column(s) {show(unknown, 200)}; the fields are {list(FIELDS)}.")
            line = reader.line_num
            while True:
                try:
                    rec = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:  # e.g. a cell over the csv module's field limit: this row only
                    line += 1
                    rows.append((line, None, f"line {line}: this row cannot be read as CSV ({e})."))
                    line = max(line, reader.line_num)
                    continue
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
                        except (ValueError, RecursionError):
                            err = f"line {start}: column {k!r} is not usable JSON (nested too deeply or too large)."
                    raw[k] = v
                rows.append((start, None if err else raw, err))
        return rows
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise ValueError(f"jobs file {str(path)!r}: use a .jsonl (one JSON object per line) or .csv file.")
    with open(path, "rb") as fh:
        for i, data in enumerate(fh, start=1):
            try:
                text = data.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                rows.append((i, None, f"line {i}: not valid UTF-8 (byte {e.start + 1}); save the file as UTF-8."))
                continue
            if not text or text.startswith("#"):
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                rows.append((i, None, f"line {i}: not valid JSON ({e.msg} at column {e.colno})."))
                continue
            except (ValueError, RecursionError):  # nested too deeply, a number too long to convert
                rows.append((i, None, f"line {i}: not usable JSON (nested too deeply or a number too large)."))
                continue
            rows.append((i, raw, None))
    return rows


def _row_id(raw: Any, line: int, limits: Limits) -> str:
    """The id a failed row is recorded under: its own when that is a valid id, else `line<N>`."""
    from .jobs import _job_id

    try:
        return (_job_id(raw, limits) if isinstance(raw, dict) else None) or f"line{line}"
    except ValueError:
        return f"line{line}"


def plan(rows, limits: Limits) -> tuple[list[tuple[int, Job]], list[dict]]:
    """Parse every row: (line, Job) for the good ones, error records (with line numbers) for the others.

    Any exception of one row (not only ValueError) becomes that row's error record: the other rows still run."""
    jobs: list[tuple[int, Job]] = []
    errors: list[dict] = []
    seen: dict[str, int] = {}
    for line, raw, err in rows:
        row_id = None
        if err is None:
            try:
                job = parse_job(raw, limits)
                job.id = job.id or f"line{line}"
                if job.id in seen:  # recorded as line<N>: under the id it would replace the first row's record
                    row_id = f"line{line}"
                    raise ValueError(
                        f"id={job.id!r} is already used on line {seen[job.id]}; give each row its own id."
                    )
                seen[job.id] = line
                jobs.append((line, job))
                continue
            except ValueError as e:
                err = f"line {line}: {e}"
            except Exception as e:  # noqa: BLE001 -- a hostile row must not stop the batch; its record says why
                err = (
                    f"line {line}: this row cannot be run ({type(e).__name__}: {show(str(e), 200)}); check its fields "
                    f"(the fields are {list(FIELDS)})."
                )
        errors.append({"id": row_id or _row_id(raw, line, limits), "line": line, "status": "error", "error": err})
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


# ---------------------------------------------------------------------- one runner per folder
class FolderBusy(ValueError):
    """Another runner holds the output folder's lock."""


class FolderLock:
    """One runner per output folder: an exclusive, non-blocking `flock` on `DIR/.lock`, held for the whole run.

    The kernel releases it when the process ends in any way (SIGKILL included), so a killed runner never leaves a
    stale lock and nothing has to guess whether a pid is still alive. The file records the holder (pid, host, start
    time, command) for the message a second runner prints. Local file systems (and NFS with lock support).
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.path = Path(out) / LOCK
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self.holder()
            os.close(fd)
            raise FolderBusy(
                f"--out {str(self.path.parent)!r} is in use by another `compose batch` ({holder}); two runners on "
                "one folder would run rows twice. Wait for it to finish (then rerun this command to resume), or give "
                "another --out."
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd
        return self

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']}, since {info['since']}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------- finished rows
def image_problem(out: Path, record: dict) -> str | None:
    """Why a finished row's images cannot be kept (missing, unreadable, truncated, another size), or None.

    Every file is decoded in full (PIL reads to the end of the data, so a truncated PNG fails)."""
    from PIL import Image

    files = record.get("files") or []
    want = (record.get("params") or {}).get("images")
    if not isinstance(files, list) or (want is not None and len(files) != want):
        return f"the record lists {len(files) if isinstance(files, list) else 0} image files for {want} images"
    size = record.get("size")
    for name in files:
        if not isinstance(name, str) or not name.startswith(f"{IMAGES}/") or ".." in name:
            return f"the record names a file outside {IMAGES}/ ({show(name)})"
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            with Image.open(path) as im:
                im.load()
                got = list(im.size)
        except Exception as err:  # noqa: BLE001 -- truncated, corrupt, not an image: all mean "redo"
            return f"{name} is incomplete or unreadable ({type(err).__name__})"
        if size is not None and got != list(size):
            return f"{name} is {got[0]}x{got[1]}, not the recorded {size[0]}x{size[1]}"
    return None


def recheck_finished(out: Path, jobs: list[tuple[int, Job]]) -> list[str]:
    """Turn the finished records (of rows in `jobs`, with unchanged parameters) whose images cannot be kept into
    error records, so the row runs again (the finished record stays inside as "previous"). Returns the messages."""
    by_id = {job.id: job for _, job in jobs}
    records = read_records(out / MANIFEST)
    notes, changed = [], False
    for i, rec in enumerate(records):
        job = by_id.get(rec.get("id"))
        if rec.get("status") != "ok" or job is None or rec.get("key") != job.key():
            continue
        problem = image_problem(out, rec)
        if problem:
            msg = f"line {rec.get('line')}: {problem}; the row runs again."
            records[i] = {"id": rec["id"], "line": rec.get("line"), "status": "error", "error": msg, "previous": rec}
            notes.append(msg)
            changed = True
    if changed:
        _atomic_write_text(out / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return notes


def rows_done(out: Path, jobs: list[tuple[int, Job]]) -> int:
    """How many rows of `jobs` have a finished record with their parameters (manifest and per-rank files)."""
    keys = {job.id: job.key() for _, job in jobs}
    done = set()
    for path in [out / MANIFEST, *sorted(out.glob("manifest.rank*.jsonl"))]:
        for rec in read_records(path):
            if rec.get("status") == "ok" and keys.get(rec.get("id")) == rec.get("key"):
                done.add(rec["id"])
    return len(done)


class BatchInterrupted(Exception):
    """Ctrl-C (SIGINT) during a batch: `done` of `total` rows are finished (`ran` of them in this run)."""

    def __init__(self, done: int, total: int, ran: int) -> None:
        super().__init__(f"{done} of {total} rows done")
        self.done, self.total, self.ran = done, total, ran


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


def run_row(
    pipes: PipelineCache, job: Job, batch_size: int | None, on_images=None, limits: Limits | None = None
) -> JobResult:
    """Run one job in chunks of at most `batch_size` sampled images (image i keeps seed + i; with candidates, a
    chunk holds batch_size // candidates output images, at least one).

    limits: `max_prompt_tokens` is checked in the loaded model's tokenizer, `max_seconds` bounds the whole row."""
    limits = limits or Limits()
    deadline = Deadline(limits.max_seconds) if limits.max_seconds is not None else None
    t0 = time.perf_counter()
    pipe = pipes.get(job.models)
    load_s = time.perf_counter() - t0
    if limits.max_prompt_tokens is not None:
        check_prompt_tokens(pipe, job, limits)
    # batch_size counts the images sampled: with candidates, K of them per output image
    step = max(1, batch_size // (job.candidates or 1)) if batch_size else job.images
    parts = []
    for start in range(0, job.images, step):
        sub = replace(job, seed=job.seed + start, images=min(step, job.images - start))
        parts.append(run_job(pipe, sub, deadline=deadline))
        if on_images is not None:
            on_images(sub.images)
    res = JobResult.join(parts)
    res.extra["load_s"] = load_s
    return res


def _all_agree(state, ok: bool) -> bool:
    """True when every process says ok (one process: `ok` itself)."""
    if state.num_processes == 1:
        return ok
    from accelerate.utils import broadcast_object_list

    flags = [ok]
    broadcast_object_list(flags, from_process=0)
    return bool(flags[0])


def run_batch(
    jobs_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_size: int | None = None,
    limits: Limits | None = None,
    progress: bool = True,
    state: Any = None,
) -> dict[str, int]:
    """Run every row of `jobs_path` into `out_dir` (resuming); return {"ok", "failed", "skipped", "ran"} counts.

    Raises FolderBusy (a ValueError) when another runner holds the folder, BatchInterrupted on Ctrl-C."""
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    state = state or PartialState(cpu=not torch.cuda.is_available())
    out = Path(out_dir)
    limits = limits or Limits()
    rows = read_rows(jobs_path)  # every rank reads the same file: the same plan everywhere
    jobs, errors = plan(rows, limits)
    lock = FolderLock(out)
    busy = None
    if state.is_main_process:
        try:
            lock.acquire()
        except FolderBusy as err:
            busy = err
    if not _all_agree(state, busy is None):
        raise busy or FolderBusy(f"--out {str(out)!r} is in use by another `compose batch`; see the main process.")
    ran = failed = skipped = 0
    bar = None
    try:
        if state.is_main_process:
            for stale in (out / IMAGES).glob(".*.tmp*"):  # half-written images of a killed run
                stale.unlink()
            merge_manifest(out)
            for note in recheck_finished(out, jobs):
                print(note, file=sys.stderr)
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
        with state.split_between_processes(pending) as mine:
            total = sum(job.images for _, job in mine)
            bar = tqdm(total=total, unit="img", disable=not (progress and state.is_main_process), dynamic_ncols=True)
            bar.set_description(f"rank {state.process_index}/{state.num_processes}: {len(mine)} rows")
            for line, job in mine:
                try:
                    res = run_row(pipes, job, batch_size, on_images=bar.update, limits=limits)
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
                        "size": list(res.images[0].size),
                        "summary": res.summary(),
                        "lift": res.lift_record(),
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
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        raise BatchInterrupted(rows_done(out, jobs), len(jobs), ran) from None
    finally:
        lock.release()
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
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="at most this many images sampled per pipeline call (a row's candidates count as images)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="per row, schedule files' steps included")
    p.add_argument("--max-images", type=int, default=Limits.max_images)
    p.add_argument("--max-terms", type=int, default=Limits.max_terms)
    p.add_argument("--max-side", type=int, default=Limits.max_side, help="largest height / width")
    p.add_argument(
        "--max-candidates",
        type=int,
        default=Limits.max_candidates,
        help="candidates per image; images x candidates stays within --max-images",
    )
    p.add_argument("--max-prompt-chars", type=int, default=Limits.max_prompt_chars)
    p.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="refuse longer prompts (default: the tokenizer truncates)"
    )
    p.add_argument("--max-seconds", type=float, default=None, help="wall-time limit of one row (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_batch(args: argparse.Namespace) -> int:
    """`compose batch`: 0 when every row is done, 1 when a row failed, 2 on a usage error, 130 on Ctrl-C."""
    try:
        import diffusers
        import torch
        import transformers

        for lib in (diffusers, transformers):
            lib.utils.logging.disable_progress_bar()
            lib.utils.logging.set_verbosity_error()
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        limits = Limits(
            max_steps=args.max_steps,
            max_images=args.max_images,
            max_terms=args.max_terms,
            max_side=args.max_side,
            max_candidates=args.max_candidates,
            max_prompt_chars=args.max_prompt_chars,
            max_prompt_tokens=args.max_prompt_tokens,
            max_seconds=args.max_seconds,
        )
        counts = run_batch(
            args.jobs, args.out, batch_size=args.batch_size, limits=limits, progress=not args.no_progress
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BatchInterrupted as stop:
        _ignore_sigint()
        print(
            f"interrupted: {stop.done} of {stop.total} rows done ({stop.ran} in this run); rerun the same command to "
            "resume.",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:
        _ignore_sigint()
        print("interrupted before any row ran; rerun the same command to resume.", file=sys.stderr)
        return 130
    return 1 if counts["failed"] else 0


def _ignore_sigint() -> None:
    """A second Ctrl-C while the message is printed must not end in a traceback either."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


__all__ = [
    "BatchInterrupted",
    "FolderBusy",
    "FolderLock",
    "add_arguments",
    "image_problem",
    "main_batch",
    "merge_manifest",
    "plan",
    "read_records",
    "read_rows",
    "recheck_finished",
    "run_batch",
]

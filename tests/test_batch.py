"""`compose batch`: parsing with line numbers, outputs against direct pipeline calls, seeds per image, resume after a
kill, and two processes (torchrun, CPU) against one. The shipped 24x24 shapes models at a few steps."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import batch as B
from pipelines import jobs as J

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"
NEEDED = ("shapes-text", "shapes-uncond-a", "shapes-uncond-b")
pytestmark = pytest.mark.skipif(
    not all((CARDS / m / "model_index.json").is_file() for m in NEEDED),
    reason="the shipped shapes models are missing (restore with `git checkout -- model_cards/`)",
)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

AND_ROW = {"id": "and", "models": "shapes-text", "prompts": ["a red shape", "a circle"], "operator": "and",
           "guidance": 4, "steps": 3, "images": 2, "seed": 5}  # fmt: skip
OR_ROW = {"id": "or", "models": ["shapes-uncond-a", "shapes-uncond-b"], "prompts": [], "operator": "or",
          "weights": [3, 1], "steps": 3, "images": 2, "seed": 1, "schedule": "uniform"}  # fmt: skip


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------- parsing
def test_bad_rows_are_reported_with_line_numbers(tmp_path):
    lines = [
        "# a comment",
        AND_ROW,  # line 2
        "{not json",  # 3
        {**AND_ROW, "id": "op", "operator": "xor"},  # 4
        {"id": "noprompt", "models": "shapes-text", "operator": "and"},  # 5
        {**AND_ROW, "id": "many", "prompts": list("abcdefghi")},  # 6
        {**AND_ROW, "id": "steps", "steps": 0},  # 7
        {**AND_ROW, "id": "steps2", "steps": 10**6},  # 8
        {**AND_ROW, "id": "field", "stepz": 3},  # 9
        {**AND_ROW},  # 10: duplicate id
        "",
        {**OR_ROW, "id": "w", "weights": [1, 2, 3]},  # 12
        {**OR_ROW, "id": "two", "operator": None},  # 13
        {**OR_ROW},  # 14
    ]
    jobs, errors = B.plan(B.read_rows(write_jsonl(tmp_path / "jobs.jsonl", lines)), J.Limits())
    assert [(line, job.id) for line, job in jobs] == [(2, "and"), (14, "or")]
    got = {e["line"]: e["error"] for e in errors}
    expect = {
        3: "not valid JSON",
        4: "operator='xor' is not known",
        5: "prompts is missing",
        6: "too many terms: 9",
        7: "steps=0 is out of range",
        8: "steps=1000000 is out of range",
        9: "unknown field(s) ['stepz']",
        10: "already used on line 2",
        12: "weights has 3 entries for 2 terms",
        13: "operator is missing but there are 2 terms",
    }
    assert sorted(got) == sorted(expect)
    for line, text in expect.items():
        assert got[line].startswith(f"line {line}: ") and text in got[line], got[line]


def test_csv_rows_read_like_jsonl(tmp_path):
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(
        "id,models,prompts,operator,weights,seed,steps,images\n"
        "a,shapes-text,a red shape|a circle,and,,5,3,2\n"
        'b,shapes-uncond-a|shapes-uncond-b,[],or,"[3, 1]",1,3,2\n'
        "c,shapes-text,a,and,,x,3,2\n"
    )
    jobs, errors = B.plan(B.read_rows(csv_path), J.Limits())
    assert [(line, j.id) for line, j in jobs] == [(2, "a"), (3, "b")]
    a, b = jobs[0][1], jobs[1][1]
    assert a.prompts == ["a red shape", "a circle"] and a.seed == 5 and a.steps == 3 and a.images == 2
    assert b.models == ["shapes-uncond-a", "shapes-uncond-b"] and b.prompts == [] and b.weights == [3.0, 1.0]
    assert len(errors) == 1 and errors[0]["line"] == 4 and "seed must be an integer" in errors[0]["error"]


def test_pipeline_kwargs_is_the_one_mapping():
    job = J.parse_job({**AND_ROW, "schedule": "uniform", "negative_prompt": "blue", "method": "ode"})
    kw = J.pipeline_kwargs(job)
    assert kw["prompt"] == ["a red shape", "a circle"] and kw["operator"] == "and" and kw["guidance_scale"] == 4.0
    assert kw["num_inference_steps"] == 3 and kw["schedule"] == "uniform" and kw["num_images_per_prompt"] == 2
    assert kw["negative_prompt"] == "blue" and kw["method"] == "ode" and "divergence" not in kw
    assert J.pipeline_kwargs(J.parse_job({**AND_ROW, "divergence": "hutchinson_fd"}))["divergence"] == "hutchinson_fd"
    assert J.pipeline_kwargs(J.parse_job(OR_ROW))["prompt"] is None


# ---------------------------------------------------------------------- running
def test_batch_outputs_match_the_pipeline(tmp_path):
    from pipelines import ComposePipeline

    jobs_path = write_jsonl(
        tmp_path / "jobs.jsonl",
        [AND_ROW, {**OR_ROW, "id": "badpath", "models": ["shapes-uncond-a", str(tmp_path / "no")]}, "[1, 2", OR_ROW],
    )
    out = tmp_path / "out"
    code = B.main_batch(_args(jobs_path, out))
    assert code == 1  # some rows failed
    recs = B.read_records(out / B.MANIFEST)
    assert [(r["line"], r["id"], r["status"]) for r in recs] == [
        (1, "and", "ok"),
        (2, "badpath", "error"),
        (3, "line3", "error"),
        (4, "or", "ok"),
    ]
    assert "cannot read" in recs[1]["error"] and str(tmp_path / "no") in recs[1]["error"]
    for rec, row in ((recs[0], AND_ROW), (recs[3], OR_ROW)):
        job = J.parse_job(row)
        models = [str(CARDS / m) for m in job.models]
        pipe = ComposePipeline.from_pretrained(models if len(models) > 1 else models[0])
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(job.seed + i) for i in range(job.images)]
        ref = pipe(**J.pipeline_kwargs(job), generator=gens, output_type="pil")
        assert rec["image_seeds"] == [job.seed, job.seed + 1]
        assert rec["files"] == [f"images/{job.id}_0.png", f"images/{job.id}_1.png"]
        for f, im in zip(rec["files"], ref.images, strict=True):
            np.testing.assert_array_equal(pixels(out / f), np.asarray(im))
            meta = json.loads(Image.open(out / f).text["parameters"])
            assert meta["seed"] == job.seed and meta["prompts"] == job.prompts and meta["steps"] == job.steps
        kappa = ref.kappa.to(torch.float64)
        np.testing.assert_allclose(rec["summary"]["kappa_mean"], kappa.mean((0, 1)).numpy(), atol=1e-5)
        np.testing.assert_allclose(rec["summary"]["log_q_final"], ref.log_q.mean(0).numpy(), atol=1e-3)
        assert set(rec["timings"]) == {"load_s", "sample_s", "save_s", "s_per_image"}
        assert rec["params"] == {**job.params(), "id": job.id}
    # the summary script prints one table line per row, failures with their message
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "examples" / "batch" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    text = summarize.table(recs).splitlines()
    assert len(text) == 2 + 4 and "| 2 | badpath | error: line 2: models: cannot read" in text[3]
    # a second run finds everything done and changes nothing that was finished
    before = (out / B.MANIFEST).read_text().splitlines()
    B.main_batch(_args(jobs_path, out))
    after = (out / B.MANIFEST).read_text().splitlines()
    assert [before[0], before[3]] == [after[0], after[3]] and len(after) == 4


def assert_same_up_to_rounding(a: np.ndarray, b: np.ndarray) -> None:
    """Images from calls of different batch sizes: CPU kernels round differently for different batch sizes, so
    equality is promised up to rounding only: no channel more than 2 levels (of 255) apart, and on average almost
    none apart (a mean absolute difference under 0.02 levels: at most 2% of the values one level off)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert a.shape == b.shape and diff.max() <= 2 and diff.mean() <= 0.02, (int(diff.max()), float(diff.mean()))


def test_images_depend_only_on_row_seed_and_index(tmp_path):
    rows = [{**OR_ROW, "images": 3, "seed": 7}, {**OR_ROW, "id": "shift", "images": 1, "seed": 8}]
    jobs_path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    B.run_batch(jobs_path, tmp_path / "a", progress=False)
    B.run_batch(jobs_path, tmp_path / "b", batch_size=1, progress=False)
    for i in range(3):
        a, b = pixels(tmp_path / f"a/images/or_{i}.png"), pixels(tmp_path / f"b/images/or_{i}.png")
        assert_same_up_to_rounding(a, b)
    # image 1 of the row with seed 7 (a call of 3 images) is image 0 of a row with seed 8 (a call of 1)
    assert_same_up_to_rounding(pixels(tmp_path / "a/images/or_1.png"), pixels(tmp_path / "a/images/shift_0.png"))
    assert (
        np.abs(pixels(tmp_path / "a/images/or_0.png").astype(int) - pixels(tmp_path / "a/images/or_1.png")).max() > 2
    )
    # with the same batch size the images are the same bit for bit (one run against a rerun)
    B.run_batch(jobs_path, tmp_path / "c", batch_size=1, progress=False)
    for i in range(3):
        np.testing.assert_array_equal(
            pixels(tmp_path / f"b/images/or_{i}.png"), pixels(tmp_path / f"c/images/or_{i}.png")
        )


def test_the_rounding_bound_catches_real_differences():
    a = np.zeros((24, 24, 3), np.uint8)
    b = a.copy()
    b[3, 4, 1] = 1  # what the CPU kernels do across batch sizes: one channel of one pixel one level off
    assert_same_up_to_rounding(a, b)
    for bad in (a + 3, np.where(np.arange(24)[:, None, None] < 3, 1, 0).astype(np.uint8) + a):
        with pytest.raises(AssertionError):
            assert_same_up_to_rounding(a, bad)


def _args(jobs, out, batch_size=None):
    import argparse

    p = argparse.ArgumentParser()
    B.add_arguments(p)
    argv = [str(jobs), "--out", str(out), "--no-progress"]
    if batch_size:
        argv += ["--batch-size", str(batch_size)]
    return p.parse_args(argv)


def test_killed_run_resumes_without_losing_or_duplicating_rows(tmp_path):
    rows = [{**OR_ROW, "id": f"r{i}", "seed": i, "steps": 12, "images": 1} for i in range(5)]
    jobs_path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.cli", "batch", str(jobs_path), "--out", str(out), "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / B.MANIFEST
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not B.read_records(manifest):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = B.read_records(manifest)
    assert 1 <= len(first) < 5, f"kill landed after {len(first)} of 5 rows; the test needs a partial run"
    # a kill in the middle of a manifest write leaves a torn line: the resumed run must drop it
    with open(manifest, "a") as fh:
        fh.write('{"id": "r4", "status": "ok", "fi')
    counts = B.run_batch(jobs_path, out, progress=False)
    final = B.read_records(manifest)
    assert [r["id"] for r in final] == [f"r{i}" for i in range(5)]
    assert all(r["status"] == "ok" for r in final)
    assert final[: len(first)] == first  # finished rows are kept as they were (not run again)
    assert counts["skipped"] == len(first) and counts["ran"] == 5 - len(first)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"r{i}_0.png" for i in range(5)]


def test_two_processes_give_the_same_outputs_as_one(tmp_path):
    rows = [{**OR_ROW, "id": f"o{i}", "seed": i} for i in range(3)] + [{**AND_ROW, "id": "a0"}]
    rows.insert(2, "{broken")
    jobs_path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    # pixel for pixel needs the same batch size (both: the whole row) and the same thread count (both: 1; another
    # test file may have changed this process's)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        B.run_batch(jobs_path, tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cli = ["-m", "pipelines.cli", "batch", str(jobs_path), "--out", str(tmp_path / "two"), "--threads", "1"]
    cmd = [*torchrun, *cli, "--no-progress"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "line 3: not valid JSON" in res.stderr  # the broken row fails, the rest ran
    one, two = B.read_records(tmp_path / "one" / B.MANIFEST), B.read_records(tmp_path / "two" / B.MANIFEST)
    assert not list((tmp_path / "two").glob("manifest.rank*"))  # merged into one manifest
    assert {r["rank"] for r in two if r["status"] == "ok"} == {0, 1}  # both processes worked

    def strip(r):
        return {k: v for k, v in r.items() if k not in ("timings", "rank")}

    assert [strip(r) for r in one] == [strip(r) for r in two]
    for r in one:
        for f in r.get("files", []):
            np.testing.assert_array_equal(pixels(tmp_path / "one" / f), pixels(tmp_path / "two" / f))


def test_merge_keeps_one_record_per_row_and_never_drops_a_finished_one(tmp_path):
    ok = {"id": "a", "line": 2, "status": "ok", "files": ["images/a_0.png"]}
    B.append_record(tmp_path / B.MANIFEST, {"id": "b", "line": 3, "status": "error", "error": "line 3: x"})
    B.append_record(tmp_path / B.MANIFEST, ok)
    B.append_record(tmp_path / "manifest.rank1.jsonl", {"id": "b", "line": 3, "status": "ok", "files": []})
    B.append_record(tmp_path / "manifest.rank1.jsonl", {"id": "c", "line": 1, "status": "error", "error": "e"})
    B.append_record(tmp_path / "manifest.rank0.jsonl", {"id": "a", "line": 2, "status": "error", "error": "later"})
    with open(tmp_path / "manifest.rank0.jsonl", "a") as fh:
        fh.write('{"id": "d", "li')  # a torn line from a killed process
    merged = B.merge_manifest(tmp_path)
    assert [(r["id"], r["status"]) for r in merged] == [("c", "error"), ("a", "error"), ("b", "ok")]
    assert merged[1]["error"] == "later" and merged[1]["previous"] == ok  # the finished record is kept inside
    assert "previous" not in merged[2] and not list(tmp_path.glob("manifest.rank*"))
    assert B.read_records(tmp_path / B.MANIFEST) == merged


def test_resume_key_ignores_unset_fields_and_the_id():
    job = J.parse_job(AND_ROW)
    assert J.parse_job({**AND_ROW, "id": "other", "divergence": None}).key() == job.key()
    assert J.parse_job({**AND_ROW, "seed": 6}).key() != job.key()
    assert J.parse_job({**AND_ROW, "schedule": "uniform"}).key() != job.key()


# ---------------------------------------------------------------------- Ctrl-C, resume checks, one runner
def _wait_for_records(proc, manifest: Path, n: int = 1, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and len(B.read_records(manifest)) < n:
        time.sleep(0.02)


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    rows = [{**OR_ROW, "id": f"r{i}", "seed": i, "steps": 12, "images": 1} for i in range(5)]
    jobs_path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.cli", "batch", str(jobs_path), "--out", str(out), "--threads", "1"]
    cmd.append("--no-progress")  # the bar would share stderr with the message
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_records(proc, out / B.MANIFEST)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    done = len(B.read_records(out / B.MANIFEST))
    assert 1 <= done < 5, f"SIGINT landed after {done} of 5 rows; the test needs a partial run"
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == [f"interrupted: {done} of 5 rows done ({done} in this run); rerun the same command to resume."], (
        stderr[-3000:]
    )
    # the lock went with the process: the same command resumes and runs the rest
    counts = B.run_batch(jobs_path, out, progress=False)
    assert counts["skipped"] == done and counts["ran"] == 5 - done and counts["ok"] == 5


def test_resume_redoes_rows_whose_images_are_missing_or_damaged(tmp_path, capsys):
    from PIL import Image as PILImage

    rows = [{**OR_ROW, "id": f"r{i}", "seed": i, "steps": 2, "images": 2} for i in range(4)]
    jobs_path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    assert B.run_batch(jobs_path, out, progress=False)["ran"] == 4
    first = {r["id"]: r for r in B.read_records(out / B.MANIFEST)}
    assert first["r0"]["size"] == [24, 24]
    images = out / "images"
    (images / "r0_1.png").unlink()  # deleted
    data = (images / "r1_0.png").read_bytes()
    (images / "r1_0.png").write_bytes(data[: len(data) // 2])  # truncated (a copy cut short, a full disk)
    PILImage.new("RGB", (10, 10)).save(images / "r2_1.png")  # replaced by another image
    capsys.readouterr()
    counts = B.run_batch(jobs_path, out, progress=False)
    err = capsys.readouterr().err
    assert "images/r0_1.png is missing; the row runs again" in err
    assert "images/r1_0.png is incomplete or unreadable" in err
    assert "images/r2_1.png is 10x10, not the recorded 24x24" in err
    assert counts["ran"] == 3 and counts["skipped"] == 1 and counts["ok"] == 4
    final = {r["id"]: r for r in B.read_records(out / B.MANIFEST)}
    assert all(r["status"] == "ok" and "previous" not in r for r in final.values())
    assert final["r3"] == first["r3"]  # the intact row was not run again
    for rec in final.values():
        assert B.image_problem(out, rec) is None
        for f in rec["files"]:
            assert PILImage.open(out / f).size == (24, 24)
    B.run_batch(jobs_path, tmp_path / "ref", progress=False)  # the redone images are the ones the rows give
    for name in ("r0_0", "r0_1", "r1_0", "r1_1", "r2_0", "r2_1"):
        np.testing.assert_array_equal(
            pixels(images / f"{name}.png"), pixels(tmp_path / "ref" / "images" / f"{name}.png")
        )


def test_one_runner_per_output_folder(tmp_path):
    jobs_path = write_jsonl(tmp_path / "jobs.jsonl", [{**OR_ROW, "steps": 1, "images": 1}])
    out = tmp_path / "out"
    held = B.FolderLock(out).acquire()
    try:
        with pytest.raises(B.FolderBusy, match=f"is in use by another `compose batch` \\(pid {os.getpid()} on"):
            B.run_batch(jobs_path, out, progress=False)
        assert B.main_batch(_args(jobs_path, out)) == 2
        assert not (out / B.MANIFEST).exists()  # nothing was run or written by the refused runner
    finally:
        held.release()
    # a runner killed with SIGKILL leaves no stale lock: the kernel drops it with the process
    code = "import sys, time; from pipelines.batch import FolderLock; FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"  # noqa: E501
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(B.FolderBusy, match=f"pid {proc.pid} on"):
            B.FolderLock(out).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert B.run_batch(jobs_path, out, progress=False)["ok"] == 1


SCHEDULE = CARDS / "schedules-shapes-uncond" / "or-dpm2m-nfe5.json"


def long_grid(source: Path, steps: int) -> list[float]:
    """A valid grid of `steps` steps shaped like `source`'s: the same first and last two times, evenly between."""
    grid = json.loads(source.read_text())["grid"]
    first, penult, last = grid[0], grid[-2], grid[-1]
    return [first + (penult - first) * k / (steps - 1) for k in range(steps)] + [last]


def _schedule_file(tmp_path: Path, name: str, **changes) -> str:
    """A copy of a shipped schedule file with keys changed (None: the key dropped, but for guidance)."""
    info = json.loads(SCHEDULE.read_text())
    info.update(changes)
    info = {k: v for k, v in info.items() if v is not None or k == "guidance"}
    path = tmp_path / name
    path.write_text(json.dumps(info))
    return str(path)


def test_any_error_of_a_row_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    """A schedule file with `network_times: 5` made the planner raise TypeError: the batch stopped with no manifest.
    Now every failure of a row, whatever its type, is that row's record."""
    bad_times = _schedule_file(tmp_path, "times.json", network_times=5)
    bad_guidance = _schedule_file(tmp_path, "guidance.json", guidance=None)
    rows = [
        {**OR_ROW, "id": "times", "schedule": bad_times},
        {**OR_ROW, "id": "guidance", "schedule": bad_guidance},
        {**OR_ROW, "id": "boom", "steps": 1},
        {**OR_ROW, "id": "good", "steps": 1, "images": 1},
        {**OR_ROW, "id": "late", "steps": 1, "images": 1},
    ]
    jobs_path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    parse = B.parse_job

    def flaky(raw, limits=None):  # any exception type from planning ...
        if isinstance(raw, dict) and raw.get("id") == "boom":
            raise KeyError("boom")
        return parse(raw, limits)

    run_row = B.run_row

    def broken(pipes, job, *a, **kw):  # ... or from sampling
        if job.id == "late":
            raise ZeroDivisionError("late")
        return run_row(pipes, job, *a, **kw)

    monkeypatch.setattr(B, "parse_job", flaky)
    monkeypatch.setattr(B, "run_row", broken)
    counts = B.run_batch(jobs_path, tmp_path / "out", progress=False)
    recs = {r["id"]: r for r in B.read_records(tmp_path / "out" / B.MANIFEST)}
    assert counts["ok"] == 1 and counts["failed"] == 4 and recs["good"]["status"] == "ok"
    # the message names the field and the file (the reader's own words, or "cannot be read (TypeError ...)")
    assert recs["times"]["error"].startswith("line 1: schedule: ") and "times.json" in recs["times"]["error"]
    assert recs["guidance"]["error"].startswith("line 2: schedule: ") and "guidance" in recs["guidance"]["error"]
    assert recs["boom"]["error"].startswith("line 3: this row cannot be run (KeyError: ")
    assert "internal error: ZeroDivisionError: late" in recs["late"]["error"]


def test_schedule_file_steps_are_held_to_the_batch_limits(tmp_path):
    long = _schedule_file(tmp_path, "long.json", nfe=5000, grid=long_grid(SCHEDULE, 5000), network_times=None)
    row = {**OR_ROW, "schedule": long}
    row.pop("steps")
    with pytest.raises(ValueError, match="has 5000 steps \\(nfe\\); the limit is 1000"):
        J.parse_job(row)
    assert J.parse_job(row, J.Limits(max_steps=5000)).steps == 5000
    jobs, errors = B.plan(B.read_rows(write_jsonl(tmp_path / "jobs.jsonl", [row])), J.Limits(max_steps=100))
    assert not jobs and "the limit is 100" in errors[0]["error"]


def test_ids_are_checked_before_anything_runs(tmp_path):
    rows = [{**OR_ROW, "id": "x" * 300, "steps": 1}, {**OR_ROW, "id": "x" * 100, "steps": 1, "images": 1}]
    jobs_path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    counts = B.run_batch(jobs_path, tmp_path / "out", progress=False)
    recs = B.read_records(tmp_path / "out" / B.MANIFEST)
    assert counts["ran"] == 1 and [r["id"] for r in recs] == ["line1", "x" * 100]
    assert "id is 300 characters long; the limit is 100" in recs[0]["error"]
    assert (tmp_path / "out" / "images" / f"{'x' * 100}_0.png").is_file()

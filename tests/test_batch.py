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


def test_images_depend_only_on_row_seed_and_index(tmp_path):
    rows = [{**OR_ROW, "images": 3, "seed": 7}, {**OR_ROW, "id": "shift", "images": 1, "seed": 8}]
    jobs_path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    B.run_batch(jobs_path, tmp_path / "a", progress=False)
    B.run_batch(jobs_path, tmp_path / "b", batch_size=1, progress=False)
    for i in range(3):
        a, b = pixels(tmp_path / f"a/images/or_{i}.png"), pixels(tmp_path / f"b/images/or_{i}.png")
        np.testing.assert_array_equal(a, b)
    # image 1 of the row with seed 7 is image 0 of a row with seed 8
    np.testing.assert_array_equal(pixels(tmp_path / "a/images/or_1.png"), pixels(tmp_path / "a/images/shift_0.png"))
    assert not np.array_equal(pixels(tmp_path / "a/images/or_0.png"), pixels(tmp_path / "a/images/or_1.png"))


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
    B.run_batch(jobs_path, tmp_path / "one", progress=False)
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

"""Per-image concept scores (issue 30) through the job layer: the `lift`, `candidates` and `select` fields checked
before anything loads and passed to the pipeline, the resume key, the manifest's per-image lift against the
pipeline's `out.lift` of the same call, the kept candidate, and the summary script's list of images below a lift."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import batch as B
from pipelines import jobs as J
from pipelines.verify import DEFAULT_LEVELS

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"
needs_models = pytest.mark.skipif(
    not (CARDS / "shapes-text" / "model_index.json").is_file(),
    reason="the shipped shapes models are missing (restore with `git checkout -- model_cards/`)",
)
ROW = {"id": "and", "models": "shapes-text", "prompts": ["a red shape", "a circle"], "operator": "and",
       "guidance": 4, "steps": 3, "images": 2, "seed": 5}  # fmt: skip
OLD_KEY = "614b725b9c2ac1f0"  # ROW's key before these fields existed (a manifest written then must resume)


def summarize():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "examples" / "batch" / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fields_are_checked_and_passed():
    job = J.parse_job(ROW)
    assert (job.lift, job.candidates, job.select) == (None, None, None)
    assert not {"lift", "candidates", "select"} & set(J.pipeline_kwargs(job))  # the pipeline's defaults
    kw = J.pipeline_kwargs(J.parse_job({**ROW, "lift": "renoise", "candidates": 3, "select": "random"}))
    assert (kw["lift"], kw["candidates"], kw["select"]) == ("renoise", 3, "random")
    assert J.pipeline_kwargs(J.parse_job({**ROW, "lift": "none"}))["lift"] is None  # the pipeline's lift=None
    assert J.parse_job({**ROW, "lift": None, "candidates": ""}) == job  # null and "" are the defaults, as everywhere
    assert J.parse_job({**ROW, "candidates": "2"}).candidates == 2  # a CSV cell
    # candidates count as images: images x candidates within max_images
    assert J.parse_job({**ROW, "images": 8, "candidates": 8}).candidates == 8
    with pytest.raises(ValueError, match=r"images x candidates = 9 x 8 = 72 images to sample; the limit is 64"):
        J.parse_job({**ROW, "images": 9, "candidates": 8})
    with pytest.raises(ValueError, match="candidates=3 is out of range; give an integer from 1 to 2 .*--max-cand"):
        J.parse_job({**ROW, "candidates": 3}, J.Limits(max_candidates=2))
    # a tracked lift without guidance has no reference to choose by; with select 'random' it needs none
    with pytest.raises(ValueError, match="lift 'tracked' reads every term against the unconditional branch"):
        J.parse_job({**ROW, "guidance": 1, "lift": "tracked", "candidates": 2})
    assert J.parse_job({**ROW, "guidance": 1, "lift": "tracked", "candidates": 2, "select": "random"}).select


def test_lift_levels_and_draws_are_checked_and_passed():
    row = {**ROW, "candidates": 2}
    job = J.parse_job({**row, "lift_levels": [3, 2, 1, 0], "lift_draws": 2})
    assert (job.lift_levels, job.lift_draws) == ([3.0, 2.0, 1.0, 0.0], 2)
    kw = J.pipeline_kwargs(job)
    assert kw["lift_levels"] == (3.0, 2.0, 1.0, 0.0) and kw["lift_draws"] == 2
    v = job.verification()
    assert v.levels == (3.0, 2.0, 1.0, 0.0) and v.draws == 2 and v.rows_per_check == 8
    assert J.parse_job({**row, "lift_levels": "3, 2,1,0"}).lift_levels == [3.0, 2.0, 1.0, 0.0]  # a CSV cell
    assert J.parse_job({**ROW, "lift": "renoise", "lift_draws": "2"}).lift_draws == 2  # one candidate, renoise
    assert not {"lift_levels", "lift_draws"} & set(J.pipeline_kwargs(J.parse_job(row)))  # the pipeline's defaults
    bad = [
        ({**row, "lift_levels": [1, "x"]}, "lift_levels must be a number; got 'x'"),
        ({**row, "lift_levels": [1, float("nan")]}, "lift_levels must be finite"),
        ({**row, "lift_levels": [30]}, "lift_levels must be log-SNR values from -20 to 20"),
        ({**row, "lift_levels": "1,,2"}, "lift_levels must be log-SNR values from -20 to 20"),
        ({**row, "lift_levels": list(range(17))}, "lift_levels has 17 entries; give 1 to 16"),
        ({**row, "lift_levels": [1, 1]}, "lift_levels repeats a level"),
        ({**row, "lift_levels": {"a": 1}}, "lift_levels must be a string, a list"),
        ({**row, "lift_levels": "1," * 400}, "lift_levels is 800 characters long"),
        ({**row, "lift_draws": 0}, "lift_draws=0 is out of range; give an integer from 1 to 16"),
        ({**row, "lift_draws": 1.5}, "lift_draws must be an integer"),
        ({**ROW, "lift_draws": 2}, r"lift_draws set\(s\) the 'renoise' lift, but this job's lift is 'tracked'"),
        ({**row, "lift": "tracked", "lift_levels": [1]}, "but this job's lift is 'tracked'"),
        ({**row, "lift": "none", "select": "random", "lift_draws": 2}, "but this job's lift is 'none'"),
    ]
    for raw, match in bad:
        with pytest.raises(ValueError, match=match):
            J.parse_job(raw)
    # each level and draw is a batched network call, like a step: levels x draws within the runner's max_steps
    with pytest.raises(ValueError, match=r"lift_levels x lift_draws = 32 network evaluations .* the limit is 20"):
        J.parse_job({**row, "lift_levels": [1, 0, -1, -2], "lift_draws": 8}, J.Limits(max_steps=20))
    with pytest.raises(ValueError, match=r"lift_levels x lift_draws = 24 network evaluations"):
        J.parse_job({**row, "lift_draws": 6}, J.Limits(max_steps=20))  # the 4 default levels


def test_the_key_changes_with_the_images_only():
    key = J.parse_job(ROW).key()
    assert key == OLD_KEY  # rows without the new fields keep the key of earlier manifests
    # one candidate: the lift only scores the image, whatever its estimator
    for same in ({"lift": "tracked"}, {"lift": "renoise"}, {"lift": "none"}, {"lift": "auto"}, {"candidates": 1}):
        assert J.parse_job({**ROW, **same}).key() == key, same
    # candidates, the selection and the estimator that chooses change the images
    two = J.parse_job({**ROW, "candidates": 2}).key()
    assert two != key and J.parse_job({**ROW, "candidates": 3}).key() not in (key, two)
    assert J.parse_job({**ROW, "candidates": 2, "lift": "renoise"}).key() == two  # "auto" chooses by "renoise"
    assert J.parse_job({**ROW, "candidates": 2, "lift": "tracked"}).key() != two
    assert J.parse_job({**ROW, "candidates": 2, "select": "random"}).key() != two
    # the renoise lift's levels and draws choose between candidates: in the key then, and only when not the default
    assert J.parse_job({**ROW, "candidates": 2, "lift_draws": 1, "lift_levels": [-1, -2, -3, -4]}).key() == two
    low = J.parse_job({**ROW, "candidates": 2, "lift_levels": [3, 2, 1, 0]}).key()
    drawn = J.parse_job({**ROW, "candidates": 2, "lift_draws": 2}).key()
    assert len({two, low, drawn}) == 3
    random = J.parse_job({**ROW, "candidates": 2, "select": "random"}).key()
    drawn_random = {**ROW, "candidates": 2, "select": "random", "lift": "renoise", "lift_draws": 2}
    assert J.parse_job(drawn_random).key() == random
    assert J.parse_job({**ROW, "lift": "renoise", "lift_draws": 2}).key() == key  # one candidate: scores only


@needs_models
def test_manifest_lift_is_the_pipeline_lift_and_records_the_kept_candidate(tmp_path):
    from pipelines import ComposePipeline

    best = {**ROW, "id": "best", "operator": "product", "candidates": 2}
    jobs_path = tmp_path / "jobs.jsonl"
    jobs_path.write_text("".join(json.dumps(r) + "\n" for r in (ROW, best)))
    out = tmp_path / "out"
    assert B.run_batch(jobs_path, out, progress=False)["ok"] == 2
    chunked = tmp_path / "chunked"
    B.run_batch(jobs_path, chunked, batch_size=2, progress=False)  # 2 sampled images a call: one image of `best`
    recs = {r["id"]: r for r in B.read_records(out / B.MANIFEST)}
    pipe = ComposePipeline.from_pretrained(str(CARDS / "shapes-text"))
    pipe.set_progress_bar_config(disable=True)
    refs = {}
    for row in (ROW, best):
        job = J.parse_job(row)
        refs[job.id] = ref = pipe(**J.pipeline_kwargs(job), generator=J.generators(job), output_type="pil")
        lift = recs[job.id]["lift"]
        assert lift["terms"] == ["a red shape", "a circle"] and lift["rule"] == "min"
        np.testing.assert_allclose(lift["per_image"], ref.lift.numpy(), rtol=0, atol=5e-4)
        np.testing.assert_allclose(lift["score"], ref.lift.min(-1).values.numpy(), rtol=0, atol=5e-4)
        np.testing.assert_allclose(recs[job.id]["summary"]["lift_mean"], ref.lift.mean(0).numpy(), atol=5e-4)
        assert lift["rows_per_image"] == ref.verification_rows
    one, two = recs["and"]["lift"], recs["best"]["lift"]
    assert one["estimator"] == "tracked" and one["candidates"] == 1 and one["kept"] is None
    assert one["rows_per_image"] == 0 and one["candidate_scores"] is None  # the tracked lift is free
    # best of 2 by the renoise lift: the kept candidate is the one with the highest score, its score the image's
    ref = refs["best"]
    assert two["estimator"] == "renoise" and two["candidates"] == 2
    assert two["rows_per_image"] == 2 * 3 * len(DEFAULT_LEVELS)  # candidates x (uncond + 2 prompts) x levels
    assert two["kept"] == ref.candidate.tolist() == ref.lift_scores.argmax(1).tolist()
    np.testing.assert_allclose(two["candidate_scores"], ref.lift_scores.numpy(), rtol=0, atol=5e-4)
    assert [max(s) for s in two["candidate_scores"]] == two["score"]
    for i, f in enumerate(recs["best"]["files"]):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f).convert("RGB")), np.asarray(ref.images[i]))
    # one image per call (--batch-size 2 with 2 candidates): the same record, joined from two calls
    split = {r["id"]: r for r in B.read_records(chunked / B.MANIFEST)}["best"]["lift"]
    per_call = [pipe(**{**J.pipeline_kwargs(J.parse_job(best)), "num_images_per_prompt": 1},
                     generator=[torch.Generator().manual_seed(best["seed"] + i)]) for i in range(2)]  # fmt: skip
    np.testing.assert_allclose(split["per_image"], torch.cat([o.lift for o in per_call]).numpy(), atol=5e-4)
    assert split["kept"] == [int(o.candidate) for o in per_call]


def _record(rid: str, line: int, per_image: list | None) -> dict:
    """A finished record as the batch writes it, with the given lifts (None: a row without a lift)."""
    files = [f"images/{rid}_{i}.png" for i in range(len(per_image or [[0]]))]
    lift = {
        "estimator": "renoise",
        "rule": "min",
        "terms": ["a", "b"],
        "per_image": per_image,
        "score": None if per_image is None else [min(v) for v in per_image],
        "candidates": 1,
        "kept": None,
    }
    params = {**J.parse_job({**ROW, "id": rid}).params(), "lift": "renoise"}
    seeds = [7 + i for i in range(len(files))]
    rec = {"id": rid, "line": line, "status": "ok", "files": files, "image_seeds": seeds}
    return {**rec, "params": params, "lift": lift}


def test_below_lists_the_images_under_a_lift_worst_first_and_writes_rows_that_redraw_them(tmp_path):
    mod = summarize()
    records = [
        _record("r1", 1, [[0.5, -1.0], [2.0, 3.0], [-4.0, 1.0]]),
        _record("none", 2, None),  # no lift (lift 'none', product_smc): nothing to list
        {"id": "old", "line": 3, "status": "ok", "files": ["images/old_0.png"], "image_seeds": [0]},  # earlier version
        {"id": "bad", "line": 4, "status": "error", "error": "line 4: x"},
        _record("r5", 5, [[0.1, 0.2]]),
    ]
    listed = mod.below(records, 0.15)
    assert [(e["file"], e["min_lift"]) for e in listed] == [
        ("images/r1_2.png", -4.0), ("images/r1_0.png", -1.0), ("images/r5_0.png", 0.1)]  # fmt: skip
    assert listed[0]["seed"] == 9 and listed[0]["lift"] == [-4.0, 1.0]
    assert mod.below(records, -10) == [] and len(mod.image_lifts(records)) == 4
    text = mod.images_table(listed).splitlines()
    assert len(text) == 2 + 3 and "| images/r1_2.png | 9 | -4.00 | a: -4.00; b: 1.00 | - | renoise |" == text[2]
    rows = mod.rerun_rows(records, listed, 4)
    jobs = [J.parse_job(r) for r in rows]  # rows a batch runs: the row's parameters, the image's seed, best of 4
    assert [(j.id, j.seed, j.images, j.candidates) for j in jobs] == [
        ("r1-2-best4", 9, 1, 4), ("r1-0-best4", 7, 1, 4), ("r5-0-best4", 7, 1, 4)]  # fmt: skip
    assert jobs[0].prompts == ROW["prompts"] and jobs[0].lift == "renoise" and jobs[0].steps == ROW["steps"]
    summary = {"terms": ["a", "b"], "kappa_mean": [0.5, 0.5], "images_won": [1, 2], "lift_mean": [-0.83, 1.0]}
    table = mod.table([records[3], {**records[0], "summary": summary, "timings": {"s_per_image": 0.1}}]).splitlines()
    assert "| mean lift per term |" in table[0] and table[2].count("|") == table[3].count("|") == table[0].count("|")
    assert "| 1 / 2 | -0.83 / 1.00 | 0.10 |" in table[3]


@needs_models
def test_the_summary_script_lists_and_redraws_from_a_real_manifest(tmp_path):
    import subprocess
    import sys

    jobs_path = tmp_path / "jobs.jsonl"
    jobs_path.write_text(json.dumps({**ROW, "lift": "renoise"}) + "\n")
    B.run_batch(jobs_path, tmp_path / "out", progress=False)
    manifest = tmp_path / "out" / B.MANIFEST
    rec = B.read_records(manifest)[0]
    worst = max(min(v) for v in rec["lift"]["per_image"]) + 1  # a threshold above every image: all listed
    script = [sys.executable, str(ROOT / "examples" / "batch" / "summarize.py"), str(manifest)]
    redo = tmp_path / "redo.jsonl"
    res = subprocess.run([*script, "--below", str(worst), "--rerun", str(redo), "--candidates", "2"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 of 2 images with a lift have a min lift below" in res.stdout and "images/and_0.png" in res.stdout
    counts = B.run_batch(redo, tmp_path / "redo", progress=False)
    assert counts["ok"] == 2
    for r in B.read_records(tmp_path / "redo" / B.MANIFEST):
        assert r["lift"]["candidates"] == 2 and len(r["lift"]["kept"]) == 1 and len(r["files"]) == 1
    res = subprocess.run([*script, "--rerun", str(redo)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "give --below too" in res.stderr


@needs_models
def test_a_manifest_written_before_these_fields_resumes(tmp_path):
    """A finished record of an earlier version (no "lift" block, no lift / candidates / select in its parameters)
    is kept by a rerun of the same row; the row with candidates runs, as its images differ."""
    row = {**ROW, "steps": 1, "images": 1}
    jobs_path = tmp_path / "jobs.jsonl"
    jobs_path.write_text(json.dumps(row) + "\n")
    out = tmp_path / "out"
    B.run_batch(jobs_path, out, progress=False)
    (rec,) = B.read_records(out / B.MANIFEST)
    old = {k: v for k, v in rec.items() if k != "lift"}
    old["params"] = {k: v for k, v in rec["params"].items() if k not in J.VERIFY_FIELDS}
    (out / B.MANIFEST).write_text(json.dumps(old) + "\n")
    counts = B.run_batch(jobs_path, out, progress=False)
    assert counts["skipped"] == 1 and counts["ran"] == 0 and B.read_records(out / B.MANIFEST) == [old]
    jobs_path.write_text(json.dumps({**row, "lift": "renoise"}) + "\n")  # another estimator: the same images
    assert B.run_batch(jobs_path, out, progress=False)["skipped"] == 1
    jobs_path.write_text(json.dumps({**row, "candidates": 2}) + "\n")
    assert B.run_batch(jobs_path, out, progress=False)["ran"] == 1
    assert B.read_records(out / B.MANIFEST)[0]["lift"]["kept"] is not None

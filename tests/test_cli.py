"""The `compose` command line parses its arguments without torch or diffusers (issue 24.5: `compose --help` took
6.8 s of CPU importing them); they are imported when a command runs. A property test, not a timed one: after
parsing, neither module is loaded. `benchmarks/bench_cli_help.py` measures the time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "gradio", "compose")

PROBE = """
import contextlib, io, json, sys
import pipelines.cli as c
for argv in (["--help"], ["batch", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            c.main(argv)
        except SystemExit as e:
            assert e.code == 0, e.code
    assert "usage: compose" in out.getvalue(), out.getvalue()
args = c.build_parser().parse_args(["batch", "jobs.jsonl", "--out", "o", "--max-steps", "9", "--max-seconds", "5"])
assert (args.max_steps, args.max_seconds, args.out) == (9, 5.0, "o")
print(json.dumps(sorted(m for m in %r if m in sys.modules)))
"""


def test_parsing_the_command_line_imports_neither_torch_nor_diffusers():
    res = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_help_lists_the_batch_command_and_its_limits():
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "batch", "--help"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and "--max-steps" in res.stdout and "--max-prompt-chars" in res.stdout
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and "batch" in res.stdout


def test_the_pipeline_is_still_importable_from_the_package():
    from pipelines import ComposePipeline, ComposePipelineOutput

    assert ComposePipeline.__name__ == "ComposePipeline" and ComposePipelineOutput.__name__ == "ComposePipelineOutput"
    import pipelines

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pipelines.Nope  # noqa: B018


def test_ctrl_c_while_starting_is_one_line_and_130(monkeypatch, capsys):
    from pipelines import batch, cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "main_batch", interrupted)
    assert cli.main(["batch", "jobs.jsonl", "--out", "o"]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume.\n"

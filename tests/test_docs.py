"""Executed documentation: the code blocks of README.md, CONTRIBUTING.md, CHANGELOG.md and docs/ run here, offline,
on the shipped models, and their `assert` lines check what the text says about the output (shapes, counts).

- A ```python block runs with `exec`, a ```bash block with `bash -euo pipefail`; the blocks of one page run in page
  order, the python ones in one fresh namespace per page, all with the working directory in a scratch copy of the
  checkout (links to its folders; `outputs/` is the scratch folder's own), so a page reads as one session.
- A block that cannot run offline or cheaply is marked on the line right before it with
  `<!-- docs-test: skip REASON: why -->`, REASON one of SKIP_REASONS. Nothing else is skipped: every unmarked
  python / bash block of every page runs (`test_every_block_is_classified` counts them).
- Every fence names its language: python / bash (run), or text / json / yaml (shown, never run).
- The site builds with `mkdocs build --strict` (a broken link, anchor or API reference fails it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN = ("python", "bash")
SHOWN = ("text", "json", "yaml")
SKIP_REASONS = {
    "hub": "downloads a checkpoint from the Hugging Face Hub (the tests run offline)",
    "gpu": "needs an accelerator",
    "long": "takes minutes to hours (a benchmark, a training run, the full demo, several processes)",
    "install": "changes the Python environment",
    "server": "starts a server that runs until it is stopped",
    "suite": "runs the test suite itself",
}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s+(?P<reason>[\w-]+)\s*:\s*(?P<why>.*?)\s*-->\s*$")
ANY_MARKER = re.compile(r"^\s*<!--\s*docs-test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the marker's reason, or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse(page: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a page, and what is wrong with its fences and markers."""
    lines, blocks, problems = page.read_text().splitlines(), [], []
    i, pending = 0, None  # pending: (line number, reason) of a marker waiting for its block
    while i < len(lines):
        line, where = lines[i], f"{page.relative_to(ROOT)}:{i + 1}"
        marker, fence = MARKER.match(line), FENCE.match(line)
        if ANY_MARKER.search(line) and not marker:
            problems.append(f"{where}: malformed marker (write `<!-- docs-test: skip REASON: why -->`)")
        if marker:
            if marker["reason"] in SKIP_REASONS and marker["why"]:
                pending = (i + 1, marker["reason"])
            else:  # reported, and its block is not skipped
                problems.append(f"{where}: skip reason must be one of {sorted(SKIP_REASONS)}, then ': why'")
            i += 1
            continue
        if fence:
            indent, body, j = fence["indent"], [], i + 1
            while j < len(lines) and lines[j].strip() != "```":
                body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
                j += 1
            lang = fence["lang"]
            if lang not in RUN + SHOWN:
                problems.append(f"{where}: fence language {lang!r}: use one of {RUN + SHOWN}")
            skip = None
            if pending is not None:
                if pending[0] != i or lang not in RUN:
                    problems.append(
                        f"{page.relative_to(ROOT)}:{pending[0]}: a skip marker must sit on the line "
                        "right before a python / bash block"
                    )
                else:
                    skip = pending[1]
                pending = None
            blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n", skip))
            i = j + 1
            continue
        if pending is not None and line.strip():
            problems.append(f"{page.relative_to(ROOT)}:{pending[0]}: a skip marker must sit right before its block")
            pending = None
        i += 1
    if pending is not None:
        problems.append(f"{page.relative_to(ROOT)}:{pending[0]}: a skip marker with no block after it")
    return blocks, problems


def runnable(page: Path) -> list[Block]:
    return [b for b in parse(page)[0] if b.lang in RUN and b.skip is None]


def test_every_block_is_classified():
    """Every fence names a language; every skip is marked, explained and of a known kind; the pages are all here."""
    problems, counts = [], {"run": 0, "skip": 0, "shown": 0}
    for page in PAGES:
        assert page.is_file(), f"{page} is missing"
        blocks, bad = parse(page)
        problems += bad
        for b in blocks:
            counts["shown" if b.lang in SHOWN else "skip" if b.skip else "run"] += 1
    assert not problems, "\n".join(problems)
    # the pages the run test covers are exactly those with an unmarked python / bash block
    assert sum(len(runnable(p)) for p in PAGES_WITH_CODE) == counts["run"]
    assert counts["run"] >= 20, counts


PAGES_WITH_CODE = [p for p in PAGES if p.is_file() and runnable(p)]


def scratch_checkout(tmp_path: Path) -> Path:
    """A folder that looks like the checkout (links to its entries) with its own, empty `outputs/`."""
    view = tmp_path / "checkout"
    view.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("outputs", "site", ".git") and not entry.name.startswith("."):
            (view / entry.name).symlink_to(entry)
    (view / "outputs").mkdir()
    return view


def run_bash(block: Block, cwd: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, f"{block.where} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(page, tmp_path, monkeypatch):
    view = scratch_checkout(tmp_path)
    monkeypatch.chdir(view)
    monkeypatch.setattr(sys, "path", list(sys.path))  # a page may add to sys.path; the next test gets it back
    namespace: dict = {"__name__": "__docs__"}
    try:
        for block in runnable(page):
            if block.lang == "bash":
                run_bash(block, view)
                continue
            try:
                exec(compile(block.code, block.where, "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{block.where}: {type(e).__name__}: {e}") from e
    finally:  # modules a page imported from the scratch checkout go with it
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(view)):
                del sys.modules[name]


def slug(heading: str) -> str:
    """A heading's anchor, as the forge and the site's `toc` both make it for plain headings."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r"[ ]+", "-", text)


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"], ids=lambda p: p.name
)
def test_links_outside_the_site_resolve(page):
    """README.md is read on the forge, outside the site (CONTRIBUTING.md and CHANGELOG.md are also pulled into it):
    every relative link names a file of the checkout, and an anchor names a heading of that file."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path) if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert not broken, broken


def test_site_builds_in_strict_mode(tmp_path):
    if not IN_CI:
        pytest.importorskip("mkdocs", reason="the docs tools are not installed (pip install -e '.[docs]')")
        pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is not installed")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "pipelines" / "index.html").is_file()


def test_the_parser_reports_every_unclassified_or_hidden_block(tmp_path, monkeypatch):
    """The classification test above is only as good as `parse`: a page with each kind of mistake."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- docs-test: skip hub: downloads a model -->\n```python\nimport nothing\n```\n\n"  # fine, skipped
        "```\nno language\n```\n\n"  # a bare fence
        "<!-- docs-test: skip lazy: not a reason -->\n```bash\necho hi\n```\n\n"  # an unknown reason
        "<!-- docs-test: skip hub -->\n```bash\necho hi\n```\n\n"  # no explanation
        "<!-- docs-test: skip long: far from its block -->\n\nsome text\n\n```python\npass\n```\n\n"
        "<!-- docs-test: skip long: on a shown block -->\n```text\noutput\n```\n\n"
        "<!-- docs-test skip long -->\n"  # malformed
        "  ```python\n  x = 1\n  ```\n"  # an indented block (in a list) runs too
    )
    blocks, problems = parse(page)
    assert [(b.lang, b.skip) for b in blocks] == [
        ("python", "hub"), ("", None), ("bash", None), ("bash", None), ("python", None), ("text", None),
        ("python", None),
    ]  # fmt: skip
    assert blocks[-1].code == "x = 1\n"
    assert len(problems) == 6, problems
    for needle in ("fence language ''", "skip reason must be one of", "right before its block",
                   "right before a python / bash block", "malformed marker"):  # fmt: skip
        assert any(needle in p for p in problems), (needle, problems)

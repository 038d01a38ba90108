"""Every Python block of README.md and docs/cluster.md runs as printed on a CPU install, on the dry runs' output.

The module runs the dry runs the blocks read (``python -m jobs.sweep`` and ``python -m jobs.tuning``, no
arguments) in a fresh directory, then each block in a fresh Python process there. A block whose first line is
``# needs: internet`` or ``# needs: gpu`` (the public release, a CUDA device) is skipped. The tour's block must
find selective units on the dry run (it prints how many).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fnn_ray.responses import read_responses
from test_cli import REPO_ROOT, TAG, _kill_tagged

pytestmark = pytest.mark.slow

DOCS = ("README.md", "docs/cluster.md")
NEEDS = re.compile(r"#\s*needs:\s*(\w+)")


def python_blocks(name: str) -> list[tuple[str, str]]:
    """``(id, code)`` of every fenced ```python block of ``name`` (id: file and line of the fence)."""
    text = (REPO_ROOT / name).read_text()
    return [(f"{name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1))
            for m in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, re.S | re.M)]


BLOCKS = [block for name in DOCS for block in python_blocks(name)]


def _run(args: list[str], cwd: Path, timeout: float = 1800.0) -> subprocess.CompletedProcess:
    tag = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               **{TAG: tag})
    try:
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        _kill_tagged(tag)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A directory holding the dry runs' ``fnn-ray-output/``, and what each dry run printed."""
    root = tmp_path_factory.mktemp("readme")
    printed = {}
    for job in ("jobs.sweep", "jobs.tuning"):
        done = _run(["-m", job], root)
        assert done.returncode == 0, f"{job}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        printed[job] = done.stdout
    return root, printed


@pytest.fixture(scope="module")
def dry_run(dry_runs) -> Path:
    return dry_runs[0]


def test_the_sweep_dry_run_says_where_its_responses_are(dry_runs):
    root, printed = dry_runs
    out = root / "fnn-ray-output"
    assert str(out / "responses") in printed["jobs.sweep"] and "pyarrow" in printed["jobs.sweep"]
    table = read_responses(str(out))
    assert len(table) > 0 and set(table.column("session").to_pylist()) == {4, 8, 9}
    assert (out / "manifest.json").is_file()


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 4 and all(code.strip() for _, code in BLOCKS)


@pytest.mark.parametrize("where, code", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_python_block_runs_as_printed(dry_run, where, code):
    needs = NEEDS.match(code.lstrip())
    if needs:
        pytest.skip(f"{where} needs {needs.group(1)}")
    done = _run(["-c", code], dry_run)
    print(f"\n{where}:\n{done.stdout[-2000:]}")
    assert done.returncode == 0, f"{where} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    found = re.search(r"(\d+) units, (\d+) selective", done.stdout)
    if "gOSI" in code:  # the tour: the filter finds something on the dry run
        assert found and int(found.group(2)) > 0, done.stdout

"""The layers import only downward (``jobs`` -> ``fnn_ray`` -> ``fnn_model``), without cycles, and the pure modules
never load Ray: checked on the source (every module-level import) and in a fresh interpreter (``sys.modules``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fnn_model", "fnn_ray", "jobs")


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path) -> set[str]:
    """The project modules ``path`` imports when it is loaded (module level, not under ``if TYPE_CHECKING``)."""
    found: set[str] = set()

    def visit(body) -> None:
        for node in body:
            if _type_checking(node):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return found


def graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_layers_import_only_downward():
    allowed = {"fnn_model": {"fnn_model"}, "fnn_ray": {"fnn_model", "fnn_ray"}, "jobs": {"fnn_model", "fnn_ray", "jobs"}}
    wrong = [f"{a} imports {b}" for a, targets in graph().items() for b in targets
             if b.split(".")[0] not in allowed[a.split(".")[0]]]
    assert not wrong, wrong


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node, [node])
    assert not cycles, [" -> ".join(c) for c in cycles]


@pytest.mark.parametrize("modules", [
    "fnn_model.network, fnn_model.engine, fnn_model.release",
    "fnn_ray.plan, fnn_ray.scheduler, fnn_ray.executor, fnn_ray.simpool",
    "jobs.simulate",
])
def test_pure_modules_do_not_load_ray(modules):
    code = f"import sys; import {modules}; sys.exit(3 if 'ray' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr or f"importing {modules} loaded ray"


def test_the_ray_check_can_fail():
    """The check above sees Ray when a module does load it."""
    code = "import sys; import fnn_ray.plan, ray; sys.exit(3 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 3


def test_jobs_do_not_import_each_other():
    """A job's module (the machinery's ``fnn_ray.<job>`` and the command line's ``jobs.<job>``) imports no other
    job: what two jobs share lives in the machinery (``fnn_ray``) or in the shared command-line modules."""
    job = {"sweep": "sweep", "evaluate": "evaluate", "export": "export", "experiment": "experiment",
           "tuning": "experiment", "receptive_fields": "experiment"}  # module -> the job it belongs to
    edges = graph()
    wrong = [f"{a} imports {b}" for a, targets in edges.items() for b in targets
             if {a.split(".")[-1], b.split(".")[-1]} <= set(job) and job[a.split(".")[-1]] != job[b.split(".")[-1]]]
    assert not wrong, wrong

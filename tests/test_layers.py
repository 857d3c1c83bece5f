"""The architecture is the DAG, and layers only look down:

    entry points (nightshift.cli)  →  flows  →  tasks  →  blocks  →  library (nightshift.*)

No module imports from a layer above its own, and no task imports another task: stages meet
only through the flow that wires them and the library beneath them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parent.parent
RANK = {"library": 0, "blocks": 1, "tasks": 2, "flows": 3, "entry": 4}
ENTRY_POINTS = {"nightshift.cli", "nightshift.serve"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "nightshift" and len(parts) > 1 and parts[1] in ("flows", "tasks", "blocks"):
        parts = parts[1:]
    if parts[0] in ("flows", "tasks", "blocks"):
        return parts[0]
    if module in ENTRY_POINTS or ".".join(parts[:2]) in ENTRY_POINTS:
        return "entry"
    if parts[0] == "nightshift":
        return "library"
    return None  # the standard library and third parties


def own_modules():
    for folder in ("nightshift", "flows", "tasks", "blocks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).with_suffix("")
            name = ".".join(relative.parts).removesuffix(".__init__")
            yield name, path


def imports_of(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def stage(module: str) -> str:
    return module.split(".")[-1]


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for name, path in own_modules():
        mine = layer_of(name)
        for imported in imports_of(path):
            theirs = layer_of(imported)
            if theirs is not None and RANK[theirs] > RANK[mine]:
                upward.append(f"{name} ({mine}) imports {imported} ({theirs})")
    assert not upward, "\n".join(upward)


def test_no_task_imports_another_task():
    crossing = []
    for name, path in own_modules():
        if layer_of(name) != "tasks" or stage(name) == "__init__":
            continue
        for imported in imports_of(path):
            if layer_of(imported) == "tasks" and stage(imported) not in (stage(name), "tasks"):
                crossing.append(f"{name} imports {imported}")
    assert not crossing, "\n".join(crossing)


RUN_DIRECTORY_NAMES = (
    "job.json", "lease.json", "progress.json", "manifest.json", "result.json", "metrics.json", "suspects.json",
    "output.jsonl", "errors.jsonl", "results.parquet", "run.json", "embeddings.parquet", "canary_results.parquet",
    "validation.json", "report.json", "report.md", "report.png", ".alive", ".refused", ".verdict", ".unfit", "chunk-",
)  # fmt: skip


def test_no_run_directory_file_name_is_spelled_outside_rundir():
    """The run directory's layout lives in nightshift/rundir.py; everyone else asks RunDir."""
    spelled = []
    for name, path in own_modules():
        if name == "nightshift.rundir":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if value and " " not in value.strip() and not value.startswith("--"):  # not prose, not an option
                if any(part in value for part in RUN_DIRECTORY_NAMES):
                    spelled.append(f"{path.relative_to(REPO)}:{node.lineno} {value!r}")
    assert spelled == []

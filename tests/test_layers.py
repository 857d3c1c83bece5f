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
ENTRY_POINTS = {"nightshift.cli", "nightshift.batch_api.server"}


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
    """The run directory's layout lives in nightshift/runtime/rundir.py; everyone else asks RunDir."""
    spelled = []
    for name, path in own_modules():
        if name == "nightshift.runtime.rundir":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if value and " " not in value.strip() and not value.startswith("--"):  # not prose, not an option
                if any(part in value for part in RUN_DIRECTORY_NAMES):
                    spelled.append(f"{path.relative_to(REPO)}:{node.lineno} {value!r}")
    assert spelled == []


def test_past_the_entry_points_a_run_directory_is_a_rundir_not_a_string():
    """Flows and tasks take a run directory as Prefect records it (a path or URL) and make it a
    RunDir once; every library function and record field past them is handed that RunDir."""
    loose = []
    for name, path in own_modules():
        if layer_of(name) != "library" or name == "nightshift.runtime.rundir":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                for argument in arguments:
                    if (
                        argument.arg in ("run_dir", "rd")
                        and ast.unparse(argument.annotation or ast.Name("?")) != "RunDir"
                    ):
                        loose.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}({argument.arg})")
    assert loose == []


def _module_graph() -> dict[str, set[str]]:
    """Own module → the own modules it imports, at any depth of its code (a lazy import inside a
    function is a dependency all the same): `from a import b` counts as `a.b` where that is a module."""
    modules = {canonical(name): path for name, path in own_modules()}

    def resolve(name: str) -> str | None:
        name = canonical(name)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    found.add(resolve(f"{node.module}.{alias.name}"))
        graph[name] = found - {None, name}
    return graph


def canonical(module: str) -> str:
    """`nightshift.flows.x` and `flows.x` are one module (package-dir)."""
    parts = module.split(".")
    if parts[0] == "nightshift" and len(parts) > 1 and parts[1] in ("flows", "tasks", "blocks"):
        return ".".join(parts[1:])
    return module


def test_no_import_circle():
    """No two modules import each other, directly or round about (lazy imports included)."""
    graph = _module_graph()
    circles = []
    for start in graph:  # a module that can reach itself is on a circle
        seen, frontier = set(), [start]
        while frontier:
            for imported in graph[frontier.pop()]:
                if imported == start:
                    circles.append(start)
                    frontier = []
                    break
                if imported not in seen:
                    seen.add(imported)
                    frontier.append(imported)
    assert circles == []


def test_every_exception_is_under_the_one_root():
    """Every exception class Nightshift defines descends from nightshift.errors.NightshiftError,
    which says its exit status and whether a retry may help."""
    import builtins

    bases = {}
    for _, path in own_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = [base.id if isinstance(base, ast.Name) else getattr(base, "attr", "") for base in node.bases]
                bases[node.name] = (names, f"{path.relative_to(REPO)}:{node.lineno}")

    def ancestry(name: str, depth: int = 0) -> set[str]:
        if name not in bases or depth > 20:
            return {name}
        return {name}.union(*(ancestry(base, depth + 1) for base in bases[name][0]))

    def is_exception(name: str) -> bool:
        built = {getattr(builtins, n, None) for n in ancestry(name)}
        return any(isinstance(b, type) and issubclass(b, BaseException) for b in built)

    unrooted = [
        where for name, (_, where) in bases.items() if is_exception(name) and "NightshiftError" not in ancestry(name)
    ]
    assert unrooted == [], "exceptions outside nightshift.errors.NightshiftError: " + ", ".join(unrooted)


def test_no_exit_status_is_a_bare_number():
    """Exit statuses are nightshift.errors.ExitStatus, never a number spelled in place."""
    bare = []
    for name, path in own_modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            exiting = isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "exit", "_exit", "SystemExit")  # fmt: skip
            literal = exiting and any(isinstance(arg, ast.Constant) and isinstance(arg.value, int) for arg in node.args)
            returned = (
                name == "nightshift.cli"
                and isinstance(node, ast.Return)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, int)
                and not isinstance(node.value.value, bool)
            )
            if literal or returned:
                bare.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bare == []


LONGEST_UNIT = 60  # lines: a function read at once


def test_no_function_is_longer_than_a_screen():
    long = []
    for _, path in own_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_UNIT:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


# vLLM's public offline entry point: the one import of vLLM outside the adapter.
PUBLIC_VLLM = {("nightshift.engine.local", "vllm")}


def test_vllm_is_reached_through_its_adapter_alone():
    """Every use of vLLM's internals (protocol models, tool parsers, structured outputs, LoRA
    requests, platform, EngineArgs) goes through nightshift/engine/vllm_adapter.py, whose
    `broken_assumptions()` checks them at start; only `from vllm import LLM` is used directly."""
    outside = []
    for name, path in own_modules():
        if name == "nightshift.engine.vllm_adapter":
            continue
        for imported in imports_of(path):
            if imported.split(".")[0] == "vllm" and (name, imported) not in PUBLIC_VLLM:
                outside.append(f"{name} imports {imported}")
    assert outside == []


# What a process shares among its threads, declared once with why it is the process's and not a
# run's (docs/architecture.md, "What is process-wide"): everything else a run needs is passed down.
PROCESS_WIDE = {
    "nightshift.runtime.storage._options": "the credentials this process was handed (never a parameter or a file)",
    "nightshift.runtime.storage._gate": "the commit gate: its fences guard every writer thread of the process",
    "nightshift.runtime.preemption.stop_requested": "a SIGTERM is sent to the process",
    "nightshift.runtime.preemption._generations": "the generate calls a SIGTERM waits for before the process exits",
    "nightshift.runtime.deadline.deadline_reached": "the run's deadline stops the generate calls of its process",
    "nightshift.runtime.lease._held": "the leases this process holds; the commit fence checks every write against them",
    "nightshift.runtime.lease._lock": "guards _held",
    "nightshift.runtime.progress._trackers": "live progress by run directory: tasks get paths, the console shows it",
    "nightshift.engine.local.ENGINES": "vLLM's engine holds the process's accelerators: one cache per process",
}


def _frozen(module: str, name: str) -> bool:
    """Whether `module.name` is a frozen dataclass: an instance of it is a constant, not state."""
    import dataclasses
    import importlib

    cls = getattr(importlib.import_module(module), name, None)
    return dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def module_state(name: str, path: Path) -> list[str]:
    """Module-level names bound to state: an empty container, a threading primitive, or an
    instance of a class of the module itself or of another Nightshift module; and any `global`
    statement."""
    tree = ast.parse(path.read_text())
    own_classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)} | {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nightshift")
        for alias in node.names
        if alias.name[:1].isupper() and not _frozen(node.module, alias.name)
    }
    found = [f"{name}: global {', '.join(n.names)}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if value is None:
            continue
        empty = isinstance(value, (ast.Dict, ast.List, ast.Set)) and not getattr(
            value, "keys", getattr(value, "elts", None)
        )
        call = value.func if isinstance(value, ast.Call) else None
        threading_primitive = isinstance(call, ast.Attribute) and getattr(call.value, "id", None) == "threading"
        own_instance = isinstance(call, ast.Name) and call.id in own_classes
        if empty or threading_primitive or own_instance:
            found += [f"{name}.{t.id}" for t in targets if isinstance(t, ast.Name)]
    return found


def test_process_wide_state_is_only_what_is_declared_and_why():
    found = sorted(state for name, path in own_modules() for state in module_state(name, path))
    assert found == sorted(PROCESS_WIDE), "process-wide state added or gone: pass it down instead, or declare why"
    documented = (REPO / "docs" / "architecture.md").read_text()
    assert [
        s for s in PROCESS_WIDE if f"`{s.rsplit('.', 1)[0]}`" not in documented or s.rsplit(".", 1)[1] not in documented
    ] == []

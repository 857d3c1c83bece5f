"""Shared fixtures: one Prefect server and one vLLM engine (the tiny model) per test session."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The engine core runs inside the process that drives it (vLLM's own switch). A vLLM engine on
# the CPU platform otherwise spawns two more processes, each importing vLLM again (~20 s of CPU
# apiece here): 38 s to start the tiny model against 12 s in-process, on every one of the
# suite's engine starts. Where the engine's own processes are the subject, vLLM's default comes
# back: for the session's engine in the engine-fault drills (`engine_in_its_own_processes`), for
# a child in the SIGTERM stop and the engine starts against a real Prefect server
# (harness.VLLM_OWN_PROCESSES).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows) -> Path:
    """Rows are dicts (written as JSON) or raw str/bytes lines (written as they are)."""
    with open(path, "wb") as out:
        for row in rows:
            if isinstance(row, dict):
                row = json.dumps(row)
            if isinstance(row, str):
                row = row.encode()
            out.write(row + b"\n")
    return path


def chat_request(custom_id: str, content: str, **body) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def read_jsonl(path) -> list[dict]:
    """Lines of a local path, or of a universal-pathlib path on a bucket."""
    path = path if hasattr(path, "read_text") else Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()]


# The fast layer's budget (`make test-fast`, `pytest -m fast`): it ran in 40–60 s on a 2-core
# machine. A layer that outgrows it fails, so slow work does not creep into it unseen.
FAST_LAYER_BUDGET_S = 120


# What each test file costs here (seconds, setup included; `scripts/file_costs.py` writes it from
# a run's `--junitxml`). Test files run whole on one worker each (`--dist loadfile`), and xdist
# hands them out in the order of collection: the dearest go first, so that the run does not end
# with one worker on a ten-minute file while the other has nothing left. xdist's own order (the
# most tests first) put the few-test, long files last.
FILE_COSTS = REPO / "tests" / "file_costs.json"


def pytest_configure(config):
    config.option.loadscopereorder = False  # xdist: keep the order below


def pytest_collection_modifyitems(config, items):
    costs = json.loads(FILE_COSTS.read_text()) if FILE_COSTS.exists() else {}
    items.sort(key=lambda item: -costs.get(item.nodeid.split("::", 1)[0], 0.0))


def pytest_sessionstart(session):
    session.config._nightshift_started = time.monotonic()


def pytest_sessionfinish(session, exitstatus):
    elapsed = time.monotonic() - session.config._nightshift_started
    if session.config.getoption("markexpr") == "fast" and elapsed > FAST_LAYER_BUDGET_S and exitstatus == 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            over = f"the fast layer took {elapsed:.0f} s, over its budget of {FAST_LAYER_BUDGET_S} s"
            reporter.write_line(over, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server for the session, in this process's settings and in the
    environment that every child process inherits (tests/harness.py): no process of the suite
    starts a temporary server of its own."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    # A 2-core machine needs far longer than the default to start the server.
    with prefect_test_harness(server_startup_timeout=300):
        api_url = PREFECT_API_URL.value()
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = api_url
        try:
            yield api_url
        finally:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before


@pytest.fixture(autouse=True)
def _session_prefect_server(request):
    """Every test but the fast layer's runs against the session's Prefect server."""
    if request.node.get_closest_marker("fast") is None:
        request.getfixturevalue("prefect_server")


@pytest.fixture
def engine_in_its_own_processes(monkeypatch):
    """vLLM's default layout, as every user runs it: the engine core and its worker in processes
    of their own, which a drill can kill and a stop must take down."""
    from nightshift.engine.local import shutdown_engine

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    shutdown_engine()  # the next job starts an engine that sees this test's environment
    yield
    shutdown_engine()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's), on a free port, for the whole session: the one the
    benches and drills start (bench/local_servers.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    from local_servers import moto_s3

    server, endpoint = moto_s3()
    try:
        yield endpoint
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def warm_engine(tmp_path_factory):
    """vLLM's OpenAI server for the tiny model, started once per test worker on first use.

    Child runs whose subject is not the engine inside them — a bucket's resume, the lease's
    fence, the Batch API, the `--engine-url` client — reach it through `--engine-url` instead of
    each starting an engine of their own (12–40 s apiece on this 2-core machine). The tests
    about the local engine (its start, sizing, stop and kill) keep starting one."""
    from harness import EngineServer

    server = EngineServer(tmp_path_factory.mktemp("warm-engine")).start()
    yield server
    if server.process.poll() is None:
        server.kill()


@pytest.fixture(autouse=True)
def _warm_engine_outlives_each_test(request):
    """The shared server is every later test's too: a test after which it is dead fails, with the
    end of the server's log (what killed it), and the server is started again on the same address
    so that the death is reported once, where it happened, instead of as the next tests' errors."""
    if "warm_engine" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("warm_engine")
    yield
    if server.process.poll() is not None:
        status, log = server.process.returncode, server.log_tail()
        server.start()
        pytest.fail(f"the shared engine server died during this test (exit {status}):\n{log}")


@pytest.fixture(scope="session")
def tiny_job():
    """A job on the tiny random Llama: small chunks so shards have several."""
    from nightshift.jobs import make_job

    return make_job("tiny", chunk_size=4, max_num_seqs=16)


@pytest.fixture(scope="session", autouse=True)
def _stop_engine_at_the_end():
    yield
    if "nightshift.engine.local" in sys.modules:  # the fast layer never imports it (nor vLLM)
        from nightshift.engine.local import shutdown_engine

        shutdown_engine()

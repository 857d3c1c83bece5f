"""How the tests start Nightshift as a user would: `nightshift …` in a child process.

Every child gets the session's Prefect server (conftest's `prefect_server` puts its URL in the
environment), so no child starts a temporary server of its own — and each child run is one
more run against a real server with the engine starting in the background (issue 27).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from nightshift.models import resolve_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from local_servers import WebhookReceiver  # noqa: E402,F401  (the tests' webhook endpoint)

# vLLM's default layout for a child (the engine core and its worker in processes of their own),
# where the suite's in-process engine core (conftest) would not be what the test is about.
VLLM_OWN_PROCESSES = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def nightshift_command(*args) -> list[str]:
    """`nightshift ARGS…` as this interpreter runs it."""
    return [sys.executable, "-m", "nightshift.cli", *map(str, args)]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment (the session's Prefect server included) plus `env`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}


def run_cli(*args, env: dict[str, str] | None = None, cwd=REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `nightshift ARGS…` to its end; stdout and stderr captured as text."""
    return subprocess.run(
        nightshift_command(*args), cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=timeout
    )


def start_cli(*args, env: dict[str, str] | None = None, cwd=REPO, **popen) -> subprocess.Popen:
    """Start `nightshift ARGS…` and return at once (for tests that signal or kill it)."""
    return subprocess.Popen(nightshift_command(*args), cwd=cwd, env=child_env(env), **popen)


def kill_what_it_left(process: subprocess.Popen) -> None:
    """SIGKILL the process group of a child already waited for: what it left running. A live
    process of its pid took the number since (no pid in use as a group id is handed out again),
    so then nothing was left, and that group is another test's — never killed."""
    import psutil

    if psutil.pid_exists(process.pid):
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_port() -> int:
    """A free port below Linux's ephemeral range (32768–60999), where `free_port` and every
    outgoing connection take theirs: a server that binds only after a long start (vLLM's, ~20 s)
    cannot lose its port to another test worker's server started meanwhile."""
    import random

    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def wait_until(url: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    """Until `url` answers (any HTTP status); fails early if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with {process.returncode}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


class EngineServer:
    """vLLM's OpenAI server for a bundled model (the tiny one, priority scheduling, by default) on a
    fixed port, in a process group of its own: killed and started again on the same address, as
    an online fleet's server restarts."""

    def __init__(self, logs, model: str = "tiny", *arguments: str) -> None:
        self.port, self.logs, self.process = quiet_port(), logs, None
        self.model, self.arguments = model, arguments or (
            "--max-model-len", "2048", "--scheduling-policy", "priority", "--enable-prompt-tokens-details"
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> EngineServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model(self.model),
             "--served-model-name", self.model, "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
             "--kv-cache-memory-bytes", "200000000", "--enforce-eager", *self.arguments],
            cwd=REPO, env=child_env(), stdout=open(self.logs / f"vllm-{time.time():.0f}.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_until(f"{self.url}/models", timeout=240, process=self.process)
        answer = httpx.get(f"{self.url}/models", timeout=10)  # a keyed server (--api-key) says 401
        served = [m["id"] for m in answer.json().get("data", [])] if answer.status_code == 200 else [self.model]
        if self.process.poll() is not None or served != [self.model]:  # another server on its port
            self.kill()
            raise RuntimeError(f"{self.url} answers for {served}, not this {self.model} server ({self.log_tail()})")
        return self

    def log_tail(self, size: int = 4000) -> str:
        logs = sorted(self.logs.glob("vllm-*.log"))
        return logs[-1].read_text(errors="replace")[-size:] if logs else "no log"

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it died already
            pass
        self.process.wait()


def events_of(run_dir, wanted: set[str], timeout: float = 60) -> dict[str, list[dict]]:
    """The Prefect events the session's server holds for the run in `run_dir`, by name, once every
    name in `wanted` is among them (events reach the server asynchronously)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    from nightshift.observe.events import run_resource
    from nightshift.runtime.rundir import RunDir

    resource = run_resource(RunDir(run_dir))["prefect.resource.id"]
    window = EventOccurredFilter(since=datetime.now(timezone.utc) - timedelta(hours=1))
    found: dict[str, list[dict]] = {}
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(
                EventFilter(occurred=window, resource=EventResourceFilter(id=[resource]),
                            event=EventNameFilter(prefix=["nightshift."])),
                limit=50,  # the server's most per page: a run's events are fewer
            )  # fmt: skip
            found = {}
            for event in page.events:
                found.setdefault(event.event, []).append(
                    {"payload": event.payload, "related": [dict(r) for r in event.related]}
                )
            if wanted <= set(found) or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


def materializations_of(keys: list[str], timeout: float = 60) -> dict[str, dict]:
    """For each asset key, its latest materialization on the session's server: the metadata it
    carried and the keys of the assets it was made from (what the lineage view draws)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    window = EventOccurredFilter(since=datetime.now(timezone.utc) - timedelta(hours=1))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(
                EventFilter(occurred=window, resource=EventResourceFilter(id=keys),
                            event=EventNameFilter(name=["prefect.asset.materialization.succeeded"])),
                limit=50,
            )  # fmt: skip
            found: dict[str, dict] = {}
            for event in sorted(page.events, key=lambda e: e.occurred):
                found[event.resource.id] = {
                    "metadata": event.payload or {},
                    "upstream": [r.id for r in event.related if r.role == "asset"],
                }
            if set(keys) <= set(found) or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

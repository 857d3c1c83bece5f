"""The servers the benches, drills and tests start on this machine: vLLM's OpenAI server, moto's S3,
PostgreSQL, a webhook receiver, a Prefect server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_server(model_path: str, name: str, port: int, log: Path, arguments: list[str], cores: str | None = None):
    """vLLM's OpenAI server for `model_path` served as `name`, up and listing its models; on
    `cores` only (its CPU engine's threads and the process), if given."""
    pinned = {"VLLM_CPU_OMP_THREADS_BIND": cores} if cores else {}
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
         "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *arguments],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **pinned}, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=(lambda: os.sched_setaffinity(0, cores_of(cores))) if cores else None,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")


def moto_s3() -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server (from .venv-s3) on a free port, answering; and its endpoint."""
    port = free_port()
    server = subprocess.Popen(
        [str(REPO / ".venv-s3" / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(endpoint, timeout=2)
            return server, endpoint
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("moto_server did not start")


def cores_of(spec: str) -> set[int]:
    return {int(core) for core in spec.split(",")}


class PostgresServer:
    """A PostgreSQL server from Debian's packages on a free port, with one database, its data in
    a fresh directory under /tmp; no container. Run as root (CI), its commands run as the
    `postgres` user the package created: PostgreSQL refuses to run as root."""

    def __init__(self, database: str = "prefect") -> None:
        import glob
        import shutil
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise SystemExit("PostgreSQL is not installed: apt-get install postgresql (scripts/setup.sh does)")
        self.bin = Path(found[-1]).parent
        self.directory = Path(tempfile.mkdtemp(prefix="nightshift-postgres-"))
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        self.port = free_port()
        self.data = self.directory / "data"
        self._run("initdb", "-D", self.data, "--auth=trust", "-U", "postgres", "-E", "UTF8")
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", self.data, "-l", self.directory / "server.log", "-w", "-o", options, "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", database)
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        import shutil

        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, program: str, *args, check: bool = True) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / program), *map(str, args)], check=check,
                       capture_output=True, timeout=120)  # fmt: skip


class WebhookReceiver:
    """An HTTP endpoint on this machine that keeps every request body it is sent: where a
    notification block points in the tests (the place a team's Slack or pager would be), and
    the Batch API's webhooks (`requests` holds each request's headers and body as sent)."""

    def __init__(self, failing: int = 0) -> None:
        """`failing`: the first requests are answered 500, as an endpoint that is down."""
        import http.server
        import threading

        received, requests, answers = self.received, self.requests, self.answers = [], [], [500] * failing

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                requests.append((dict(self.headers.items()), body))
                status = answers.pop(0) if answers else 200
                if status == 200:
                    received.append(body.decode())
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 90) -> str | None:
        """The first body received holding `text`, waiting for it up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((body for body in list(self.received) if text in body), None)
            if found is not None:
                return found
            time.sleep(0.5)
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for_prefect(api: str, timeout: float = 120) -> None:
    """Until the Prefect server at `api` answers its health check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the Prefect server at {api} did not start")


@contextmanager
def prefect_server(home: Path, prefect: list[str] | None = None, log: Path | None = None):
    """`prefect server start` (this environment's, or the `prefect` command given) on a free port,
    its state under `home` — a real server, whose services (the repossessor of expired leases)
    run, unlike a test harness's; yields its API URL and is killed at the end."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}  # fmt: skip
    env.pop("PREFECT_PROFILES_PATH", None)
    with open(log or os.devnull, "wb") as out:
        server = subprocess.Popen([*(prefect or [sys.executable, "-m", "prefect"]), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        wait_for_prefect(api, timeout=300)
        yield api
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()

"""One temporary Prefect server per machine for the runs that have no Prefect server configured.

Prefect starts a temporary server inside every process that has no `PREFECT_API_URL`: three
`nightshift run`s started together on one machine start three, on one SQLite database, and on a
busy machine they time out ("database is locked", then "Timed out while attempting to connect to
ephemeral Prefect API server") before a row is sent. A run, retry or demo with no server
configured uses the machine's shared one instead: the first to arrive starts it — a small
supervisor process of its own session, `python -m nightshift.runtime.local_prefect`, which runs the same
temporary server Prefect would (no UI, no background services, the same database under
PREFECT_HOME) — and the others find it. It stops once no run has used it for
`NIGHTSHIFT_SHARED_PREFECT_IDLE_S` (30 s). Its address, its log and its clients are files under
`PREFECT_HOME/nightshift-server/`; a file lock orders the runs that arrive together. A run waits
for it as long as `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS` says (180 s), then exits 75.

Prefect's own temporary server stays in use where Prefect's setting turns temporary servers off
(`PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false`) and nothing here is done where a server is configured.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from nightshift.errors import PrefectUnreachable
from nightshift.runtime.processes import free_port, on_parent_death, started_at


class Place:
    """`PREFECT_HOME/nightshift-server/`: lock, server.json (the supervisor's pid and the URL),
    server.log, and clients/<pid>-<start time> for each run using it."""

    def __init__(self, home: str | Path) -> None:
        self.root = Path(home).expanduser() / "nightshift-server"
        self.clients = self.root / "clients"
        self.state = self.root / "server.json"
        self.log = self.root / "server.log"

    @contextmanager
    def locked(self):
        self.clients.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def register(self, pid: int) -> None:
        if (key := _process_key(pid)) is not None:  # a live process: this one
            (self.clients / key).touch()

    def live_clients(self) -> list[str]:
        """The clients whose process still runs; the files of the others are removed."""
        live = []
        for entry in self.clients.iterdir():
            pid = entry.name.partition("-")[0]
            if pid.isdigit() and _process_key(int(pid)) == entry.name:  # not a pid handed out again, nor a zombie
                live.append(entry.name)
            else:
                entry.unlink(missing_ok=True)
        return live

    def server(self) -> dict | None:
        """The running supervisor's {"pid", "url"}, or None (none, or it is gone)."""
        try:
            known = json.loads(self.state.read_text())
        except (FileNotFoundError, ValueError):
            return None
        key = _process_key(known["pid"])
        return known if key is not None and key == known.get("key") else None


def _process_key(pid: int) -> str | None:
    """pid and start time (a pid the kernel hands out again is another process), or None for a
    process that is gone (a zombie too: see `started_at`)."""
    started = started_at(pid)
    return None if started is None else f"{pid}-{started:.2f}"


def use_shared_server() -> str | None:
    """Point this process and its children at the machine's shared temporary server, starting it
    if none runs, and wait for it to answer; its API URL — or None where a Prefect server is
    configured or temporary servers are off (then nothing changes)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    place = Place(settings.home)
    with place.locked():
        place.register(os.getpid())
        server = place.server() or _start_supervisor(place, settings)
    url = server["url"]
    _wait_until_it_answers(place, url, float(settings.server.ephemeral.startup_timeout_seconds))
    os.environ["PREFECT_API_URL"] = url
    _refresh_prefect_settings(url)
    return url


def _start_supervisor(place: Place, settings) -> dict:
    """Start the supervisor (in a session of its own: a Ctrl-C to this run leaves the other runs'
    server be) and record it; called under the place's lock."""
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True)}
    env.pop("PREFECT_API_URL", None)
    port = free_port()
    with open(place.log, "wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "nightshift.runtime.local_prefect", str(place.root.parent), str(port)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = {"pid": supervisor.pid, "key": _process_key(supervisor.pid), "url": f"http://127.0.0.1:{port}/api"}
    place.state.write_text(json.dumps(server))
    return server


def _wait_until_it_answers(place: Place, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or place.server() is None:
            raise PrefectUnreachable.not_started(f"{timeout_s:.0f}", str(place.log))
        time.sleep(0.2)


def _refresh_prefect_settings(url: str) -> None:
    """Prefect read its settings when it was imported: have it read them again, and check that
    it now sees the URL (an assumption about Prefect's internals, checked where it is used)."""
    import prefect.context
    from prefect.settings import get_current_settings

    refresh = getattr(prefect.context, "refresh_global_settings_context", None)
    if refresh is not None:
        refresh()
    if get_current_settings().api.url != url:
        raise PrefectUnreachable(f"Prefect did not take PREFECT_API_URL={url} after its import; set it before the run")


def supervise(home: str, port: int, idle_s: float) -> int:
    """The supervisor: run the temporary server until no client has been alive for `idle_s`."""
    place = Place(home)
    server = subprocess.Popen(  # a supervisor killed outright takes its server with it
        _server_command(port), env={**os.environ, **_TEMPORARY_SERVER_ENV}, preexec_fn=_dies_with_its_supervisor
    )
    idle_since = None
    try:
        while server.poll() is None:
            time.sleep(1)
            with place.locked():
                if place.live_clients():
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > idle_s:
                    place.state.unlink(missing_ok=True)  # no new client finds it from here on
                    break
    finally:
        with place.locked():
            if (known := place.server()) is None or known["pid"] == os.getpid():
                place.state.unlink(missing_ok=True)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


# What Prefect's own temporary server runs with (prefect.server.api.server.SubprocessASGIServer)
_TEMPORARY_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def _server_command(port: int) -> list[str]:
    import prefect

    return [
        sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
        "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
        "--lifespan", "on",
    ]  # fmt: skip


def _dies_with_its_supervisor() -> None:
    on_parent_death(signal.SIGTERM)


if __name__ == "__main__":
    from nightshift.config import RuntimeSettings

    sys.exit(supervise(sys.argv[1], int(sys.argv[2]), RuntimeSettings.from_environment().shared_prefect_idle_s))

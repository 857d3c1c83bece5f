"""Prefect 3.8 (issue 53): vLLM pins fastapi below 0.137 and Prefect 3.8 needs 0.139 or later, so
an environment that runs an engine holds Prefect 3.7 — but a team that upgraded its Prefect
server (its Helm chart ships 3.8) runs Nightshift against that server. Here a real Prefect 3.8
server (scripts/setup.sh's `.venv-prefect38`) takes a run: its flow run, task runs and events."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import orjson
from conftest import chat_request
from harness import REPO, free_port, run_cli
from local_servers import wait_for_prefect

PREFECT_38 = REPO / ".venv-prefect38" / "bin" / "prefect"


def test_a_run_reports_its_flow_run_tasks_and_events_to_a_prefect_38_server(tmp_path):
    assert PREFECT_38.exists(), "scripts/setup.sh provisions .venv-prefect38 (a Prefect 3.8 server)"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}  # fmt: skip
    env.pop("PREFECT_PROFILES_PATH", None)
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([str(PREFECT_38), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_for_prefect(api, timeout=300)
        version = httpx.get(f"{api}/admin/version").json()
        rows = [chat_request(f"r{i}", f"Say {i}.", max_tokens=8) for i in range(24)]
        (tmp_path / "in.jsonl").write_bytes(b"\n".join(orjson.dumps(row) for row in rows) + b"\n")
        result = run_cli("run", tmp_path / "in.jsonl", "--output", tmp_path / "out", "--model", "tiny",
                         "--shard-size", "12", env={"PREFECT_API_URL": api})  # fmt: skip
        flow_runs = httpx.post(f"{api}/flow_runs/filter", json={}).json()
        task_runs = httpx.post(f"{api}/task_runs/filter", json={}).json()
        events = _events(api, "nightshift.run.completed")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()

    assert version.startswith("3.8."), version
    assert result.returncode == 0, result.stderr[-3000:]
    assert [run["state_type"] for run in flow_runs] == ["COMPLETED"]
    assert {run["state_type"] for run in task_runs} == {"COMPLETED"}
    assert sum(run["name"].startswith("generate") for run in task_runs) == 2, [run["name"] for run in task_runs]
    [completed] = events
    assert completed["payload"]["rows"] == 24


def _events(api: str, name: str, timeout: float = 60) -> list[dict]:
    """The server's events of `name` (the server stores them a moment after they arrive)."""
    deadline = time.monotonic() + timeout
    while True:
        found = httpx.post(f"{api}/events/filter", json={"limit": 50, "filter": {"event": {"name": [name]}}}).json()
        if found["events"] or time.monotonic() > deadline:
            return found["events"]
        time.sleep(0.5)

"""Prefect 3.8 (issue 53): vLLM pins fastapi below 0.137 and Prefect 3.8 needs 0.139 or later, so
an environment that runs an engine holds Prefect 3.7 — but a team that upgraded its Prefect
server (its Helm chart ships 3.8) runs Nightshift against that server. Here a real Prefect 3.8
server (scripts/setup.sh's `.venv-prefect38`) takes a run: its flow run, task runs and events."""

from __future__ import annotations

import time

import httpx
import orjson
from conftest import chat_request
from harness import REPO, run_cli
from local_servers import prefect_server

PREFECT_38 = REPO / ".venv-prefect38" / "bin" / "prefect"


def test_a_run_reports_its_flow_run_tasks_and_events_to_a_prefect_38_server(tmp_path):
    assert PREFECT_38.exists(), "scripts/setup.sh provisions .venv-prefect38 (a Prefect 3.8 server)"
    with prefect_server(tmp_path / "home", [str(PREFECT_38)], log=tmp_path / "server.log") as api:
        version = httpx.get(f"{api}/admin/version").json()
        rows = [chat_request(f"r{i}", f"Say {i}.", max_tokens=8) for i in range(24)]
        (tmp_path / "in.jsonl").write_bytes(b"\n".join(orjson.dumps(row) for row in rows) + b"\n")
        result = run_cli("run", tmp_path / "in.jsonl", "--output", tmp_path / "out", "--model", "tiny",
                         "--shard-size", "12", env={"PREFECT_API_URL": api})  # fmt: skip
        flow_runs = httpx.post(f"{api}/flow_runs/filter", json={}).json()
        task_runs = httpx.post(f"{api}/task_runs/filter", json={}).json()
        events = _events(api, "nightshift.run.completed")

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

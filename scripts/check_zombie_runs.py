"""Does the shipped zombie-run automation turn a killed worker's flow run Crashed? A drill.

    .venv/bin/python scripts/check_zombie_runs.py [--zombie-after-s 150]

PostgreSQL and `prefect server start` on it, `scripts/deploy.sh` (pools, blocks, deployments,
automations), `nightshift automations apply --zombie-after-s N`, a worker on the CPU pool, then
the nightly deployment over rows enough to keep it busy for minutes. Once the flow run is Running
and has sent a heartbeat (deployments/prefect.yaml asks one every 60 s), the worker's whole
process group — the worker, the flow run's process, its engine — is killed with SIGKILL, as a
lost machine would be. Prints how long after the kill the flow run turned Crashed, and the
state's message; exit 0 only if it did within N s plus two heartbeats.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from local_servers import PostgresServer, free_port, wait_for_prefect  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zombie-after-s", type=int, default=150)
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nightshift-zombie-"))
    postgres = PostgresServer()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(work / "prefect"),
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url, "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # fmt: skip
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip
    worker = None
    try:
        wait_for_prefect(api)
        subprocess.run([str(REPO / "scripts" / "deploy.sh")], cwd=REPO, env=env, check=True)
        subprocess.run([str(bin_dir / "nightshift"), "automations", "apply", "--zombie-after-s",
                        str(args.zombie_after_s)], env=env, check=True)  # fmt: skip
        subprocess.run([sys.executable, "-c", "from nightshift.blocks import ModelConfig\n"
                        "ModelConfig(model='tiny', engine={'max_num_seqs': 64}).save('tiny-zombie')"],
                       env=env, check=True)  # fmt: skip
        worker = subprocess.Popen([str(bin_dir / "prefect"), "worker", "start", "--pool", "nightshift-cpu"],
                                  cwd=REPO, env=env, start_new_session=True,
                                  stdout=open(work / "worker.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip
        rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 64,
                          "temperature": 0, "ignore_eos": True}} for i in range(args.rows)]  # fmt: skip
        (work / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        parameters = {"input_path": str(work / "in.jsonl"), "run_dir": str(work / "nightly"), "model": "tiny-zombie",
                      "shard_size": 2000, "fan_out": None}  # fmt: skip
        deployment = httpx.get(f"{api}/deployments/name/nightshift-batch/nightly").json()
        flow_run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run",
                              json={"parameters": parameters}).json()  # fmt: skip
        run_id = flow_run["id"]
        _wait(lambda: _state(api, run_id) == "RUNNING" and _heartbeats(api, run_id) > 0, 600, "a running, beating run")
        killed = time.monotonic()
        os.killpg(worker.pid, signal.SIGKILL)
        print(f"killed the worker's process group while flow run {run_id} was Running", flush=True)
        budget = args.zombie_after_s + 2 * 60 + 30
        _wait(lambda: _state(api, run_id) != "RUNNING", budget, "the flow run to leave Running")
        after = time.monotonic() - killed
        run = httpx.get(f"{api}/flow_runs/{run_id}").json()
        print(json.dumps({"state": run["state"]["type"], "name": run["state"]["name"],
                          "message": run["state"].get("message"), "seconds_after_kill": round(after, 1),
                          "zombie_after_s": args.zombie_after_s}, indent=2))  # fmt: skip
        return 0 if run["state"]["type"] == "CRASHED" else 1
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        server.terminate()
        server.wait(timeout=30)
        postgres.stop()


def _state(api: str, run_id: str) -> str:
    return httpx.get(f"{api}/flow_runs/{run_id}").json()["state"]["type"]


def _heartbeats(api: str, run_id: str) -> int:
    query = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                        "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 5}  # fmt: skip
    return len(httpx.post(f"{api}/events/filter", json=query).json().get("events", []))


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(2)
    raise SystemExit(f"gave up waiting for {what} after {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

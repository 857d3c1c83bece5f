"""How often does `nightshift run` hang at engine start against a real Prefect server?

Starts `prefect server start` on a free port (its own PREFECT_HOME), then runs `nightshift run`
N times in a row against it, each a fresh process with the engine loading in the background
while Prefect's log and event services start — the race of issue 27. A run that has not
finished within --timeout seconds counts as hung: its threads are dumped with py-spy if it is
installed, then it is killed. Prints one line per run and a summary.

    .venv/bin/python scripts/engine_start_race.py --runs 20 --rows 600
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(home / "server.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    for _ in range(600):
        try:
            if httpx.get(f"{api}/health", timeout=1).status_code == 200:
                return server, api
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not start; see {home / 'server.log'}")


def write_requests(path: Path, rows: int) -> None:
    with open(path, "w") as out:
        for i in range(rows):
            body = {"messages": [{"role": "user", "content": f"Say something about {i}"}], "max_tokens": 8}
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            out.write("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--timeout", type=float, default=300, help="seconds after which a run counts as hung")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="nightshift-race-"))
    server, api = start_prefect_server(scratch)
    requests = scratch / "requests.jsonl"
    write_requests(requests, args.rows)
    env = {**os.environ, "PREFECT_API_URL": api, "HF_HUB_OFFLINE": "1"}
    hung = failed = 0
    try:
        for attempt in range(args.runs):
            run_dir = scratch / f"run-{attempt}"
            command = [sys.executable, "-m", "nightshift.cli", "run", str(requests), "--output", str(run_dir)]
            command += ["--model", args.model, "--oracle-samples", "0", "--determinism-samples", "0"]
            started = time.monotonic()
            log = open(scratch / f"run-{attempt}.log", "wb")
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                code = process.wait(timeout=args.timeout)
                verdict = "finished" if code == 0 else f"exit {code}"
                failed += code != 0
            except subprocess.TimeoutExpired:
                hung += 1
                verdict = "HUNG"
                if shutil.which("py-spy"):
                    dump = subprocess.run(["py-spy", "dump", "--pid", str(process.pid)], capture_output=True, text=True)
                    (scratch / f"run-{attempt}.stacks").write_text(dump.stdout + dump.stderr)
                process.kill()
                process.wait()
            print(f"run {attempt + 1:2d}/{args.runs}: {verdict} in {time.monotonic() - started:5.1f} s", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(f"{hung} of {args.runs} runs hung, {failed} failed otherwise (logs in {scratch})")
    return 1 if hung or failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak the self-hosted Batch API: several keys submit, poll, cancel and download many small
batches at once through the official `openai` client while the server is killed (SIGKILL) and
restarted once on the same storage. Checks that every batch ends in a terminal state, that every
request of every batch is in its output or error file exactly once, and that no key sees another
key's files or batches.

    .venv/bin/python bench/soak_batch_api.py --keys 3 --batches 4 --rows 12

Prints one line per batch and a summary; exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("completed", "failed", "expired", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, storage: Path, keys: list[str], port: int, log: Path) -> None:
        self.storage, self.keys, self.port, self.log = storage, keys, port, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "NIGHTSHIFT_API_KEYS": ",".join(self.keys), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "nightshift.cli", "serve", "--storage", str(self.storage), "--port",
                   str(self.port), "--chat-model", "tiny", "--poll-s", "0.3"]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("the server did not listen within 60 s")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill()


def call(method, *args, **kwargs):
    """One API call, retried while the server is down (killed and restarting)."""
    deadline = time.time() + 180
    while True:
        try:
            return method(*args, **kwargs)
        except (openai.APIConnectionError, openai.InternalServerError):
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def tenant(port: int, key: str, batches: int, rows: int, results: dict, problems: list) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    created = {}
    for b in range(batches):
        lines = [
            json.dumps({"custom_id": f"{key}-{b}-{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"messages": [{"role": "user", "content": f"{key} batch {b} row {i}"}],
                                 "max_tokens": 8, "temperature": 0}})
            for i in range(rows)
        ]  # fmt: skip
        upload = call(client.files.create, file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
        batch = call(client.batches.create, input_file_id=upload.id, endpoint="/v1/chat/completions",
                     completion_window="24h")  # fmt: skip
        created[batch.id] = [json.loads(line)["custom_id"] for line in lines]
        if b % 3 == 1:  # every third batch cancelled at once, before or while it runs
            call(client.batches.cancel, batch.id)
    pending = set(created)
    deadline = time.time() + 1800
    while pending and time.time() < deadline:
        for batch_id in sorted(pending):
            batch = call(client.batches.retrieve, batch_id)
            if batch.status in TERMINAL:
                pending.discard(batch_id)
                answered = []
                for file_id in (batch.output_file_id, batch.error_file_id):
                    if file_id:
                        text = call(client.files.content, file_id).text
                        answered += [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]
                counts = Counter(answered)
                once = sorted(counts) == sorted(created[batch_id]) and all(n == 1 for n in counts.values())
                results[batch_id] = (key, batch.status, len(answered), once)
                if not once:
                    problems.append(f"{batch_id} ({key}, {batch.status}): rows not exactly once")
        time.sleep(1)
    problems += [f"{batch_id} ({key}): not terminal after 30 min" for batch_id in pending]
    own = {b.id for b in call(client.batches.list, limit=100)}
    if own != set(created):
        problems.append(f"{key} lists batches {sorted(own - set(created))} that are not its own")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="batches per key")
    parser.add_argument("--rows", type=int, default=12, help="requests per batch")
    parser.add_argument("--kill-after-s", type=float, default=40.0, help="SIGKILL the server this long in")
    args = parser.parse_args()
    keys = [f"soak-key-{k}" for k in range(args.keys)]
    root = Path(tempfile.mkdtemp(prefix="nightshift-soak-"))
    server = Server(root / "api", keys, free_port(), root / "server.log")
    server.start()
    results: dict = {}
    problems: list[str] = []
    began = time.monotonic()
    threads = [
        threading.Thread(target=tenant, args=(server.port, key, args.batches, args.rows, results, problems))
        for key in keys
    ]
    for thread in threads:
        thread.start()
    time.sleep(args.kill_after_s)
    server.kill()
    print(f"server killed at {time.monotonic() - began:.0f} s; restarting on the same storage", flush=True)
    server.start()
    for thread in threads:
        thread.join()
    server.stop()
    for batch_id, (key, status, rows, once) in sorted(results.items(), key=lambda item: item[1][0]):
        print(f"{key} {batch_id} {status:9} {rows} rows {'exactly once' if once else 'NOT exactly once'}")
    states = Counter(status for _, status, _, _ in results.values())
    total = args.keys * args.batches
    print(
        f"{len(results)}/{total} batches terminal ({dict(states)}), "
        f"{sum(rows for _, _, rows, _ in results.values())} rows checked, {time.monotonic() - began:.0f} s, "
        f"server log {root / 'server.log'}"
    )
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems or len(results) < total else 0


if __name__ == "__main__":
    sys.exit(main())

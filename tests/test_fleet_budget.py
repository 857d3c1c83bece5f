"""One budget for a fleet: three runs on one engine server, each with an online objective, share
one Prefect global concurrency limit — at no moment do they hold more rows in flight together
than the fleet's most, where on their own each would take that much — and give every slot back.
Real parts: the session's `vllm serve` (warm engine), its Prefect server, three `nightshift run`s."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import httpx
import pytest
from conftest import chat_request, read_jsonl, write_jsonl
from harness import run_cli, start_cli
from local_servers import prefect_server

MOST = 6
RUNS = 3


class Watch:
    """What the server and the Prefect limit hold, read four times a second while the runs go:
    the rows at the server (vLLM's own gauges: running + waiting) and the fleet limit's slots, on
    the Prefect server at `api` (the session's unless given)."""

    def __init__(self, server_url: str, api: str | None = None) -> None:
        from nightshift.engine.fleet import limit_names

        self.metrics_url = server_url.removesuffix("/v1") + "/metrics"
        self.api = api or os.environ["PREFECT_API_URL"]
        self.fleet, self.clients = limit_names(server_url)
        self.seen: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def limit(self, name: str) -> dict | None:
        """The Prefect limit `name` (its size and active slots), or None before a client made it."""
        answer = httpx.get(f"{self.api}/v2/concurrency_limits/{name}", timeout=10)
        return answer.json() if answer.status_code == 200 else None

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            gauges = dict(re.findall(r"^vllm:num_requests_(running|waiting)\{[^}]*\} (\S+)$",
                                     httpx.get(self.metrics_url, timeout=10).text, re.M))  # fmt: skip
            look = {"at_server": sum(int(float(v)) for v in gauges.values())}
            budget, members = self.limit(self.fleet), self.limit(self.clients)
            if budget and members:
                look.update(slots=budget["active_slots"], limit=budget["limit"], members=members["active_slots"])
            self.seen.append(look)


def test_three_runs_on_one_server_share_one_fleet_budget_and_give_it_back(warm_engine, tmp_path):
    """Alone, each run would grow to MOST rows in flight under so lenient an objective; together,
    with the fleet budget, the server never holds more than MOST of their rows (plus one probe a
    run: the objective's one-token requests at the online priority), nor Prefect more slots."""
    rows = [chat_request(f"q-{i:03d}", f"Tell me about topic {i}.", max_tokens=16) for i in range(120)]
    batch = write_jsonl(tmp_path / "in.jsonl", rows)
    with Watch(warm_engine.url) as watch:
        runs = [
            start_cli(
                "run",
                batch,
                "--output",
                tmp_path / f"run{i}",
                "--model",
                "tiny",
                "--engine-url",
                warm_engine.url,
                "--oracle-samples",
                "0",
                "--online-ttft-slo-ms",
                "60000",
                "--engine-max-concurrency",
                str(MOST),
                "--fleet-budget",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            for i in range(RUNS)
        ]
        outputs = [run.communicate(timeout=600)[0] for run in runs]

    for i, (run, output) in enumerate(zip(runs, outputs)):
        assert run.returncode == 0, output[-3000:]
        answered = [line["custom_id"] for line in read_jsonl(tmp_path / f"run{i}" / "output.jsonl")]
        assert sorted(answered) == sorted(r["custom_id"] for r in rows), "every row once"
    most_at_server = max(look["at_server"] for look in watch.seen)
    assert most_at_server <= MOST + RUNS, f"the server held {most_at_server} rows at once: {watch.seen}"
    shared = [look for look in watch.seen if look.get("members", 0) >= 2 * 2]  # two nightly clients at least
    assert shared, f"the runs never overlapped, so nothing was shared: {watch.seen}"
    assert max(look["slots"] for look in shared) >= 2, "the budget grew while the objective held"
    over = [look for look in watch.seen if "slots" in look and not look["slots"] <= look["limit"] <= MOST]
    assert not over, f"slots held over the fleet's limit: {over}"

    budget, members = watch.limit(watch.fleet), watch.limit(watch.clients)
    assert 1 <= budget["limit"] <= MOST, "the fleet's limit, in Prefect, within the most"
    assert budget["active_slots"] == 0 and members["active_slots"] == 0, "every slot given back at the end"


def test_a_fleet_budget_without_an_objective_is_refused_before_any_row(tmp_path):
    batch = write_jsonl(tmp_path / "in.jsonl", [chat_request("q", "Hello")])
    done = run_cli("run", batch, "--output", tmp_path / "run", "--model", "tiny",
                   "--engine-url", "http://127.0.0.1:9/v1", "--fleet-budget")  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "fleet_budget shares the rows in flight an online objective adapts" in done.stderr


@pytest.fixture
def real_prefect_server(tmp_path):
    """`prefect server start`, whose services run (the session's test server runs none): its
    repossessor takes back the slots of expired leases."""
    with prefect_server(tmp_path / "prefect", log=tmp_path / "prefect.log") as api:
        yield api


@pytest.mark.drill
def test_a_client_killed_with_slots_in_hand_loses_them_when_its_leases_expire(
    warm_engine, real_prefect_server, tmp_path
):
    """A drill (`make drills`: it waits out Prefect's shortest lease, 60 s, and its repossessor's
    look every 15 s). A run SIGKILLed while it holds fleet slots gives nothing back itself; its
    leases expire and the slots return to the fleet, and the next run takes them and finishes."""
    from nightshift.engine.fleet import LEASE_S

    api = real_prefect_server
    rows = [chat_request(f"q-{i:03d}", f"Tell me about topic {i}.", max_tokens=64) for i in range(600)]
    batch = write_jsonl(tmp_path / "in.jsonl", rows)
    polite = ["--model", "tiny", "--engine-url", warm_engine.url, "--oracle-samples", "0",
              "--online-ttft-slo-ms", "60000", "--engine-max-concurrency", str(MOST), "--fleet-budget"]  # fmt: skip
    with Watch(warm_engine.url, api) as watch:
        victim = start_cli("run", batch, "--output", tmp_path / "killed", *polite, env={"PREFECT_API_URL": api},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 300
        while not any(look.get("slots", 0) >= 2 for look in watch.seen[-3:]) and time.monotonic() < deadline:
            assert victim.poll() is None, "the run ended before it held its slots"
            time.sleep(0.25)
        victim.kill()
        victim.wait()
        killed_at = time.monotonic()
        assert watch.limit(watch.fleet)["active_slots"] >= 1, "it was killed with slots in hand"
        while time.monotonic() - killed_at < LEASE_S + 90 and watch.limit(watch.fleet)["active_slots"]:
            time.sleep(1)
        freed_after = time.monotonic() - killed_at
    assert freed_after < LEASE_S + 90, f"the killed run's slots still held {freed_after:.0f} s after"
    assert watch.limit(watch.clients)["active_slots"] == 0, "its place among the fleet's clients expired too"
    print(f"the killed run's slots came back {freed_after:.0f} s after the kill")

    done = run_cli("run", batch, "--output", tmp_path / "killed", *polite, env={"PREFECT_API_URL": api})
    assert done.returncode == 0, done.stderr[-3000:]  # it resumes, and takes the slots
    answered = [line["custom_id"] for line in read_jsonl(tmp_path / "killed" / "output.jsonl")]
    assert sorted(answered) == sorted(r["custom_id"] for r in rows), "every row once"

"""One budget for a fleet: three runs on one engine server, each with an online objective, share
one Prefect global concurrency limit — at no moment do they hold more rows in flight together
than the fleet's most, where on their own each would take that much — and give every slot back.
Real parts: the session's `vllm serve` (warm engine), its Prefect server, three `nightshift run`s."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import chat_request, read_jsonl, write_jsonl
from harness import run_cli, start_cli

MOST = 6


def looks_of(run_dir) -> list[tuple[float, int]]:
    """(when, rows in flight allowed) at every look of the run's controller, from its shards' metrics."""
    looks = []
    for metrics in run_dir.glob("shards/*/metrics.json"):
        looks += [(at, limit) for at, _, limit in json.loads(metrics.read_text()).get("politeness") or []]
    return sorted(looks)


@pytest.mark.drill
def test_three_runs_on_one_server_share_one_fleet_budget_and_give_it_back(warm_engine, tmp_path):
    """A drill (`make drills`) for now: its per-look sum reads each run's slots when that run looked,
    so a release can show up after another run's take (seen once in CI: 7 held over 6). Until it
    reads the Prefect limit's own active slots, it is not in `make test`."""
    from prefect.client.orchestration import get_client

    from nightshift.engine.fleet import limit_names

    rows = [chat_request(f"q-{i:03d}", f"Tell me about topic {i}.", max_tokens=16) for i in range(48)]
    batch = write_jsonl(tmp_path / "in.jsonl", rows)
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
        for i in range(3)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]

    for i, (run, output) in enumerate(zip(runs, outputs)):
        assert run.returncode == 0, output[-3000:]
        answered = [line["custom_id"] for line in read_jsonl(tmp_path / f"run{i}" / "output.jsonl")]
        assert sorted(answered) == sorted(r["custom_id"] for r in rows), "every row once"
    # Alone, each run grows to MOST under so lenient an objective; together they held at most MOST.
    events = sorted((at, i, limit) for i in range(3) for at, limit in looks_of(tmp_path / f"run{i}"))
    assert events, "the controllers looked"
    held: dict[int, int] = {}
    for at, i, limit in events:
        held[i] = limit
        assert sum(held.values()) <= MOST, f"at {at} the runs held {held}, over the fleet's {MOST}"
    assert max(limit for _, _, limit in events) >= 2, "the budget grew while the objective held"

    fleet, clients = limit_names(warm_engine.url)
    with get_client(sync_client=True) as client:
        budget = client.read_global_concurrency_limit_by_name(fleet)
        members = client.read_global_concurrency_limit_by_name(clients)
    assert 1 <= budget.limit <= MOST, "the fleet's limit, in Prefect, within the most"
    assert budget.active_slots == 0 and members.active_slots == 0, "every slot given back at the end"


def test_a_fleet_budget_without_an_objective_is_refused_before_any_row(tmp_path):
    batch = write_jsonl(tmp_path / "in.jsonl", [chat_request("q", "Hello")])
    done = run_cli("run", batch, "--output", tmp_path / "run", "--model", "tiny",
                   "--engine-url", "http://127.0.0.1:9/v1", "--fleet-budget")  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "fleet_budget shares the rows in flight an online objective adapts" in done.stderr

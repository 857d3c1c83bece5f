"""Specification of the opt-in result cache: tonight's rows that last night already answered
deterministically cost no generation; nothing is served across a configuration change, and
sampled rows without a seed are always generated."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import chat_request, read_jsonl, write_jsonl


@pytest.fixture(scope="module")
def no_checks():
    from nightshift.config import CanaryConfig

    return CanaryConfig(oracle_samples=0, determinism_samples=0)


def run(tmp_path, name, rows, job, validation):
    from nightshift.flows.run import run_job

    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    report = run_job(str(path), str(tmp_path / name), job, shard_size=4, validation=validation)
    assert report.complete
    run_dir = tmp_path / name
    table = pq.read_table(run_dir / "results.parquet", columns=["custom_id", "source"]).to_pydict()
    outputs = {row["custom_id"]: row for row in read_jsonl(run_dir / "output.jsonl")}
    return run_dir, dict(zip(table["custom_id"], table["source"])), outputs


def test_rows_answered_last_night_are_served_from_the_cache_under_tonights_ids(
    tmp_path, prefect_server, tiny_job, no_checks
):
    job = tiny_job.model_copy(update={"result_cache": str(tmp_path / "cache")})
    shared = [f"Contract clause {i} renews yearly" for i in range(5)]
    last_night = [chat_request(f"mon-{i}", text) for i, text in enumerate(shared)]
    last_night += [
        chat_request("mon-dice", "Roll", temperature=1.0),
        chat_request("mon-seeded", "Roll", temperature=1.0, seed=7),
    ]
    _, sources, monday = run(tmp_path, "monday", last_night, job, no_checks)
    assert set(sources.values()) == {"engine"}

    tonight = [chat_request(f"tue-{i}", text) for i, text in enumerate(shared)]
    tonight += [
        chat_request("tue-new", "A clause never seen"),
        chat_request("tue-dice", "Roll", temperature=1.0),
        chat_request("tue-seeded", "Roll", temperature=1.0, seed=7),
    ]
    run_dir, sources, tuesday = run(tmp_path, "tuesday", tonight, job, no_checks)
    for i in range(5):
        assert sources[f"tue-{i}"] == "cache"
        ours, theirs = tuesday[f"tue-{i}"], monday[f"mon-{i}"]
        assert ours["response"]["body"]["choices"] == theirs["response"]["body"]["choices"]
        assert ours["response"]["body"]["usage"] == theirs["response"]["body"]["usage"]
        assert ours["id"] != theirs["id"] and ours["custom_id"] == f"tue-{i}"
    assert sources["tue-seeded"] == "cache"  # sampled, but with a fixed seed: the same draw
    assert sources["tue-new"] == sources["tue-dice"] == "engine"  # unseen, and sampled without a seed
    report = json.loads((run_dir / "report.json").read_text())
    saved = report["served_without_generating"]
    assert saved["rows"] == 6
    assert saved["tokens"] == sum(
        tuesday[c]["response"]["body"]["usage"]["total_tokens"] for c, s in sources.items() if s == "cache"
    )


def test_a_changed_configuration_serves_nothing_from_the_cache(tmp_path, prefect_server, tiny_job, no_checks):
    job = tiny_job.model_copy(update={"result_cache": str(tmp_path / "cache")})
    rows = [chat_request(f"r{i}", f"Invoice {i} is overdue") for i in range(3)]
    run(tmp_path, "first", rows, job, no_checks)
    renamed = job.model_copy(update={"served_model_name": "tiny-v2"})  # another output fingerprint, same engine
    _, sources, _ = run(tmp_path, "renamed", rows, renamed, no_checks)
    assert set(sources.values()) == {"engine"}

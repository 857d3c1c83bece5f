"""Specification of a batch's lifecycle over the `BatchRuns` interface: what the server does
with each way a run can end. The runs here end as each test scripts them (the real ones — a
`nightshift run` process, a deployment's flow run — are in tests/test_batch_api.py and
tests/deployments/test_work_pools.py)."""

import io
import json

import openai
import pytest
from conftest import chat_request
from fastapi.testclient import TestClient
from scripted_batches import LAST_WORDS, ScriptedRuns, tenants_batches

from nightshift.batch_api.lifecycle import BatchLifecycle
from nightshift.batch_api.local_process import LocalProcessRuns
from nightshift.batch_api.routes import create_app
from nightshift.batch_api.runs import BatchRuns, RunEnd, StartedRun
from nightshift.batch_api.store import Store, owner_of
from nightshift.config import BATCH_CLASS_KEY, BatchApiConfig, EngineSettings

pytestmark = pytest.mark.fast
KEY = "key-alice"


def a_batch(tmp_path, runs: BatchRuns, rows: int = 100, **create):
    """A batch created through the API (the official client), and its lifecycle, whose thread never
    starts: the test takes each of its steps."""
    config = BatchApiConfig(storage=str(tmp_path / "api"), chat_model="tiny", max_attempts=3)
    store = Store(config.storage)
    lifecycle = BatchLifecycle(config, store, runs)
    app = create_app(config, store, lifecycle, {owner_of(KEY)})
    with TestClient(app, base_url="http://nightshift.test") as http:
        client = openai.OpenAI(base_url="http://nightshift.test/v1", api_key=KEY, http_client=http, max_retries=0)
        content = "\n".join(json.dumps(chat_request(f"r{i}", "hi")) for i in range(rows)).encode()
        upload = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="2h", **create
        )
    return lifecycle, store, batch


def test_a_run_that_keeps_getting_lost_is_resumed_until_its_attempts_are_used_then_fails_with_its_last_words(
    tmp_path,
):
    runs = ScriptedRuns(RunEnd.LOST, RunEnd.LOST, RunEnd.LOST)
    lifecycle, store, batch = a_batch(tmp_path, runs)

    for _ in range(4):
        lifecycle.step()

    stored = store.batch(batch.id)
    assert [order.attempt for order in runs.orders] == [0, 1, 2], "each lost run resumed, up to max_attempts"
    assert stored.run_attempts == 3 and stored.run_group == 1003, "the latest run is the one recorded"
    assert stored.batch.status == "failed"
    assert [(e.code, e.message) for e in stored.batch.errors.data] == [("run_failed", LAST_WORDS)]


def test_a_server_killed_mid_batch_is_followed_by_one_that_resumes_the_batch_from_the_storage(tmp_path):
    """The fast representative of the drill tests/test_batch_api.py::test_a_server_killed_mid_batch_
    resumes_it_when_started_again: all a server knows of a batch is on the storage, so a new one finds
    it in_progress, its run not its own (LocalProcessRuns says LOST), and starts it again in the same
    run directory (the run resumes from its checkpoints: tests/test_preemption.py) within the window."""
    first_runs = ScriptedRuns(None)
    killed, _, batch = a_batch(tmp_path, first_runs, rows=40)
    killed.step()
    [first] = first_runs.orders

    config, store = killed.config, Store(killed.config.storage)  # the restarted server: nothing carried over
    stored = store.batch(batch.id)
    assert stored.batch.status == "in_progress" and stored.run_group == 1001
    assert LocalProcessRuns(config, store).ended(stored) is RunEnd.LOST, "a run the server did not start is lost"
    restarted_runs = ScriptedRuns(RunEnd.LOST, None)
    BatchLifecycle(config, store, restarted_runs).step()

    [again] = restarted_runs.orders
    assert (again.attempt, first.attempt) == (1, 0)
    assert (again.run_dir.root, again.input_path, again.deadline) == (
        first.run_dir.root,
        first.input_path,
        first.deadline,
    )
    resumed = store.batch(batch.id)
    assert resumed.batch.status == "in_progress" and resumed.run_attempts == 2


def test_request_counts_follow_the_live_runs_progress_never_a_late_snapshot_of_a_run_taken_over(tmp_path):
    """A frozen run's progress.json write can land after a new run took the directory over (the
    fence cannot recall a write already past it): the batch's counts ignore a snapshot of an epoch
    the directory's lease has passed, and follow the new run's."""
    from nightshift.records import ProgressSnapshot
    from nightshift.runtime.lease import run_lease
    from nightshift.runtime.progress import Progress
    from nightshift.stages.plan import plan

    runs = ScriptedRuns(None, None, None, None)
    lifecycle, store, batch = a_batch(tmp_path, runs, rows=40)
    lifecycle.step()
    [order] = runs.orders
    run = order.run_dir
    plan(str(order.input_path), run, shard_size=100)

    def counted() -> int:
        lifecycle.step()
        return store.batch(batch.id).batch.request_counts.completed

    with run_lease(run):  # the first run, epoch 1
        Progress(run, total=40, completed=10)
        late = ProgressSnapshot.load(run.progress).model_copy(update={"completed": 25})
    assert counted() == 10
    with run_lease(run):  # the run that took the directory over, epoch 2
        Progress(run, total=40, completed=20)
        assert counted() == 20
        late.save(run.progress)  # the first run's write, frozen past the fence, lands now
        assert counted() == 20, "a late snapshot of the run taken over does not move the counts"
        Progress(run, total=40, completed=30)
        assert counted() == 30


def test_a_refused_run_fails_the_batch_at_once_with_the_runs_own_reason(tmp_path):
    runs = ScriptedRuns(RunEnd.REFUSED)
    lifecycle, store, batch = a_batch(tmp_path, runs)

    lifecycle.step()
    assert store.batch(batch.id).batch.status == "in_progress"
    lifecycle.step()

    stored = store.batch(batch.id)
    assert len(runs.orders) == 1, "a configuration error is never retried"
    assert stored.batch.status == "failed" and stored.batch.failed_at
    assert [(e.code, e.message) for e in stored.batch.errors.data] == [("invalid_batch", LAST_WORDS)]


def test_a_run_is_ordered_with_the_endpoints_model_a_twentieth_of_the_batch_per_chunk_and_the_window(tmp_path):
    runs = ScriptedRuns(None)
    lifecycle, store, batch = a_batch(tmp_path, runs, rows=400)

    lifecycle.step()
    lifecycle.step()  # still running: nothing changes

    [order] = runs.orders
    assert order.model == "tiny" and order.chunk_size == 20
    assert order.deadline.timestamp() == batch.expires_at
    assert order.run_dir == store.run_dir(batch.id)
    stored = store.batch(batch.id)
    assert stored.batch.status == "in_progress" and stored.batch.request_counts.total == 400


def test_a_cancelled_batch_stops_its_run_and_every_row_becomes_a_cancelled_error_line(tmp_path):
    runs = ScriptedRuns(None)
    lifecycle, store, batch = a_batch(tmp_path, runs, rows=5)
    lifecycle.step()
    lifecycle.update(batch.id, lambda s: setattr(s.batch, "status", "cancelling"))

    lifecycle.step()

    stored = store.batch(batch.id)
    assert runs.stopped == [batch.id]
    assert stored.batch.status == "cancelled" and stored.batch.cancelled_at
    error_file = store.file(stored.batch.error_file_id, owner_of(KEY))
    errors = [json.loads(line) for line in store.path(error_file.content).read_text().splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(f"r{i}", "batch_cancelled") for i in range(5)]


def test_a_batch_runs_on_its_endpoints_engine_server_when_the_api_names_one_its_key_by_block_name_only(tmp_path):
    runs = ScriptedRuns(None, None)
    lifecycle, store, _ = a_batch(tmp_path, runs, rows=10)
    chat_config = lifecycle.config.model_copy(
        update={"chat_engine_url": "http://gpu-1:8000/v1", "engine_api_key_secret": "fleet-key"}
    )
    lifecycle.config = chat_config

    lifecycle.step()

    [order] = runs.orders
    assert order.job_settings() == {
        "chunk_size": 8,
        "media_sources": "allowed",  # a tenant's rows: data: URLs only, nothing opened
        "engine_url": "http://gpu-1:8000/v1",
        "engine_api_key_secret": "fleet-key",
    }


def test_a_batch_on_a_shared_chat_server_keeps_the_online_objective_in_the_fleets_one_budget(tmp_path):
    runs = ScriptedRuns(None, None)
    lifecycle, store, _ = a_batch(tmp_path, runs, rows=10)
    lifecycle.config = BatchApiConfig.model_validate(
        {
            **lifecycle.config.model_dump(),
            "chat_engine_url": "http://gpu-1:8000/v1",
            "online_ttft_slo_ms": 400,
            "fleet_budget": True,
        }  # fmt: skip
    )

    lifecycle.step()

    [order] = runs.orders
    settings = order.job_settings()
    assert (settings["online_ttft_slo_ms"], settings["fleet_budget"]) == (400, True)
    with pytest.raises(ValueError, match="fleet_budget shares the rows in flight"):
        BatchApiConfig(storage=str(tmp_path / "api"), chat_engine_url="http://gpu-1:8000/v1", fleet_budget=True)


def test_a_poisoned_batch_cancelled_before_validation_ends_alone_and_the_next_batch_still_starts(tmp_path):
    """A file of `[1, 2]`, junk and a non-string custom_id, cancelled before the runner looked at
    it: every line an error line (no custom_id to trust), and the batch behind it is started in
    the same look. Before issue 48 this raised on every look and held every batch behind it."""
    runs = ScriptedRuns(None)
    config = BatchApiConfig(storage=str(tmp_path / "api"), chat_model="tiny")
    store = Store(config.storage)
    lifecycle = BatchLifecycle(config, store, runs)
    app = create_app(config, store, lifecycle, {owner_of(KEY)})
    with TestClient(app, base_url="http://nightshift.test") as http:
        client = openai.OpenAI(base_url="http://nightshift.test/v1", api_key=KEY, http_client=http, max_retries=0)

        def created(lines: list[str]):
            upload = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
            return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                         completion_window="2h"), upload  # fmt: skip

        (poisoned, _), (healthy, healthy_file) = (
            created(["[1, 2]", "not json", '{"custom_id": 7}']),
            created([json.dumps(chat_request("r0", "hi"))]),
        )
        client.batches.cancel(poisoned.id)
        with pytest.raises(openai.ConflictError):  # the input of a batch not yet finished stays
            client.files.delete(healthy_file.id)

    lifecycle.step()

    ended = store.batch(poisoned.id)
    assert ended.batch.status == "cancelled"
    error_file = store.file(ended.batch.error_file_id, owner_of(KEY))
    errors = [json.loads(line) for line in store.path(error_file.content).read_text().splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(None, "batch_cancelled")] * 3
    assert store.batch(healthy.id).batch.status == "in_progress" and len(runs.orders) == 1


def test_a_batch_whose_look_keeps_raising_fails_alone_with_the_reason(tmp_path):
    class Raising(ScriptedRuns):
        def ended(self, stored):
            if stored.batch.id == broken:
                raise OSError("the run directory's disk vanished")
            return super().ended(stored)

    runs = Raising(None, None, None)
    lifecycle, store, batch = a_batch(tmp_path, runs)
    broken = batch.id
    lifecycle.step()  # started: in_progress
    for _ in range(3):
        lifecycle.step()

    stored = store.batch(batch.id)
    assert stored.batch.status == "failed" and runs.stopped == [batch.id]
    [error] = stored.batch.errors.data
    assert error.code == "batch_failed" and "the run directory's disk vanished" in error.message


def test_a_batchs_output_files_expire_as_its_output_expires_after_says_and_take_its_outputs_along(tmp_path):
    """OpenAI's `output_expires_after`: the output and error files expire `seconds` after they are
    made; the retention sweep removes them with every copy of their rows (the run directory), and
    keeps the batch object, as OpenAI does."""
    import time

    runs = ScriptedRuns(None)
    policy = {"anchor": "created_at", "seconds": 7200}
    lifecycle, store, batch = a_batch(tmp_path, runs, rows=5, output_expires_after=policy)
    lifecycle.step()
    lifecycle.update(batch.id, lambda s: setattr(s.batch, "status", "cancelling"))
    lifecycle.step()  # cancelled: every row an error line, in an error file of the batch's policy

    stored = store.batch(batch.id)
    errors = store.file(stored.batch.error_file_id, owner_of(KEY))
    assert errors.file.expires_at == errors.file.created_at + 7200
    assert store.expire(None, int(time.time())) == ([], []), "not yet"
    assert store.run_dir(batch.id).root.exists()

    gone = store.expire(None, errors.file.expires_at)

    ids = {stored.batch.output_file_id, stored.batch.error_file_id}
    assert gone[0] == [] and set(gone[1]) == ids and len(ids) == 2
    assert all(store.file(i, owner_of(KEY)) is None for i in ids)
    assert not store.run_dir(batch.id).root.exists(), "no copy of the expired rows stays"
    assert store.batch(batch.id).batch.status == "cancelled", "the batch object stays"


def test_batches_start_as_many_as_there_is_room_for_the_key_with_the_fewest_running_first(tmp_path):
    """Three batches of one tenant, then one of another, two runs' room: the second tenant's
    batch starts beside the first tenant's first, not behind its queue; as a run ends the next
    turn is the first tenant's second batch, then its third."""

    class TwoAtOnce(ScriptedRuns):
        def __init__(self) -> None:
            super().__init__()
            self.live: set[str] = set()

        def room(self) -> int:
            return 2 - len(self.live)

        def start(self, stored, order) -> StartedRun:
            self.live.add(stored.batch.id)
            return super().start(stored, order)

        def ended(self, stored) -> RunEnd | None:
            return RunEnd.COMPLETED if stored.batch.id not in self.live else None

    runs = TwoAtOnce()
    lifecycle, store, (a1, a2, a3, b1) = tenants_batches(
        tmp_path, runs, [("key-alice", 50), ("key-alice", 50), ("key-alice", 50), ("key-bob", 5)]
    )

    lifecycle.step()
    assert [order.batch_id for order in runs.orders] == [a1.id, b1.id]
    assert [store.batch(b.id).batch.status for b in (a1, a2, a3, b1)] == [
        "in_progress", "validating", "validating", "in_progress"
    ]  # fmt: skip

    runs.live.discard(b1.id)  # the small batch's run ends: one run's room again
    lifecycle.step()
    assert [order.batch_id for order in runs.orders] == [a1.id, b1.id, a2.id]


def test_shortest_batch_first_sends_a_small_batchs_rows_ahead_of_a_large_ones_never_ahead_of_the_floor(tmp_path):
    runs = ScriptedRuns()
    settings = {"chat_engine_url": "http://gpu-1:8000/v1", "row_priority_floor": 10}
    lifecycle, _, (large, small) = tenants_batches(
        tmp_path, runs, [("key-a", 400), ("key-b", 10)], shortest_batch_first=True, **settings
    )
    lifecycle.step()
    priorities = {order.batch_id: order.job_settings()["engine_priority"] for order in runs.orders}
    assert priorities == {large.id: 10 + 9, small.id: 10 + 4}  # lower runs first; the floor holds

    plain = ScriptedRuns()
    lifecycle, _, _ = tenants_batches(tmp_path / "plain", plain, [("key-a", 400)], **settings)
    lifecycle.step()
    assert "engine_priority" not in plain.orders[0].job_settings(), "a FCFS engine server refuses priorities"


def test_a_batch_goes_at_the_servers_class_or_a_lower_one_its_metadata_asks_never_a_higher(tmp_path):
    runs = ScriptedRuns()
    settings = {"chat_engine_url": "http://gpu-1:8000/v1", "priority_class": "nightly"}
    plan = [("key-a", 10), ("key-b", 10, {BATCH_CLASS_KEY: "backfill", "team": "search"})]
    lifecycle, _, (plain, lowered) = tenants_batches(tmp_path, runs, plan, **settings)
    lifecycle.step()
    classes = {order.batch_id: order.job_settings().get("priority_class") for order in runs.orders}
    assert classes == {plain.id: "nightly", lowered.id: "backfill"}
    run = EngineSettings(engine_url="http://gpu-1:8000/v1", priority_class=classes[lowered.id])
    assert (run.run_priority, run.fleet_weight) == (10, 1), "after the nightly batch's 5, a third of its share"

    for asked, why in [("urgent", "above this server's 'nightly'"), ("whenever", "is not one of urgent")]:
        with pytest.raises(openai.BadRequestError, match=why):
            tenants_batches(tmp_path / asked, ScriptedRuns(), [("key-c", 10, {BATCH_CLASS_KEY: asked})], **settings)
    lifecycle, _, _ = tenants_batches(tmp_path / "none", ScriptedRuns(), [("key-d", 10, {BATCH_CLASS_KEY: "nightly"})])
    assert lifecycle.config.priority_class is None, "a server with no class lets a batch ask nightly or lower"

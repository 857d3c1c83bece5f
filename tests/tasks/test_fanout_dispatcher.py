"""Specification of the fan-out dispatcher against a fake Prefect client and work pool (no server,
no workers): bounded in flight, every shard's result back in order, failed child runs dispatched
again under the next idempotency key, a retried parent getting its runs back, a bounded number of
attempts, work done before a crash kept, and groups handed on by workers that cannot start the
engine."""

import contextlib
import hashlib
import logging
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from prefect.client.schemas.objects import StateType

from nightshift.config import EngineConfig, FanOut, JobSpec
from nightshift.errors import EngineCannotStartHere
from nightshift.fleet import fan_out as fanout
from nightshift.fleet import workers
from nightshift.records import GroupManifest, Shard, ShardResult
from nightshift.runtime.rundir import RunDir

pytestmark = pytest.mark.fast

PARENT = "parent-run"


class FakePool:
    """Plays the Prefect server and the GPU workers. Each child run walks through a script of
    states, one step each time the dispatcher reads it; a run that completes writes its group
    manifest as a real child run does. A step `("on", gpu)` is the run starting on worker slot
    `gpu` through the child's real hand-on code: a slot in `cannot_start` refuses to start the
    engine there and the run fails; another carries on. `WROTE_THEN_CRASHED` writes the manifest,
    then the worker dies before reporting."""

    def __init__(self, run_dir, scripts, cannot_start=(), online_workers=2):
        self.run_dir, self.scripts = run_dir, scripts  # scripts(group key, attempt) → list of states
        self.cannot_start, self.online_workers = set(cannot_start), online_workers
        self.engine_starts: list[str] = []  # the slots where an engine start was tried
        self.runs: dict[str, SimpleNamespace] = {}
        self.by_key: dict[str, str] = {}
        self.created: list[str] = []  # idempotency keys of the runs this pool made
        self.most_live = 0

    def run_deployment(self, name, parameters, timeout, idempotency_key, flow_run_name):
        if idempotency_key in self.by_key:  # Prefect answers a known key with the run it made
            return self.runs[self.by_key[idempotency_key]]
        group, attempt = parameters["group"], int(idempotency_key.rsplit(":", 1)[1])
        run = SimpleNamespace(
            id=uuid.uuid4(),
            name=flow_run_name,
            script=list(self.scripts(group, attempt)),
            group=group,
            shards=parameters["shards"],
            state=self._state(StateType.SCHEDULED),
            start_time=None,
            end_time=None,
        )
        self.runs[str(run.id)], self.by_key[idempotency_key] = run, str(run.id)
        self.created.append(idempotency_key)
        self.most_live = max(self.most_live, sum(not r.state.is_final() for r in self.runs.values()))
        return run

    def read_flow_run(self, run_id):
        run = self.runs[str(run_id)]
        if run.script and not run.state.is_final():
            step = run.script.pop(0)
            if isinstance(step, tuple):
                run.state = self._state(StateType.FAILED if self._refused_on(run, gpu=step[1]) else StateType.RUNNING)
                return run
            run.state = self._state(StateType.CRASHED if step == WROTE_THEN_CRASHED else step)
            now = datetime.now(timezone.utc)
            run.start_time = run.start_time or now - timedelta(seconds=1)
            if step in (StateType.COMPLETED, WROTE_THEN_CRASHED):
                run.end_time = now
                results = [
                    ShardResult(
                        shard_index=s["index"],
                        cache_key="k",
                        output_dir="d",
                        chunk_files=[],
                        chunk_sha256=[],
                        rows=s["num_rows"],
                        succeeded=s["num_rows"],
                        failed=0,
                        prompt_tokens=0,
                        completion_tokens=0,
                        regenerated_rows=s["num_rows"],
                        wall_seconds=1.0,
                    )
                    for s in run.shards
                ]
                identity = workers.worker_identity().model_dump()
                GroupManifest(**identity, flow_run_id=str(run.id), cached=0, results=results).save(
                    RunDir(self.run_dir).group_manifest(run.group, str(run.id))
                )
        return run

    def set_flow_run_state(self, run_id, state, force=False):
        self.runs[str(run_id)].state = state

    def _refused_on(self, run, gpu: str) -> bool:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PREFECT__FLOW_RUN_ID", str(run.id))
            env.setenv("CUDA_VISIBLE_DEVICES", gpu)
            with contextlib.suppress(EngineCannotStartHere):
                with workers.handing_on_if_the_engine_cannot_start(RunDir(self.run_dir), run.group, hold_s=0):
                    self.engine_starts.append(gpu)
                    if gpu in self.cannot_start:
                        raise EngineCannotStartHere(f"the engine could not start: no memory on GPU {gpu}")
                return False
        return True

    def read_deployment_by_name(self, name):
        return SimpleNamespace(work_pool_name="gpu")

    def read_workers_for_work_pool(self, work_pool_name):
        return [SimpleNamespace(status=fanout.WorkerStatus.ONLINE)] * self.online_workers

    @staticmethod
    def _state(kind):
        final = kind in (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)
        return SimpleNamespace(type=kind, name=kind.value.title(), is_final=lambda: final)


WROTE_THEN_CRASHED = "wrote-then-crashed"
JOB = JobSpec(engine=EngineConfig(model="m"), served_model_name="m", model_identity="x")


def shard(i: int) -> Shard:
    return Shard(
        index=i, path=f"s{i}", first_row=10 * i, num_rows=10, content_hash=hashlib.sha256(str(i).encode()).hexdigest()
    )


def dispatch(run_dir, pool, groups=5, **settings):
    job = JOB
    shards = [shard(i) for i in range(groups)]
    fan_out = FanOut(deployment="gen/gpu", shards_per_group=1, poll_s=0.001, **settings)
    dispatcher = fanout.Dispatcher(shards, job, RunDir(run_dir), "ckpt", fan_out, pool)
    return shards, dispatcher.run()


@pytest.fixture(autouse=True)
def no_prefect_context(monkeypatch):
    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger("test-fanout"))
    monkeypatch.setattr(fanout, "_parent_flow_run_id", lambda: PARENT)


def use(monkeypatch, pool):
    monkeypatch.setattr(fanout, "run_deployment", pool.run_deployment)
    return pool


def test_at_most_max_in_flight_runs_are_live_and_every_shard_comes_back_in_order(tmp_path, monkeypatch):
    steps = [StateType.PENDING, StateType.RUNNING, StateType.RUNNING, StateType.COMPLETED]
    pool = use(monkeypatch, FakePool(tmp_path, lambda group, attempt: steps))
    shards, (results, cached) = dispatch(tmp_path, pool, groups=5, max_in_flight=2)
    assert pool.most_live == 2 and len(pool.created) == 5
    assert [r.shard_index for r in results] == [s.index for s in shards] and cached == 0


def test_a_failed_child_run_is_dispatched_again_and_a_retried_parent_gets_its_runs_back(tmp_path, monkeypatch):
    def scripts(group, attempt):
        if group == fanout.group_key([shard(0)], JOB) and attempt == 0:
            return [StateType.RUNNING, StateType.FAILED]
        return [StateType.RUNNING, StateType.COMPLETED]

    pool = use(monkeypatch, FakePool(tmp_path, scripts))
    _, (results, _) = dispatch(tmp_path, pool, groups=2)
    retried = [key for key in pool.created if key.endswith(":1")]
    assert len(retried) == 1 and retried[0].startswith(f"{PARENT}:") and len(pool.created) == 3
    assert [r.shard_index for r in results] == [0, 1]

    made = list(pool.created)
    _, (again, _) = dispatch(tmp_path, pool, groups=2)  # the parent flow run retried: same keys
    assert pool.created == made  # no new child run: the failed one is skipped, the finished ones reused
    assert [r.shard_index for r in again] == [0, 1]


def test_a_group_that_keeps_failing_fails_the_stage_naming_the_group(tmp_path, monkeypatch):
    pool = use(monkeypatch, FakePool(tmp_path, lambda group, attempt: [StateType.RUNNING, StateType.CRASHED]))
    with pytest.raises(RuntimeError, match=r"shard group \w+ failed 2 times"):
        dispatch(tmp_path, pool, groups=1, max_attempts=2)
    assert len(pool.created) == 2


def test_a_run_that_wrote_its_results_then_lost_its_worker_is_not_redone(tmp_path, monkeypatch):
    pool = use(monkeypatch, FakePool(tmp_path, lambda group, attempt: [StateType.RUNNING, WROTE_THEN_CRASHED]))
    _, (results, _) = dispatch(tmp_path, pool, groups=3, max_attempts=1)
    assert len(pool.created) == 3, "no group dispatched a second time"
    assert [r.shard_index for r in results] == [0, 1, 2]


def test_a_worker_that_cannot_start_the_engine_hands_its_groups_on_and_tries_once(tmp_path, monkeypatch):
    # the first three runs land on GPU 0, which cannot hold the engine; the pool then gives them to GPU 1
    def scripts(group, attempt):
        return [("on", "0" if attempt < 3 else "1"), StateType.RUNNING, StateType.COMPLETED]

    pool = use(monkeypatch, FakePool(tmp_path, scripts, cannot_start={"0"}))
    _, (results, _) = dispatch(tmp_path, pool, groups=2, max_attempts=1)  # hand-ons are not attempts
    assert [r.shard_index for r in results] == [0, 1]
    assert pool.engine_starts.count("0") == 1, "the unfit worker tried its engine once, then refused at once"
    assert list(workers.unfit_workers(RunDir(tmp_path))) == [f"{workers.worker_identity().host}/gpu-0"]

    made = list(pool.created)
    _, (again, _) = dispatch(tmp_path, pool, groups=2, max_attempts=1)  # the parent retried: same keys
    assert pool.created == made and [r.shard_index for r in again] == [0, 1], "hand-ons are not attempts then either"


def test_when_every_online_worker_cannot_start_the_engine_the_run_fails_with_their_words(tmp_path, monkeypatch):
    def scripts(group, attempt):
        return [("on", str(attempt % 2)), StateType.RUNNING, StateType.COMPLETED]

    pool = use(monkeypatch, FakePool(tmp_path, scripts, cannot_start={"0", "1"}, online_workers=2))
    with pytest.raises(EngineCannotStartHere, match=r"2 refused, 2 online.*no memory on GPU 0.*no memory on GPU 1"):
        dispatch(tmp_path, pool, groups=1)
    assert pool.engine_starts == ["0", "1"] and len(pool.created) == 2, "given up once both had refused"


@pytest.mark.parametrize(
    ("left", "group_s", "seconds_left", "most", "expected"),
    [
        (10, 60, 360, 8, 2),  # 10 × 60 s of work in the 300 s before the last wave must start
        (10, 60, 3600, 8, 1),  # plenty of time: one at a time
        (40, 60, 360, 8, 8),  # more than the pool has: all of it
        (3, 60, 50, 8, 8),  # not even one group fits: everything at once
    ],
)
def test_with_a_deadline_the_fleet_is_as_wide_as_the_measured_pace_needs(left, group_s, seconds_left, most, expected):
    assert fanout.groups_needed(left, group_s, seconds_left, most) == expected


def test_at_the_deadline_nothing_more_is_dispatched_and_waiting_runs_are_cancelled(tmp_path, monkeypatch):
    from nightshift.errors import DeadlineReached
    from nightshift.runtime.deadline import deadline_reached

    monkeypatch.setenv("NIGHTSHIFT_SIGTERM_GRACE_S", "0")
    first, running, waiting = (fanout.group_key([shard(i)], JOB) for i in range(3))
    scripts = {
        first: [StateType.RUNNING, StateType.COMPLETED],
        running: [StateType.RUNNING] * 3 + [StateType.FAILED],  # stops itself at the same deadline
        waiting: [StateType.SCHEDULED] * 1000,  # no worker free to take it
    }
    pool = use(monkeypatch, FakePool(tmp_path, lambda group, attempt: scripts.get(group, [StateType.COMPLETED])))
    read = pool.read_flow_run

    def read_and_pass_the_deadline(run_id):
        run = read(run_id)
        if run.group == first and run.state.type == StateType.COMPLETED:
            deadline_reached.set()
        return run

    pool.read_flow_run = read_and_pass_the_deadline
    fan_out = FanOut(deployment="gen/gpu", shards_per_group=1, poll_s=0.001, max_in_flight=3, heartbeat_timeout_s=1)
    deadline = datetime.now(timezone.utc) + timedelta(hours=1)
    dispatcher = fanout.Dispatcher(
        [shard(i) for i in range(5)], JOB, RunDir(tmp_path), "ckpt", fan_out, pool, None, deadline
    )
    try:
        with pytest.raises(DeadlineReached):
            dispatcher.run()
    finally:
        deadline_reached.clear()
    assert len(pool.created) == 3  # groups 3 and 4 were never dispatched
    by_group = {run.group: run for run in pool.runs.values()}
    assert by_group[waiting].state.type == StateType.CANCELLED
    assert by_group[running].state.type == StateType.FAILED  # waited for, not abandoned while writing

"""Fan-out: the generate stage run on a GPU work pool, one child flow run per shard group.

The parent flow cuts the plan's shards into groups and hands each group to the
shard-generation deployment with `run_deployment`. Each child flow run loads the engine
once and generates its shards through the same cached `generate-shard` tasks as a local run
(same cache keys, same result storage), so checkpoints are shared: a shard finished by any
worker — or by an earlier local run — comes back Cached.

What the dispatcher guarantees:

* **No double dispatch.** Every child run carries the idempotency key
  `<parent flow run>:<group>:<attempt>`. A retried parent re-asks for the same keys and gets
  the runs it already made — finished ones are not redone, live ones are waited for.
* **Bounded in flight.** At most `max_in_flight` groups have a live child run.
* **Lost workers.** A child writes a heartbeat file while it runs. A running child whose
  heartbeat the parent has not seen change for `heartbeat_timeout_s` (its worker or machine
  died: Prefect would show it Running forever), or one left Pending for `start_timeout_s`, is
  marked Crashed and its group dispatched again; the new run resumes from the chunk files the
  lost one wrote. Silence is timed on the parent's clock, and a failed read of a heartbeat
  counts for nothing (nightshift/fleet/workers.py: HeartbeatWatch).
* **Work done is kept.** A child run that wrote its group's manifest and then failed or lost its
  worker (killed between the last write and reporting Completed) has done the group: its
  results are used, the group is not dispatched again.
* **Workers that cannot start the engine hand their work on.** A child run whose worker
  refuses to start the engine (too little free memory) leaves a `.refused` record and fails
  at once; the group is dispatched again without using up an attempt, and that worker's later
  child runs of this run refuse without starting an engine, so the group lands on a worker
  that can hold it. When every online worker of the pool has refused, the run fails with the
  workers' own words (a configuration error: nothing to retry).
* **Stragglers.** A group running longer than `straggler_factor` × the median of finished
  groups is dispatched a second time. The first run to finish wins; the other is cancelled and
  whatever it wrote is superseded (merge keeps one outcome per row).

Chunks, heartbeats and group manifests live in the run directory. With an object-store run
directory (`s3://bucket/runs/x`) the bucket and the Prefect API are all the parent and the
workers share; a local path works when every machine mounts it.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType, WorkerStatus
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling, Crashed

from nightshift.config import CanaryConfig, FanOut, JobSpec
from nightshift.errors import ConfigurationError, DeadlineReached, EngineCannotStartHere
from nightshift.fleet.workers import HeartbeatWatch, read_refusal, unfit_workers
from nightshift.records import GroupManifest, Refusal, Shard, ShardResult
from nightshift.runtime.deadline import deadline_reached
from nightshift.runtime.preemption import grace_seconds
from nightshift.runtime.rundir import VALIDATION_GROUP, RunDir
from nightshift.stages.chunks import shard_cache_key

_FAILED = {StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


@dataclass
class _Group:
    key: str
    shards: list[Shard]
    attempts: int = 0
    handed_on: int = 0  # runs that found no engine could start on their worker: not attempts used up
    live: dict[str, HeartbeatWatch] = field(default_factory=dict)  # flow run id → its heartbeat, as seen here
    winner: str | None = None


def group_key(shards: list[Shard], job: JobSpec) -> str:
    """Names a group by its shards' cache keys: the same work has the same name in every run."""
    keys = "|".join(shard_cache_key(shard, job) for shard in shards)
    return hashlib.sha256(keys.encode()).hexdigest()[:16]


def check_deployments(fan_out: FanOut) -> None:
    """The deployments `fan_out` names exist, before anything is planned or dispatched: a typo
    or a deployment never made is a configuration error, said at once and not retried."""
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in filter(None, (fan_out.deployment, fan_out.validation_deployment)):
            try:
                client.read_deployment_by_name(name)
            except ObjectNotFound:
                raise ConfigurationError(
                    f"fan_out names the deployment {name!r}, which the Prefect server does not have: deploy it "
                    "(scripts/deploy.sh, deployments/prefect.yaml) or name another"
                ) from None


def dispatch_shard_groups(
    shards: list[Shard],
    job: JobSpec,
    run_dir: RunDir,
    checkpoint_storage: str,
    fan_out: FanOut,
    storage: str | None = None,
    deadline: datetime | None = None,
) -> tuple[list[ShardResult], int]:
    """Generate `shards` on the work pool behind `fan_out.deployment`; returns the shards'
    results in order and how many came back from the cache. `storage` (an ObjectStorage
    block's name, never its secrets) is handed on for the workers to load. At `deadline`
    (the parent's timer sets `deadline_reached`) nothing more is dispatched, child runs not
    yet started are cancelled, running ones stop themselves at the same moment, and
    DeadlineReached is raised once none is left writing."""
    with get_client(sync_client=True) as client:
        return Dispatcher(shards, job, run_dir, checkpoint_storage, fan_out, client, storage, deadline).run()


class Dispatcher:
    def __init__(
        self,
        shards: list[Shard],
        job: JobSpec,
        run_dir: RunDir,
        checkpoint_storage: str,
        fan_out: FanOut,
        client,
        storage: str | None = None,
        deadline: datetime | None = None,
    ) -> None:
        size = max(1, fan_out.shards_per_group)
        self.shards, self.job, self.run_dir, self.fan_out, self.client = shards, job, run_dir, fan_out, client
        self.checkpoint_storage, self.storage, self.deadline = checkpoint_storage, storage, deadline
        self.groups = [
            _Group(group_key(shards[i : i + size], job), shards[i : i + size]) for i in range(0, len(shards), size)
        ]
        self.parent = _parent_flow_run_id()
        self.durations: list[float] = []  # seconds of the groups that generated something
        self._width_said: int | None = None
        self.manifests: dict[str, GroupManifest] = {}
        self.logger = get_run_logger()
        self.unfit = UnfitWorkers(client, fan_out.deployment, run_dir, self.logger)

    def run(self) -> tuple[list[ShardResult], int]:
        waiting = deque(self.groups)
        while waiting or self._unfinished():
            if deadline_reached.is_set():
                self._stop_at_deadline()
            while waiting and len(self._unfinished()) < self._width(len(waiting)):
                self._launch(waiting.popleft())
            time.sleep(self.fan_out.poll_s)
            for group in self._unfinished():
                self._check(group)
                if group.winner is None and not group.live:  # every run of it failed or was lost
                    self._launch(group)
        by_index = {r.shard_index: r for m in self.manifests.values() for r in m.results}
        return [by_index[shard.index] for shard in self.shards], sum(m.cached for m in self.manifests.values())

    def _width(self, waiting: int) -> int:
        """Groups live at once: the pool's width (`max_in_flight`); with a deadline, once groups
        have finished, only as many as the measured pace needs to be done by it."""
        if self.deadline is None or not self.durations:
            return self.fan_out.max_in_flight
        left_s = (self.deadline - datetime.now(timezone.utc)).total_seconds()
        width = groups_needed(
            waiting + len(self._unfinished()), statistics.median(self.durations), left_s, self.fan_out.max_in_flight
        )
        if width != self._width_said:
            self._width_said = width
            self.logger.info(
                "deadline %s: %d groups left at ~%.0f s each → %d at once",
                self.deadline.isoformat(timespec="minutes"),
                waiting + len(self._unfinished()),
                statistics.median(self.durations),
                width,
            )
        return width

    def _stop_at_deadline(self) -> None:
        for group in self._unfinished():
            for run_id in list(group.live):
                run = self.client.read_flow_run(uuid.UUID(run_id))
                if run.state and run.state.type in (StateType.SCHEDULED, StateType.PENDING):
                    self._cancel(run_id, group, "the run's deadline passed before it started")
        # Running children hold the same deadline: they stop admitting, flush and end.
        give_up = time.monotonic() + grace_seconds() + self.fan_out.heartbeat_timeout_s
        while time.monotonic() < give_up and any(
            not self._ended(run_id) for group in self._unfinished() for run_id in group.live
        ):
            time.sleep(self.fan_out.poll_s)
        for group in self._unfinished():
            for run_id in list(group.live):
                if not self._ended(run_id):
                    self._cancel(run_id, group, "the run's deadline passed")
        raise DeadlineReached(f"deadline {self.deadline} reached with shard groups unfinished")

    def _ended(self, run_id: str) -> bool:
        run = self.client.read_flow_run(uuid.UUID(run_id))
        return run.state is not None and run.state.is_final()

    def _unfinished(self) -> list[_Group]:
        return [g for g in self.groups if g.winner is None and g.live]

    def _launch(self, group: _Group) -> None:
        # A retried parent asks for the same keys and gets back the runs it made before: one
        # that ended is read like any other (`_check`: kept, handed on or failed) and the next
        # attempt follows.
        if group.attempts - group.handed_on >= self.fan_out.max_attempts:
            raise RuntimeError(f"shard group {group.key} failed {group.attempts} times; see its child runs")
        run = run_deployment(
            self.fan_out.deployment,
            parameters={
                "shards": [s.model_dump() for s in group.shards],
                "job": self.job.model_dump(),
                "run_dir": str(self.run_dir),
                "checkpoint_storage": self.checkpoint_storage,
                "group": group.key,
                "storage": self.storage,
                **({"deadline": self.deadline.isoformat()} if self.deadline else {}),
            },
            timeout=0,
            idempotency_key=f"{self.parent}:{group.key}:{group.attempts}",
            flow_run_name=f"shards-{group.shards[0].index}-{group.shards[-1].index}-try{group.attempts}",
        )
        group.attempts += 1
        group.live[str(run.id)] = _heartbeat_watch(self.run_dir, group.key, run.id, self.fan_out)
        self.logger.info(
            "group %s (shards %s–%s) → child run %s", group.key, group.shards[0].index, group.shards[-1].index, run.name
        )

    def _check(self, group: _Group) -> None:
        for run_id, watch in list(group.live.items()):
            run = self.client.read_flow_run(uuid.UUID(run_id))
            state = run.state.type if run.state else StateType.SCHEDULED
            if state == StateType.COMPLETED:
                self._finish(group, run)
                return
            refusal = read_refusal(self.run_dir, group.key, run_id) if state != StateType.SCHEDULED else None
            if refusal is not None:  # handed back, whether or not it still holds its worker
                del group.live[run_id]
                group.handed_on += 1
                self.unfit.refused(refusal, group.handed_on)
            elif state in _FAILED:
                if self._manifest_written(group, run):
                    self._keep(group, run, f"ended {run.state.name}")
                    return
                del group.live[run_id]
                self.logger.warning("child run %s of group %s ended %s", run.name, group.key, run.state.name)
            elif state in (StateType.RUNNING, StateType.PENDING):
                self._crash_if_lost(group, run, watch.lost(running=state == StateType.RUNNING))

    def _manifest_written(self, group: _Group, run) -> bool:
        return self.run_dir.group_manifest(group.key, str(run.id)).exists()

    def _keep(self, group: _Group, run, how: str) -> None:
        """A run that failed or lost its worker after writing its manifest did the group."""
        self.logger.warning(
            "child run %s of group %s %s after writing its results: they are used, the group is not redone",
            run.name,
            group.key,
            how,
        )
        self._finish(group, run)

    def _finish(self, group: _Group, run) -> None:
        group.winner = str(run.id)
        del group.live[group.winner]
        manifest = self.run_dir.group_manifest(group.key, group.winner)
        if not manifest.exists():
            raise RuntimeError(
                f"child run {run.name} completed but {manifest} is missing: "
                "is the run directory shared with the GPU workers?"
            )
        self.manifests[group.key] = GroupManifest.load(manifest)
        if self.manifests[group.key].cached < len(group.shards) and run.start_time and run.end_time:
            # A group served from the cache says nothing about how long work takes.
            self.durations.append((run.end_time - run.start_time).total_seconds())
        for run_id in list(group.live):  # its duplicates' work is no longer needed
            self._cancel(run_id, group, "its group finished elsewhere")

    def _crash_if_lost(self, group: _Group, run, lost: str | None) -> None:
        if lost:
            done = self._manifest_written(group, run)
            then = "the results it wrote are used" if done else "the group was dispatched again"
            self.client.set_flow_run_state(run.id, Crashed(message=f"{lost}: its worker is gone; {then}"), force=True)
            if done:
                self._keep(group, run, "lost its worker")
                return
            del group.live[str(run.id)]
            self.logger.warning("child run %s lost its worker; re-dispatching group %s", run.name, group.key)
            return
        running_s = (_utcnow() - run.start_time).total_seconds() if run.start_time else 0.0
        median = statistics.median(self.durations) if self.durations else None
        if (
            median is not None
            and len(group.live) == 1
            and running_s > max(self.fan_out.straggler_factor * median, self.fan_out.straggler_min_s)
        ):
            self.logger.warning(
                "group %s running %.0f s (median %.0f s): dispatching a duplicate", group.key, running_s, median
            )
            self._launch(group)

    def _cancel(self, run_id: str, group: _Group, why: str) -> None:
        run = self.client.read_flow_run(uuid.UUID(run_id))
        if run.state and run.state.type in (StateType.SCHEDULED, StateType.PENDING):
            self.client.set_flow_run_state(run.id, Cancelled(message=why), force=True)
        elif run.state and not run.state.is_final():
            self.client.set_flow_run_state(run.id, Cancelling(message=why), force=True)
        self.logger.info("cancelled %s of group %s: %s", run.name, group.key, why)
        del group.live[run_id]


class UnfitWorkers:
    """The worker slots that could not start this run's engine (as their child runs left them in
    the run directory), against the pool's online workers: when every one has refused, no worker
    will take the work and the run fails. Where the server cannot say how many workers are online,
    one group handed on `HAND_ON_LIMIT` times is taken to mean the same."""

    HAND_ON_LIMIT = 20

    def __init__(self, client, deployment: str, run_dir: RunDir, logger) -> None:
        self.client, self.deployment, self.run_dir, self.logger = client, deployment, run_dir, logger
        self.said: set[str] = set()

    def refused(self, refusal: Refusal, handed_on: int) -> None:
        slot = refusal.slot
        if slot not in self.said:
            self.said.add(slot)
            self.logger.warning(
                "worker %s cannot start the engine (%s): its work goes to other workers", slot, refusal.reason
            )
        unfit = unfit_workers(self.run_dir) | {slot: refusal.reason}
        online = self._online_workers()
        if len(unfit) >= online if online is not None else handed_on >= self.HAND_ON_LIMIT:
            said = "; ".join(f"{name}: {reason}" for name, reason in sorted(unfit.items()))
            raise EngineCannotStartHere(
                f"no worker of the pool behind {self.deployment} could start the engine "
                f"({len(unfit)} refused, {online if online is not None else 'unknown'} online): {said}"
            )

    def _online_workers(self) -> int | None:
        try:
            pool = self.client.read_deployment_by_name(self.deployment).work_pool_name
            workers = self.client.read_workers_for_work_pool(work_pool_name=pool)
        except Exception:  # the count only hastens the verdict; HAND_ON_LIMIT still bounds it
            return None
        return sum(worker.status == WorkerStatus.ONLINE for worker in workers)


def groups_needed(groups_left: int, group_s: float, seconds_left: float, most: int) -> int:
    """Groups to run at once so that `groups_left` groups of `group_s` seconds each are done in
    `seconds_left`: the last wave starts by `seconds_left − group_s`. Never more than `most`;
    all of them when even that cannot make it."""
    if seconds_left <= group_s:
        return most
    return max(1, min(most, math.ceil(groups_left * group_s / (seconds_left - group_s))))


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _parent_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return flow_run.id or uuid.uuid4().hex


def validate_on_pool(
    run_dir: RunDir, job: JobSpec, validation: CanaryConfig, fan_out: FanOut, storage: str | None = None
) -> str:
    """Run the canary checks as a flow run of `fan_out.validation_deployment` on the GPU pool,
    where an engine for the re-run and the reference model fit; returns that flow run's id once
    it has written its verdict to the run directory. A run that fails or loses its worker is
    dispatched again, up to `fan_out.max_attempts` runs; one whose worker cannot start the engine
    is handed on without using up an attempt, as shard groups are."""
    logger = get_run_logger()
    parent = _parent_flow_run_id()
    with get_client(sync_client=True) as client:
        unfit = UnfitWorkers(client, fan_out.validation_deployment, run_dir, logger)
        attempt = handed_on = 0
        while attempt - handed_on < fan_out.max_attempts:
            run = run_deployment(
                fan_out.validation_deployment,
                parameters={
                    "run_dir": str(run_dir),
                    "job": job.model_dump(),
                    "validation": validation.model_dump(),
                    "storage": storage,
                },
                timeout=0,
                idempotency_key=f"{parent}:{VALIDATION_GROUP}:{attempt}",  # a retried parent gets it back
                flow_run_name=f"validation-try{attempt}",
            )
            attempt += 1
            logger.info("canary checks → child run %s on %s", run.name, fan_out.validation_deployment)
            state = _followed_to_the_end(client, run.id, run_dir, fan_out)
            if state == StateType.COMPLETED:
                return str(run.id)
            if run_dir.validation_verdict(str(run.id)).exists():
                logger.warning(
                    "validation run %s ended %s after writing its verdict: it is used", run.name, state.value
                )
                return str(run.id)
            if (refusal := read_refusal(run_dir, VALIDATION_GROUP, str(run.id))) is not None:
                handed_on += 1
                unfit.refused(refusal, handed_on)
                continue
            logger.warning("validation run %s ended %s", run.name, state.value)
    raise RuntimeError(f"the canary checks failed to run {fan_out.max_attempts} times; see their child runs")


def _followed_to_the_end(client, run_id: uuid.UUID, run_dir: RunDir, fan_out: FanOut) -> StateType:
    watch = _heartbeat_watch(run_dir, VALIDATION_GROUP, run_id, fan_out)
    while True:
        run = client.read_flow_run(run_id)
        state = run.state.type if run.state else StateType.SCHEDULED
        if state == StateType.COMPLETED or state in _FAILED:
            return state
        if state in (StateType.RUNNING, StateType.PENDING):
            if read_refusal(run_dir, VALIDATION_GROUP, str(run_id)) is not None:  # handed back
                return state
            if lost := watch.lost(running=state == StateType.RUNNING):
                client.set_flow_run_state(run_id, Crashed(message=f"{lost}: its worker is gone"), force=True)
                return StateType.CRASHED
        time.sleep(fan_out.poll_s)


def _heartbeat_watch(run_dir: RunDir, group: str, run_id: uuid.UUID, fan_out: FanOut) -> HeartbeatWatch:
    return HeartbeatWatch(run_dir, group, str(run_id), fan_out.heartbeat_timeout_s, fan_out.start_timeout_s)

"""The GPU-worker side of fan-out: what a child flow run leaves in the run directory so the
parent can follow it through nothing but shared storage — heartbeats while it runs, a manifest
of what it did, and which machine and GPU it was.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from nightshift.errors import EngineCannotStartHere
from nightshift.records import GroupManifest, Heartbeat, Refusal, ShardResult, UnfitWorker, WorkerIdentity
from nightshift.runtime.rundir import RunDir

HEARTBEAT_INTERVAL_S = 5.0
# A refusing child keeps its worker's slot this long, so the pool hands the group it gave back
# to a worker that can take it instead of straight back to this one.
UNFIT_HOLD_S = 60.0


@contextmanager
def heartbeat(run_dir: RunDir, group: str):
    """Rewrite `groups/<group>/<flow run id>.alive` every few seconds while the body runs: its
    content carries the time (an object store has no mtime to touch)."""
    from prefect.runtime import flow_run

    path = run_dir.group_heartbeat(group, flow_run.id)
    identity = worker_identity().model_dump()

    def beat_now() -> None:
        Heartbeat(**identity, heartbeat=time.time()).save(path)

    beat_now()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                beat_now()
            except OSError:  # a missed beat is not fatal; HEARTBEAT_TIMEOUT spans several
                continue

    thread = threading.Thread(target=beat, name="nightshift-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def worker_identity() -> WorkerIdentity:
    """Which machine and which worker slot (GPU) runs this process."""
    return WorkerIdentity(
        host=socket.gethostname(),
        pid=os.getpid(),
        worker_pid=os.getppid(),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def worker_slot(identity: WorkerIdentity) -> str:
    """One worker slot of the fleet: a machine and the GPUs it was given."""
    devices = identity.cuda_visible_devices
    return f"{identity.host}/gpu-{devices}" if devices is not None else f"{identity.host}/all-gpus"


def read_refusal(run_dir: RunDir, group: str, flow_run_id: str) -> Refusal | None:
    """What a child run that could not start the engine on its worker left behind, if it did."""
    try:
        return Refusal.load(run_dir.group_refusal(group, flow_run_id))
    except (OSError, ValueError):
        return None


def unfit_workers(run_dir: RunDir) -> dict[str, str]:
    """Every worker slot that could not start this run's engine, with what it said."""
    found = {}
    for marker in run_dir.every_unfit_worker():
        try:
            record = UnfitWorker.load(marker)
        except (OSError, ValueError):
            continue
        found[record.slot] = record.reason
    return found


@contextmanager
def handing_on_if_the_engine_cannot_start(run_dir: RunDir, group: str, hold_s: float = UNFIT_HOLD_S):
    """A child run whose worker cannot start the engine hands its group back to the pool.

    The first refusal on a worker slot is remembered in the run directory, so the worker's later
    child runs of this run refuse at once instead of starting the engine again; each refusal
    leaves `<flow run id>.refused` beside the group's heartbeats, which the parent reads as
    "dispatch this group again, not an attempt used up" (nightshift/fleet/fan_out.py). The run then holds
    its worker for `hold_s` before failing, so that worker does not take the group straight back."""
    from prefect.runtime import flow_run

    identity = worker_identity()
    slot = worker_slot(identity)
    marker = run_dir.unfit_worker(slot)
    try:
        earlier = UnfitWorker.load(marker).reason
    except (OSError, ValueError):
        earlier = None
    try:
        if earlier is not None:
            raise EngineCannotStartHere(f"this worker could not start the engine earlier in this run: {earlier}")
        yield
    except EngineCannotStartHere as refusal:
        reason = earlier or str(refusal)
        if earlier is None:
            UnfitWorker(**identity.model_dump(), slot=slot, reason=reason).save(marker)
        Refusal(**identity.model_dump(), slot=slot, reason=reason, engine_started=earlier is None).save(
            run_dir.group_refusal(group, flow_run.id)
        )
        time.sleep(hold_s)
        raise


def write_group_manifest(run_dir: RunDir, group: str, results: list[ShardResult], cached: int) -> Path:
    from prefect.runtime import flow_run

    path = run_dir.group_manifest(group, flow_run.id)
    GroupManifest(**worker_identity().model_dump(), flow_run_id=flow_run.id, cached=cached, results=results).save(path)
    return path


class HeartbeatWatch:
    """The parent's view of one child run's heartbeat, timed on the parent's own clock.

    A run is lost when its heartbeat has not changed for `timeout_s` since the parent first saw
    it running (or it never beat in that time), or when it has been pending — taken by a worker
    that has not started it — for `start_timeout_s` (a pod pulling an image or waiting for a
    node may take minutes). The worker's clock is never compared with the parent's, and a read
    that fails (a storage hiccup) says nothing either way: one failed read must not crash a
    run that is working."""

    def __init__(
        self, run_dir: RunDir, group: str, run_id: str, timeout_s: float, start_timeout_s: float, clock=None
    ) -> None:
        self.path = run_dir.group_heartbeat(group, run_id)
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.clock = clock or time.monotonic
        self.pending_since: float | None = None
        self.changed_at: float | None = None  # when the beat was last seen to change (or running first seen)
        self.last_beat: str | None = None

    def lost(self, running: bool) -> str | None:
        """Why the run has lost its worker, or None while it may still be working."""
        now = self.clock()
        if not running:
            if self.pending_since is None:
                self.pending_since = now
            if now - self.pending_since > self.start_timeout_s:
                return f"taken by a worker but not started in {self.start_timeout_s:.0f} s"
            return None
        try:
            beat = self.path.read_text()
        except FileNotFoundError:
            beat = None
        except OSError:  # the silence is timed afresh from the next read that works
            self.changed_at = None
            return None
        if self.changed_at is None or beat != self.last_beat:
            self.changed_at, self.last_beat = now, beat
            return None
        if now - self.changed_at <= self.timeout_s:
            return None
        if beat is None:
            return f"no heartbeat in its first {self.timeout_s:.0f} s running"
        return f"no heartbeat for {self.timeout_s:.0f} s"

"""A batch as a `nightshift run` process on this machine, `max_running_batches` at a time.

The run keeps the completion window itself (its `--deadline`: it ends at the window with its
finished rows merged, exit status 4). It dies with the server (a killed server's restart resumes
it instead) and runs in a process group of its own, so that stopping it takes the engine's
processes too — and a restarted server can kill what a killed one's run left behind.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from nightshift.batch_api.runs import STOP_GRACE_S, BatchRuns, RunEnd, RunOrder, StartedRun
from nightshift.batch_api.store import Store, StoredBatch
from nightshift.config import BatchApiConfig
from nightshift.errors import ExitStatus
from nightshift.runtime.processes import on_parent_death, started_at
from nightshift.runtime.storage import is_url

log = logging.getLogger("nightshift.serve")

# `nightshift run`'s exit statuses (nightshift.cli), as a batch's lifecycle reads them
ENDS_BY_EXIT_STATUS = {
    ExitStatus.COMPLETE: RunEnd.COMPLETED,
    ExitStatus.VALIDATION_FAILED: RunEnd.GATE_FAILED,
    ExitStatus.EXPIRED: RunEnd.EXPIRED,
    ExitStatus.CONFIGURATION: RunEnd.REFUSED,
}


class LocalProcessRuns(BatchRuns):
    def __init__(self, config: BatchApiConfig, store: Store) -> None:
        self.store, self.most = store, config.max_running_batches
        self.children: dict[str, subprocess.Popen] = {}
        # a bucket holds no log files: they stay on this machine
        self.logs = Path(tempfile.gettempdir()) / "nightshift-serve" if is_url(config.storage) else None

    def room(self) -> int:
        return max(0, self.most - sum(child.poll() is None for child in self.children.values()))

    def start(self, stored: StoredBatch, order: RunOrder) -> StartedRun:
        _kill_leftovers(stored)
        command = [
            sys.executable, "-m", "nightshift.cli", "run", str(order.input_path), "--output", str(order.run_dir),
            "--model", order.model, "--deadline", order.deadline.isoformat(),
        ]  # fmt: skip
        for name, value in order.job_settings().items():
            for one in value if isinstance(value, list) else [value]:  # a repeatable option: once each
                command += [f"--{name.replace('_', '-')}", str(one)]
        with open(self._log_path(order.batch_id), "ab") as log_file:
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                # A cancelled or expired batch stops now: rows in flight get 2 s, not a spot VM's 20.
                env={
                    "NIGHTSHIFT_SIGTERM_GRACE_S": "2",
                    **run_environment(order),
                    "NIGHTSHIFT_RUN_NAME": f"batch {order.batch_id}",
                },
            )
        self.children[order.batch_id] = child
        record = {"run_group": child.pid, "run_host": socket.gethostname(), "run_started": started_at(child.pid)}
        return StartedRun(f"run started ({order.model})", record=record)

    def running(self, stored: StoredBatch) -> bool:
        child = self.children.get(stored.batch.id)
        return child is not None and child.poll() is None

    def ended(self, stored: StoredBatch) -> RunEnd | None:
        child = self.children.get(stored.batch.id)
        if child is None:  # the server restarted: its run died with the last one
            return RunEnd.LOST
        code = child.poll()
        if code is None:
            return None
        del self.children[stored.batch.id]
        end = ENDS_BY_EXIT_STATUS.get(code, RunEnd.LOST)
        if end is RunEnd.LOST:
            log.warning("batch %s: run exited %s", stored.batch.id, code)
        return end

    def stop(self, stored: StoredBatch) -> None:
        child = self.children.pop(stored.batch.id, None)
        if child is not None:
            _stop_child(child)
        _kill_leftovers(stored)

    def last_words(self, stored: StoredBatch) -> str:
        """The run's own one-line reason (`nightshift: …`), else its log's last line."""
        try:
            lines = self._log_path(stored.batch.id).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "the batch's run never started"
        said = [line.removeprefix("nightshift: ") for line in lines if line.startswith("nightshift: ")]
        return (said or lines or ["the batch's run failed without a word"])[-1][:2000]

    def shutdown(self) -> None:
        """Each run saves its finished rows (SIGTERM) and ends; the next server resumes it."""
        for child in self.children.values():
            _stop_child(child)

    def _log_path(self, batch_id: str) -> Path:
        folder = self.logs or Path(self.store.root) / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{batch_id}.log"


def _stop_child(child: subprocess.Popen) -> None:
    """SIGTERM: the run saves its finished rows and exits 143; then its whole group goes."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the engine's processes, whatever the run left behind
    except ProcessLookupError:
        pass
    child.wait()


# What a batch's run is given of the server's environment: not the tenants' keys nor the webhooks'
# signing secret, and the engine servers' key only where the run talks to one.
WITHHELD = ("NIGHTSHIFT_API_KEYS", "NIGHTSHIFT_WEBHOOK_SECRET")


def run_environment(order: RunOrder) -> dict[str, str]:
    withheld = set(WITHHELD) | (set() if order.engine.get("engine_url") else {"NIGHTSHIFT_ENGINE_API_KEY"})
    return {name: value for name, value in os.environ.items() if name not in withheld}


def _kill_leftovers(stored: StoredBatch) -> None:
    """A server killed with -9 takes its run along (`_die_with_parent`), but not the engine
    processes that run started: they would hold the machine's cores and memory forever. Only
    processes of the run's group started since the run did, on this boot, are its own: after a
    reboot, or with no start time recorded, a process group id may be anyone's."""
    if stored.run_group is None or stored.run_host != socket.gethostname() or stored.run_started is None:
        return
    import psutil

    if psutil.boot_time() > stored.run_started:
        return
    # The run (its group's leader) is gone: it died with its server, or `stop` reaped it. A live
    # process of that pid took the number since — Linux hands out no pid still in use as a group
    # id, so then the run left no process behind, and this group (its create time later than the
    # run's start) is another program's, never to be killed. pid_max is 32,768 on many hosts. A
    # zombie run (killed with its server, never reaped) is gone: its engine processes are leftovers.
    if started_at(stored.run_group) is not None:
        return
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == stored.run_group and process.create_time() >= stored.run_started - 1:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    for process in members:
        log.warning("batch %s: killing %s left over from its last run", stored.batch.id, process.pid)
        try:
            process.kill()
        except psutil.Error:
            pass


def _die_with_parent() -> None:
    """A run must not outlive a killed server: the restarted server resumes it instead."""
    on_parent_death(signal.SIGKILL)

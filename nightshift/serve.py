"""`nightshift serve`: OpenAI's Batch API (/v1/files, /v1/batches) on your own machines.

Code written for OpenAI's batch flow runs unchanged with `base_url` pointed here: upload a JSONL,
create a batch, poll it, download its output and error files. Each batch is a Nightshift run
(`nightshift run` in a child process: plan → generate → merge → validate → report, a Prefect
flow run on the server's Prefect API when PREFECT_API_URL is set), one at a time, oldest first.

The runner owns the lifecycle: validating → in_progress → finalizing → completed; failed (the
file is not a valid batch, or its run cannot start); cancelling → cancelled and expired (the
rows already finished in the output file, every other row an error line). Everything is on the
storage (nightshift.batch_api): a server killed mid-batch resumes the batch when started again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from nightshift.batch_api import (
    TERMINAL,
    BatchError,
    BatchErrors,
    BatchObject,
    BatchUsage,
    RequestCounts,
    Store,
    StoredBatch,
    StoredFile,
    check_batch_input,
    new_id,
    owner_of,
)
from nightshift.batch_routes import create_app
from nightshift.config import BatchApiConfig, ConfigurationError
from nightshift.deadline import EXIT_EXPIRED
from nightshift.records import Plan, ProgressSnapshot, RunReport, Verdict
from nightshift.rundir import RunDir
from nightshift.storage import is_url, location, written_whole

log = logging.getLogger("nightshift.serve")

CANCELLED_MESSAGE = "The batch was cancelled before this request ran."
# A run past its window stops itself (its --deadline); the server closes it only if it has not
# within this margin (rows in flight get 2 s, then the merge).
RUN_EXPIRY_MARGIN_S = 120
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
STOP_GRACE_S = 90.0  # a run told to stop flushes its finished rows first


def api_keys(config: BatchApiConfig) -> set[str]:
    """Owners (digests) of the accepted keys, from a Prefect Secret block or NIGHTSHIFT_API_KEYS."""
    if config.api_key_secret:
        from prefect.blocks.system import Secret

        value = Secret.load(config.api_key_secret).get()
        keys = value if isinstance(value, list) else str(value).split(",")
    else:
        keys = os.environ.get("NIGHTSHIFT_API_KEYS", "").split(",")
    keys = [k.strip() for k in keys if k.strip()]
    if not keys:
        raise ConfigurationError(
            "no API keys: set NIGHTSHIFT_API_KEYS (comma-separated) or name a Prefect Secret block "
            "with --api-key-secret"
        )
    return {owner_of(k) for k in keys}


class BatchRunner:
    """Turns stored batches into Nightshift runs and follows them; the only writer of a batch's
    status besides the API's create and cancel (all under one lock)."""

    def __init__(self, config: BatchApiConfig, store: Store) -> None:
        self.config, self.store = config, store
        self.lock = threading.RLock()
        self.children: dict[str, subprocess.Popen] = {}
        self.logs = Path(tempfile.gettempdir()) / "nightshift-serve" if is_url(config.storage) else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nightshift-batch-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop following; running batches are told to save their finished rows and stay
        in_progress, so the next server resumes them."""
        self._stop.set()
        self._thread.join(timeout=30)
        for child in self.children.values():
            _stop_child(child)

    def update(self, batch_id: str, change) -> StoredBatch:
        with self.lock:
            stored = self.store.batch(batch_id)
            change(stored)
            self.store.save_batch(stored)
            return stored

    def _loop(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                self.step()
            except Exception:  # one bad look must not end the runner; the next one tries again
                log.exception("batch runner step failed")

    def step(self) -> None:
        for stored in self.store.batches():
            if stored.batch.status not in TERMINAL and not self._stop.is_set():
                self._advance(stored)

    def _advance(self, stored: StoredBatch) -> None:
        batch = stored.batch
        if batch.status == "cancelling":
            self._close(batch.id, "cancelled", "batch_cancelled", CANCELLED_MESSAGE)
        elif self._window_closed(stored):
            self._close(batch.id, "expired", "batch_expired", EXPIRED_MESSAGE)
        elif batch.status == "validating":
            self._validate_or_start(stored)
        else:
            self._follow(stored)

    def _window_closed(self, stored: StoredBatch) -> bool:
        """Past the completion window. A running batch run stops itself at the window with its
        rows merged (its --deadline), so it gets a margin to do so before the server closes it."""
        now = time.time()
        if now < stored.batch.expires_at:
            return False
        return now >= stored.batch.expires_at + RUN_EXPIRY_MARGIN_S or not self._running(stored)

    def _running(self, stored: StoredBatch) -> bool:
        if self.config.deployment:
            if not stored.flow_run_id:
                return False
            state = self._flow_run(stored).state
            return state is not None and not state.is_final()
        child = self.children.get(stored.batch.id)
        return child is not None and child.poll() is None

    def _validate_or_start(self, stored: StoredBatch) -> None:
        batch = stored.batch
        if not batch.request_counts.total:
            requests, errors = check_batch_input(self._input(batch), batch.endpoint, self.config.max_requests)
            if errors:
                self._fail(batch.id, errors)
                return
            stored = self.update(batch.id, lambda s: setattr(s.batch.request_counts, "total", requests))
        # Here, one run at a time, oldest first; a work pool decides its own concurrency.
        if self.config.deployment or not any(child.poll() is None for child in self.children.values()):
            self._launch(stored)

    def _launch(self, stored: StoredBatch) -> None:
        batch = stored.batch
        if stored.run_attempts >= self.config.max_attempts:
            self._fail(batch.id, [BatchError(code="run_failed", message=self._last_words(stored))])
            return
        model = self.config.embedding_model if batch.endpoint == "/v1/embeddings" else self.config.chat_model
        # Progress and checkpoints at least every twentieth of the batch: request_counts move.
        chunk_size = max(8, min(512, batch.request_counts.total // 20))
        if self.config.deployment:
            self._dispatch(stored, model, chunk_size)
            return
        command = [
            sys.executable, "-m", "nightshift.cli", "run", str(self._input(batch)),
            "--output", str(self.store.run_dir(batch.id)), "--model", model, "--chunk-size", str(chunk_size),
            # the run keeps the completion window itself: it ends at it with its rows merged (exit 4)
            "--deadline", datetime.fromtimestamp(batch.expires_at, timezone.utc).isoformat(),
        ]  # fmt: skip
        with open(self._log_path(batch.id), "ab") as log_file:
            self.children[batch.id] = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                # A cancelled or expired batch stops now: rows in flight get 2 s, not a spot VM's 20.
                env={"NIGHTSHIFT_SIGTERM_GRACE_S": "2", **os.environ, "NIGHTSHIFT_RUN_NAME": f"batch {batch.id}"},
            )

        def started(s: StoredBatch) -> None:
            s.run_attempts += 1
            s.run_group, s.run_host = self.children[batch.id].pid, socket.gethostname()
            s.batch.status = "finalizing" if s.batch.status == "finalizing" else "in_progress"
            s.batch.in_progress_at = s.batch.in_progress_at or int(time.time())

        self.update(batch.id, started)
        log.info("batch %s: run started (%s, attempt %d)", batch.id, model, stored.run_attempts + 1)

    def _dispatch(self, stored: StoredBatch, model: str, chunk_size: int) -> None:
        """The batch as a flow run of the deployment: its work pool's workers run it, reading
        the input from and writing the run directory to this server's storage."""
        from prefect.deployments import run_deployment

        from nightshift.jobs import make_job

        batch = stored.batch
        run_dir = self.store.run_dir(batch.id)
        run = run_deployment(
            self.config.deployment,
            parameters={
                "input_path": str(self._input(batch))
                if is_url(str(run_dir))
                else str(Path(self._input(batch)).resolve()),
                "run_dir": str(run_dir) if is_url(str(run_dir)) else str(Path(run_dir).resolve()),
                "job": make_job(model, chunk_size=chunk_size).model_dump(),
                "deadline": datetime.fromtimestamp(batch.expires_at, timezone.utc).isoformat(),
                "fan_out": None,
            },
            timeout=0,
            idempotency_key=f"{batch.id}:{stored.run_attempts}",  # a restarted server gets the same run back
            flow_run_name=f"batch {batch.id}",
        )

        def started(s: StoredBatch) -> None:
            s.run_attempts += 1
            s.flow_run_id = str(run.id)
            s.batch.status = "finalizing" if s.batch.status == "finalizing" else "in_progress"
            s.batch.in_progress_at = s.batch.in_progress_at or int(time.time())

        self.update(batch.id, started)
        log.info("batch %s: flow run %s of %s (attempt %d)", batch.id, run.name, self.config.deployment,
                 stored.run_attempts + 1)  # fmt: skip

    def _flow_run(self, stored: StoredBatch):
        import uuid

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(uuid.UUID(stored.flow_run_id))

    def _follow_flow_run(self, stored: StoredBatch) -> None:
        batch = stored.batch
        state = self._flow_run(stored).state
        if state is None or not state.is_final():
            self._count_progress(stored)
            return
        if state.is_completed():
            self._finish(batch.id, "expired" if state.name == "Expired" else "completed")
            return
        validation = RunDir(self.store.run_dir(batch.id)).validation
        if state.is_failed() and validation.exists() and not Verdict.load(validation).validated:
            self._finish(batch.id, "failed", gate_failed=True)
            return
        log.warning("batch %s: flow run ended %s (%s); resuming it", batch.id, state.name, state.message)
        self._launch(stored)

    def _follow(self, stored: StoredBatch) -> None:
        batch = stored.batch
        if self.config.deployment and stored.flow_run_id:
            self._follow_flow_run(stored)
            return
        child = self.children.get(batch.id)
        if child is None:  # the server restarted, or the last run crashed: resume from checkpoints
            _kill_leftovers(stored)
            self._launch(stored)
            return
        code = child.poll()
        if code is None:
            self._count_progress(stored)
            return
        del self.children[batch.id]
        if code in (0, 3):  # 3: the outputs are there, but the canary gate failed
            self._finish(batch.id, "completed" if code == 0 else "failed", gate_failed=code == 3)
        elif code == EXIT_EXPIRED:  # the window closed: finished rows merged, the rest batch_expired
            self._finish(batch.id, "expired")
        elif code == 2:  # the input or the configuration is refused: retrying cannot help
            self._fail(batch.id, [BatchError(code="invalid_batch", message=self._last_words(stored))])
        else:
            log.warning("batch %s: run exited %s; resuming it", batch.id, code)

    def _count_progress(self, stored: StoredBatch) -> None:
        run_dir = RunDir(self.store.run_dir(stored.batch.id))
        try:
            progress = ProgressSnapshot.load(run_dir.progress)
            canaries = Plan.load(run_dir.plan_manifest).canary_rows
        except (FileNotFoundError, ValueError):
            return
        done = max(0, min(progress.completed - canaries, stored.batch.request_counts.total))

        def counted(s: StoredBatch) -> None:
            s.batch.request_counts.completed = done
            if done >= s.batch.request_counts.total and s.batch.status == "in_progress":
                s.batch.status, s.batch.finalizing_at = "finalizing", int(time.time())

        if done != stored.batch.request_counts.completed:
            self.update(stored.batch.id, counted)

    def _close(self, batch_id: str, status: str, code: str, message: str) -> None:
        """Stop the batch's run; its finished rows are its output, every other row an error line."""
        child = self.children.pop(batch_id, None)
        if child is not None:
            _stop_child(child)
        stored = self.store.batch(batch_id)
        _kill_leftovers(stored)
        if stored.flow_run_id:
            self._cancel_flow_run(stored)
        batch = stored.batch
        run_dir = RunDir(self.store.run_dir(batch_id))
        if run_dir.plan_manifest.exists() and run_dir.job.exists():
            from nightshift.tasks.s4_merge import merge_unfinished

            merge_unfinished(run_dir, code, message)
        else:  # never planned: every request is unfinished
            _write_unfinished(self._input(batch), run_dir, code, message)
        self._finish(batch_id, status)

    def _cancel_flow_run(self, stored: StoredBatch) -> None:
        """Cancel the batch's flow run and wait (bounded) until its worker has stopped it, so
        that nothing writes the run directory while its unfinished rows are closed."""
        import uuid

        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        with get_client(sync_client=True) as client:
            run_id = uuid.UUID(stored.flow_run_id)
            state = client.read_flow_run(run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(run_id, Cancelling(message="the batch was cancelled or expired"), force=True)
            give_up = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < give_up:
                state = client.read_flow_run(run_id).state
                if state is None or state.is_final():
                    return
                time.sleep(1)

    def _finish(self, batch_id: str, status: str, gate_failed: bool = False) -> None:
        run_dir = RunDir(self.store.run_dir(batch_id))
        report = RunReport.load(run_dir.summary)
        batch = self.store.batch(batch_id)
        owner, now = batch.owner, int(time.time())
        output = self._output_file(owner, batch_id, run_dir.output, "output")
        errors = self._output_file(owner, batch_id, run_dir.errors, "errors") if report.failed else None

        def finished(s: StoredBatch) -> None:
            b = s.batch
            b.status, b.output_file_id = status, output.file.id
            b.error_file_id = errors.file.id if errors else None
            b.request_counts = RequestCounts(total=report.total_rows, completed=report.succeeded, failed=report.failed)
            b.usage = BatchUsage(
                input_tokens=report.prompt_tokens,
                output_tokens=report.completion_tokens,
                total_tokens=report.prompt_tokens + report.completion_tokens,
            )
            b.finalizing_at = b.finalizing_at or now
            setattr(b, {"completed": "completed_at", "failed": "failed_at"}.get(status, f"{status}_at"), now)
            if gate_failed:
                b.errors = BatchErrors(
                    data=[
                        BatchError(
                            code="validation_failed",
                            message="The canary validation gate failed: the outputs were written, but do not trust "
                            "them before reading validation.json in the batch's run directory.",
                        )
                    ]
                )

        self.update(batch_id, finished)
        log.info("batch %s: %s (%d ok, %d failed)", batch_id, status, report.succeeded, report.failed)

    def _fail(self, batch_id: str, errors: list[BatchError]) -> None:
        def failed(s: StoredBatch) -> None:
            s.batch.status, s.batch.failed_at = "failed", int(time.time())
            s.batch.errors = BatchErrors(data=errors)

        self.update(batch_id, failed)
        log.info("batch %s: failed (%s)", batch_id, errors[0].code)

    def _output_file(self, owner: str, batch_id: str, path, kind: str) -> StoredFile:
        relative = str(location(path)).removeprefix(str(self.store.root)).lstrip("/")
        return self.store.add_file(
            new_id("file-"), owner, f"{batch_id}_{kind}.jsonl", "batch_output", location(path).stat().st_size, relative
        )

    def _input(self, batch: BatchObject) -> Path:
        return self.store.path(self.store.upload_path(batch.input_file_id))

    def _log_path(self, batch_id: str) -> Path:
        folder = self.logs or Path(self.store.root) / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{batch_id}.log"

    def _last_words(self, stored: StoredBatch) -> str:
        """The run's own one-line reason (`nightshift: …`), else its log's last line; with a
        deployment, its flow run's state message."""
        batch_id = stored.batch.id
        if stored.flow_run_id:
            state = self._flow_run(stored).state
            return (state.message if state and state.message else "the batch's flow run failed")[:2000]
        try:
            lines = self._log_path(batch_id).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "the batch's run never started"
        said = [line.removeprefix("nightshift: ") for line in lines if line.startswith("nightshift: ")]
        return (said or lines or ["the batch's run failed without a word"])[-1][:2000]


def _write_unfinished(input_path: Path, run_dir: RunDir, code: str, message: str) -> None:
    """Outputs of a batch stopped before its run planned anything: every request an error line."""
    import json

    from nightshift.batch_api import _lines
    from nightshift.openai_format import error_line

    failed = 0
    with written_whole(run_dir.errors) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for line_no, raw in _lines(input_path):
            if raw.strip():
                custom_id = json.loads(raw).get("custom_id")  # validated: every line is an object
                error = {"code": code, "message": message, "line": line_no}
                out.write(json.dumps(error_line(custom_id, error, "unplanned"), ensure_ascii=False) + "\n")
                failed += 1
    with written_whole(run_dir.output) as tmp:
        Path(tmp).write_text("")
    RunReport(
        run_dir=str(run_dir.root),
        total_rows=failed,
        succeeded=0,
        failed=failed,
        prompt_tokens=0,
        completion_tokens=0,
        output_path=str(run_dir.output),
        errors_path=str(run_dir.errors),
        results_path=str(run_dir.results),
        errors_by_code={code: failed},
    ).save(run_dir.summary)


def _absolute(path) -> str:
    """A path as workers elsewhere must be given it: a bucket URL as it is, a local path absolute."""
    return str(path) if is_url(str(path)) else str(Path(path).resolve())


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


def _kill_leftovers(stored: StoredBatch) -> None:
    """A server killed with -9 takes its run along (`_die_with_parent`), but not the engine
    processes that run started: they would hold the machine's cores and memory forever."""
    if stored.run_group is None or stored.run_host != socket.gethostname():
        return
    import psutil

    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == stored.run_group:
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
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def serve(config: BatchApiConfig) -> int:
    """Run the API until SIGINT/SIGTERM; batches in flight resume on the next start."""
    import uvicorn

    from nightshift.lease import run_lease

    owners = api_keys(config)  # before anything listens: no keys, no server
    store = Store(config.storage)
    if not is_url(config.storage):
        Path(config.storage).mkdir(parents=True, exist_ok=True)
    with run_lease(str(store.root)):  # one server per storage: two would run each batch twice
        runner = BatchRunner(config, store)
        app = create_app(config, store, runner, owners)
        runner.start()
        try:
            uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
        finally:
            runner.shutdown()
    return 0

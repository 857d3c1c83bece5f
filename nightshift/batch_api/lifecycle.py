"""A batch's lifecycle: validating → in_progress → finalizing → completed; failed (the file is
not a valid batch, or its run cannot start); cancelling → cancelled and expired (the rows already
finished in the output file, every other row an error line).

`BatchLifecycle` is the only writer of a batch's status besides the API's create and cancel (all
under one lock). Where a batch's run happens is its `BatchRuns` (nightshift.batch_api.runs); everything
else is on the storage (nightshift.batch_api.store), so a server killed mid-batch resumes the batch when
started again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from nightshift.batch_api.runs import BatchRuns, RunEnd, RunOrder
from nightshift.batch_api.store import (
    TERMINAL,
    BatchError,
    BatchErrors,
    BatchObject,
    BatchUsage,
    ExpiresAfter,
    RequestCounts,
    Store,
    StoredBatch,
    StoredFile,
    check_batch_input,
    input_lines,
    new_id,
)
from nightshift.batch_api.webhooks import Webhooks
from nightshift.config import BATCH_CLASS_KEY, BatchApiConfig, batch_class
from nightshift.records import Plan, ProgressSnapshot, RunReport, Verdict
from nightshift.runtime.lease import superseded
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import location, written_whole
from nightshift.wire.openai_format import error_line

log = logging.getLogger("nightshift.serve")

CANCELLED_MESSAGE = "The batch was cancelled before this request ran."
# A run past its window stops itself (its --deadline); the server closes it only if it has not
# within this margin (rows in flight get 2 s, then the merge).
RUN_EXPIRY_MARGIN_S = 120
SWEEP_EVERY_S = 60.0  # retention's look at old files and batches
STRIKES = 3  # looks at a batch in a row that raise before the batch fails with the reason
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
GATE_FAILED_MESSAGE = (
    "The canary validation gate failed: the outputs were written, but do not trust them before reading "
    "validation.json in the batch's run directory."
)


class BatchLifecycle:
    """Turns stored batches into runs and follows them to a terminal status."""

    def __init__(self, config: BatchApiConfig, store: Store, runs: BatchRuns, webhooks: Webhooks | None = None) -> None:
        self.config, self.store, self.runs, self.webhooks = config, store, runs, webhooks
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nightshift-batch-runner", daemon=True)
        self._next_sweep = 0.0
        self._strikes: dict[str, int] = {}  # batch id → looks in a row that raised

    def start(self) -> None:
        self._thread.start()
        if self.webhooks is not None:
            self.webhooks.start()

    def shutdown(self) -> None:
        """Stop following; running batches are told to save their finished rows and stay
        in_progress, so the next server resumes them."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.runs.shutdown()
        if self.webhooks is not None:
            self.webhooks.shutdown()

    def update(self, batch_id: str, change) -> StoredBatch:
        """Change a stored batch under the lock; one that turns terminal is announced (webhooks,
        Prefect events) before it is saved so: a server killed in between announces it again,
        under the same event id."""
        with self.lock:
            stored = self.store.batch(batch_id)
            before = stored.batch.status
            change(stored)
            if stored.batch.status != before and stored.batch.status in TERMINAL and self.webhooks is not None:
                self.webhooks.announce(stored)
            self.store.save_batch(stored)
            return stored

    def _loop(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                self.step()
            except Exception:  # one bad look must not end the runner; the next one tries again
                log.exception("batch runner step failed")

    def step(self) -> None:
        """One look at every open batch. A batch whose look raises is that batch's trouble alone:
        the others are looked at all the same, and after STRIKES such looks in a row it fails
        with the reason (a poisoned or vanished input never holds the queue)."""
        batches, waiting = self.store.batches(), []
        for stored in batches:
            if stored.batch.status not in TERMINAL and not self._stop.is_set():
                self._isolated(stored.batch.id, lambda stored=stored: waiting.extend(self._advance(stored)))
        for stored in self._turns(waiting, batches):
            self._isolated(stored.batch.id, lambda stored=stored: self._launch(stored))
        if time.monotonic() >= self._next_sweep:
            try:
                self.sweep()
            except Exception:  # a sweep that fails is tried again at the next one; batches go on
                log.exception("retention sweep failed")

    def _isolated(self, batch_id: str, look) -> None:
        try:
            look()
            self._strikes.pop(batch_id, None)
        except Exception as exc:  # noqa: BLE001 - isolated per batch, said in its errors
            self._struck(batch_id, exc)

    def _turns(self, waiting: list[StoredBatch], batches: list[StoredBatch]) -> list[StoredBatch]:
        """The validated batches that start now, as many as the runs have room for, fairly: the
        key with the fewest batches running (in this look's `batches`) goes first, then the oldest
        batch — a tenant's tenth batch never holds another tenant's first."""
        running: dict[str, int] = {}
        for stored in batches:
            if stored.batch.status in ("in_progress", "finalizing"):
                running[stored.owner] = running.get(stored.owner, 0) + 1
        chosen = []
        for _ in range(min(len(waiting), self.runs.room())):
            turn = min(waiting, key=lambda s: (running.get(s.owner, 0), s.batch.created_at, s.batch.id))
            waiting.remove(turn)
            running[turn.owner] = running.get(turn.owner, 0) + 1
            chosen.append(turn)
        return chosen

    def _struck(self, batch_id: str, exc: Exception) -> None:
        strikes = self._strikes[batch_id] = self._strikes.get(batch_id, 0) + 1
        log.warning("batch %s: %s (%d of %d)", batch_id, exc, strikes, STRIKES)
        if strikes < STRIKES:
            return
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        try:
            self.runs.stop(self.store.batch(batch_id))
            self._fail(batch_id, [BatchError(code="batch_failed", message=f"the batch could not be run: {reason}")])
            self._strikes.pop(batch_id, None)
        except Exception:  # noqa: BLE001 - the storage itself is failing: the next look tries again
            log.exception("batch %s: could not be failed", batch_id)

    def sweep(self) -> None:
        """Retention, a minute apart: files past their `expires_at` (their own policy or
        `--retention`), and finished batches older than `--retention`, gone."""
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        now = int(time.time())
        with self.lock:
            retention = self.config.retention_s
            batches, files = self.store.expire(now - retention if retention else None, now)
        if batches or files:
            log.info("retention: removed %d batches and %d files", len(batches), len(files))

    def _advance(self, stored: StoredBatch) -> list[StoredBatch]:
        """One look at an open batch; the batch itself if it is valid and waits for its turn."""
        batch = stored.batch
        if batch.status == "cancelling":
            self._close(batch.id, "cancelled", "batch_cancelled", CANCELLED_MESSAGE)
        elif self._window_closed(stored):
            self._close(batch.id, "expired", "batch_expired", EXPIRED_MESSAGE)
        elif batch.status == "validating":
            return self._validated(stored)
        else:
            self._follow(stored)
        return []

    def _window_closed(self, stored: StoredBatch) -> bool:
        """Past the completion window. A running batch run stops itself at the window with its
        rows merged (its --deadline), so it gets a margin to do so before the server closes it."""
        now = time.time()
        if now < stored.batch.expires_at:
            return False
        return now >= stored.batch.expires_at + RUN_EXPIRY_MARGIN_S or not self.runs.running(stored)

    def _validated(self, stored: StoredBatch) -> list[StoredBatch]:
        batch = stored.batch
        if not self._input(batch).exists():
            self._fail(batch.id, [BatchError(code="input_file_missing", message="The batch's input file is gone.")])
            return []
        if not batch.request_counts.total:
            requests, errors = check_batch_input(self._input(batch), batch.endpoint, self.config.max_requests)
            if errors:
                self._fail(batch.id, errors)
                return []
            stored = self.update(batch.id, lambda s: setattr(s.batch.request_counts, "total", requests))
        return [stored]

    def _launch(self, stored: StoredBatch) -> None:
        batch = stored.batch
        if stored.run_attempts >= self.config.max_attempts:
            self._fail(batch.id, [BatchError(code="run_failed", message=self.runs.last_words(stored))])
            return
        embeds = batch.endpoint == "/v1/embeddings"
        started = self.runs.start(
            stored,
            RunOrder(
                batch_id=batch.id,
                input_path=self._input(batch),
                run_dir=self.store.run_dir(batch.id),
                model=self.config.embedding_model if embeds else self.config.chat_model,
                engine=_engine_settings(self.config, embeds, batch),
                # Progress and checkpoints at least every twentieth of the batch: request_counts move.
                chunk_size=max(8, min(512, batch.request_counts.total // 20)),
                # the run keeps the completion window itself: it ends at it with its rows merged
                deadline=datetime.fromtimestamp(batch.expires_at, timezone.utc),
                attempt=stored.run_attempts,
            ),
        )

        def recorded(s: StoredBatch) -> None:
            s.run_attempts += 1
            for name, value in started.record.items():
                setattr(s, name, value)
            s.batch.status = "finalizing" if s.batch.status == "finalizing" else "in_progress"
            s.batch.in_progress_at = s.batch.in_progress_at or int(time.time())

        self.update(batch.id, recorded)
        log.info("batch %s: %s (attempt %d)", batch.id, started.description, stored.run_attempts + 1)

    def _follow(self, stored: StoredBatch) -> None:
        batch = stored.batch
        end = self.runs.ended(stored)
        if end is None:
            self._count_progress(stored)
        elif end is RunEnd.COMPLETED:
            self._finish(batch.id, "completed")
        elif end is RunEnd.GATE_FAILED:
            self._finish(batch.id, "failed", gate_failed=True)
        elif end is RunEnd.EXPIRED:  # the window closed: finished rows merged, the rest batch_expired
            self._finish(batch.id, "expired")
        elif end is RunEnd.REFUSED:
            self._fail(batch.id, [BatchError(code="invalid_batch", message=self.runs.last_words(stored))])
        else:  # the server restarted, or the last run crashed: resume from its checkpoints
            self._launch(stored)

    def _count_progress(self, stored: StoredBatch) -> None:
        run_dir = self.store.run_dir(stored.batch.id)
        try:
            progress = ProgressSnapshot.load(run_dir.progress)
            canaries = Plan.load(run_dir.plan_manifest).canary_rows
        except (FileNotFoundError, ValueError):
            return
        done = max(0, min(progress.completed - canaries, stored.batch.request_counts.total))
        # the lease is read only when the count would move: not the late write of a run taken over
        if done == stored.batch.request_counts.completed or superseded(run_dir, progress.epoch):
            return

        def counted(s: StoredBatch) -> None:
            s.batch.request_counts.completed = done
            if done >= s.batch.request_counts.total and s.batch.status == "in_progress":
                s.batch.status, s.batch.finalizing_at = "finalizing", int(time.time())

        self.update(stored.batch.id, counted)

    def _close(self, batch_id: str, status: str, code: str, message: str) -> None:
        """Stop the batch's run; its finished rows are its output, every other row an error line."""
        stored = self.store.batch(batch_id)
        self.runs.stop(stored)
        run_dir = self.store.run_dir(batch_id)
        if run_dir.plan_manifest.exists() and run_dir.job.exists():
            from nightshift.stages.merge import merge_unfinished

            merge_unfinished(run_dir, code, message)
        else:  # never planned: every request is unfinished
            _write_unfinished(self._input(stored.batch), run_dir, code, message)
        self._finish(batch_id, status)

    def _finish(self, batch_id: str, status: str, gate_failed: bool = False) -> None:
        run_dir = self.store.run_dir(batch_id)
        report = RunReport.load(run_dir.summary)
        batch = self.store.batch(batch_id)
        owner, now = batch.owner, int(time.time())
        expiry = batch.output_expires_after
        output = self._output_file(owner, batch_id, run_dir.output, "output", expiry)
        errors = self._output_file(owner, batch_id, run_dir.errors, "errors", expiry) if report.failed else None

        def finished(s: StoredBatch) -> None:
            b = s.batch
            b.status, b.output_file_id = status, output.file.id
            b.error_file_id = errors.file.id if errors else None
            b.request_counts = RequestCounts(total=report.total_rows, completed=report.succeeded, failed=report.failed)
            b.usage = BatchUsage(
                input_tokens=report.prompt_tokens,
                input_tokens_details={"cached_tokens": report.cached_tokens},
                output_tokens=report.completion_tokens,
                total_tokens=report.prompt_tokens + report.completion_tokens,
            )
            b.finalizing_at = b.finalizing_at or now
            setattr(b, {"completed": "completed_at", "failed": "failed_at"}.get(status, f"{status}_at"), now)
            if gate_failed:
                b.errors = BatchErrors(data=[BatchError(code="validation_failed", message=GATE_FAILED_MESSAGE)])
            if said := _validation_said(run_dir):
                b.metadata = {**(b.metadata or {}), **said}

        self.update(batch_id, finished)
        log.info("batch %s: %s (%d ok, %d failed)", batch_id, status, report.succeeded, report.failed)

    def _fail(self, batch_id: str, errors: list[BatchError]) -> None:
        def failed(s: StoredBatch) -> None:
            s.batch.status, s.batch.failed_at = "failed", int(time.time())
            s.batch.errors = BatchErrors(data=errors)

        self.update(batch_id, failed)
        log.info("batch %s: failed (%s)", batch_id, errors[0].code)

    def _output_file(self, owner: str, batch_id: str, path, kind: str, expiry: ExpiresAfter | None) -> StoredFile:
        relative = str(location(path)).removeprefix(str(self.store.root)).lstrip("/")
        size = location(path).stat().st_size
        name = f"{batch_id}_{kind}.jsonl"
        return self.store.add_file(new_id("file-"), owner, name, "batch_output", size, relative, expiry)

    def _input(self, batch: BatchObject) -> Path:
        return self.store.path(self.store.upload_path(batch.input_file_id))


def _validation_said(run_dir: RunDir) -> dict[str, str]:
    """The canary gate's verdict for the batch's metadata, where a tenant reads it: its state
    (validated, not_validated, failed) and, in words, why (OpenAI caps a value at 512 characters)."""
    try:
        verdict = Verdict.load(run_dir.validation)
    except (FileNotFoundError, ValueError):  # closed before validation (cancelled, expired)
        return {}
    words = "; ".join(verdict.failures) if verdict.failures else verdict.said()
    return {"nightshift_validation": verdict.verdict, "nightshift_validation_detail": words[:512]}


def _engine_settings(config: BatchApiConfig, embeds: bool, batch: BatchObject) -> dict[str, object]:
    """The settings of a batch's run: its rows are a tenant's (media only from data: URLs and
    what the operator opened); the server answering its endpoint's rows, if any, the priority and
    class they are sent with there; the chat model's LoRA adapters."""
    media = {
        "media_sources": "allowed",
        **({"allow_media_root": list(config.allow_media_root)} if config.allow_media_root else {}),
        **({"allow_media_url": list(config.allow_media_url)} if config.allow_media_url else {}),
    }
    adapters = {} if embeds or not config.chat_lora else {"lora": [f"{a.name}={a.path}" for a in config.chat_lora]}
    url = config.embedding_engine_url if embeds else config.chat_engine_url
    if url is None:
        return {**media, **adapters}
    secret = {"engine_api_key_secret": s} if (s := config.engine_api_key_secret) else {}
    floor = {"row_priority_floor": f} if (f := config.row_priority_floor) is not None else {}
    # checked when the batch was made (routes._new_batch): a class no higher than the server's
    grade = batch_class(config.priority_class, (batch.metadata or {}).get(BATCH_CLASS_KEY))
    return {**media, "engine_url": url, **secret, **floor, **_size_priority(config, batch.request_counts.total),
            **adapters, **({"priority_class": grade} if grade else {}), **_politeness(config, embeds)}  # fmt: skip


def _politeness(config: BatchApiConfig, embeds: bool) -> dict[str, object]:
    """The online objective a chat batch keeps to on the shared server, and whether it shares the
    fleet's budget (an embeddings server has no online chat traffic to probe)."""
    if embeds or config.online_ttft_slo_ms is None:
        return {}
    return {"online_ttft_slo_ms": config.online_ttft_slo_ms, **({"fleet_budget": True} if config.fleet_budget else {})}


def _size_priority(config: BatchApiConfig, requests: int) -> dict[str, int]:
    """With `shortest_batch_first`, a batch's rows reach the engine server with a priority that
    grows with the batch's size (lower runs first in vLLM's priority scheduling): the bits of its
    request count, over the operator's row_priority_floor — a 10-line batch's rows (4) pass a
    20,000-line one's (15) in the server's queue, and none passes online traffic."""
    if not config.shortest_batch_first:
        return {}
    return {"engine_priority": (config.row_priority_floor or 0) + requests.bit_length()}


def _write_unfinished(input_path: Path, run_dir: RunDir, code: str, message: str) -> None:
    """Outputs of a batch stopped before its run planned anything: every request an error line."""
    failed = 0
    with written_whole(run_dir.errors) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for line_no, raw in input_lines(input_path) if location(input_path).exists() else ():
            if raw.strip():
                custom_id = _custom_id(raw)  # a batch cancelled in `validating`: its lines were never checked
                error = {"code": code, "message": message, "line": line_no}
                out.write(json.dumps(error_line(custom_id, error, "unplanned").wire(), ensure_ascii=False) + "\n")
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


def _custom_id(raw: str) -> str | None:
    """A line's custom_id if the line is an object with a string one; None for anything else."""
    try:
        row = json.loads(raw)
    except ValueError:
        return None
    custom_id = row.get("custom_id") if isinstance(row, dict) else None
    return custom_id if isinstance(custom_id, str) else None

"""Live progress of a run: `progress.json` in the run directory, a Prefect progress artifact,
and a log line with the rolling tokens/s every minute.

progress.json can be read at any moment without touching the job:
    {"completed": rows, "total": rows, "elapsed_seconds": s, "eta_seconds": s | null,
     "tokens": n, "rolling_tokens_per_second": x | null, "updated": unix time}
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from nightshift.records import ProgressSnapshot
from nightshift.rundir import RunDir

log = logging.getLogger("nightshift.progress")
LOG_EVERY_S = 60.0
ROLLING_WINDOW_S = 60.0


class Progress:
    def __init__(self, run_dir: RunDir, total: int, completed: int, artifact_id=None) -> None:
        self.run_dir, self.total, self.completed = run_dir, total, completed
        self.started = time.time()
        self.completed_at_start = completed
        self.tokens = 0
        self.window: deque[tuple[float, int]] = deque()
        self.artifact_id = artifact_id
        self._lock = threading.Lock()
        self._last_write = self._last_log = 0.0
        self.write()

    def advance(self, rows: int, tokens: int) -> None:
        with self._lock:
            now = time.time()
            self.completed += rows
            self.tokens += tokens
            self.window.append((now, tokens))
            while self.window and self.window[0][0] < now - ROLLING_WINDOW_S:
                self.window.popleft()
            if now - self._last_write >= 1.0 or self.completed >= self.total:
                self.write()
            if now - self._last_log >= LOG_EVERY_S:
                self._last_log = now
                rate = self.rolling_rate()
                log.info("%d/%d rows, rolling %.1f tokens/s", self.completed, self.total, rate or 0.0)

    def rolling_rate(self) -> float | None:
        if len(self.window) < 2:
            return None
        span = max(self.window[-1][0] - self.window[0][0], 1e-6)
        return sum(t for _, t in list(self.window)[1:]) / span

    def snapshot(self) -> ProgressSnapshot:
        """What progress.json says: rows finished so far (checkpointed or about to be)."""
        now = time.time()
        elapsed = now - self.started
        done_here = self.completed - self.completed_at_start
        remaining = self.total - self.completed
        eta = remaining / (done_here / elapsed) if done_here and elapsed > 0 else (0.0 if not remaining else None)
        rate = self.rolling_rate()
        return ProgressSnapshot(
            completed=self.completed,
            total=self.total,
            elapsed_seconds=round(elapsed, 1),
            eta_seconds=round(eta, 1) if eta is not None else None,
            tokens=self.tokens,
            rolling_tokens_per_second=round(rate, 2) if rate is not None else None,
            updated=now,
        )

    def write(self) -> None:
        self._last_write = time.time()
        self.snapshot().save(self.run_dir.progress)
        if self.artifact_id is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.artifact_id, 100.0 * self.completed / max(self.total, 1))
            except Exception as exc:  # the dashboard is a convenience; never fail a shard for it
                log.debug("progress artifact not updated: %r", exc)


_trackers: dict[str, Progress] = {}


def start(run_dir: RunDir, total: int, completed: int) -> Progress:
    """Called by the flow before generation; creates the Prefect progress artifact."""
    artifact_id = None
    try:
        from prefect.artifacts import create_progress_artifact

        artifact_id = create_progress_artifact(100.0 * completed / max(total, 1), description="rows generated")
    except Exception as exc:
        log.debug("no progress artifact: %r", exc)
    tracker = _trackers[str(run_dir.root)] = Progress(run_dir, total, completed, artifact_id)
    return tracker


class ConsoleProgress:
    """`nightshift run`'s view of its progress on stderr: on a terminal, a bar with rows,
    tokens/s and ETA redrawn every second; otherwise (a log file, CI) one line every 60 s."""

    def __init__(self, stream=None, width: int = 30) -> None:
        import sys

        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 1.0 if self.tty else LOG_EVERY_S
        self.width = width
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nightshift-console-progress", daemon=True)
        self._drawn = False

    def __enter__(self) -> ConsoleProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for tracker in list(_trackers.values()):
                self.stream.write(self.line(tracker.snapshot()))
                self.stream.flush()
                self._drawn = True

    def line(self, state: ProgressSnapshot) -> str:
        done, total = state.completed, max(state.total, 1)
        filled = int(self.width * done / total)
        rate = state.rolling_tokens_per_second
        eta = state.eta_seconds
        text = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done:,}/{state.total:,} rows "
            f"{rate or 0:,.0f} tokens/s ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if eta is not None else '--'}"
        )
        return f"\r{text}\033[K" if self.tty else f"progress {text}\n"


def advance(run_dir: RunDir, rows: int, tokens: int) -> None:
    tracker = _trackers.get(str(run_dir.root))
    if tracker is not None:
        tracker.advance(rows, tokens)

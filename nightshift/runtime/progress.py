"""Live progress of a run: `progress.json` in the run directory, a Prefect progress artifact,
and a log line with the rolling tokens/s every minute.

progress.json can be read at any moment without touching the job:
    {"completed": rows, "total": rows, "elapsed_seconds": s, "eta_seconds": s | null,
     "tokens": n, "rolling_tokens_per_second": x | null, "updated": unix time,
     "epoch": the writer's lease epoch | null}
A snapshot of an epoch older than the directory's lease is the late write of a run taken over
(frozen with the write in flight): `lease.superseded` tells its readers to ignore it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from nightshift.records import ProgressSnapshot
from nightshift.runtime.lease import held_epoch
from nightshift.runtime.rundir import RunDir

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
            epoch=held_epoch(self.run_dir),  # a late write of a run taken over is ignored by readers
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
    """`nightshift run`'s view of its progress on stderr. On a terminal, one live line at the
    bottom — rows, tokens/s and ETA, redrawn every second by rich (which Prefect ships) — with
    every log line printed above it, never through it: Prefect's console handlers print through
    the live display's console while it runs, and whatever else writes to stdout or stderr
    (warnings, the engine's logger) is redirected above it too. Otherwise (a log file, CI) one
    plain line every 60 s."""

    def __init__(self, stream=None, width: int = 30) -> None:
        import sys

        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 1.0 if self.tty else LOG_EVERY_S
        self.width = width
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nightshift-console-progress", daemon=True)
        self._live = None
        self._restores: list = []

    def __enter__(self) -> ConsoleProgress:
        if not self.tty:
            self._thread.start()
            return self
        import prefect.main  # noqa: F401  (configures Prefect's logging now: its handlers exist to repoint)
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.stream, force_terminal=True, soft_wrap=True)
        self._live = Live(
            get_renderable=self._render, console=console, refresh_per_second=1,
            redirect_stdout=True, redirect_stderr=True,
        )  # fmt: skip
        self._live.start()
        self._restores = _print_logs_through(console, self.stream)
        return self

    def __exit__(self, *exc) -> None:
        if self._live is None:
            self._stop.set()
            self._thread.join(timeout=2)
            return
        self._live.stop()
        for restore in self._restores:
            restore()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for tracker in list(_trackers.values()):
                self.stream.write(self.line(tracker.snapshot()))
                self.stream.flush()

    def _render(self):
        from rich.text import Text

        return Text("\n".join(self.text(tracker.snapshot()) for tracker in list(_trackers.values())))

    def text(self, state: ProgressSnapshot) -> str:
        done, total = state.completed, max(state.total, 1)
        filled = int(self.width * done / total)
        rate = state.rolling_tokens_per_second
        eta = state.eta_seconds
        return (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done:,}/{state.total:,} rows "
            f"{rate or 0:,.0f} tokens/s ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if eta is not None else '--'}"
        )

    def line(self, state: ProgressSnapshot) -> str:
        """The plain line written every minute when stderr is not a terminal."""
        return f"progress {self.text(state)}\n"


def _print_logs_through(console, stream) -> list:
    """Point every Prefect console handler at `console` (the live display's), and every other
    handler writing straight to `stream` at the redirected `sys.stderr`; returns how to undo it."""
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    from nightshift.observe.logs import every_handler

    restores = []
    for handler in every_handler():
        if isinstance(handler, PrefectConsoleHandler):
            restores.append(lambda handler=handler, was=handler.console: setattr(handler, "console", was))
            handler.console = console
        elif isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
            stream,
            sys.__stderr__,
        ):
            restores.append(lambda handler=handler, was=handler.stream: handler.setStream(was))
            handler.setStream(sys.stderr)
    return restores


def advance(run_dir: RunDir, rows: int, tokens: int) -> None:
    tracker = _trackers.get(str(run_dir.root))
    if tracker is not None:
        tracker.advance(rows, tokens)

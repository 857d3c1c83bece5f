"""SIGTERM (the spot-preemption notice) → a bounded, consistent stop.

On SIGTERM, generation stops admitting rows, keeps the rows already in flight for up to
`NIGHTSHIFT_SIGTERM_GRACE_S` seconds (default 20), writes every finished row to a chunk
file, and the process exits with status 143 so a scheduler retries it. Whatever is killed
when, chunk files are written atomically: a re-run sees whole chunks or none.
"""

from __future__ import annotations

import os
import signal
import threading

stop_requested = threading.Event()
_active = 0
_idle = threading.Condition()

EXIT_PREEMPTED = 128 + signal.SIGTERM


class Preempted(RuntimeError):
    """Generation stopped on SIGTERM; finished rows are on disk, the rest are not."""


def grace_seconds() -> float:
    return float(os.environ.get("NIGHTSHIFT_SIGTERM_GRACE_S", "20"))


def install_sigterm_handler() -> None:
    """Call from the main thread before the flow starts."""

    def on_sigterm(signum, frame) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_sigterm)


class generation_in_progress:
    """Marks a generate call as running, so a stopping process can wait for its flush."""

    def __enter__(self):
        global _active
        with _idle:
            _active += 1

    def __exit__(self, *exc):
        global _active
        with _idle:
            _active -= 1
            _idle.notify_all()


def wait_until_flushed(timeout: float) -> bool:
    with _idle:
        return _idle.wait_for(lambda: _active == 0, timeout=timeout)

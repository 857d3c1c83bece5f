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

from nightshift.runtime.in_flight import InFlight

stop_requested = threading.Event()


def grace_seconds() -> float:
    from nightshift.config import RuntimeSettings

    return RuntimeSettings.from_environment().sigterm_grace_s


def install_sigterm_handler() -> None:
    """Call from the main thread before the flow starts.

    A Python signal handler runs only when the main thread next executes Python code, and a
    flow run's main thread can sit in a C-level wait until its shard ends (Prefect installs its
    own SIGTERM handler over ours, too). The wakeup fd is written by the C-level handler at
    the moment the signal arrives, whoever's Python handler is installed: a thread reading it
    stops admission at once.
    """

    def on_sigterm(signum, frame) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:
        while received := os.read(read_end, 64):
            if signal.SIGTERM in received:
                stop_requested.set()

    threading.Thread(target=watch, name="nightshift-sigterm", daemon=True).start()


# the generate calls running in this process, so that a stopping process can wait for their flush
# (process-wide by nature, as the SIGTERM that stops them is)
_generations = InFlight()


def generation_in_progress() -> InFlight:
    """Marks a generate call as running (`with generation_in_progress(): …`)."""
    return _generations


def wait_until_flushed(timeout: float) -> bool:
    return _generations.wait_until_none(timeout)

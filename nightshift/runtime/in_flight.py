"""A count of the calls in flight in this process, and a wait until there are none: what a
stopping process waits for (the generate calls a SIGTERM lets flush, the writes between their
fence checks)."""

from __future__ import annotations

import threading


class InFlight:
    """`with counter: …` counts a call while it runs; `wait_until_none` waits for all to end."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def __enter__(self) -> InFlight:
        with self._changed:
            self.count += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self.count -= 1
            self._changed.notify_all()

    def wait_until_none(self, timeout: float) -> bool:
        """Whether none is in flight, waiting up to `timeout` seconds for it."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count == 0, timeout=timeout)

"""A completion window that is kept: `--deadline` on a run.

At the deadline, generation stops admitting rows; rows already in the engine get the grace
period (`NIGHTSHIFT_SIGTERM_GRACE_S`, 20 s by default) to finish; finished rows are written
as usual; then the run merges, and every row without an outcome gets a `batch_expired` error
line (OpenAI's code for a batch out of its completion window), retryable with
`nightshift retry`. The run ends with exit status 4 and a Prefect state named "Expired".

A deadline is a duration from now ("6h", "90m", "1h30m", "45s"), a time of day ("08:00":
the next 08:00 in the machine's time zone, or "08:00+01:00"), or an ISO 8601 date-time
("2026-11-27T08:00", with or without an offset).
"""

from __future__ import annotations

import re
import threading
from datetime import datetime, time, timedelta

from nightshift.errors import ConfigurationError

EXPIRED_CODE = "batch_expired"

deadline_reached = threading.Event()

_DURATION = re.compile(
    r"^(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$"
)


def parse_duration(text: str) -> timedelta | None:
    """ "30d", "6h", "90m", "1h30m", "45s", "1.5h" as a timedelta; None if `text` is not such a
    duration. The one reading of durations: deadlines, the Batch API's completion windows and its
    retention."""
    value = text.strip().lower()
    duration = _DURATION.match(value)
    if not value or not duration or not any(duration.groupdict().values()):
        return None
    parts = {k: float(v) for k, v in duration.groupdict().items() if v}
    return timedelta(
        days=parts.get("d", 0), hours=parts.get("h", 0), minutes=parts.get("m", 0), seconds=parts.get("s", 0)
    )


def parse_deadline(text: str, now: datetime | None = None) -> datetime:
    """The moment `text` names, timezone-aware. Raises ConfigurationError for anything else."""
    now = (now or datetime.now()).astimezone()
    value = text.strip()
    duration = parse_duration(value)
    if duration is not None:
        return now + duration
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is not None and ("T" in value or " " in value or re.fullmatch(r"\d{4}-\d{2}-\d{2}", value)):
        return moment.astimezone() if moment.tzinfo else moment.replace(tzinfo=now.tzinfo)
    try:
        clock = time.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(
            f"deadline {text!r}: give a duration (6h, 90m, 1h30m), a time of day (08:00) or an ISO date-time "
            "(2026-11-27T08:00)"
        ) from None
    tz = clock.tzinfo or now.tzinfo
    today = now.astimezone(tz)
    moment = datetime.combine(today.date(), clock.replace(tzinfo=None), tzinfo=tz)
    return moment if moment > today else moment + timedelta(days=1)


class DeadlineTimer:
    """Sets `deadline_reached` at `when` (at once if it has passed) while the block runs;
    without a deadline, makes sure an earlier run's in this process does not linger."""

    def __init__(self, when: datetime | None):
        self.when = when
        deadline_reached.clear()
        self._timer = None
        if when is not None:
            delay = max((when - datetime.now().astimezone()).total_seconds(), 0.0)
            self._timer = threading.Timer(delay, deadline_reached.set)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        deadline_reached.clear()

    def __enter__(self) -> DeadlineTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class StopSignal:
    """What generation watches: SIGTERM (preemption) or the deadline, whichever comes first."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)

"""One root for Nightshift's errors, and the exit statuses a run ends with, below every layer.

Every exception Nightshift raises is a `NightshiftError`: it says the exit status a run that
ends on it returns (`exit_status`) and whether trying again in the same process may help
(`retryable`: Prefect's task retries read it). The CLI, the Batch API (which reads a run's
exit status back into a batch's end) and the deployments read `ExitStatus`, never a bare number.
The errors several layers raise live here; the others live beside the code that raises them,
under this root.
"""

from __future__ import annotations

import signal
from enum import IntEnum
from typing import ClassVar


class ExitStatus(IntEnum):
    """`nightshift run`'s exit statuses (sysexits' numbers where one fits)."""

    COMPLETE = 0  # every input row is in output.jsonl or errors.jsonl
    INCOMPLETE = 1  # rows left without an outcome (running again resumes them), or a crash
    CONFIGURATION = 2  # bad input or configuration: said in one line before any engine time, never retried
    VALIDATION_FAILED = 3  # the canary validation gate failed
    EXPIRED = 4  # the deadline (a batch's completion window) came first: the rest are batch_expired errors
    STORAGE_FULL = 73  # EX_CANTCREAT: the run directory's device is full; run again once there is room
    TEMPORARY = 75  # EX_TEMPFAIL: the engine did not start in time or its server stayed silent; a retry may succeed
    PREEMPTED = 128 + signal.SIGTERM  # stopped by SIGTERM, finished rows flushed


class NightshiftError(Exception):
    """The root. A subclass sets the exit status of a run that ends on it, and whether a retry
    in the same process may succeed."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.INCOMPLETE
    retryable: ClassVar[bool] = True


class ConfigurationError(NightshiftError, ValueError):
    """The job cannot run as configured (a context longer than the model's, an unknown dtype,
    a missing model, an engine that cannot start here). Said once, exit status 2, never retried."""

    exit_status = ExitStatus.CONFIGURATION
    retryable = False


class EngineCannotStartHere(ConfigurationError):
    """The engine refused to start on this machine (too little free memory, say). Another start
    here fails the same way; on a work pool another worker may well hold it."""


class EngineUnreachable(NightshiftError, RuntimeError):
    """The engine server (`engine_url`) has not answered for `engine_unreachable_s`, retried with
    backoff all along. Finished rows are on disk; the run fails retryably (exit status 75) and
    resumes when run again, not retried inside the process (the wait was the retry)."""

    exit_status = ExitStatus.TEMPORARY
    retryable = False


class PrefectUnreachable(NightshiftError, RuntimeError):
    """No Prefect API to run the flow on: the temporary server a run starts when no
    PREFECT_API_URL is set did not answer within its start timeout (a busy machine). Nothing was
    lost: the run fails retryably (exit status 75) and resumes when run again."""

    exit_status = ExitStatus.TEMPORARY
    retryable = False

    @classmethod
    def not_started(cls, waited: str, log: str | None = None) -> PrefectUnreachable:
        return cls(
            f"Prefect's temporary server did not start within {waited} s (a busy machine?); nothing was lost: run "
            "the same command again to resume, or set PREFECT_API_URL to a running Prefect server"
            + (f" (its log: {log})" if log else "")
        )


class EngineStartStalled(NightshiftError, RuntimeError):
    """The engine was not ready within its `engine_start_timeout_s`. Nothing about the job is
    wrong and a fresh process may well start it, so the run fails retryably (the CLI's exit
    status 75), not as a configuration error; it is not retried inside the process, where the
    stalled start still holds whatever it waits on."""

    exit_status = ExitStatus.TEMPORARY
    retryable = False


class Preempted(NightshiftError, RuntimeError):
    """Generation stopped on SIGTERM; finished rows are on disk, the rest are not. A preempted
    process is going away: retrying inside it would only be killed again."""

    exit_status = ExitStatus.PREEMPTED
    retryable = False


class DeadlineReached(NightshiftError, RuntimeError):
    """Generation stopped at the run's deadline; finished rows are on disk, the rest are not.
    Past the deadline there is no time left to retry in."""

    exit_status = ExitStatus.EXPIRED
    retryable = False


class RequestRejected(NightshiftError, ValueError):
    """One row refused, with OpenAI's error code: it goes to errors.jsonl, never to the engine."""

    exit_status = ExitStatus.CONFIGURATION
    retryable = False

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

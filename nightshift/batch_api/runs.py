"""The ways a batch runs, behind one small interface.

The lifecycle (nightshift.batch_api.lifecycle) owns a batch's status; where its run happens — a
`nightshift run` process on this machine (nightshift.batch_api.local_process) or a flow run of a
Prefect deployment on a work pool (nightshift.batch_api.deployment) — is a `BatchRuns`: start a run,
say whether it is running and how it ended, stop it, and give its last words. What finds a run
again after the server restarts is recorded on the stored batch (`StartedRun.record`).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nightshift.batch_api.store import StoredBatch
from nightshift.runtime.rundir import RunDir

STOP_GRACE_S = 90.0  # a run told to stop flushes its finished rows first


class RunEnd(enum.Enum):
    """How a batch's run ended, as the lifecycle acts on it."""

    COMPLETED = "completed"  # every row in the outputs or the errors, validated
    GATE_FAILED = "gate_failed"  # the outputs are written, but the canary gate failed
    EXPIRED = "expired"  # stopped at the completion window: finished rows merged, the rest batch_expired
    REFUSED = "refused"  # the input or the configuration was refused: running it again cannot help
    LOST = "lost"  # crashed, killed, or started by a server that is gone: resume it from its checkpoints


@dataclass(frozen=True)
class RunOrder:
    """One run of a batch: its input, its run directory, the model (and the server answering its
    rows, if any) and the completion window."""

    batch_id: str
    input_path: Path
    run_dir: RunDir
    model: str
    chunk_size: int
    deadline: datetime
    attempt: int  # runs of this batch started before this one
    # engine settings: engine_url, engine_api_key_secret, lora (NAME=PATH each)
    engine: dict[str, object] = field(default_factory=dict)

    def job_settings(self) -> dict[str, object]:
        """The run's settings by name, as make_job and the CLI's flags take them."""
        return {"chunk_size": self.chunk_size, **self.engine}


@dataclass(frozen=True)
class StartedRun:
    description: str  # for the server's log
    record: dict[str, object] = field(default_factory=dict)  # StoredBatch fields that find the run again


class BatchRuns(ABC):
    """Where batches run. Called from the lifecycle's thread only (and `shutdown` at the end)."""

    @abstractmethod
    def room(self) -> int:
        """How many more batches may start now."""

    @abstractmethod
    def start(self, stored: StoredBatch, order: RunOrder) -> StartedRun:
        """Start the run `order` describes; a run of the batch left by an earlier server goes first."""

    @abstractmethod
    def running(self, stored: StoredBatch) -> bool:
        """Whether the batch's latest run is still going."""

    @abstractmethod
    def ended(self, stored: StoredBatch) -> RunEnd | None:
        """How the batch's latest run ended; None while it runs."""

    @abstractmethod
    def stop(self, stored: StoredBatch) -> None:
        """Stop the batch's run; on return nothing of it writes the run directory any more."""

    @abstractmethod
    def last_words(self, stored: StoredBatch) -> str:
        """The run's own reason for ending, for the batch's errors."""

    @abstractmethod
    def shutdown(self) -> None:
        """The server stops: what becomes of the runs it started, which the next server follows."""

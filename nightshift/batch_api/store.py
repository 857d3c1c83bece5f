"""The self-hosted OpenAI Batch API's objects and where they live.

Files and Batches are OpenAI's own objects (the `openai` client parses them unmodified), kept
as JSON beside their content on the server's storage — a directory or an s3:// prefix — so
nothing lives only in a server's memory:

    STORAGE/files/<file id>.json         a File and its owner
    STORAGE/files/<file id>.jsonl        an uploaded file's content
    STORAGE/batches/<batch id>.json      a Batch, its owner and its run
    STORAGE/batches/<batch id>/          the batch's Nightshift run directory

Ids are generated here and checked against their pattern before they touch a path, so no id or
file name from a request reaches outside the storage. An owner is a digest of the API key that
created the object; the key itself is never stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nightshift.runtime.deadline import parse_duration
from nightshift.runtime.rundir import RunDir, write_json_atomic
from nightshift.runtime.storage import location

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
TERMINAL = ("failed", "completed", "expired", "cancelled")
_ID_PATTERN = re.compile(r"^(file-|batch_|evt_)[0-9a-f]{24}$")
# OpenAI's bounds on `expires_after` (files) and `output_expires_after` (a batch's output files)
EXPIRES_AFTER_S = (3600, 2_592_000)  # an hour to 30 days, after the file's created_at
MAX_LISTED_ERRORS = 100  # a file with a million bad lines fails with the first hundred named


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class BatchError(BaseModel):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int
    output_tokens_details: dict = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int


BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus = "validating"
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: BatchErrors | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None


class StoredFile(BaseModel):
    file: FileObject
    owner: str
    content: str = Field(description="the content's path under the storage root")


class ExpiresAfter(BaseModel):
    """OpenAI's expiration policy of a file: `seconds` after its `created_at`."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=EXPIRES_AFTER_S[0], le=EXPIRES_AFTER_S[1])


class StoredBatch(BaseModel):
    batch: BatchObject
    owner: str
    output_expires_after: ExpiresAfter | None = Field(None, description="of its output and error files")
    run_attempts: int = Field(0, description="runs started; a run that crashed is resumed until max_attempts")
    run_group: int | None = Field(None, description="process group of the latest run, on run_host")
    run_host: str | None = None
    run_started: float | None = Field(None, description="the latest run's start (its process's create time)")
    flow_run_id: str | None = Field(None, description="with a deployment: the latest run's flow run")


class Delivery(BaseModel):
    """A webhook event in the outbox: what is sent, to whom it still is to be sent, and when next."""

    event: dict
    pending: list[str] = Field(description="endpoints that have not yet answered 2xx")
    attempts: int = 0
    next_at: float = 0.0
    first_at: float = Field(default_factory=time.time)

    @property
    def event_id(self) -> str:
        return self.event["id"]


def owner_of(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def window_seconds(completion_window: str) -> int:
    """OpenAI accepts "24h" only; a self-hosted night may be shorter ("6h", "90m", "30s")."""
    window = parse_duration(completion_window)
    if window is None or window.total_seconds() < 1:
        raise ValueError(f'completion_window {completion_window!r} is not a duration like "24h", "90m" or "30s"')
    return int(window.total_seconds())


def new_id(prefix: str) -> str:
    """Time-ordered (newest sorts last), unguessable: 12 hex digits of ms time, 12 random."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class Store:
    """Files and batches on the server's storage, each object one JSON document written whole."""

    def __init__(self, root: str, retention_s: int | None = None) -> None:
        self.root = location(root)
        self.retention_s = retention_s  # files say when retention removes them (FileObject.expires_at)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def run_dir(self, batch_id: str) -> RunDir:
        return RunDir(self.root / "batches" / _checked(batch_id))

    # Files
    def upload_path(self, file_id: str) -> str:
        return f"files/{_checked(file_id)}.jsonl"

    def add_file(
        self,
        file_id: str,
        owner: str,
        filename: str,
        purpose: str,
        size: int,
        content: str,
        expires_after: ExpiresAfter | None = None,
    ) -> StoredFile:
        """Record a file whose content is already at `content` (a path under the storage root); it
        expires `expires_after` its creation (OpenAI's policy), else at the server's retention."""
        now = int(time.time())
        retention = expires_after.seconds if expires_after else self.retention_s
        expires = now + retention if retention else None
        file = FileObject(
            id=_checked(file_id), bytes=size, created_at=now, filename=filename, purpose=purpose, expires_at=expires
        )
        stored = StoredFile(file=file, owner=owner, content=content)
        write_json_atomic(self.root / "files" / f"{file.id}.json", stored.model_dump())
        return stored

    def file(self, file_id: str, owner: str) -> StoredFile | None:
        """The file, if it exists and `owner` made it (another owner's file does not exist for them)."""
        stored = self._load(StoredFile, "files", file_id)
        return stored if stored is not None and stored.owner == owner else None

    def files(self, owner: str) -> list[StoredFile]:
        return [f for f in self._all(StoredFile, "files") if f.owner == owner]

    def delete_file(self, stored: StoredFile) -> None:
        content = self.root / stored.content
        if stored.file.purpose == "batch" and content.exists():  # outputs stay in their run directory
            content.unlink()
        (self.root / "files" / f"{stored.file.id}.json").unlink()

    # Batches
    def save_batch(self, stored: StoredBatch) -> None:
        write_json_atomic(self.root / "batches" / f"{_checked(stored.batch.id)}.json", stored.model_dump())

    def batch(self, batch_id: str, owner: str | None = None) -> StoredBatch | None:
        stored = self._load(StoredBatch, "batches", batch_id)
        return stored if stored is not None and owner in (None, stored.owner) else None

    def batches(self, owner: str | None = None) -> list[StoredBatch]:
        return [b for b in self._all(StoredBatch, "batches") if owner in (None, b.owner)]

    def in_use(self, file_id: str) -> bool:
        """Whether a batch not yet finished reads the file."""
        return any(b.batch.input_file_id == file_id and b.batch.status not in TERMINAL for b in self.batches())

    def active_batches(self, owner: str) -> int:
        return sum(b.batch.status not in TERMINAL for b in self.batches(owner))

    # Webhook events not yet delivered (nightshift.batch_api.webhooks)
    def save_webhook(self, delivery: Delivery) -> None:
        write_json_atomic(self.root / "webhooks" / f"{_checked(delivery.event_id)}.json", delivery.model_dump())

    def webhooks(self) -> list[Delivery]:
        return self._all(Delivery, "webhooks")

    def drop_webhook(self, event_id: str) -> None:
        path = self.root / "webhooks" / f"{_checked(event_id)}.json"
        if path.exists():
            path.unlink()

    # Retention
    def expire(self, created_before: int | None, now: int) -> tuple[list[str], list[str]]:
        """Remove the finished batches created before `created_before` (Unix time; None: keep
        them), with their run directories and output files, and every file past its `expires_at`
        at `now` (its own policy, or the server's retention) — except a file a batch in progress
        still reads. A batch whose output files expired by its `output_expires_after` keeps its
        object but loses its run directory: nothing of its outputs stays. Returns the batch and
        file ids removed."""
        batches = self.batches()
        gone_batches = self._retire_batches(batches, created_before)
        in_use = {b.batch.input_file_id for b in batches if b.batch.status not in TERMINAL}
        gone_files = self._expire_files(created_before, now, in_use)
        self._clear_expired_outputs([b for b in batches if b.batch.id not in gone_batches])
        return gone_batches, gone_files

    def _retire_batches(self, batches: list[StoredBatch], created_before: int | None) -> list[str]:
        gone = []
        for stored in batches:
            old = created_before is not None and stored.batch.created_at < created_before
            if stored.batch.status in TERMINAL and old:
                self._remove_run_dir(stored.batch.id)
                (self.root / "batches" / f"{stored.batch.id}.json").unlink()
                gone.append(stored.batch.id)
        return gone

    def _expire_files(self, created_before: int | None, now: int, in_use: set[str]) -> list[str]:
        gone = []
        for stored in self._all(StoredFile, "files"):
            expired = stored.file.expires_at is not None and stored.file.expires_at <= now
            old = created_before is not None and stored.file.created_at < created_before
            if (expired or old) and stored.file.id not in in_use:
                content = self.root / stored.content
                if content.exists():
                    content.unlink()
                (self.root / "files" / f"{stored.file.id}.json").unlink()
                gone.append(stored.file.id)
        return gone

    def _clear_expired_outputs(self, batches: list[StoredBatch]) -> None:
        for stored in batches:
            outputs = [f for f in (stored.batch.output_file_id, stored.batch.error_file_id) if f]
            ended = stored.output_expires_after is not None and stored.batch.status in TERMINAL
            if ended and outputs and not any((self.root / "files" / f"{f}.json").exists() for f in outputs):
                self._remove_run_dir(stored.batch.id)

    def _remove_run_dir(self, batch_id: str) -> None:
        run_dir = self.run_dir(batch_id).root
        if run_dir.exists():
            run_dir.fs.rm(run_dir.path, recursive=True) if hasattr(run_dir, "fs") else shutil.rmtree(run_dir)

    def _load(self, model, folder: str, object_id: str):
        if not _ID_PATTERN.match(object_id):
            return None
        path = self.root / folder / f"{object_id}.json"
        for attempt in range(5):
            try:
                return model.model_validate_json(path.read_text())
            except FileNotFoundError:
                return None
            except OSError:  # on a bucket, the object was replaced while being read (s3fs FileExpired)
                if attempt == 4:
                    raise
                time.sleep(0.1)

    def _all(self, model, folder: str) -> list:
        """Oldest first (ids are time-ordered)."""
        directory = self.root / folder
        if not directory.exists():
            return []
        found = []
        for path in sorted(directory.glob("*.json"), key=lambda p: p.name):
            try:
                found.append(model.model_validate_json(path.read_text()))
            except FileNotFoundError:  # deleted while listed
                continue
        return found


def page(objects: list, limit: int, after: str | None, newest_first: bool = True) -> tuple[list, bool]:
    """OpenAI's cursor pagination: up to `limit` objects after the one with id `after`."""
    ordered = list(reversed(objects)) if newest_first else list(objects)
    ids = [o.id for o in ordered]
    start = ids.index(after) + 1 if after in ids else 0
    chosen = ordered[start : start + limit]
    return chosen, start + limit < len(ordered)


def check_batch_input(path: Path, endpoint: str, max_requests: int) -> tuple[int, list[BatchError]]:
    """What makes OpenAI fail a whole batch in `validating`: a line that is not a JSON object,
    a line for another endpoint, a repeated custom_id, no request at all, too many requests.
    Returns (requests, errors); a request's body is checked later, per row, by the run."""
    errors: list[BatchError] = []
    custom_ids: set[str] = set()
    requests = 0
    for line_no, raw in input_lines(path):
        if not raw.strip():
            continue
        requests += 1
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            errors.append(
                BatchError(code="invalid_json_line", line=line_no, message="This line is not parseable as valid JSON.")
            )
        elif row.get("url") != endpoint:
            errors.append(
                BatchError(
                    code="url_mismatch",
                    line=line_no,
                    param="url",
                    message=f"The url of this line ({row.get('url')!r}) is not the batch's endpoint {endpoint}.",
                )
            )
        elif isinstance(row.get("custom_id"), str):
            if row["custom_id"] in custom_ids:
                errors.append(
                    BatchError(
                        code="duplicate_custom_id",
                        line=line_no,
                        param="custom_id",
                        message=f"The custom_id {row['custom_id']!r} is already used by an earlier line.",
                    )
                )
            custom_ids.add(row["custom_id"])
        if len(errors) >= MAX_LISTED_ERRORS:
            break
    if not requests:
        errors.append(BatchError(code="empty_file", message="The input file has no requests."))
    elif requests > max_requests:
        errors.append(
            BatchError(
                code="too_many_tasks",
                message=f"The input file has {requests} requests; a batch holds at most {max_requests}.",
            )
        )
    return requests, errors


def input_lines(path: Path) -> Iterator[tuple[int, str]]:
    with location(path).open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            yield line_no, raw.decode("utf-8-sig" if line_no == 1 else "utf-8", errors="replace")


def _checked(object_id: str) -> str:
    if not _ID_PATTERN.match(object_id):
        raise ValueError(f"not a Nightshift object id: {object_id!r}")
    return object_id

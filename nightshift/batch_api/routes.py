"""The Batch API's HTTP surface (/v1/files, /v1/batches) as FastAPI routers over the Store.

Requests are pydantic models and every 4xx is in OpenAI's error shape, which its clients parse
into the error's message — never FastAPI's own `{"detail": …}`. What happens to a batch after it
is created is the runner's (nightshift.batch_api.server); the routes only read the store and hand the
runner a status change under its lock.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Literal, Protocol

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from nightshift.batch_api.store import (
    ENDPOINTS,
    EXPIRES_AFTER_S,
    TERMINAL,
    BatchObject,
    ExpiresAfter,
    Store,
    StoredBatch,
    StoredFile,
    new_id,
    owner_of,
    page,
    window_seconds,
)
from nightshift.config import BATCH_CLASS_KEY, BatchApiConfig, batch_class
from nightshift.errors import NightshiftError
from nightshift.runtime.storage import StorageFull, written_whole


class Runner(Protocol):
    """What the routes need of whoever runs the batches: its lock, and a status change made under it."""

    lock: threading.RLock

    def update(self, batch_id: str, change: Callable[[StoredBatch], None]) -> StoredBatch: ...


class ApiError(NightshiftError):
    """A refusal in OpenAI's error shape, answered with its HTTP status (not a run's end)."""

    retryable = False

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        self.status, self.message, self.code, self.param = status, message, code, param


async def bounded_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past `limit` bytes before more of it is read: by its
    declared length, else as it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body is larger than {limit} bytes.")
    body = bytearray()
    async for block in request.stream():
        body += block
        if len(body) > limit:
            raise ApiError(413, f"The request body is larger than {limit} bytes.")
    return bytes(body)


FORM_OVERHEAD = 65536  # a multipart upload's boundaries, headers and purpose field beside the file


async def bounded_form(request: Request, limit: int, too_large: Callable[[], ApiError]):
    """The request's multipart form, refused (`too_large()`) once more than `limit` bytes have
    come — by its declared length before any is read, else as it streams in; starlette removes
    the parts it spooled when parsing stops."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large()
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise too_large()
        return message

    return await Request(request.scope, receive).form(max_files=1, max_fields=8)


def form_expires_after(form) -> ExpiresAfter | None:
    """The upload's `expires_after` policy, as the official client sends it in a multipart form
    (`expires_after[anchor]`, `expires_after[seconds]`); a 400 naming it when it is not OpenAI's."""
    fields = {key.removeprefix("expires_after[").removesuffix("]"): value
              for key, value in form.multi_items() if key.startswith("expires_after[")}  # fmt: skip
    if not fields:
        return None
    try:
        return ExpiresAfter.model_validate(fields)
    except ValidationError:
        low, high = EXPIRES_AFTER_S
        message = f"expires_after: anchor 'created_at' and seconds from {low} to {high}, not {fields}"
        raise ApiError(400, message, "invalid_value", "expires_after") from None


def stored_upload(
    store: Store, file: UploadFile, who: str, limit: int, too_large: Callable[[], ApiError],
    expiry: ExpiresAfter | None = None,
) -> dict:  # fmt: skip
    """An upload copied onto the storage as a new file of `who` (at most `limit` bytes)."""
    file_id = new_id("file-")
    size = 0
    try:
        with written_whole(store.path(store.upload_path(file_id))) as tmp, open(tmp, "wb") as out:
            while block := file.file.read(1 << 20):
                size += len(block)
                if size > limit:
                    raise too_large()
                out.write(block)
    except StorageFull:  # nothing of the upload is kept: it was a temporary, removed
        raise ApiError(507, "The server's storage is full: the file was not stored. Try again later.") from None
    name = os.path.basename(file.filename or "upload.jsonl")[:255]  # a label only, never a path
    return store.add_file(file_id, who, name, "batch", size, store.upload_path(file_id), expiry).file.model_dump()


def known_cursor(objects: list, after: str | None, kind: str) -> list:
    """`objects`, once `after` (a cursor) is one of them: an unknown one is a 400, not the first page
    again — a client following cursors would loop. Another key's object is as unknown as none."""
    if after is not None and all(o.id != after for o in objects):
        raise ApiError(400, f"after: no {kind} {after!r} to list after", "invalid_value", "after")
    return objects


class CreateBatch(BaseModel):
    """POST /v1/batches' body, as OpenAI's reference defines it (`completion_window` may be any
    duration here, not only "24h")."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: Literal[ENDPOINTS]  # type: ignore[valid-type]
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)
    output_expires_after: ExpiresAfter | None = None

    @field_validator("completion_window")
    @classmethod
    def _a_duration(cls, value: str) -> str:
        window_seconds(value)
        return value

    @field_validator("metadata")
    @classmethod
    def _short_pairs(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and not all(len(k) <= 64 and len(v) <= 512 for k, v in value.items()):
            raise ValueError("metadata holds at most 16 string pairs (keys ≤ 64, values ≤ 512)")
        return value


def create_app(config: BatchApiConfig, store: Store, runner: Runner, owners: set[str]) -> FastAPI:
    """The API for the key digests in `owners`; each key sees only its own files and batches."""
    app = FastAPI(title="Nightshift Batch API", docs_url=None, redoc_url=None)
    _answer_errors_as_openai_does(app)

    def owner(authorization: str | None = Header(None)) -> str:
        key = (authorization or "").removeprefix("Bearer ").strip()
        digest = owner_of(key) if key else ""
        if not key or not any(hmac.compare_digest(digest, allowed) for allowed in owners):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return digest

    app.include_router(files_router(config, store, runner, owner))
    app.include_router(batches_router(config, store, runner, owner))
    return app


def _answer_errors_as_openai_does(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return openai_error(exc.status, exc.message, exc.code, exc.param)

    # A 422 for a malformed upload, a 404 for an unknown path: in OpenAI's shape too.
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return _invalid(exc.errors())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return openai_error(404, f"Unknown request URL: {request.method} {request.url.path}.", "unknown_url")
        return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)  # a 405 keeps its Allow


def openai_error(status: int, message: str, code: str | None = None, param: str | None = None, headers=None):
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _invalid(errors) -> JSONResponse:
    """A 400 naming the first parameter that is missing or invalid."""
    first = errors[0]
    param = str(first["loc"][-1]) if first.get("loc") else None
    if first.get("type") == "missing":
        return openai_error(400, f"Missing required parameter: '{param}'.", "missing_required_parameter", param)
    message = str(first["msg"]).removeprefix("Value error, ")
    return openai_error(400, f"Invalid '{param}': {message}.", "invalid_value", param)


def files_router(config: BatchApiConfig, store: Store, runner: Runner, owner) -> APIRouter:
    router = APIRouter(prefix="/v1/files")

    def found(file_id: str, who: str) -> StoredFile:
        stored = store.file(file_id, who)
        if stored is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return stored

    _add_file_writes(router, config, store, runner, owner, found)
    _add_file_reads(router, store, owner, found)
    return router


def _add_file_writes(router: APIRouter, config: BatchApiConfig, store: Store, runner: Runner, owner, found) -> None:
    def too_large() -> ApiError:
        return ApiError(413, f"The file is larger than {config.max_file_bytes} bytes.", param="file")

    @router.post("")
    async def create_file(request: Request):
        """The key first, then the body — read as it streams in, refused (413) the moment it
        passes the limit, its spooled parts removed: nothing is read for a stranger, nothing
        larger than the limit is ever held."""
        who = owner(request.headers.get("authorization"))
        form = await bounded_form(request, config.max_file_bytes + FORM_OVERHEAD, too_large)
        try:
            file, purpose = form.get("file"), form.get("purpose")
            if file is None or isinstance(file, str):
                raise ApiError(400, "Missing required parameter: 'file'.", "missing_required_parameter", "file")
            if not isinstance(purpose, str):
                raise ApiError(400, "Missing required parameter: 'purpose'.", "missing_required_parameter", "purpose")
            if purpose != "batch":
                raise ApiError(400, f"Nightshift serves purpose 'batch' only, not {purpose!r}.", param="purpose")
            expiry = form_expires_after(form)
            return await run_in_threadpool(stored_upload, store, file, who, config.max_file_bytes, too_large, expiry)
        finally:
            await form.close()

    @router.delete("/{file_id}")
    def delete_file(file_id: str, who=Depends(owner)):
        with runner.lock:  # no batch takes the file while it goes
            stored = found(file_id, who)
            if store.in_use(file_id):
                raise ApiError(409, f"File {file_id} is the input of a batch in progress: cancel the batch first.")
            store.delete_file(stored)
        return {"id": file_id, "object": "file", "deleted": True}


def _add_file_reads(router: APIRouter, store: Store, owner, found) -> None:
    @router.get("")
    def list_files(
        purpose: str | None = None,
        limit: int = Query(10000, ge=1, le=10000),
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
        who=Depends(owner),
    ):
        files = [f.file for f in store.files(who) if purpose in (None, f.file.purpose)]
        chosen, more = page(known_cursor(files, after, "file"), limit, after, newest_first=order == "desc")
        return listing([f.model_dump() for f in chosen], more)

    @router.get("/{file_id}")
    def retrieve_file(file_id: str, who=Depends(owner)):
        return found(file_id, who).file.model_dump()

    @router.get("/{file_id}/content")
    def file_content(file_id: str, who=Depends(owner)):
        handle = store.path(found(file_id, who).content).open("rb")

        def blocks():
            with handle:
                while block := handle.read(1 << 20):
                    yield block

        return StreamingResponse(blocks(), media_type="application/octet-stream")


def batches_router(config: BatchApiConfig, store: Store, runner: Runner, owner) -> APIRouter:
    router = APIRouter(prefix="/v1/batches")

    def found(batch_id: str, who: str) -> StoredBatch:
        stored = store.batch(batch_id, who)
        if stored is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="id")
        return stored

    @router.post("")
    async def create_batch(request: Request, who=Depends(owner)):
        raw = await bounded_body(request, config.max_body_bytes)
        try:
            body = CreateBatch.model_validate(json.loads(raw))
        except ValidationError as exc:  # named by its top-level field, as OpenAI names them
            return _invalid([{**error, "loc": error["loc"][:1]} for error in exc.errors()])
        except ValueError:
            raise ApiError(400, "The request body is not JSON.") from None
        return _new_batch(config, store, runner, body, who).model_dump()

    @router.get("")
    def list_batches(limit: int = Query(20, ge=1, le=100), after: str | None = None, who=Depends(owner)):
        batches = [b.batch for b in store.batches(who)]
        chosen, more = page(known_cursor(batches, after, "batch"), limit, after)
        return listing([b.model_dump() for b in chosen], more)

    @router.get("/{batch_id}")
    def retrieve_batch(batch_id: str, who=Depends(owner)):
        return found(batch_id, who).batch.model_dump()

    @router.post("/{batch_id}/cancel")
    def cancel_batch(batch_id: str, who=Depends(owner)):
        with runner.lock:
            stored = found(batch_id, who)
            if stored.batch.status in TERMINAL or stored.batch.status == "cancelling":
                if stored.batch.status not in ("cancelling", "cancelled"):
                    raise ApiError(409, f"Cannot cancel a batch with status '{stored.batch.status}'.")
                return stored.batch.model_dump()

            def cancelling(s: StoredBatch) -> None:
                s.batch.status, s.batch.cancelling_at = "cancelling", int(time.time())

            return runner.update(batch_id, cancelling).batch.model_dump()

    return router


def _new_batch(config: BatchApiConfig, store: Store, runner: Runner, body: CreateBatch, who: str) -> BatchObject:
    """A batch saved for `who`, queued: its file its own and of purpose batch, and the key under its cap."""
    now = int(time.time())
    batch = BatchObject(
        id=new_id("batch_"),
        endpoint=body.endpoint,
        input_file_id=body.input_file_id,
        completion_window=body.completion_window,
        created_at=now,
        expires_at=now + window_seconds(body.completion_window),
        metadata=body.metadata,
        model=config.embedding_model if body.endpoint == "/v1/embeddings" else config.chat_model,
    )
    try:
        batch_class(config.priority_class, (body.metadata or {}).get(BATCH_CLASS_KEY))
    except ValueError as refused:
        raise ApiError(400, f"Invalid metadata: {refused}.", param="metadata") from None
    cap = config.max_active_batches_per_key
    with runner.lock:  # counted and saved under one lock: two requests cannot both take the last place
        source = store.file(body.input_file_id, who)  # …nor can the file be deleted meanwhile
        if source is None or source.file.purpose != "batch":
            raise ApiError(400, f"Invalid input_file_id: {body.input_file_id!r}.", param="input_file_id")
        if cap is not None and store.active_batches(who) >= cap:
            raise ApiError(
                429, f"This key has {cap} batches in progress, the most this server allows: wait for one to "
                "finish, or cancel one.", "batch_limit_exceeded",
            )  # fmt: skip
        store.save_batch(StoredBatch(batch=batch, owner=who, output_expires_after=body.output_expires_after))
    return batch


def listing(data: list[dict], has_more: bool) -> dict:
    """A page in OpenAI's list shape."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }

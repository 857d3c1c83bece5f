"""Readers that turn an input file into a stream of request rows, one row per input record.

Two input kinds:

* ``openai-batch``: JSONL in the OpenAI Batch format, one ``{custom_id, method, url, body}``
  object a line, for ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``.
* ``corpus``: Parquet, CSV or JSONL with an id column and a text column; each text becomes a
  chat request through a user prompt template and an optional system prompt — or, with
  `task="embed"`, an embedding request (truncated to the model's limit, as sentence-transformers
  users expect) whose vector is written to `embeddings.parquet`.

Readers stream (the input is never held whole in memory) and open paths through fsspec, so
``s3://`` and other object-store URLs read the same way as local files. A row that cannot be
turned into a request still comes out, carrying an OpenAI-style error instead of a request:
every input record is accounted for. A problem with the whole input raises `InputError`
before any model is loaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import orjson

from nightshift.config import CorpusOptions
from nightshift.errors import ExitStatus, NightshiftError, RequestRejected
from nightshift.runtime.storage import filesystem, is_url
from nightshift.wire.responses import RESPONSES_URL, chat_body, echoed

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL, RESPONSES_URL)
CORPUS_SUFFIXES = (".parquet", ".csv")


class InputError(NightshiftError, ValueError):
    """The whole input is unusable; raised before any GPU time is spent."""

    exit_status = ExitStatus.CONFIGURATION
    retryable = False


@dataclass(frozen=True, slots=True)
class InputRow:
    """One input record: either a request or the error that kept it from being one.

    The request travels as JSON text holding at least `url` and `body` — for a batch line the
    line itself, so planning never re-serialises it (planning speed is per-row work).
    """

    line_no: int  # 1-based line (JSONL, CSV data line) or record number (Parquet)
    custom_id: str | None
    request_json: str | None  # {"url": ..., "body": {...}, ...}
    error: dict | None  # {"code": ..., "message": ..., "line": ...}

    @property
    def request(self) -> dict | None:
        return json.loads(self.request_json) if self.request_json is not None else None

    @property
    def error_json(self) -> str | None:
        return orjson.dumps(self.error).decode() if self.error is not None else None


def row_error(code: str, message: str, line_no: int) -> dict:
    return {"code": code, "message": message, "line": line_no}


def detect_kind(path: str, corpus: CorpusOptions | None) -> str:
    if corpus is not None or path.lower().endswith(CORPUS_SUFFIXES):
        return "corpus"
    return "openai-batch"


def estimate_rows(path: str, kind: str, storage_options: dict | None = None) -> int | None:
    """About how many rows `path` holds, read in milliseconds: Parquet's footer, else the file's
    size over the mean length of its first lines. None when it cannot be told — also for a
    remote input without credentials at hand (probing a bucket could hang on retries)."""
    if storage_options is None and is_url(path):
        return None
    try:
        fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
        if fs_path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open(fs_path, "rb") as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        size = fs.size(fs_path)
        with fs.open(fs_path, "rb") as handle:
            head = handle.read(1 << 16)
    except Exception:
        return None
    lines = head.count(b"\n")
    if not lines:
        return 1 if size else 0
    return int(size / (len(head) / lines)) if len(head) < size else lines


def check_input(path: str, kind: str, corpus: CorpusOptions | None = None, storage_options: dict | None = None) -> None:
    """Raise InputError at once for an input that cannot be used at all (missing, not a file,
    unreadable, columns missing, no rows, no usable row): rows are read up to the first usable
    one — the whole file only when none is."""
    next((row for row in read_rows(path, kind, corpus, storage_options) if row.request_json is not None), None)


def read_rows(
    path: str, kind: str, corpus: CorpusOptions | None = None, storage_options: dict | None = None
) -> Iterator[InputRow]:
    """Stream the rows of `path` (`storage_options` go to fsspec: s3fs credentials, endpoint;
    by default the process's, see nightshift.runtime.storage). Raises InputError for an unreadable or
    empty input."""
    try:
        if storage_options is None:
            fs, fs_path = filesystem(path)
        else:
            fs, fs_path = fsspec.core.url_to_fs(path, **storage_options)
        if not fs.isfile(fs_path):
            raise InputError(f"input {path!r} does not exist or is not a file")
    except InputError:
        raise
    except Exception as exc:  # credentials, bad URL, unreachable bucket...
        raise InputError(f"cannot open input {path!r}: {exc}") from exc
    if kind == "openai-batch":
        rows = _read_openai_batch(fs, fs_path)
    else:
        rows = _read_corpus(fs, fs_path, corpus or CorpusOptions())
    return _non_empty(rows, path)


def _non_empty(rows: Iterator[InputRow], path: str) -> Iterator[InputRow]:
    count = 0
    usable = 0
    first_error = None
    for row in rows:
        count += 1
        usable += row.request_json is not None
        first_error = first_error or row.error
        yield row
    if count == 0:
        raise InputError(f"input {path!r} holds no rows")
    if usable == 0 and count > 0:
        raise InputError(
            f"input {path!r}: none of its {count} rows is a usable request (is it the right format?); "
            f"line {first_error['line']}: {first_error['message']}"
        )


UTF8_BOM = b"\xef\xbb\xbf"


def _without_bom(lines):
    """The lines of a file, a UTF-8 byte-order mark (Windows tools write one) taken off the first."""
    lines = iter(lines)
    first = next(lines, None)
    if first is None:
        return
    yield first.removeprefix(UTF8_BOM)
    yield from lines


# --- OpenAI batch JSONL ---------------------------------------------------------------


def _read_openai_batch(fs, fs_path: str) -> Iterator[InputRow]:
    seen_ids: set[int] = set()
    with fs.open(fs_path, "rb") as handle:
        for line_no, raw in enumerate(_without_bom(handle), start=1):
            if not raw.strip():
                continue  # blank lines are separators, not records
            row = parse_batch_line(raw, line_no)
            if row.custom_id is not None and row.error is None:
                # 8-byte digests keep ten million ids in a few hundred MB
                key = int.from_bytes(hashlib.blake2b(row.custom_id.encode(), digest_size=8).digest(), "big")
                if key in seen_ids:
                    row = InputRow(
                        line_no,
                        row.custom_id,
                        None,
                        row_error(
                            "duplicate_custom_id", f"custom_id {row.custom_id!r} appears on an earlier line", line_no
                        ),
                    )
                else:
                    seen_ids.add(key)
            yield row


def parse_batch_line(raw: bytes, line_no: int) -> InputRow:
    """Structural checks of one OpenAI batch line; the body's fields are checked at generation."""

    def bad(code: str, message: str, custom_id: str | None = None) -> InputRow:
        return InputRow(line_no, custom_id, None, row_error(code, message, line_no))

    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return bad("invalid_encoding", f"line is not valid UTF-8: {exc.reason} at byte {exc.start}")
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return bad("invalid_json", f"line is not valid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(obj, dict):
        return bad("invalid_request", f"line must be a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if custom_id is None or custom_id == "":
        return bad("missing_custom_id", "line has no custom_id")
    if not isinstance(custom_id, str):
        return bad("invalid_custom_id", f"custom_id must be a string, got {type(custom_id).__name__}")
    method = obj.get("method", "POST")
    if method != "POST":
        return bad("unsupported_method", f"method {method!r} is not supported; use POST", custom_id)
    url = obj.get("url")
    if url not in SUPPORTED_URLS:
        return bad(
            "unsupported_url", f"url {url!r} is not supported; use one of {', '.join(SUPPORTED_URLS)}", custom_id
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        return bad("invalid_request", "body must be a JSON object", custom_id)
    if url == CHAT_URL and not body.get("messages"):
        return bad("missing_messages", "a chat completion body needs a non-empty messages list", custom_id)
    if url == COMPLETIONS_URL and body.get("prompt") in (None, "", []):
        return bad("missing_prompt", "a completion body needs a non-empty prompt", custom_id)
    if url == EMBEDDINGS_URL and body.get("input") in (None, "", []):
        return bad("missing_input", "an embeddings body needs a non-empty input", custom_id)
    if url == RESPONSES_URL:
        return _responses_row(obj, body, line_no, custom_id)
    return InputRow(line_no, custom_id, text, None)


def _responses_row(line: dict, body: dict, line_no: int, custom_id: str) -> InputRow:
    """A /v1/responses line as the chat line that asks the same, carrying what its Response object
    echoes (nightshift.wire.responses); what chat cannot ask, the row's error."""
    try:
        chat = chat_body(body)
    except RequestRejected as exc:
        return InputRow(line_no, custom_id, None, row_error(exc.code, str(exc), line_no))
    request = {**line, "url": CHAT_URL, "body": chat, "responses": echoed(body)}
    return InputRow(line_no, custom_id, orjson.dumps(request).decode(), None)


# --- corpora --------------------------------------------------------------------------


def _read_corpus(fs, fs_path: str, options: CorpusOptions) -> Iterator[InputRow]:
    lower = fs_path.lower()
    if lower.endswith(".parquet"):
        records = _parquet_records(fs, fs_path, options)
    elif lower.endswith(".csv"):
        records = _csv_records(fs, fs_path, options)
    else:
        records = _jsonl_records(fs, fs_path, options)
    for line_no, record_id, text, image in records:
        yield corpus_row(line_no, record_id, text, options, image)


def corpus_row(line_no: int, record_id, text, options: CorpusOptions, image=None) -> InputRow:
    """One corpus record as a request (or the error it is); `image`: its image column's value —
    bytes, or a path or URL — shown to a vision model beside the prompt (nightshift.wire.images)."""
    custom_id = f"row-{line_no}" if options.id_column is None else record_id
    if custom_id is None or custom_id == "":
        return InputRow(
            line_no, None, None, row_error("missing_custom_id", f"column {options.id_column!r} is empty", line_no)
        )
    custom_id = str(custom_id)
    if text is None or not str(text).strip():
        return InputRow(
            line_no, custom_id, None, row_error("empty_prompt", f"column {options.text_column!r} is empty", line_no)
        )
    if options.task == "embed":
        body = {"input": options.template.replace("{text}", str(text)), "truncate_prompt_tokens": -1}
        if options.normalize is not None:
            body["use_activation"] = options.normalize
        request = {"url": EMBEDDINGS_URL, "body": body, "vector_only": True}  # no JSON floats for corpora
        return InputRow(line_no, custom_id, orjson.dumps(request).decode(), None)
    messages = []
    if options.system:
        messages.append({"role": "system", "content": options.system})
    prompt = options.template.replace("{text}", str(text))
    if image is not None and image != "" and image != b"":
        url = f"data:image/*;base64,{base64.b64encode(image).decode()}" if isinstance(image, bytes) else str(image)
        messages.append({"role": "user", "content": [{"type": "text", "text": prompt}, _image_part(url)]})
    else:
        messages.append({"role": "user", "content": prompt})
    body: dict = {"messages": messages, "temperature": options.temperature}
    if options.max_tokens is not None:
        body["max_tokens"] = options.max_tokens
    return InputRow(line_no, custom_id, orjson.dumps({"url": CHAT_URL, "body": body}).decode(), None)


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _require_columns(available, options: CorpusOptions, path: str) -> list[str]:
    wanted = [c for c in (options.id_column, options.text_column, options.image_column) if c is not None]
    missing = [c for c in wanted if c not in available]
    if missing:
        raise InputError(
            f"input {path!r} has no column {', '.join(map(repr, missing))}; "
            f"its columns are {', '.join(map(repr, available))}"
        )
    return wanted


def _parquet_records(fs, fs_path: str, options: CorpusOptions):
    import pyarrow.parquet as pq

    with fs.open(fs_path, "rb") as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as exc:
            raise InputError(f"input {fs_path!r} is not a readable Parquet file: {exc}") from exc
        columns = _require_columns(parquet.schema_arrow.names, options, fs_path)
        yield from _batch_records(parquet.iter_batches(batch_size=4096, columns=columns), options, fs_path)


def _csv_records(fs, fs_path: str, options: CorpusOptions):
    import pyarrow.csv as pacsv

    with fs.open(fs_path, "rb") as handle:
        try:
            reader = pacsv.open_csv(
                handle,
                convert_options=pacsv.ConvertOptions(
                    column_types={c: "string" for c in (options.id_column, options.text_column) if c}
                ),
            )
        except Exception as exc:
            raise InputError(f"input {fs_path!r} is not a readable CSV file: {exc}") from exc
        _require_columns(reader.schema.names, options, fs_path)
        yield from _batch_records(reader, options, fs_path)


def _batch_records(batches, options: CorpusOptions, fs_path: str):
    """(record number, id, text) from Arrow record batches; a file broken midway fails whole."""
    import pyarrow as pa

    line_no = 0
    try:
        for batch in batches:
            ids = batch.column(options.id_column).to_pylist() if options.id_column else None
            texts = batch.column(options.text_column).to_pylist()
            images = batch.column(options.image_column).to_pylist() if options.image_column else None
            for i, text in enumerate(texts):
                line_no += 1
                yield line_no, ids[i] if ids else None, text, images[i] if images else None
    except pa.ArrowException as exc:
        raise InputError(f"input {fs_path!r} is unreadable after record {line_no}: {exc}") from exc


def _jsonl_records(fs, fs_path: str, options: CorpusOptions):
    checked = False
    with fs.open(fs_path, "rb") as handle:
        for line_no, raw in enumerate(_without_bom(handle), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                obj = None
            if not isinstance(obj, dict):
                yield line_no, f"row-{line_no}", None, None
                continue
            if not checked:
                _require_columns(list(obj), options, fs_path)
                checked = True
            record_id = obj.get(options.id_column) if options.id_column else None
            yield (
                line_no,
                record_id,
                obj.get(options.text_column),
                obj.get(options.image_column) if options.image_column else None,
            )

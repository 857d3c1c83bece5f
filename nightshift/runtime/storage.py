"""One storage layer for every stage: a run directory, a shard file, a chunk or a result cache
is a local path or an object-store URL (`s3://bucket/prefix/run`), reached the same way.

`location()` gives a pathlib object for either: `pathlib.Path` for a local path, a
universal-pathlib `UPath` over fsspec for a URL; both have `/`, `open`, `exists`, `glob`,
`read_text`, `stat`, `unlink`, so stages have one code path.

Object stores have no rename. `written_whole()` always hands the writer a local temporary
file; locally it replaces the target in one rename, remotely it is uploaded in one PUT (one
multipart upload for large files), which an object store makes visible all at once. A reader
sees the old object or the new one, never part of one, and a writer killed half-way leaves
nothing behind that a later run could trust.

Credentials: the environment or the machine's role (s3fs's own chain: `AWS_ACCESS_KEY_ID`,
`AWS_ENDPOINT_URL`, instance profile), or an ObjectStorage block the flow loads by name and
hands to `use_storage_options()`. They stay in this process's memory: never in a parameter, a
run file or a log line. Transient faults (throttling, 5xx, dropped connections) are retried by
botocore with adaptive backoff; a failure that outlasts them names the object.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

from nightshift.errors import ExitStatus, NightshiftError
from nightshift.runtime.in_flight import InFlight

# botocore's retry loop, for throttling, 5xx and connection errors on every request.
# A dead endpoint fails in about a minute, not after ten full connect timeouts.
_S3_CLIENT_CONFIG = {"retries": {"max_attempts": 10, "mode": "adaptive"}, "connect_timeout": 5}
_options: dict[str, dict] = {}  # protocol → storage options of this process (credentials)


class StorageError(NightshiftError, OSError):
    """A read or write that failed after its retries; the message names the object."""


class StorageFull(StorageError):
    """A local write found its device full. Nothing half-written became visible (every write is
    a temporary renamed whole); rows already on disk are kept, so the run resumes once there is
    room. Said once, with the path and the space, never as a traceback."""

    exit_status = ExitStatus.STORAGE_FULL
    retryable = False

    def __init__(self, target: Path, written: int) -> None:
        try:
            free = shutil.disk_usage(_existing_parent(target)).free
        except OSError:
            free = 0
        self.target, self.free = target, free
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device of {target}: {size_text(free)} free, and this write needed more than "
            f"{size_text(written)} — free some space (or give the run directory a larger disk) and run the same "
            "command again: finished rows are kept and the run resumes",
        )

    def __str__(self) -> str:
        return self.strerror


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def size_text(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count} GiB"


_FULL = {errno.ENOSPC, errno.EDQUOT}


def is_device_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full device or quota: an OSError's errno, or the
    text pyarrow and Prefect pass on without one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno in _FULL or "No space left on device" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_url(path) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def protocol_of(path) -> str:
    return str(path).split("://", 1)[0] if is_url(path) else "file"


def use_storage_options(options: dict, protocol: str = "s3") -> None:
    """Credentials and endpoint for every `protocol://` location this process opens."""
    _options[protocol] = dict(options)


def storage_options(path) -> dict:
    protocol = protocol_of(path)
    options = dict(_options.get(protocol, {}))
    if protocol in ("s3", "s3a"):
        options.setdefault("config_kwargs", _S3_CLIENT_CONFIG)
        # Other machines write the same prefixes: a cached listing would hide their objects.
        options.setdefault("use_listings_cache", False)
    return options


def location(path) -> Path:
    """A pathlib object for a local path or an object-store URL (typed as Path: same API)."""
    if not is_url(path):
        return Path(str(path)).expanduser()
    from upath import UPath

    if isinstance(path, UPath):
        return path
    return UPath(str(path), **storage_options(path))


def filesystem(path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem holding `path`, and the path as that filesystem names it."""
    return fsspec.core.url_to_fs(str(path), **storage_options(path))


def read_fresh(path) -> bytes:
    """The object's bytes as they are now: a small file another process rewrites (a lease, a
    heartbeat) read whole, past the filesystem's cached listing — whose stale size would cut a
    rewritten object short."""
    if not is_url(path):
        return Path(str(path)).expanduser().read_bytes()
    fs, fs_path = filesystem(path)
    fs.invalidate_cache(fs_path)
    return fs.cat_file(fs_path)


class _CommitGate:
    """The process's commit gate. Its fences are called with every path just before it is made
    visible, and again just after: the run directory's owner fence (nightshift.runtime.lease) raises there
    when this process no longer owns the directory it writes in, and says whether it guards
    `target` at all. It counts the writes between those two checks, so that a process about to
    exit (the CLI ends with os._exit) lets each one finish its second check — and take back what
    landed after a takeover — instead of cutting it off mid-upload to land once the process is
    gone. Process-wide by nature: the fences guard every writer thread of the process."""

    def __init__(self) -> None:
        self.fences: list[Callable[[str], bool]] = []
        self.writes = InFlight()  # the writes between their two checks

    def passes(self, target) -> bool:
        return any([fence(str(target)) for fence in self.fences])


_gate = _CommitGate()


def add_commit_fence(fence: Callable[[str], bool]) -> None:
    if fence not in _gate.fences:
        _gate.fences.append(fence)


def settle_commits(timeout: float = 60.0) -> bool:
    """Wait until no write of this process is between its fence checks; whether none is."""
    return _gate.writes.wait_until_none(timeout)


@contextmanager
def _retracted_if_fenced(target, guarded: bool, existed: Callable[[], bool], remove: Callable[[], None]):
    """Make `target` visible in the body, then pass the fences once more: a process frozen after
    its check and before its write landed (a stopped VM mid-upload) wakes to find the directory
    another's, and a file it added is taken back — one that was there before is left as it is."""
    was_there = guarded and existed()
    yield
    if guarded:
        try:
            _gate.passes(target)
        except NightshiftError:
            if not was_there:
                remove()
            raise


@contextmanager
def written_whole(path) -> Iterator[Path]:
    """Yield a local temporary file to write; once the body returns it becomes `path` whole —
    unless a commit fence refuses it. If the body raises, `path` is left as it was."""
    target = location(path)
    if not is_url(target):
        # one temporary per write: two threads of a process (a lease's renewal and its release)
        # may write the same file at once, and each fsyncs and renames its own
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with _gate.writes:
                guarded = _gate.passes(target)
                _synced(tmp)  # on disk before it counts: a power cut leaves the old file or the new, whole
                with _retracted_if_fenced(target, guarded, target.exists, lambda: target.unlink(missing_ok=True)):
                    os.replace(tmp, target)
            _synced(target.parent)
        except OSError as exc:
            if is_device_full(exc) and not isinstance(exc, StorageFull):
                raise StorageFull(target, tmp.stat().st_size if tmp.exists() else 0) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return
    scratch = tempfile.mkdtemp(prefix="nightshift-upload-")
    try:
        tmp = Path(scratch) / target.name
        yield tmp
        with _gate.writes:
            guarded = _gate.passes(target)
            fs, fs_path = filesystem(target)
            with _retracted_if_fenced(target, guarded, lambda: fs.exists(fs_path), lambda: fs.rm_file(fs_path)):
                try:
                    fs.put_file(str(tmp), fs_path, **_upload_options(target, tmp.stat().st_size))
                except Exception as exc:
                    raise StorageError(f"could not write {target}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _synced(path: Path) -> None:
    """fsync a file or a directory (its entries: a rename made durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def local_copies(paths) -> Iterator[list[str]]:
    """`paths` as local files, for DuckDB to read: local paths as they are, object-store ones
    fetched together (one GET each, concurrently) into a temporary directory removed on exit.

    DuckDB reading through fsspec costs about ten requests per remote file and query (HEADs
    before every open): a 120-row run on a bucket made 2,800 requests, 90 % of them from DuckDB
    reading chunk, metrics and plan files again and again. Fetched first, the same query costs
    one GET per file and is an order of magnitude faster. A copy keeps its object's path under
    the directory, so names sort as the objects' do (best_rows_sql breaks ties by file name)."""
    paths = [str(p) for p in paths]
    remote = [p for p in paths if is_url(p)]
    if not remote:
        yield paths
        return
    scratch = tempfile.mkdtemp(prefix="nightshift-fetch-")
    try:
        fs, _ = filesystem(remote[0])
        names = [filesystem(p)[1] for p in remote]
        copies = {p: os.path.join(scratch, name.lstrip("/")) for p, name in zip(remote, names)}
        try:
            fs.get(names, [copies[p] for p in remote])
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise StorageError(
                f"could not read {len(remote)} files under {remote[0].rsplit('/', 1)[0]}: {exc}"
            ) from exc
        yield [copies.get(p, p) for p in paths]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# s3fs reads a file under 100 MiB whole into memory to upload it, and a larger one 10 parts of
# 50 MiB at a time: a 1M-row run's output.jsonl took ~1 GiB to upload. Parts of 8 MiB, two at
# a time, keep an upload's memory near 16 MiB whatever the file's size.
_S3_UPLOAD_PART = 8 * 2**20
_S3_MAX_PARTS = 10_000


def _upload_options(target, size: int) -> dict:
    if protocol_of(target) not in ("s3", "s3a"):
        return {}
    return {"chunksize": max(_S3_UPLOAD_PART, -(-size // _S3_MAX_PARTS)), "max_concurrency": 2}


def read_table(paths, columns: list[str] | None = None):
    """A pyarrow Table from one Parquet file or several (all on one filesystem)."""
    import pyarrow.parquet as pq

    many = isinstance(paths, (list, tuple))
    paths = list(paths) if many else [paths]
    fs, _ = filesystem(paths[0])
    names = [filesystem(p)[1] for p in paths]
    try:
        return pq.read_table(names if many else names[0], filesystem=fs, columns=columns)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(f"could not read {paths[0] if not many else f'{len(paths)} files'}: {exc}") from exc


def parquet_rows(path) -> int:
    """Rows of a Parquet file, read from its footer alone."""
    import pyarrow.parquet as pq

    with location(path).open("rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def duckdb_connection(database: str = ":memory:", memory_limit: str | None = None):
    """A DuckDB connection that reads and writes object-store URLs through fsspec (no DuckDB
    extension download: only package registries may be reachable). With a `database` file and
    a `memory_limit`, its tables and sorts go to local disk past that much memory."""
    import duckdb

    # Stages read each remote object once: DuckDB's cache of remote file blocks would only take
    # memory. Its progress bar would draw in every task's log.
    config = {"enable_external_file_cache": False} | ({"memory_limit": memory_limit} if memory_limit else {})
    con = duckdb.connect(database, config=config)
    con.execute("SET enable_progress_bar = false")
    for protocol in {"s3", *_options}:
        try:
            con.register_filesystem(fsspec.filesystem(protocol, **storage_options(f"{protocol}://")))
        except (ImportError, ValueError):  # s3fs not installed, or an unknown protocol
            continue
    return con


def sql_path(path) -> str:
    """A path as a DuckDB string literal's content."""
    return str(path).replace("'", "''")

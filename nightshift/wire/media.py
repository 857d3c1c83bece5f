"""What a row may make this machine read: one policy for every source a batch line names.

A chat row's `image_url` parts (audio, video and documents later) name their content inline
(`data:`), on this machine (a path, `file://`), in a bucket (`s3://`, `gs://`, `az://` …) or on
the web (`http(s)://`). Whoever wrote the row decides what is read — so whether the row is
trusted decides what may be:

- **trusted** (`nightshift run`, the operator's own files): any local path, any bucket the
  machine's credentials reach; http(s) URLs are left to the engine, which fetches them itself.
- **tenant** (`nightshift serve`'s batches, `media_sources="allowed"`): only `data:` URLs, plus
  the roots and URL prefixes the operator opened (`--allow-media-root DIR`, `--allow-media-url
  s3://bucket/prefix/` or `https://host/path/`). Everything is read here and sent inline, so the
  engine — in this process or a server — never reads a path or fetches a URL of a row.

Everywhere: no fsspec protocol chaining (`simplecache::…`), only the schemes above, regular
files only (no devices, FIFOs, or symlinks out of a root), every read bounded (limit + 1
bytes), remote fetches with a timeout and no redirect outside what is allowed. A source the
policy refuses is that row's `media_not_allowed` error, which says nothing about the source.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from nightshift.errors import RequestRejected

MAX_MEDIA_BYTES = 20 * 1024**2  # OpenAI's limit for an image of a chat request
OBJECT_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
WEB_SCHEMES = frozenset({"http", "https"})
MAX_REDIRECTS = 3
NOT_ALLOWED = "media_not_allowed"


@dataclass(frozen=True)
class MediaPolicy:
    """What the rows of one run may name as a source, and the bounds of what is read."""

    trusted: bool = False  # the operator's own rows: any path or bucket; http(s) left to the engine
    roots: tuple[str, ...] = ()  # tenant rows: local directories they may name (resolved, absolute)
    url_prefixes: tuple[str, ...] = ()  # tenant rows: s3://bucket/prefix/ or https://host/path/ they may name
    max_items: int = 16  # media parts per row
    max_pixels: int = 40_000_000  # an image's decoded width × height
    max_bytes: int = MAX_MEDIA_BYTES
    fetch_timeout_s: float = 10.0

    @classmethod
    def of_job(cls, job) -> MediaPolicy:
        """A job's (JobOptions'): trusted unless its media_sources is "allowed"."""
        return cls(
            trusted=job.media_sources == "any",
            roots=tuple(os.path.realpath(os.path.expanduser(root)) for root in job.allow_media_root),
            url_prefixes=tuple(job.allow_media_url),
            max_items=job.max_media_per_row,
            max_pixels=job.max_image_pixels,
        )

    def engine_fetches(self, url: str) -> bool:
        """Whether `url` goes to the engine as it is (a trusted row's web URL), not read here."""
        return self.trusted and scheme_of(url) in WEB_SCHEMES

    def admit(self, url: str) -> str:
        """The source's kind ("data", "local", "object", "web") if this policy lets a row name it;
        RequestRejected(media_not_allowed) — saying nothing of the source — if not."""
        kind = kind_of(url)
        if kind == "data" or self.trusted:
            return kind
        if kind == "local":
            path = local_path(url)
            if os.path.isabs(path) and any(_within(os.path.realpath(path), root) for root in self.roots):
                return kind
        elif any(_under_prefix(url, prefix) for prefix in self.url_prefixes):
            return kind
        raise RequestRejected(NOT_ALLOWED, self.refusal())

    def refusal(self) -> str:
        opened = [*self.roots, *self.url_prefixes]
        where = f" and sources under {', '.join(opened)}" if opened else ""
        return f"this server reads media only from data: URLs{where}: the source is not allowed"


def scheme_of(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url.split("/", 1)[0] else ""


def kind_of(url: str) -> str:
    """data, local, object or web — RequestRejected(media_not_allowed) for a chained fsspec URL
    or a scheme no policy reads (ftp, webhdfs, memory, …)."""
    if url.startswith("data:"):
        return "data"
    if "::" in url:
        raise RequestRejected(NOT_ALLOWED, "a chained URL (::) is never read: give the source's own URL")
    scheme = scheme_of(url)
    if scheme in ("", "file"):
        if scheme == "file" and urlsplit(url).netloc not in ("", "localhost"):
            raise RequestRejected(NOT_ALLOWED, "a file:// URL names this machine only (file:///path)")
        return "local"
    if scheme in OBJECT_SCHEMES:
        return "object"
    if scheme in WEB_SCHEMES:
        return "web"
    raise RequestRejected(NOT_ALLOWED, f"{scheme}: URLs are not read: give a data:, path, bucket or http(s) URL")


def local_path(url: str) -> str:
    return unquote(urlsplit(url).path) if url.lower().startswith("file:") else url


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _under_prefix(url: str, prefix: str) -> bool:
    """Whether `url` lies under `prefix` (same scheme, host and port; a path below the prefix's,
    no `.`/`..` segment, no query or fragment to smuggle another path)."""
    given, allowed = urlsplit(url), urlsplit(prefix)
    if given.scheme.lower() != allowed.scheme.lower() or given.netloc.lower() != allowed.netloc.lower():
        return False
    if given.query or given.fragment or "@" in given.netloc:
        return False
    segments = unquote(given.path).split("/")
    if any(segment in (".", "..") for segment in segments) or "\\" in unquote(given.path):
        return False
    base = allowed.path if allowed.path.endswith("/") else allowed.path + "/"
    return unquote(given.path).startswith(base) or given.path == allowed.path


def size_checked(url: str, policy: MediaPolicy) -> None:
    """At preparation: the source is allowed, and a file or object is there within bounds
    (a web source is fetched when its row is admitted)."""
    kind = policy.admit(url)
    if kind == "local":
        with _opened_local(url, policy) as (_, size):
            _within_bounds(size, url, policy)
    elif kind == "object":
        _within_bounds(_object_size(url), url, policy)


def read(url: str, policy: MediaPolicy) -> bytes:
    """The source's bytes, at most policy.max_bytes (one more is an error), once admitted."""
    kind = policy.admit(url)
    if kind == "local":
        with _opened_local(url, policy) as (fd, size):
            _within_bounds(size, url, policy)
            return _bounded(lambda n: os.read(fd, n), url, policy)
    if kind == "object":
        return _read_object(url, policy)
    if kind == "web":
        return _fetch(url, policy)
    raise ValueError(f"read() takes a file, object or web URL, not {kind}")


class _opened_local:
    """A local source opened for reading: the file itself (symlinks resolved, then checked
    against the roots again), a regular file only, never blocking on a FIFO."""

    def __init__(self, url: str, policy: MediaPolicy) -> None:
        self.url, self.policy, self.fd = url, policy, -1
        self.path = os.path.realpath(os.path.expanduser(local_path(url)))

    def __enter__(self) -> tuple[int, int]:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            # named as the row named it: an allowed source (a tenant's outside the roots never gets here)
            raise RequestRejected("invalid_image", f"{self.url}: the file cannot be read: {exc.strerror}") from None
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self.fd)
            raise RequestRejected(NOT_ALLOWED, "only regular files are read: not a device, FIFO or directory")
        return self.fd, info.st_size

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _within_bounds(size: int, url: str, policy: MediaPolicy) -> None:
    if size > policy.max_bytes:
        raise RequestRejected("invalid_image", f"{size:,} bytes, over the {policy.max_bytes:,} a media part may have")


def _bounded(read_some, url: str, policy: MediaPolicy) -> bytes:
    """Read until the end or policy.max_bytes + 1 bytes, whichever comes first."""
    data = bytearray()
    while len(data) <= policy.max_bytes:
        block = read_some(min(1 << 20, policy.max_bytes + 1 - len(data)))
        if not block:
            return bytes(data)
        data += block
    raise RequestRejected("invalid_image", f"over the {policy.max_bytes:,} bytes a media part may have")


def _object_size(url: str) -> int:
    from nightshift.runtime.storage import location

    try:
        return location(url).stat().st_size
    except (OSError, ValueError) as exc:
        raise RequestRejected("invalid_image", f"{url}: cannot be read from the bucket: {exc}") from None


def _read_object(url: str, policy: MediaPolicy) -> bytes:
    from nightshift.runtime.storage import location

    try:
        with location(url).open("rb") as handle:
            return _bounded(handle.read, url, policy)
    except (OSError, ValueError) as exc:
        raise RequestRejected("invalid_image", f"{url}: cannot be read from the bucket: {exc}") from None


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    """A web source fetched here: a timeout, no redirect outside the allowed prefixes, a host
    name that resolves to a private or loopback address refused (a literal address the operator
    allowed is taken as meant), the body bounded as it streams in."""
    import httpx

    for _ in range(MAX_REDIRECTS + 1):
        policy.admit(url)
        _public_or_literal(url)
        try:
            with httpx.stream("GET", url, timeout=policy.fetch_timeout_s, follow_redirects=False) as response:
                if response.is_redirect:
                    url = str(response.url.join(response.headers.get("location", "")))
                    continue
                if response.status_code != 200:
                    raise RequestRejected("invalid_image", f"{url}: the server answered {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit():
                    _within_bounds(int(declared), url, policy)
                blocks = response.iter_bytes(1 << 16)
                return _bounded(lambda _n, blocks=blocks: next(blocks, b""), url, policy)
        except httpx.HTTPError as exc:
            raise RequestRejected("invalid_image", f"{url}: could not be fetched: {type(exc).__name__}") from None
    raise RequestRejected("invalid_image", f"{url}: more than {MAX_REDIRECTS} redirects")


def _public_or_literal(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
        return  # a literal address: the operator's prefix named it
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        raise RequestRejected("invalid_image", f"{url}: the host does not resolve") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            raise RequestRejected(NOT_ALLOWED, "the host resolves to a private address: the source is not allowed")


def normalized_prefix(prefix: str) -> str:
    """An operator's --allow-media-url, checked: an object-store or http(s) URL with a host, no
    credentials, query, chaining or `..`."""
    parts = urlsplit(prefix)
    if "::" in prefix or parts.scheme.lower() not in OBJECT_SCHEMES | WEB_SCHEMES or not parts.netloc:
        raise ValueError(f"an allowed media URL is s3://bucket/prefix/ or https://host/path/, not {prefix!r}")
    if "@" in parts.netloc or parts.query or parts.fragment or {".", ".."} & set(unquote(parts.path).split("/")):
        raise ValueError(f"an allowed media URL has no user, query, fragment or '..': {prefix!r}")
    return prefix

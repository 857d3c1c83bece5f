"""Where the task cache (Prefect's result storage) lives: inside the run directory, local or on
a bucket.

Prefect wants result storage saved server-side. This block saves a path and nothing else: the
credentials of an `s3://` run directory come from each process (its environment or role, or
the ObjectStorage block its flow loaded), so the block document shown in the UI holds no
secret, and every worker reaches the same checkpoints with its own credentials. Results are
written whole (nightshift.runtime.storage), so a cached result is never read half-written.
"""

from __future__ import annotations

import hashlib

import anyio
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import WritableFileSystem
from pydantic import Field

from nightshift.runtime.storage import location, written_whole


class RunCheckpoints(WritableFileSystem):
    """A run directory's `checkpoints/`: the cache that lets finished shards come back Cached."""

    _block_type_name = "Nightshift Run Checkpoints"
    _block_type_slug = "nightshift-run-checkpoints"

    basepath: str = Field(description="a local directory or an object-store URL (s3://bucket/runs/x/checkpoints)")

    def _resolve_path(self, path: str) -> str:
        return f"{self.basepath.rstrip('/')}/{path}"

    # Prefect calls the a-prefixed methods from async code and passes `_sync` to the others.
    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return location(self._resolve_path(path)).read_bytes()

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        full = self._resolve_path(path)
        with written_whole(full) as tmp:
            tmp.write_bytes(content)
        return full

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)


def saved_run_checkpoints(basepath: str) -> str:
    """Save (idempotently) the checkpoints block of one run directory; returns its slug."""
    name = "nightshift-ckpt-" + hashlib.sha256(basepath.encode()).hexdigest()[:16]
    for attempt in range(3):
        try:
            RunCheckpoints(basepath=basepath).save(name, overwrite=True)
            break
        except ObjectAlreadyExists:  # runs started together on a new server: another registered the
            if attempt == 2:  # block type between this one's look and its create; it is there now
                raise
    return f"{RunCheckpoints.get_block_type_slug()}/{name}"

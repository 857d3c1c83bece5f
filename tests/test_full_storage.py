"""A run directory whose disk fills up mid-run: one clear message naming the path and the space,
exit status 73, no traceback, nothing half-written and no output published — and the same
command, once there is room, resumes and ends with every row exactly once."""

import os
import subprocess

import pyarrow.parquet as pq
import pytest
from conftest import chat_request, read_jsonl, write_jsonl

from nightshift.cli import main  # in this process: the session's engine serves it
from nightshift.errors import ExitStatus


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs of its own, as a run directory's disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"this machine cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def run(batch, run_dir) -> int:
    return main(["run", str(batch), "--output", str(run_dir), "--model", "tiny", "--max-num-seqs", "64",
                 "--shard-size", "400", "--chunk-size", "100"])  # fmt: skip


def test_a_full_run_directory_fails_once_clearly_and_the_same_command_resumes_exactly_once(tmp_path, small_disk, capfd):
    rows = [chat_request(f"r{i}", f"Write note {i}", max_tokens=32, ignore_eos=True) for i in range(1200)]
    batch = write_jsonl(tmp_path / "in.jsonl", rows)
    assert run(batch, tmp_path / "reference") == 0
    needed = sum(p.stat().st_size for p in (tmp_path / "reference").rglob("*") if p.is_file())
    capfd.readouterr()
    # Leave the disk room for a sixth of what the run writes (its plan is a twenty-fifth, its
    # chunk files a third, its outputs the rest): it fills up mid-generation.
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as handle:
        os.posix_fallocate(
            handle.fileno(), 0, os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - needed // 6
        )
    run_dir = small_disk / "run"

    assert run(batch, run_dir) == ExitStatus.STORAGE_FULL
    told = capfd.readouterr().err
    assert f"no space left on the device of {run_dir}" in told and "free" in told, told[-3000:]
    assert "Traceback" not in told, told[-3000:]
    assert not (run_dir / "output.jsonl").exists() and not (run_dir / "errors.jsonl").exists()
    assert not [p for p in run_dir.rglob("*.tmp-*")], "nothing half-written left behind"
    chunks = list(run_dir.rglob("chunk-*.parquet"))
    assert chunks and sum(pq.read_metadata(c).num_rows for c in chunks) < 1200  # whole files, some rows done

    ballast.unlink()
    assert run(batch, run_dir) == 0
    outputs = read_jsonl(run_dir / "output.jsonl")
    assert [o["custom_id"] for o in outputs] == [f"r{i}" for i in range(1200)], "every row once, in input order"
    reference = [
        o["response"]["body"]["choices"][0]["message"]["content"]
        for o in read_jsonl(tmp_path / "reference" / "output.jsonl")
    ]
    answers = [o["response"]["body"]["choices"][0]["message"]["content"] for o in outputs]
    # vLLM is not batch-invariant: a near-tie token may flip between runs with other batches.
    assert sum(a == b for a, b in zip(answers, reference)) >= 0.99 * len(reference)


def test_a_full_result_cache_is_said_once_and_the_run_completes_without_it(tmp_path, small_disk, caplog):
    """The cache saves later runs work; a full cache disk costs tonight's run nothing: its outputs
    are whole, the cache holds no half-written file, and once there is room it fills again."""
    rows = [chat_request(f"r{i}", f"Cached note {i}", max_tokens=8) for i in range(150)]
    batch = write_jsonl(tmp_path / "in.jsonl", rows)
    cache = small_disk / "cache"
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize)

    def cached_run(run_dir) -> int:
        return main(["run", str(batch), "--output", str(run_dir), "--model", "tiny", "--max-num-seqs", "64",
                     "--result-cache", str(cache), "--oracle-samples", "0", "--determinism-samples", "0"])  # fmt: skip

    assert cached_run(tmp_path / "full") == 0
    warned = [r for r in caplog.records if r.name == "nightshift.result_cache"]
    assert len(warned) == 1 and warned[0].exc_info is None  # one line, no traceback
    assert warned[0].getMessage().startswith(f"result cache full: no space left on the device of {cache}")
    assert len(read_jsonl(tmp_path / "full" / "output.jsonl")) == 150
    assert not [p for p in small_disk.rglob("*.tmp-*")] and not list(small_disk.rglob("*.parquet"))

    ballast.unlink()
    assert cached_run(tmp_path / "room") == 0  # stores this time
    assert cached_run(tmp_path / "again") == 0
    assert {r["source"] for r in pq.read_table(tmp_path / "again" / "results.parquet").to_pylist()} == {"cache"}

"""`nightshift status RUN_DIR`: how far a run (finished, running or killed) has got.

Reads only the run directory — the plan manifest and the chunk files' Parquet footers — so
it is cheap, safe while the job runs, and needs no Prefect server.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nightshift.config import JobSpec
from nightshift.records import Plan, ProgressSnapshot
from nightshift.runtime.lease import superseded
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import parquet_rows
from nightshift.stages.chunks import chunk_files, shard_cache_key


@dataclass
class ShardStatus:
    index: int
    rows: int
    rows_done: int
    state: str  # done | partial | pending


@dataclass
class RunStatus:
    total_rows: int
    rows_done: int
    shards_done: int
    shards_partial: int
    shards_pending: int
    rows_per_second: float | None
    eta_seconds: float | None
    merged: bool
    shards: list[ShardStatus]
    # Rows finished so far by the live run (progress.json, updated as each row finishes), of
    # which `rows_done` are already in chunk files: what a kill would keep.
    rows_finished: int | None = None
    tokens_per_second: float | None = None


def run_status(rd: RunDir) -> RunStatus:
    if not rd.plan_manifest.exists():
        raise FileNotFoundError(f"{rd} has no plan yet (plan/manifest.json)")
    plan, job = Plan.load(rd.plan_manifest), JobSpec.load(rd.job)
    shard_states, written = [], []
    for shard in plan.shards:
        output = rd.shard_output(shard_cache_key(shard, job))
        done = 0
        for chunk in chunk_files(output):
            try:
                rows = parquet_rows(chunk)
            except Exception:  # damaged: the next run's checkpoint check regenerates it
                continue
            done += rows
            written.append((_written_at(chunk), rows))
        finished = RunDir.shard_result(output).exists()
        state = "done" if finished else "partial" if done else "pending"
        shard_states.append(ShardStatus(shard.index, shard.num_rows, done, state))
    rows_done = sum(s.rows_done for s in shard_states)
    rate = _recent_rate(written)
    remaining = plan.total_rows - rows_done
    live = _live_progress(rd, plan.total_rows)  # by the row, where the chunks move by the chunk
    remaining_live = live.eta_seconds if live else None
    return RunStatus(
        total_rows=plan.total_rows,
        rows_done=rows_done,
        shards_done=sum(s.state == "done" for s in shard_states),
        shards_partial=sum(s.state == "partial" for s in shard_states),
        shards_pending=sum(s.state == "pending" for s in shard_states),
        rows_per_second=rate,
        eta_seconds=remaining_live if remaining_live is not None else _eta(remaining, rate),
        merged=rd.summary.exists() and rd.summary.stat().st_mtime >= rd.plan_manifest.stat().st_mtime,
        shards=shard_states,
        rows_finished=max(live.completed, rows_done) if live else None,
        tokens_per_second=live.rolling_tokens_per_second if live else None,
    )


def _eta(remaining: int, rate: float | None) -> float | None:
    return (remaining / rate) if rate and remaining else (0.0 if not remaining else None)


def _live_progress(rd: RunDir, total: int) -> ProgressSnapshot | None:
    """progress.json of a run still writing it (updated in the last two minutes, by the lease's
    holder: not the late write of a run taken over), else None."""
    try:
        live = ProgressSnapshot.load(rd.progress)
    except (OSError, ValueError):
        return None
    if live.total != total or time.time() - live.updated > 120 or superseded(rd, live.epoch):
        return None
    return live


def _written_at(chunk: Path) -> float:
    """When a chunk was written, from its name (`chunk-<time_ns>-…`): no stat call per file,
    which on an object store would be a request each."""
    return int(chunk.name.split("-")[1]) / 1e9


def _recent_rate(written: list[tuple[float, int]]) -> float | None:
    """Rows per second over the chunk files written in the last ten minutes of activity."""
    if len(written) < 2:
        return None
    written.sort()
    last = written[-1][0]
    recent = [(t, n) for t, n in written if t >= last - 600]
    if len(recent) < 2 or recent[-1][0] == recent[0][0]:
        return None
    return sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])


def print_status(run_dir: RunDir, as_json: bool = False) -> int:
    try:
        status = run_status(run_dir)
    except FileNotFoundError as exc:
        print(f"nightshift: {exc}")
        return 2
    if as_json:
        print(json.dumps(asdict(status), indent=2))
        return 0
    pct = 100 * status.rows_done / status.total_rows if status.total_rows else 100
    print(f"{run_dir}: {status.rows_done}/{status.total_rows} rows ({pct:.1f}%){' — merged' if status.merged else ''}")
    if status.rows_finished is not None and not status.merged:
        rate = f", {status.tokens_per_second:,.0f} tokens/s" if status.tokens_per_second else ""
        print(f"live: {status.rows_finished}/{status.total_rows} rows finished{rate} ({status.rows_done} checkpointed)")
    print(f"shards: {status.shards_done} done, {status.shards_partial} partial, {status.shards_pending} pending")
    if status.rows_per_second:
        eta = status.eta_seconds or 0
        print(
            f"rate: {status.rows_per_second:.1f} rows/s, "
            f"estimated remaining: {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )
    for shard in status.shards:
        if shard.state == "partial":
            print(f"  shard {shard.index}: {shard.rows_done}/{shard.rows} rows")
    return 0

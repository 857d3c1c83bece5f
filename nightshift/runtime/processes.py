"""What a process Nightshift starts needs (a port to listen on, to know when its parent dies), and
what it needs to know of another process: whether it still runs."""

from __future__ import annotations

import ctypes
import socket


def on_parent_death(signum: int) -> None:
    """This process gets `signum` when the thread that started it (its parent) ends, by any death
    (Linux's PR_SET_PDEATHSIG; call it in the child, e.g. as Popen's preexec_fn)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def free_port() -> int:
    """A port on 127.0.0.1 that is free now (the kernel's pick), for a server about to start."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def started_at(pid: int) -> float | None:
    """When the process `pid` started (seconds since the epoch), or None for a process that is
    gone. A zombie is gone: a process killed outright after its parent ended is reparented, and
    where the machine's first process reaps no orphans (a container without an init) it stays a
    zombie, with its pid and start time, doing nothing."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except psutil.Error:
        return None


def still_runs(pid: int, started: float) -> bool:
    """Whether the process that was `pid`, started at `started`, still runs: not gone, not a
    zombie, and not another process the kernel has since handed the same pid."""
    now = started_at(pid)
    return now is not None and abs(now - started) < 1

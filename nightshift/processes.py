"""What a process Nightshift starts needs: a port to listen on, and to know when its parent dies."""

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

"""What a process Nightshift starts needs to know about its parent."""

from __future__ import annotations

import ctypes


def on_parent_death(signum: int) -> None:
    """This process gets `signum` when the thread that started it (its parent) ends, by any death
    (Linux's PR_SET_PDEATHSIG; call it in the child, e.g. as Popen's preexec_fn)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)

"""Fault drills: the hooks that tests and operators' drills use to make a real process fail the
way production ones do. Each is off unless its environment variable is set on the process.

    NIGHTSHIFT_CHAOS_KILL_ENGINE_ON=<custom_id>   admitting that row SIGKILLs the engine's processes
    NIGHTSHIFT_CHAOS_STALL_FILE=<path>            the first fan-out child run to find that file removes
                                                  it and hangs, heartbeating, like a straggler
    NIGHTSHIFT_CHAOS_STALL_ENGINE_START=<seconds> the engine start waits this long before loading: an
                                                  engine that never gets ready (engine_start_timeout_s)
"""

from __future__ import annotations

import os
import time


def kill_engine_on() -> str | None:
    """The custom_id whose admission kills the engine, if the drill is on."""
    return os.environ.get("NIGHTSHIFT_CHAOS_KILL_ENGINE_ON")


def stall_if_drilled() -> None:
    """Straggler drill: the first child run to find NIGHTSHIFT_CHAOS_STALL_FILE removes it and hangs."""
    path = os.environ.get("NIGHTSHIFT_CHAOS_STALL_FILE")
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            return
        time.sleep(24 * 3600)


def stall_engine_start() -> None:
    """Engine-start drill: wait NIGHTSHIFT_CHAOS_STALL_ENGINE_START seconds before loading."""
    seconds = os.environ.get("NIGHTSHIFT_CHAOS_STALL_ENGINE_START")
    if seconds:
        time.sleep(float(seconds))

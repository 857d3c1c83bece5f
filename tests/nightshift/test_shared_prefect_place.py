"""The shared temporary Prefect server's place (nightshift/local_prefect.py): who counts as alive.

A supervisor killed outright whose parent is gone is reparented, and on a machine whose first
process does not reap orphans (a container without an init) it stays a zombie: it still has a
pid and a start time, but it serves nothing. The next run must start a new server, not wait for
the dead one's to answer."""

import json
import subprocess
import time

import psutil
import pytest

from nightshift.local_prefect import Place

pytestmark = pytest.mark.fast


def _key_when_alive(pid: int) -> str:
    """The key the place recorded while the process ran: its pid and start time."""
    return f"{pid}-{psutil.Process(pid).create_time():.2f}"


def _zombie() -> tuple[subprocess.Popen, str]:
    """A child that has exited and that nobody has waited for, and its key from when it ran."""
    child = subprocess.Popen(["sleep", "0.5"])
    key = _key_when_alive(child.pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat") as stat:
            if stat.read().split(")")[-1].split()[0] == "Z":
                return child, key
        time.sleep(0.05)
    raise AssertionError("the child did not exit")


def test_a_supervisor_that_is_a_zombie_is_no_server_and_a_zombie_client_is_not_alive(tmp_path):
    place = Place(tmp_path)
    zombie, key = _zombie()
    try:
        place.clients.mkdir(parents=True, exist_ok=True)
        (place.clients / key).touch()  # registered while it ran
        place.state.write_text(json.dumps({"pid": zombie.pid, "key": key, "url": "http://x/api"}))
        assert place.server() is None, "a zombie supervisor serves nothing: a new server must start"
        assert place.live_clients() == [], "a zombie client keeps no server alive"
    finally:
        zombie.wait()


def test_a_live_supervisor_is_the_server(tmp_path):
    place = Place(tmp_path)
    live = subprocess.Popen(["sleep", "30"])
    try:
        place.root.mkdir(parents=True, exist_ok=True)
        known = {"pid": live.pid, "key": _key_when_alive(live.pid), "url": "http://x/api"}
        place.state.write_text(json.dumps(known))
        assert place.server() == known
    finally:
        live.kill()
        live.wait()

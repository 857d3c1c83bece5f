"""Stopping the process's engine kills its vLLM processes — and not a `vllm serve` the same
program started in a session of its own (an online server beside the batch; the suite's shared
server, whose engine core a test's engine stop used to kill)."""

import subprocess
import sys
import time

import pytest

from nightshift.engine.local import _kill_engine_processes

pytestmark = pytest.mark.fast
SLEEP = "import time; time.sleep(60)"


def test_an_engine_stop_kills_its_own_vllm_processes_not_a_server_in_a_session_of_its_own():
    own = subprocess.Popen([sys.executable, "-c", SLEEP, "VLLM::EngineCore"])
    server = subprocess.Popen([sys.executable, "-c", SLEEP, "VLLM::EngineCore"], start_new_session=True)
    try:
        time.sleep(0.3)
        _kill_engine_processes()
        assert own.wait(timeout=10) != 0, "the engine's own process lives on"
        assert server.poll() is None, "a server in its own session was killed"
    finally:
        for process in (own, server):
            process.kill()
            process.wait()

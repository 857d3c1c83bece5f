"""One engine for every batch: `nightshift serve --shared-engine`.

Without it, each batch's run starts a vLLM engine of its own: with `--max-running-batches 2` two
engines would each size themselves for the whole machine (on a GPU, 0.9 of the card each). With
it, the server starts one vLLM OpenAI server of its chat model on 127.0.0.1, sized as a run's
in-process engine is (nightshift.engine.sizing), with priority scheduling and cached-token
details on; every chat and completions batch's run sends its rows there (`--engine-url`), so the
batches running at once interleave in one engine's steps — with `--shortest-batch-first` a small
batch's rows pass a large one's there, and `--priority-class` and `--online-ttft-slo-ms` apply as
on any shared server. The server is stopped with `serve`, and dies with it if `serve` is killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from nightshift.batch_api.local_process import WITHHELD
from nightshift.errors import ConfigurationError
from nightshift.runtime.processes import free_port, on_parent_death

log = logging.getLogger("nightshift.serve")

CPU_KV_SPACE = "VLLM_CPU_KVCACHE_SPACE"  # GiB of a CPU engine's KV cache, as the operator may set it
READY_TIMEOUT_S = 900.0  # a large model's load from a slow disk; a server that dies says so at once


def server_flags(arguments: dict) -> list[str]:
    """vLLM's engine keyword arguments as `vllm serve` flags: True as --flag, False as --no-flag,
    a dict as JSON."""
    flags = []
    for name, value in arguments.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def server_command(model: str, port: int) -> list[str]:
    """The vLLM server of `model` (a bundled name or a path), sized as a run's own engine."""
    from nightshift.config import EngineConfig
    from nightshift.engine.sizing import engine_arguments
    from nightshift.engine.vllm_adapter import platform_is_cpu
    from nightshift.models import resolve_model

    arguments = engine_arguments(EngineConfig(model=model))
    arguments.pop("model")
    if platform_is_cpu() and (space := os.environ.get(CPU_KV_SPACE)):  # vLLM reads only whole GiB from it
        arguments.setdefault("kv_cache_memory_bytes", int(float(space) * 1024**3))
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model(model),
        "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port),
        "--scheduling-policy", "priority", "--enable-prompt-tokens-details", *server_flags(arguments),
    ]  # fmt: skip


class SharedEngine:
    """The chat model's server, started by `start()` (which returns its URL) and ended by `stop()`."""

    def __init__(self, model: str) -> None:
        self.model, self.process = model, None
        self.log_path = Path(tempfile.mkdtemp(prefix="nightshift-shared-engine-")) / "vllm.log"

    def start(self) -> str:
        port = free_port()
        command = server_command(self.model, port)
        log.info("starting the shared engine for %s: %s (log: %s)", self.model, " ".join(command), self.log_path)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(  # under a supervisor that takes its whole group down with it
                [sys.executable, "-m", "nightshift.batch_api.shared_engine", *command],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                env={name: value for name, value in os.environ.items() if name not in {*WITHHELD, CPU_KV_SPACE}},
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1"
        self._wait_ready(url)
        log.info("the shared engine serves %s at %s", self.model, url)
        return url

    def _wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise ConfigurationError(
                    f"the shared engine for {self.model} exited with status {self.process.returncode} before it "
                    f"was ready ({self.log_path}):\n{tail}"
                )
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise ConfigurationError(f"the shared engine for {self.model} was not ready in {READY_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        """The server and every process it started (vLLM's engine core and workers outlive a
        SIGTERMed API server on their own)."""
        if self.process is None:
            return
        for sent in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sent)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                continue


def supervise(command: list[str]) -> int:
    """The shared engine's supervisor, in the server's process group: it runs `command` (the
    vLLM server) and takes the whole group down with SIGKILL when it is told to stop or when
    `serve`, its parent, dies — even by SIGKILL; vLLM's engine core and workers, left to
    themselves, outlive their API server."""

    def down(*_) -> None:
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, down)
    signal.signal(signal.SIGINT, down)
    on_parent_death(signal.SIGTERM)
    if os.getppid() == 1:  # serve died before the line above
        down()
    status = subprocess.Popen(command).wait()
    _kill_the_rest_of_the_group()  # whatever the server left running
    return status


def _kill_the_rest_of_the_group() -> None:
    import psutil

    group = os.getpgid(0)
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and os.getpgid(process.pid) == group:
                process.kill()
        except (ProcessLookupError, psutil.Error):
            pass


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))

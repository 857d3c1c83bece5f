"""One vLLM engine per worker process, kept saturated across chunk and shard boundaries.

`LLM.chat` on a list of rows returns only when the last row finishes, so calling it per
chunk or per shard leaves the engine idle while the batch drains. Here one driver thread
owns the engine: generate tasks hand it iterators of prepared rows (jobs), the driver keeps
up to `2 × max_num_seqs` rows in flight, taking rows from the oldest job first, and routes
each finished row back to its job the moment it finishes. The next shard's rows enter while
the previous shard's last rows are still decoding.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from nightshift import drills
from nightshift.config import EngineConfig
from nightshift.engine import vllm_adapter
from nightshift.engine.protocol import Engine
from nightshift.engine.sizing import engine_arguments, memory_picture, use_every_cpu_core
from nightshift.errors import ConfigurationError, EngineCannotStartHere, EngineStartStalled, NightshiftError, Preempted
from nightshift.wire.images import with_images_resolved
from nightshift.wire.openai_format import PreparedRequest

log = logging.getLogger("nightshift.engine")

_DONE = object()


class EngineFailure(NightshiftError, RuntimeError):
    """The engine died under a job; `in_flight` holds the keys of the job's rows it was
    generating at that moment (the suspects, should one of them be what killed it)."""

    def __init__(self, message: str, in_flight: list[int] | None = None) -> None:
        super().__init__(message)
        self.in_flight = in_flight or []


class _Job:
    def __init__(self, requests: Iterable[PreparedRequest]) -> None:
        self.requests = iter(requests)
        self.results: queue.Queue = queue.Queue()
        self.in_flight = 0
        self.admitted_all = False
        self.stop_admitting = False  # set on preemption: finish what is in flight, take no more
        self.cancelled = False  # the consumer is gone: drop its results


class BatchEngine:
    """A vLLM `LLM` driven row by row by a background thread.

    `generate(rows)` yields `(row, RequestOutput)` as rows finish, or `(row, error)` for a
    row the engine refused (prompt longer than the context, say). Several callers may
    generate at once; their rows share the engine's batch. On an embedding model (vLLM's
    pooling runner) an embedding row's inputs go in as one engine request each and the row
    comes back as `(row, [PoolingRequestOutput, ...])` once all of them are done.
    """

    def __init__(self, config: EngineConfig) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        self.config = config
        vllm_adapter.check_at_start()  # a vLLM outside the supported range, or whose internals moved: said now
        arguments = engine_arguments(config)
        use_every_cpu_core()
        loading = time.monotonic()
        try:
            self.llm = LLM(**arguments)
        except Exception as exc:  # not worth a retry here: another start on this machine fails the same way
            raise EngineCannotStartHere(
                f"the engine could not start: {str(exc).splitlines()[0]} ({memory_picture(arguments)})"
            ) from exc
        self.tokenizer = self.llm.get_tokenizer()
        self.adapters = _lora_requests(config)  # a row's `adapter` → what vLLM generates it with
        self.tool_calling: dict[str | None, object] = {}  # per tool-call setting (engine.tool_calls)
        self.runner_type = self.llm.model_config.runner_type  # "generate" or "pooling": the endpoint served
        self.model_config = self.llm.model_config
        hf_config = self.model_config.hf_config  # a vision model's placeholder token for image pieces
        self.image_token_id = getattr(hf_config, "image_token_id", None) or getattr(
            hf_config, "image_token_index", None
        )
        self.default_sampling_params = (
            self.llm.model_config.get_diff_sampling_param() if self.runner_type == "generate" else {}
        )
        self.max_model_len = self.llm.model_config.max_model_len  # what vLLM settled on
        # vLLM fills the sizes left open with its defaults for the hardware: read them back
        self.max_num_seqs = vllm_adapter.scheduler_max_num_seqs(self.llm)
        self.settings = vllm_adapter.resolved_settings(self.llm)
        if config.engine_args:  # the passthrough, as given: the report shows what else ran
            self.settings["engine_args"] = " ".join(config.engine_args)  # KEY=JSON each, one string
        self.max_in_flight = 2 * self.max_num_seqs
        self.load_seconds = time.monotonic() - loading
        self.announced: set[str] = set()  # runs whose log has said "engine ready" (once each)
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._owners: dict[str, tuple[_Job, PreparedRequest, int]] = {}  # engine request → row, input
        self._parts: dict[int, list] = {}  # id(row) → its inputs' outputs so far (embedding rows)
        self._dead: BaseException | None = None
        self._chaos_custom_id = drills.kill_engine_on()
        self._closed = False
        self._thread = threading.Thread(target=self._drive, name="nightshift-engine", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="nightshift-engine-watch", daemon=True).start()

    def describe(self) -> str:
        s = self.settings
        kv = f"{s['kv_cache_tokens']:,} tokens" if s["kv_cache_tokens"] else "size unknown"
        return (
            f"engine ready in {self.load_seconds:.0f} s ({os.path.basename(self.config.model.rstrip('/'))}, "
            f"{s['dtype']}, context {self.max_model_len}, max_num_seqs {s['max_num_seqs']}, "
            f"max_num_batched_tokens {s['max_num_batched_tokens']}, "
            f"prefix caching {'on' if s['enable_prefix_caching'] else 'off'}, "
            f"chunked prefill {'on' if s['enable_chunked_prefill'] else 'off'}, KV cache {s['kv_cache_dtype']} {kv}, "
            f"{'eager' if s['enforce_eager'] else 'compiled'}, tensor parallel {s['tensor_parallel_size']})"
        )

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed

    def politeness_timeline(self, since: float) -> None:
        """An engine of this process's own shares it with nobody (nightshift.engine.remote does)."""
        return None

    def generate(
        self,
        requests: Iterable[PreparedRequest],
        stop: threading.Event | None = None,
        grace_s: float | Callable[[], float] = 20.0,
    ) -> Iterator[tuple[PreparedRequest, object]]:
        """Yield rows as they finish. Once `stop` is set, no new row is admitted and the
        rows in flight get `grace_s` seconds to finish; then `Preempted` is raised."""
        if not self.alive:
            raise EngineFailure(f"engine is not running: {self._dead!r}")
        job = _Job(requests)
        with self._wake:
            self._jobs.append(job)
            self._wake.notify()
        deadline = None
        try:
            while True:
                if stop is not None and stop.is_set() and deadline is None:
                    job.stop_admitting = True
                    deadline = time.monotonic() + (grace_s() if callable(grace_s) else grace_s)
                try:
                    item = job.results.get(timeout=0.25)
                except queue.Empty:
                    if deadline is not None and time.monotonic() > deadline:
                        raise Preempted(f"stopped on SIGTERM with {job.in_flight} rows in flight") from None
                    continue
                if item is _DONE:
                    if deadline is not None:
                        raise Preempted("stopped on SIGTERM after the rows in flight finished")
                    return
                if isinstance(item, EngineFailure):
                    raise item
                yield item
        finally:
            job.cancelled = True  # a consumer that stops early frees its rows' slots

    def close(self) -> None:
        """Stop the driver and the engine's processes (dropping the LLM object alone does not
        reliably end them, and each holds its KV cache). They are killed, not asked to stop:
        the engine holds nothing worth waiting for (every output is on disk), and vLLM's
        graceful teardown of a CPU engine never ends by itself — its core is force-killed after
        the 10 s it is given (measured: every graceful shutdown took 10.0 s)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        _kill_engine_processes()
        client = vllm_adapter.engine_core_client(self.llm)
        try:
            if client is not None:
                vllm_adapter.shutdown_engine_core(client, timeout=0)
        except Exception as exc:  # a dead engine may fail to shut down cleanly; it is gone anyway
            log.warning("engine shutdown: %r", exc)
        _kill_engine_processes()
        del self.llm
        # An engine core inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) holds its KV
        # cache until its objects are collected.
        gc.collect()

    # --- the driver thread ----------------------------------------------------------------

    def _watch(self) -> None:
        """Wake the driver when the engine core process dies.

        vLLM's own monitor notices a killed engine core and marks the client dead, but the
        synchronous client's `step()` keeps waiting on its output queue; a death notice put on
        that queue makes it raise EngineDeadError instead of hanging forever.
        """
        client = vllm_adapter.engine_core_client(self.llm)
        if not vllm_adapter.can_watch_engine_core(client):
            return
        while self._dead is None and not self._closed:
            if vllm_adapter.engine_core_died(client):
                vllm_adapter.wake_with_death_notice(client, "engine core process died")
                return
            time.sleep(0.5)

    def _drive(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closed and not self._owners and not self._jobs:
                        self._wake.wait()
                    if self._closed:
                        return
                self._admit()
                if not self._owners:
                    continue
                for output in vllm_adapter.step(self.llm):
                    if output.finished:
                        self._finish(output)
        except BaseException as exc:  # the engine is gone: every waiting job must hear it
            log.error("engine failed: %r", exc)
            self._dead = exc
            in_flight: dict[int, tuple[_Job, list[int]]] = {}
            with self._wake:
                for job, request, _ in self._owners.values():
                    keys = in_flight.setdefault(id(job), (job, []))[1]
                    if request.key not in keys:
                        keys.append(request.key)
                for job in self._jobs:
                    in_flight.setdefault(id(job), (job, []))
                self._jobs.clear()
            self._owners.clear()
            self._parts.clear()
            for job, keys in in_flight.values():
                job.results.put(EngineFailure(f"engine died: {exc!r}", in_flight=keys))

    def _admit(self) -> None:
        while len(self._owners) < self.max_in_flight:
            with self._wake:
                if not self._jobs:
                    return
                job = self._jobs[0]
            request = None if (job.cancelled or job.stop_admitting) else next(job.requests, None)
            if request is None:
                job.admitted_all = True
                with self._wake:
                    self._jobs.popleft()
                if job.in_flight == 0:
                    job.results.put(_DONE)
                continue
            if self._chaos_custom_id is not None and request.custom_id == self._chaos_custom_id:
                _kill_engine_processes(wait=False)  # the row still goes in: the engine dies under it
            try:
                request_ids = self._enqueue(request)
            except (*vllm_adapter.client_errors(), ValueError, TypeError) as exc:  # this row only: too long, bad image
                job.results.put((request, exc))
                continue
            job.in_flight += 1
            if request.kind == "embedding":
                self._parts[id(request)] = [None] * len(request_ids)
            for part, request_id in enumerate(request_ids):
                self._owners[request_id] = (job, request, part)

    def _enqueue(self, request: PreparedRequest) -> list[str]:
        if request.kind == "embedding":  # the driver collects the outputs of every input
            ids = vllm_adapter.enqueue_pooling(
                self.llm,
                request.prompt,
                [request.sampling_params.clone() for _ in request.prompt],
                request.tokenization_kwargs,
            )
            return [vllm_adapter.output_request_id(i) for i in ids]
        lora = self.adapters[request.adapter] if request.adapter else None
        if request.kind == "chat":
            ids = self.llm.enqueue_chat(
                [with_images_resolved(request.prompt, request.media)[0] if request.images else request.prompt],
                [request.sampling_params],
                use_tqdm=False,
                lora_request=lora,
                chat_template_kwargs=request.chat_template_kwargs,
                tools=request.tools,
            )
        else:
            prompt = request.prompt
            if isinstance(prompt, list):
                prompt = {"prompt_token_ids": prompt}
            ids = self.llm.enqueue([prompt], [request.sampling_params], use_tqdm=False, lora_request=lora)
        return [vllm_adapter.output_request_id(ids[0])]

    def _finish(self, output) -> None:
        job, request, part = self._owners.pop(output.request_id)
        if request.kind == "embedding":
            parts = self._parts[id(request)]
            parts[part] = output
            if any(p is None for p in parts):
                return
            del self._parts[id(request)]
            output = parts
        job.in_flight -= 1
        if not job.cancelled:
            job.results.put((request, output))
        if job.admitted_all and job.in_flight == 0:
            job.results.put(_DONE)


def _lora_requests(config: EngineConfig) -> dict:
    """Each adapter's LoRARequest: its name, a number of its own (vLLM's adapter slot id) and this
    machine's copy of the job's weights."""
    from nightshift.engine.lora import local_adapter

    return {
        adapter.name: vllm_adapter.lora_request(adapter.name, number, local_adapter(adapter))
        for number, adapter in enumerate(config.lora, start=1)
    }


def _kill_engine_processes(wait: bool = True) -> None:
    """SIGKILL this process's vLLM engine processes and, with `wait`, until they are gone (a
    GPU's memory is free only then). Only those of this process group: the engine's own, which
    vLLM starts in it — never a `vllm serve` this program started in a session of its own (an
    online server beside the batch, a test suite's shared server), though it is a child too."""
    import psutil

    ours, killed = os.getpgrp(), []
    for child in psutil.Process().children(recursive=True):
        try:
            if os.getpgid(child.pid) != ours:
                continue
            if "VLLM" in child.name() or any("VLLM" in part for part in child.cmdline()):
                child.kill()
                killed.append(child)
        except (psutil.Error, ProcessLookupError):
            pass
    deadline = time.monotonic() + (10 if wait else 0)
    while killed and time.monotonic() < deadline:  # dead once a zombie: reaping is their parent's (vLLM's)
        killed = [process for process in killed if _still_running(process)]
        time.sleep(0.02)


def _still_running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _EngineStart:
    """One engine start on its own thread, watched by whoever waits for it: a start that takes
    longer than the config's `engine_start_timeout_s` is reported with every thread's stack
    (what it waits on) and fails its waiters, instead of hanging them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.began = time.monotonic()
        self.done = threading.Event()
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self._reported = threading.Lock()
        self._stalled = ""
        threading.Thread(target=self._start, name="nightshift-engine-start", daemon=True).start()

    def _start(self) -> None:
        try:
            drills.stall_engine_start()
            if self.config.engine_url:  # an OpenAI-compatible server answers the rows
                from nightshift.engine.remote import RemoteEngine

                self.engine = RemoteEngine(self.config)
            else:
                self.engine = BatchEngine(self.config)
        except BaseException as exc:  # its waiters raise it
            self.error = exc
        finally:
            self.done.set()

    def wait(self) -> None:
        """Until the start has ended; raises EngineStartStalled once it is past its time."""
        timeout = self.config.engine_start_timeout_s
        if self.done.wait(max(0.0, self.began + timeout - time.monotonic())):
            return
        with self._reported:  # one report, however many tasks wait
            if not self._stalled:
                self._stalled = (
                    f"the engine was not ready after {timeout:.0f} s (engine_start_timeout_s); "
                    "this process's threads, where the start is stuck:\n" + thread_stacks()
                )
                report_without_blocking(self._stalled)
        raise EngineStartStalled(
            f"the engine was not ready after {timeout:.0f} s (engine_start_timeout_s); a fresh process may start "
            "it: the run can be retried (its threads' stacks are in the log)"
        )


def thread_stacks() -> str:
    """Every thread's name and current stack, innermost call last."""
    import sys
    import traceback

    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"--- thread {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    )


def report_without_blocking(message: str, wait_s: float = 5.0) -> None:
    """`message` on stderr at once, then to the log (Prefect's handlers: the dashboard) from a
    helper thread given `wait_s`: what a stall is stuck on may be a lock that logging needs."""
    import sys

    try:
        sys.stderr.write(f"nightshift: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    logger = threading.Thread(target=log.error, args=("%s", message), name="nightshift-stall-report", daemon=True)
    logger.start()
    logger.join(wait_s)


class EngineCache:
    """The process's engine: one at a time, started on first use and again after a failure or
    for another config; a config the engine refused to start with is refused again at once.
    vLLM's engine holds a process's accelerators, so a process has one cache (`ENGINES`)."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.start: _EngineStart | None = None  # the start under way, if any
        self.lock = threading.Lock()  # held for moments only, never while an engine starts
        self.refused: dict[EngineConfig, ConfigurationError] = {}

    def get(self, config: EngineConfig) -> Engine:
        """The engine for `config`. A start past its `engine_start_timeout_s` raises
        EngineStartStalled."""
        while True:
            with self.lock:
                if config in self.refused:
                    raise self.refused[config]
                if self.start is None:
                    if self.engine is not None and self.engine.config == config and self.engine.alive:
                        return self.engine
                    self._close_engine("replacing engine (config changed or engine died)")
                    self.start = _EngineStart(config)
                start = self.start
            start.wait()  # a start for another config ends before this one begins: one engine at a time
            self._settle(start)
            if start.config == config and start.error is not None:
                raise start.error

    def _settle(self, start: _EngineStart) -> None:
        with self.lock:
            if self.start is start:
                self.start = None
                if start.engine is not None:
                    self.engine = start.engine
                elif isinstance(start.error, ConfigurationError):
                    self.refused[start.config] = start.error

    def _close_engine(self, why: str) -> None:
        if self.engine is not None:
            log.info(why)
            self.engine.close()
            self.engine = None

    def abandon(self) -> None:
        """At the end of a process: its engine's processes killed at once — a start still under
        way too, as soon as it has any, instead of waiting for an engine nothing will use (a run
        whose shards all came from checkpoints, or whose deadline had passed, started one in the
        background). Killing until the start gives up leaves no engine process loading behind."""
        logging.getLogger("vllm").setLevel(logging.CRITICAL + 1)  # a start cut short complains: not news
        start = self.start
        if start is not None:
            deadline = start.began + start.config.engine_start_timeout_s
            while not start.done.is_set() and time.monotonic() < deadline:
                _kill_engine_processes()
                start.done.wait(0.2)
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the engine, if one runs (its worker processes go with it). A start under way is
        waited for first, up to its time, so that no engine is left loading behind this call."""
        start = self.start
        if start is not None:
            start.done.wait(max(0.0, start.began + start.config.engine_start_timeout_s - time.monotonic()))
        with self.lock:
            if start is not None and self.start is start and start.done.is_set():
                self.start = None
                self.engine = start.engine or self.engine
            if self.engine is not None:
                self.engine.close()
                self.engine = None


ENGINES = EngineCache()


def get_engine(config: EngineConfig) -> Engine:
    """The process's engine for `config` (EngineCache.get)."""
    return ENGINES.get(config)


def abandon_engine() -> None:
    """The process's engine and any start under way, killed at its end (EngineCache.abandon)."""
    ENGINES.abandon()


def current_engine() -> Engine | None:
    """The engine this process holds, if any (without starting one)."""
    return ENGINES.engine


def start_engine_in_background(config: EngineConfig) -> threading.Thread:
    """Begin loading the engine for `config` now, so that it loads while Prefect starts and the
    input is planned; the first generate task waits for it (or, if it failed, starts it again
    and meets the error itself)."""

    def load() -> None:
        try:
            get_engine(config)
        except BaseException as exc:  # the generate task that needs it raises it (not starting again)
            log.debug("engine start ahead of planning failed: %r", exc)

    thread = threading.Thread(target=load, name="nightshift-engine-start-ahead", daemon=True)
    thread.start()
    return thread


def shutdown_engine() -> None:
    """Stop the process's engine, if one runs (EngineCache.shutdown)."""
    ENGINES.shutdown()

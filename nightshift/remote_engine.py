"""A remote engine: a shard's rows answered by an OpenAI-compatible server (`engine_url`) instead
of a vLLM engine in this process — `vllm serve` of the same model, an online fleet's spare
capacity, any server speaking /v1/chat/completions and /v1/completions.

It is driven exactly like the in-process engine (nightshift.engine.BatchEngine): rows go in,
`(row, outcome)` come out as they finish, so everything around generation holds as it is —
chunk files and resume, every row once, duplicates answered once, the result cache, the
deadline and SIGTERM stops, the canary re-run. What differs is the outcome: the server's own
response body (its choices, usage and logprobs), or a per-row error with the server's words.

Faults, by what they say about the row:

* 2xx: the row's answer.
* 429, 5xx, refused connections, timeouts, a dropped connection: the server is busy or away, not
  the row's fault — retried with exponential backoff (and the server's Retry-After) until the
  server has not answered for `engine_unreachable_s`; then `EngineUnreachable` ends the shard,
  every finished row already on disk, and the run fails retryably (exit status 75).
* 401, 403: the key is refused — a configuration error, said once, never retried.
* any other 4xx: this row is refused (a prompt longer than the context, say) — its error line
  carries the server's message.

The server's key comes from `NIGHTSHIFT_ENGINE_API_KEY`, never from a parameter or a file.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from urllib.parse import urlsplit, urlunsplit

import httpx

from nightshift.config import ConfigurationError, EngineConfig, EngineUnreachable
from nightshift.openai_format import PreparedRequest, RemoteCompletion
from nightshift.politeness import ConcurrencyController
from nightshift.preemption import Preempted

log = logging.getLogger("nightshift.engine")

API_KEY_VARIABLE = "NIGHTSHIFT_ENGINE_API_KEY"
_BACKOFF_FIRST_S, _BACKOFF_MOST_S = 0.5, 15.0
READ_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 30.0
_PATHS = {"chat": "/chat/completions", "completion": "/completions"}


class RemoteRejection(ValueError):
    """The server refused this row (a 4xx other than the key's): its own message."""


class _Abandoned(Exception):
    """A request given up because its generate call ended (stopped, or the engine closed)."""


def displayed(url: str) -> str:
    """The URL without any user:password part: what logs and reports may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RemoteEngine:
    """The server at `config.engine_url`, driven as nightshift.engine.BatchEngine is."""

    runner_type = "generate"  # chat and completions; embeddings stay with an in-process engine
    tokenizer = None  # the server's bodies carry their own text and logprobs
    model_config = None
    default_sampling_params: dict = {}  # the server applies the model's own defaults

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.url = config.engine_url.rstrip("/")
        self.concurrency = config.engine_max_concurrency
        key = os.environ.get(API_KEY_VARIABLE)
        self.client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            # a long row on a busy server may take minutes; one that never answers is retried, not waited on forever
            timeout=httpx.Timeout(60.0, read=READ_TIMEOUT_S, pool=None),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="nightshift-remote")
        self._dead: BaseException | None = None
        started = time.monotonic()
        served = self._call("GET", "/models").json().get("data") or []
        self.served_model, self.max_model_len = _the_model(served, config, displayed(self.url))
        # vLLM's server says which tokens it wrote when asked: the canary oracle scores those, not a
        # re-tokenized text (which a tokenizer may split otherwise)
        self.token_ids_on_request = any(entry.get("owned_by") == "vllm" for entry in served)
        self.load_seconds = time.monotonic() - started
        objective = config.online_ttft_slo_ms
        self.settings = {
            "engine": "remote",
            "engine_url": displayed(self.url),
            "served_model": self.served_model,
            "max_model_len": self.max_model_len,
            "max_concurrency": self.concurrency,
            "priority": config.engine_priority,
            "online_ttft_slo_ms": objective,
        }
        self.announced: set[str] = set()
        self.politeness = (
            ConcurrencyController(self._probe, objective, self.concurrency).start() if objective is not None else None
        )

    def describe(self) -> str:
        priority = f", priority {self.config.engine_priority}" if self.config.engine_priority is not None else ""
        if self.politeness is not None:
            width = (
                f"rows in flight adapting (from {self.politeness.limit}, at most {self.concurrency}) to keep online "
                f"time to first token within {self.config.online_ttft_slo_ms:.0f} ms"
            )
        else:
            width = f"up to {self.concurrency} rows in flight"
        return (
            f"engine ready in {self.load_seconds:.0f} s: the server at {displayed(self.url)} "
            f"({self.served_model}, context {self.max_model_len}, {width}{priority})"
        )

    def in_flight_limit(self) -> int:
        return self.politeness.limit if self.politeness is not None else self.concurrency

    def politeness_timeline(self, since: float) -> list[tuple[float, float | None, int]] | None:
        """The controller's looks from `since` (time.time()): (Unix time, online TTFT ms, in-flight limit)."""
        if self.politeness is None:
            return None
        return [
            (look.at, look.online_ttft_ms, look.in_flight_limit) for look in self.politeness.looks if look.at >= since
        ]

    def _probe(self) -> float | None:
        """The time to first token an online request meets now: one token, at the default priority."""
        body = {"model": self.served_model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        sent = time.monotonic()
        try:
            response = self.client.post(_PATHS["chat"], json=body, timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return None
        return (time.monotonic() - sent) * 1000 if response.status_code == 200 else None

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closing.is_set()

    def generate(
        self,
        requests: Iterable[PreparedRequest],
        stop: threading.Event | None = None,
        grace_s: float = 20.0,
    ) -> Iterator[tuple[PreparedRequest, object]]:
        """Yield rows as the server answers them; once `stop` is set no new row is sent and the
        rows in flight get `grace_s` seconds, then `Preempted` is raised."""
        if not self.alive:
            raise EngineUnreachable(f"the engine server at {displayed(self.url)} is not in use: {self._dead!r}")
        waiting = iter(requests)
        in_flight: set[Future] = set()
        given_up = threading.Event()  # this call's requests stop retrying once it ends
        exhausted, deadline = False, None
        try:
            while True:
                if stop is not None and stop.is_set() and deadline is None:
                    deadline = time.monotonic() + grace_s
                while deadline is None and not exhausted and len(in_flight) < self.in_flight_limit():
                    request = next(waiting, None)
                    if request is None:
                        exhausted = True
                    else:
                        in_flight.add(self._executor.submit(self._answer, request, given_up))
                if not in_flight:
                    if deadline is not None:
                        raise Preempted("stopped on SIGTERM after the rows in flight finished")
                    return
                done, in_flight = wait(in_flight, timeout=0.25, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()  # EngineUnreachable, ConfigurationError: the shard ends here
                if deadline is not None and time.monotonic() > deadline and in_flight:
                    raise Preempted(f"stopped on SIGTERM with {len(in_flight)} rows in flight")
        finally:
            given_up.set()

    def close(self) -> None:
        self._closing.set()
        if self.politeness is not None:
            self.politeness.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def _answer(self, request: PreparedRequest, given_up: threading.Event) -> tuple[PreparedRequest, object]:
        body = {**request.body, "model": self.served_model}
        if self.config.engine_priority is not None:
            body["priority"] = self.config.engine_priority
        if self.token_ids_on_request:
            body["return_token_ids"] = True
        try:
            response = self._call("POST", _PATHS[request.kind], json=body, given_up=given_up)
        except RemoteRejection as refusal:
            return request, refusal
        return request, RemoteCompletion(response.json(), request.kind)

    def _call(self, method: str, path: str, given_up: threading.Event | None = None, **kwargs) -> httpx.Response:
        """One request, retried with backoff while the server is busy or away, for up to
        `engine_unreachable_s` of silence."""
        silent_since, backoff = None, _BACKOFF_FIRST_S
        while True:
            if self._closing.is_set() or (given_up is not None and given_up.is_set()):
                raise _Abandoned()
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server's state, not the row's
                why, wait_s = f"{type(exc).__name__}: {exc}", None
            else:
                if response.status_code < 400:
                    return response
                if response.status_code in (401, 403):
                    raise ConfigurationError(
                        f"the engine server at {displayed(self.url)} refused the key "
                        f"({response.status_code}; the key comes from ${API_KEY_VARIABLE})"
                    )
                if response.status_code != 429 and response.status_code < 500:
                    raise RemoteRejection(_server_message(response))
                why, wait_s = f"{response.status_code} {_server_message(response)}", _retry_after(response)
            silent_since = silent_since or time.monotonic()
            silence = time.monotonic() - silent_since
            if silence > self.config.engine_unreachable_s:
                self._dead = EngineUnreachable(
                    f"the engine server at {displayed(self.url)} has not answered for {silence:.0f} s ({why}); "
                    "every finished row is kept: run again to resume"
                )
                raise self._dead
            time.sleep(wait_s if wait_s is not None else backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _BACKOFF_MOST_S)


def _the_model(served: list[dict], config: EngineConfig, url: str) -> tuple[str, int]:
    """Which of the server's models is the job's, and its context: the only one it serves, or the
    one named like the job's model."""
    names = [entry.get("id") for entry in served]
    wanted = {config.model, os.path.basename(config.model.rstrip("/"))}
    chosen = next((e for e in served if e.get("id") in wanted), served[0] if len(served) == 1 else None)
    if chosen is None:
        raise ConfigurationError(
            f"the engine server at {url} serves {', '.join(map(str, names)) or 'no model'}, none of them "
            f"{os.path.basename(config.model.rstrip('/'))!r}: give --model the model it serves"
        )
    context = chosen.get("max_model_len") or config.max_model_len
    if context is None:
        from nightshift.engine_sizing import model_context

        context = model_context(config)
    return chosen["id"], int(context)


def _server_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error or response.json().get("detail")
    except (ValueError, AttributeError):
        message = None
    return str(message or response.text or response.reason_phrase)[:1000]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers.get("retry-after", "")), _BACKOFF_MOST_S)
    except ValueError:
        return None

"""A remote engine: a shard's rows answered by an OpenAI-compatible server (`engine_url`) instead
of a vLLM engine in this process — `vllm serve` of the same model, an online fleet's spare
capacity, any server speaking /v1/chat/completions, /v1/completions or /v1/embeddings.

It is driven exactly like the in-process engine (nightshift.engine.local.BatchEngine): rows go in,
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

A fleet: `engine_url` may name several servers. The engine uses the first that answers, in the
order its config gives (`EngineSettings.spread_over_servers` rotates it per shard group, so the
groups on a work pool spread over the fleet); a server that does not answer at start is passed
over, and one that goes away mid-run hands its rows over: after FAILOVER_AFTER_S of refused or
dropped connections, the rows in flight and the rest go to the next server of the fleet that
answers with the same model (each row still written once). Only with no server left does the
run end, resumably (exit 75), after `engine_unreachable_s`.

The server's key comes from a Prefect Secret block (`engine_api_key_secret`) or
`NIGHTSHIFT_ENGINE_API_KEY`, never from a parameter or a file.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from urllib.parse import urlsplit, urlunsplit

import httpx

from nightshift.config import EngineConfig
from nightshift.engine.fleet import FleetBudget
from nightshift.engine.politeness import START_IN_FLIGHT, ConcurrencyController
from nightshift.errors import ConfigurationError, EngineUnreachable, NightshiftError, Preempted
from nightshift.wire.images import with_images_resolved
from nightshift.wire.openai_format import PreparedRequest, RemoteCompletion, RemoteEmbedding, RequestRejected

log = logging.getLogger("nightshift.engine")

API_KEY_VARIABLE = "NIGHTSHIFT_ENGINE_API_KEY"
_BACKOFF_FIRST_S, _BACKOFF_MOST_S = 0.5, 15.0
READ_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 30.0
FIRST_LOOK_TIMEOUT_S = 10.0  # a server of a fleet that takes longer to list its models is passed over
FAILOVER_AFTER_S = 5.0  # a fleet's server unreachable this long: its rows go to another (engine_urls)
_PATHS = {"chat": "/chat/completions", "completion": "/completions", "embedding": "/embeddings"}


class RemoteRejection(NightshiftError, ValueError):
    """The server refused this row (a 4xx other than the key's): its own message."""

    retryable = False


class _Abandoned(NightshiftError):
    """A request given up because its generate call ended (stopped, or the engine closed)."""


def displayed(url: str) -> str:
    """The URL without any user:password part: what logs and reports may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _Count:
    """A number several threads change."""

    def __init__(self) -> None:
        self._value, self._lock = 0, threading.Lock()

    def add(self, step: int) -> None:
        with self._lock:
            self._value += step

    def value(self) -> int:
        return self._value


class RemoteEngine:
    """The server at `config.engine_url`, driven as nightshift.engine.local.BatchEngine is (the
    nightshift.engine.protocol.Engine both are)."""

    tokenizer = None  # the server's bodies carry their own text and logprobs
    model_config = None
    default_sampling_params: dict = {}  # the server applies the model's own defaults

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.concurrency = config.engine_max_concurrency
        key = engine_api_key(config)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._closing = threading.Event()
        self._dead: BaseException | None = None
        self._at_server = _Count()  # rows sent and not yet answered, over every shard of this client
        started = time.monotonic()
        self.url, served = self._first_answering(config.engine_urls)
        self.client = self._client_of(self.url)
        self._left: list[httpx.Client] = []  # clients of servers failed over from, closed at the end
        self._switching, self._next_look = threading.Lock(), 0.0
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="nightshift-remote")
        self.served_model, self.max_model_len = _the_model(served, config, displayed(self.url))
        # "generate" answers chat and completions lines, "pooling" embeddings ones, as in-process
        self.runner_type = "pooling" if self._embeds() else "generate"
        # vLLM's server says which tokens it wrote when asked: the canary oracle scores those, not a
        # re-tokenized text (which a tokenizer may split otherwise)
        self.token_ids_on_request = self.runner_type == "generate" and any(
            entry.get("owned_by") == "vllm" for entry in served
        )
        self.load_seconds = time.monotonic() - started
        objective = config.online_ttft_slo_ms
        self.settings = {
            "engine": "remote",
            "engine_url": displayed(self.url),
            "fleet": [displayed(url) for url in config.engine_urls] if len(config.engine_urls) > 1 else None,
            "served_model": self.served_model,
            "runner": self.runner_type,
            "max_model_len": self.max_model_len,
            "max_concurrency": self.concurrency,
            "priority": config.run_priority,
            "priority_class": config.priority_class,
            "online_ttft_slo_ms": objective,
            "fleet_budget": config.fleet_budget or None,
        }
        self.announced: set[str] = set()
        polite = objective is not None and self.runner_type == "generate"  # the probe is a one-token chat
        fleet = (
            FleetBudget(displayed(self.url), self.concurrency, START_IN_FLIGHT, config.fleet_weight)
            if polite and config.fleet_budget
            else None
        )
        self.politeness = (
            ConcurrencyController(
                self._probe, objective, self.concurrency, fleet=fleet, in_flight=self._at_server.value
            ).start()
            if polite
            else None
        )

    def _client_of(self, url: str) -> httpx.Client:
        return httpx.Client(
            base_url=url,
            headers=self._headers,
            # a long row on a busy server may take minutes; one that never answers is retried, not waited on forever
            timeout=httpx.Timeout(60.0, read=READ_TIMEOUT_S, pool=None),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )

    def _fail_over(self, lost: str, why: str) -> bool:
        """A fleet's server silent for FAILOVER_AFTER_S: its rows — those in flight, retried, and
        the rest — go to the next server of the fleet that answers and serves the same model. True
        once they do (this row's switch or another's). Each row is still written once: only an
        answer received is written, and a row the lost server never answered is asked again."""
        with self._switching:
            if self.url != lost:
                return True
            if time.monotonic() < self._next_look:
                return False
            for url in (u for u in self.config.engine_urls if u != lost):
                if self._serves_the_model(url):
                    self._left.append(self.client)
                    self.client, self.url = self._client_of(url), url
                    log.warning("the engine server at %s stopped answering (%s): its rows go to %s now",
                                displayed(lost), why, displayed(url))  # fmt: skip
                    return True
            self._next_look = time.monotonic() + FAILOVER_AFTER_S
            return False

    def _serves_the_model(self, url: str) -> bool:
        try:
            response = httpx.get(f"{url}/models", headers=self._headers, timeout=FIRST_LOOK_TIMEOUT_S)
        except httpx.TransportError:
            return False
        if response.status_code >= 400:
            return False
        return self.served_model in [entry.get("id") for entry in response.json().get("data") or []]

    def _first_answering(self, urls: list[str]) -> tuple[str, list[dict]]:
        """The first of `urls` that lists its models, and the list; servers that do not answer are
        tried again, with backoff, until none has answered for `engine_unreachable_s`."""
        silent_since, backoff, why = time.monotonic(), _BACKOFF_FIRST_S, {}
        while True:
            for url in urls:
                try:
                    response = httpx.get(f"{url}/models", headers=self._headers, timeout=FIRST_LOOK_TIMEOUT_S)
                except httpx.TransportError as exc:
                    why[url] = f"{type(exc).__name__}: {exc}"
                    continue
                self._refuse_a_refused_key(response, url)
                if response.status_code < 400:
                    if url != urls[0]:
                        log.warning("engine servers not answering, passed over: %s", _reasons(why))
                    return url, response.json().get("data") or []
                why[url] = f"{response.status_code} {_server_message(response)}"
            silence = time.monotonic() - silent_since
            if silence > self.config.engine_unreachable_s:
                raise EngineUnreachable(
                    f"no engine server answered for {silence:.0f} s ({_reasons(why)}); run again to resume"
                )
            time.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _BACKOFF_MOST_S)

    def _embeds(self) -> bool:
        """Whether the server's model answers /embeddings (a pooling model) rather than chat."""
        body = {"model": self.served_model, "input": "ping"}
        try:
            return self.client.post(_PATHS["embedding"], json=body, timeout=PROBE_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            return False

    def describe(self) -> str:
        priority = f", priority {self.config.run_priority}" if self.config.run_priority is not None else ""
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
        grace_s: float | Callable[[], float] = 20.0,
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
                    deadline = time.monotonic() + (grace_s() if callable(grace_s) else grace_s)
                while deadline is None and not exhausted and len(in_flight) < self.in_flight_limit():
                    request = next(waiting, None)
                    if request is None:
                        exhausted = True
                    else:
                        self._at_server.add(1)
                        in_flight.add(self._executor.submit(self._answered, request, given_up))
                if not in_flight:
                    if deadline is not None:
                        raise Preempted("stopped on SIGTERM after the rows in flight finished")
                    if exhausted:
                        return
                    time.sleep(0.25)  # no slot of the fleet's budget free yet: the other clients hold them
                    continue
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
        for client in [*self._left, self.client]:
            client.close()

    def _answered(self, request: PreparedRequest, given_up: threading.Event) -> tuple[PreparedRequest, object]:
        try:
            return self._answer(request, given_up)
        finally:
            self._at_server.add(-1)

    def _answer(self, request: PreparedRequest, given_up: threading.Event) -> tuple[PreparedRequest, object]:
        # an adapter's rows go to the server under the adapter's name (`vllm serve --lora-modules NAME=PATH`)
        body = {**request.body, "model": request.adapter or self.served_model}
        if request.images:  # the server reads no bucket or file of this machine: the images go inline
            try:
                body["messages"] = with_images_resolved(body["messages"], request.media)[0]
            except RequestRejected as unreadable:
                return request, unreadable
        body.pop("priority", None)
        if (priority := row_priority(request.body or {}, self.config)) is not None:
            body["priority"] = priority
        if request.kind == "embedding":
            body["encoding_format"] = "float"  # the run writes the row's own encoding, and the vectors' file
        elif self.token_ids_on_request:
            body["return_token_ids"] = True
        try:
            response = self._call("POST", _PATHS[request.kind], json=body, given_up=given_up)
        except RemoteRejection as refusal:
            return request, refusal
        if request.kind == "embedding":
            return request, RemoteEmbedding(response.json())
        return request, RemoteCompletion(response.json(), request.kind)

    def _call(self, method: str, path: str, given_up: threading.Event | None = None, **kwargs) -> httpx.Response:
        """One request, retried with backoff while the server is busy or away, for up to
        `engine_unreachable_s` of silence."""
        silent_since, backoff = None, _BACKOFF_FIRST_S
        while True:
            if self._closing.is_set() or (given_up is not None and given_up.is_set()):
                raise _Abandoned()
            url, gone = self.url, False
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server's state, not the row's
                why, wait_s, gone = f"{type(exc).__name__}: {exc}", None, True
            else:
                if response.status_code < 400:
                    return response
                self._refuse_a_refused_key(response, self.url)
                if response.status_code != 429 and response.status_code < 500:
                    raise RemoteRejection(_server_message(response))
                why, wait_s = f"{response.status_code} {_server_message(response)}", _retry_after(response)
            silent_since = silent_since or time.monotonic()
            silence = time.monotonic() - silent_since
            if gone and silence > FAILOVER_AFTER_S and len(self.config.engine_urls) > 1 and self._fail_over(url, why):
                silent_since, backoff = None, _BACKOFF_FIRST_S
                continue
            if silence > self.config.engine_unreachable_s:
                self._dead = EngineUnreachable(
                    f"the engine server at {displayed(self.url)} has not answered for {silence:.0f} s ({why}); "
                    "every finished row is kept: run again to resume"
                )
                raise self._dead
            time.sleep(wait_s if wait_s is not None else backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _BACKOFF_MOST_S)

    def _refuse_a_refused_key(self, response: httpx.Response, url: str) -> None:
        if response.status_code in (401, 403):
            source = (
                f"the Prefect Secret block {self.config.engine_api_key_secret!r}"
                if self.config.engine_api_key_secret
                else f"${API_KEY_VARIABLE}"
            )
            raise ConfigurationError(
                f"the engine server at {displayed(url)} refused the key ({response.status_code}; "
                f"the key comes from {source})"
            )


def engine_api_key(config: EngineConfig) -> str | None:
    """The engine server's key: the Secret block's the config names, else $NIGHTSHIFT_ENGINE_API_KEY."""
    if not config.engine_api_key_secret:
        return os.environ.get(API_KEY_VARIABLE) or None
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(config.engine_api_key_secret).get())
    except ValueError as exc:  # Prefect's "Unable to find block document named …"
        raise ConfigurationError(f"engine_api_key_secret: {exc}") from None


def _reasons(why: dict[str, str]) -> str:
    return "; ".join(f"{displayed(url)}: {reason}" for url, reason in why.items())


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
        from nightshift.engine.sizing import model_context

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


def row_priority(body: dict, config) -> int | None:
    """The vLLM priority a row is sent with: the run's engine_priority; the row's own only where
    the operator set a floor, and never below it (lower runs first: a row cannot jump ahead of
    online traffic or of the run's own priority)."""
    floor = [p for p in (config.run_priority, config.row_priority_floor) if p is not None]
    own = body.get("priority")
    if config.row_priority_floor is not None and isinstance(own, int) and not isinstance(own, bool):
        return max([own, *floor])
    return config.run_priority

"""What a shard's generation needs of an engine, whichever answers the rows: vLLM in this process
(nightshift.engine.local.BatchEngine) or an OpenAI-compatible server (nightshift.engine.remote.RemoteEngine)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from nightshift.config import EngineConfig
from nightshift.wire.openai_format import PreparedRequest


class Engine(Protocol):
    config: EngineConfig
    runner_type: str  # "generate" answers chat and completions lines, "pooling" embeddings ones
    tokenizer: Any  # the in-process engine's, for logprobs' token texts; None where answers carry their own
    model_config: Any  # vLLM's ModelConfig, for pooling parameters' checks; None for a server
    default_sampling_params: dict  # the model's generation defaults a row's body does not override
    max_model_len: int
    settings: dict  # the engine settings that really ran, for the log's first line and report.json
    load_seconds: float
    announced: set[str]  # run directories whose log has said "engine ready"

    @property
    def alive(self) -> bool: ...

    def describe(self) -> str:
        """The "engine ready" log line."""

    def generate(
        self,
        requests: Iterable[PreparedRequest],
        stop: threading.Event | None = None,
        grace_s: float | Callable[[], float] = 20.0,
    ) -> Iterator[tuple[PreparedRequest, Any]]:
        """`(row, outcome)` as rows finish — an answer, or the row's refusal as an exception; once
        `stop` is set no row is admitted and those in flight get `grace_s` (or what it returns
        when the stop is seen), then Preempted."""

    def politeness_timeline(self, since: float) -> list[tuple[float, float | None, int]] | None:
        """On a shared server, the in-flight limit over time against the online TTFT; else None."""

    def close(self) -> None: ...

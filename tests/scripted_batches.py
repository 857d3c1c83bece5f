"""Batches created through the API (the official client, in process) and runs that end as a test
scripts them: what the lifecycle's and the webhooks' specifications drive."""

import io
import json

import openai
from conftest import chat_request
from fastapi.testclient import TestClient

from nightshift.batch_api.lifecycle import BatchLifecycle
from nightshift.batch_api.routes import create_app
from nightshift.batch_api.runs import BatchRuns, RunEnd, StartedRun
from nightshift.batch_api.store import Store, owner_of
from nightshift.config import BatchApiConfig

LAST_WORDS = "the model directory /models/x does not exist"


class ScriptedRuns(BatchRuns):
    """Runs that end as the test says, one scripted end per look once started."""

    def __init__(self, *ends: RunEnd | None) -> None:
        self.ends, self.orders, self.stopped = list(ends), [], []

    def room(self) -> int:
        return 100

    def start(self, stored, order) -> StartedRun:
        self.orders.append(order)
        return StartedRun("scripted run", record={"run_group": 1000 + len(self.orders), "run_host": "here"})

    def running(self, stored) -> bool:
        return False

    def ended(self, stored) -> RunEnd | None:
        return self.ends.pop(0) if self.ends else None

    def stop(self, stored) -> None:
        self.stopped.append(stored.batch.id)

    def last_words(self, stored) -> str:
        return LAST_WORDS

    def shutdown(self) -> None:
        pass


def tenants_batches(tmp_path, runs: BatchRuns, plan: list[tuple[str, int]], **settings):
    """Batches created in `plan`'s order, each (API key, rows) or (API key, rows, metadata), through
    the API; the lifecycle."""
    config = BatchApiConfig(storage=str(tmp_path / "api"), chat_model="tiny", **settings)
    store = Store(config.storage)
    lifecycle = BatchLifecycle(config, store, runs)
    app = create_app(config, store, lifecycle, {owner_of(key) for key, *_ in plan})
    created = []
    with TestClient(app, base_url="http://nightshift.test") as http:
        for key, rows, *metadata in plan:
            client = openai.OpenAI(base_url="http://nightshift.test/v1", api_key=key, http_client=http, max_retries=0)
            content = "\n".join(json.dumps(chat_request(f"r{i}", "hi")) for i in range(rows)).encode()
            upload = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
            created.append(client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                                 completion_window="2h", metadata=(metadata or [None])[0]))  # fmt: skip
    return lifecycle, store, created

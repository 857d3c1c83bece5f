"""The Batch API's webhooks as OpenAI sends them: a batch's end reaches the operator's endpoint as
an event the official client's `webhooks.unwrap` accepts with the signing secret (and refuses
with another), retried until the endpoint answers, kept across a restart, never a tenant's to
point anywhere. The endpoint is a real HTTP server; the runs are scripted (the lifecycle's
subject is what the server does with each end: tests/nightshift/test_batch_lifecycle.py)."""

import base64
import json
import time

import openai
import pytest
from harness import WebhookReceiver
from scripted_batches import ScriptedRuns, tenants_batches

from nightshift.batch_api.store import Store
from nightshift.batch_api.webhooks import Webhooks
from nightshift.config import BatchApiConfig
from nightshift.errors import ConfigurationError

pytestmark = pytest.mark.fast
SECRET = "whsec_" + base64.b64encode(b"the operator's signing secret").decode()


@pytest.fixture
def receiver():
    endpoint = WebhookReceiver(failing=1)  # down for the first request
    yield endpoint
    endpoint.close()


def cancelled_batch(tmp_path, receiver, monkeypatch):
    """A batch started and cancelled on a server whose webhook points at `receiver`."""
    monkeypatch.setenv("NIGHTSHIFT_WEBHOOK_SECRET", SECRET)
    runs = ScriptedRuns()
    lifecycle, store, [batch] = tenants_batches(tmp_path, runs, [("key-a", 5)], webhook_url=[receiver.url])
    lifecycle.webhooks = Webhooks(lifecycle.config, store)
    lifecycle.step()
    lifecycle.update(batch.id, lambda s: setattr(s.batch, "status", "cancelling"))
    lifecycle.step()
    return lifecycle.webhooks, store, batch


def test_a_batchs_end_reaches_the_endpoint_signed_as_openai_signs_and_is_retried_until_it_answers(
    tmp_path, receiver, monkeypatch
):
    webhooks, store, batch = cancelled_batch(tmp_path, receiver, monkeypatch)
    assert store.batch(batch.id).batch.status == "cancelled"

    webhooks.deliver_due()  # the endpoint answers 500: the event stays, due again in a second
    [waiting] = store.webhooks()
    assert waiting.attempts == 1 and waiting.next_at > time.time() and len(receiver.requests) == 1
    webhooks.deliver_due()
    assert len(receiver.requests) == 1, "not before its backoff"
    time.sleep(1.1)
    webhooks.deliver_due()

    assert store.webhooks() == [], "delivered: out of the outbox"
    [(headers, body), (headers_again, body_again)] = receiver.requests
    client = openai.OpenAI(api_key="unused")
    event = client.webhooks.unwrap(body_again, headers_again, secret=SECRET)
    assert event.type == "batch.cancelled" and event.data.id == batch.id and event.object == "event"
    assert headers["webhook-id"] == headers_again["webhook-id"] == event.id, "a retry is the same event"
    assert json.loads(body) == json.loads(body_again)
    other = "whsec_" + base64.b64encode(b"someone else's").decode()
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body_again, headers_again, secret=other)


def test_an_event_not_yet_delivered_is_sent_by_the_next_server(tmp_path, receiver, monkeypatch):
    webhooks, store, batch = cancelled_batch(tmp_path, receiver, monkeypatch)
    webhooks.deliver_due()  # refused once; then the server stops

    restarted = Webhooks(webhooks_config(tmp_path, receiver), Store(str(tmp_path / "api")))
    [delivery] = store.webhooks()
    store.save_webhook(delivery.model_copy(update={"next_at": 0}))  # its backoff over
    restarted.deliver_due()

    assert store.webhooks() == [] and len(receiver.received) == 1
    assert json.loads(receiver.received[0])["data"] == {"id": batch.id}


def webhooks_config(tmp_path, receiver) -> BatchApiConfig:
    return BatchApiConfig(storage=str(tmp_path / "api"), webhook_url=[receiver.url])


def test_an_endpoint_without_a_signing_secret_or_not_http_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.delenv("NIGHTSHIFT_WEBHOOK_SECRET", raising=False)
    config = BatchApiConfig(storage=str(tmp_path / "api"), webhook_url=["https://hooks.example/batch"])
    with pytest.raises(ConfigurationError, match="NIGHTSHIFT_WEBHOOK_SECRET"):
        Webhooks(config, Store(config.storage))
    with pytest.raises(ValueError, match="not an http"):
        BatchApiConfig(storage=str(tmp_path / "api"), webhook_url=["file:///etc/passwd"])

"""OpenAI's batch webhooks: a batch that reaches a terminal status is announced to the operator's
endpoints as OpenAI announces it — `batch.completed`, `batch.failed`, `batch.expired`,
`batch.cancelled`: an event object `{"id", "object": "event", "created_at", "type", "data":
{"id": <batch id>}}`, signed as Standard Webhooks sign (`webhook-id`, `webhook-timestamp`,
`webhook-signature: v1,<base64 HMAC-SHA256>`), which the official client's
`client.webhooks.unwrap(body, headers, secret=...)` verifies — and to Prefect's event stream
(`nightshift.batch.completed`, …) for Automations.

Announcing never holds a batch: the lifecycle writes the event to an outbox on the storage (a
server killed before sending sends it after its restart) and a thread of its own delivers it,
each endpoint until it answers 2xx, retrying after 1 s, 2 s, 4 s … an hour apart for up to 72
hours, as OpenAI does; then the event is dropped with a warning. The endpoints are the
operator's (`--webhook-url`), never a tenant's: a tenant cannot point the server anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time

import httpx

from nightshift.batch_api.store import Delivery, Store, StoredBatch
from nightshift.config import BatchApiConfig
from nightshift.errors import ConfigurationError

log = logging.getLogger("nightshift.serve")

EVENT_TYPES = {s: f"batch.{s}" for s in ("completed", "failed", "expired", "cancelled")}
RETRY_FOR_S = 72 * 3600  # OpenAI retries a webhook for up to 72 hours
MOST_BACKOFF_S = 3600.0
TIMEOUT_S = 10.0


def webhook_secret(config: BatchApiConfig) -> str | None:
    """The signing secret (`whsec_…`, as OpenAI's dashboard gives, or any string): the Secret
    block the config names, else $NIGHTSHIFT_WEBHOOK_SECRET; endpoints without one are refused."""
    if not config.webhook_url:
        return None
    if config.webhook_secret_block:
        from prefect.blocks.system import Secret

        secret = str(Secret.load(config.webhook_secret_block).get())
    else:
        secret = os.environ.get("NIGHTSHIFT_WEBHOOK_SECRET", "")
    if not _key(secret):
        raise ConfigurationError(
            "--webhook-url needs a signing secret: set NIGHTSHIFT_WEBHOOK_SECRET (whsec_<base64>) or name a Prefect "
            "Secret block with --webhook-secret-block"
        )
    return secret


def signed_headers(secret: str, event_id: str, body: bytes, now: int) -> dict[str, str]:
    """Standard Webhooks' signature: HMAC-SHA256 of `id.timestamp.body` under the secret (a
    `whsec_` secret's base64 bytes)."""
    digest = hmac.new(_key(secret), f"{event_id}.{now}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(now),
        "webhook-signature": f"v1,{base64.b64encode(digest).decode()}",
        "content-type": "application/json",
    }


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            return b""
    return secret.encode()


class Webhooks:
    """The outbox and the thread that empties it."""

    def __init__(self, config: BatchApiConfig, store: Store) -> None:
        self.urls, self.secret, self.store = list(config.webhook_url), webhook_secret(config), store
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nightshift-webhooks", daemon=True)

    def start(self) -> None:
        if self.urls:
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=TIMEOUT_S + 5)

    def announce(self, stored: StoredBatch) -> None:
        """A batch turns terminal: its event to the outbox for the endpoints, and to Prefect."""
        batch = stored.batch
        kind = EVENT_TYPES.get(batch.status)
        if kind is None:
            return
        # one id per batch and end: announced again after a restart, it is the same event
        event_id = "evt_" + hashlib.sha256(f"{batch.id}:{kind}".encode()).hexdigest()[:24]
        event = {"id": event_id, "object": "event", "created_at": int(time.time()), "type": kind,
                 "data": {"id": batch.id}}  # fmt: skip
        _to_prefect(stored, kind)
        if self.urls:
            self.store.save_webhook(Delivery(event=event, pending=list(self.urls)))
            self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # the storage failing now: the next look tries again
                log.exception("webhook delivery failed")
            self._wake.wait(1.0)
            self._wake.clear()

    def deliver_due(self) -> None:
        """One pass over the outbox: each event due is sent to its pending endpoints."""
        for delivery in self.store.webhooks():
            if delivery.next_at <= time.time() and not self._stop.is_set():
                self._attempt(delivery)

    def _attempt(self, delivery: Delivery) -> None:
        event_id = delivery.event_id
        body = json.dumps(delivery.event, separators=(",", ":")).encode()
        headers = signed_headers(self.secret or "", event_id, body, int(time.time()))
        delivery.pending = [url for url in delivery.pending if not _delivered(url, body, headers)]
        delivery.attempts += 1
        if not delivery.pending:
            self.store.drop_webhook(event_id)
        elif time.time() - delivery.first_at > RETRY_FOR_S:
            log.warning("webhook %s (%s) dropped: %s never answered in 72 h", event_id, delivery.event["type"],
                        ", ".join(delivery.pending))  # fmt: skip
            self.store.drop_webhook(event_id)
        else:
            delivery.next_at = time.time() + min(2.0 ** (delivery.attempts - 1), MOST_BACKOFF_S)
            self.store.save_webhook(delivery)


def _delivered(url: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False)
    except httpx.HTTPError as exc:
        log.warning("webhook to %s: %s", url, type(exc).__name__)
        return False
    if not response.is_success:
        log.warning("webhook to %s: HTTP %d", url, response.status_code)
    return response.is_success


def _to_prefect(stored: StoredBatch, kind: str) -> None:
    """The same news on Prefect's event stream (`nightshift.batch.completed`, …), the batch as the
    resource: never the tenant's key, only its digest's first characters as a label."""
    try:
        from prefect.events import emit_event
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():  # no Prefect server of the operator's: none started for this
            return
        counts = stored.batch.request_counts
        emit_event(
            f"nightshift.{kind}",
            resource={
                "prefect.resource.id": f"nightshift.batch.{stored.batch.id}",
                "prefect.resource.name": stored.batch.id,
                "nightshift.tenant": stored.owner[:12],
            },  # fmt: skip
            payload={"status": stored.batch.status, "endpoint": stored.batch.endpoint, **counts.model_dump()},
        )
    except Exception as exc:  # an event is news, not the batch's work
        log.warning("could not emit nightshift.%s: %s", kind, exc)

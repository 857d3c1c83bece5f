"""`nightshift serve`: OpenAI's Batch API (/v1/files, /v1/batches) on your own machines.

Code written for OpenAI's batch flow runs unchanged with `base_url` pointed here: upload a JSONL,
create a batch, poll it, download its output and error files. Each batch is a Nightshift run
(plan → generate → merge → validate → report, a Prefect flow run on the server's Prefect API when
PREFECT_API_URL is set).

    nightshift.batch_api.routes        the HTTP surface (routes, request models, OpenAI's error shape)
    nightshift.batch_api.lifecycle     a batch's status from validating to a terminal one
    nightshift.batch_api.runs          where a batch runs, behind one interface:
    nightshift.batch_api.local_process   `nightshift run` processes on this machine, fair between keys
    nightshift.batch_api.deployment      a flow run of a Prefect deployment, on its work pool
    nightshift.batch_api.webhooks      each batch's end, signed, to the operator's endpoints
    nightshift.batch_api.shared_engine one engine server every batch's rows go to (--shared-engine)
"""

from __future__ import annotations

import os
from pathlib import Path

from nightshift.batch_api.deployment import DeploymentRuns
from nightshift.batch_api.lifecycle import BatchLifecycle
from nightshift.batch_api.local_process import LocalProcessRuns
from nightshift.batch_api.routes import create_app
from nightshift.batch_api.runs import BatchRuns
from nightshift.batch_api.shared_engine import SharedEngine
from nightshift.batch_api.store import Store, owner_of
from nightshift.batch_api.webhooks import Webhooks
from nightshift.config import BatchApiConfig
from nightshift.errors import ConfigurationError
from nightshift.runtime.storage import is_url


def api_keys(config: BatchApiConfig) -> set[str]:
    """Owners (digests) of the accepted keys, from a Prefect Secret block or NIGHTSHIFT_API_KEYS."""
    if config.api_key_secret:
        from prefect.blocks.system import Secret

        value = Secret.load(config.api_key_secret).get()
        keys = value if isinstance(value, list) else str(value).split(",")
    else:
        keys = os.environ.get("NIGHTSHIFT_API_KEYS", "").split(",")
    keys = [k.strip() for k in keys if k.strip()]
    if not keys:
        raise ConfigurationError(
            "no API keys: set NIGHTSHIFT_API_KEYS (comma-separated) or name a Prefect Secret block "
            "with --api-key-secret"
        )
    return {owner_of(k) for k in keys}


def batch_runs(config: BatchApiConfig, store: Store) -> BatchRuns:
    """Where this server's batches run: its deployment's work pool, or this machine."""
    return DeploymentRuns(config, store) if config.deployment else LocalProcessRuns(config, store)


def serve(config: BatchApiConfig) -> int:
    """Run the API until SIGINT/SIGTERM; batches in flight resume on the next start."""
    import uvicorn

    from nightshift.runtime.lease import run_lease
    from nightshift.runtime.rundir import RunDir

    owners = api_keys(config)  # before anything listens: no keys, no server
    store = Store(config.storage, config.retention_s)
    webhooks = Webhooks(config, store)  # and a signing secret for its endpoints, if any
    if not is_url(config.storage):
        Path(config.storage).mkdir(parents=True, exist_ok=True)
    with run_lease(RunDir(store.root)):  # one server per storage: two would run each batch twice
        shared = SharedEngine(config.chat_model) if config.shared_engine else None
        try:
            if shared is not None:  # before any batch runs: each is told where the engine is
                config = config.model_copy(update={"chat_engine_url": shared.start()})
            lifecycle = BatchLifecycle(config, store, batch_runs(config, store), webhooks)
            app = create_app(config, store, lifecycle, owners)
            lifecycle.start()
            try:
                uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
            finally:
                lifecycle.shutdown()
        finally:
            if shared is not None:
                shared.stop()
    return 0

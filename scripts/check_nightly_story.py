"""The nightly story in the Prefect UI, looked at with a real browser: a run on a
Postgres-backed server fails its canaries on purpose, the shipped automation notifies a
webhook, and the event feed, the automation and the assets' events show it.

    apt-get install chromium && python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    .venv/bin/python scripts/check_nightly_story.py --browser-python /tmp/pw/bin/python

Starts PostgreSQL (bench/local_servers.py) and `prefect server start` on it with its UI, a
webhook receiver here with a CustomWebhookNotificationBlock pointing at it, `scripts/deploy.sh`
with NIGHTSHIFT_NOTIFY_BLOCK=custom-webhook/on-call (pools, blocks, deployments, automations), a
worker on the CPU pool, then `prefect deployment run nightshift-batch/nightly --watch` over 40
rows on the tiny model with a canary that cannot pass (the flow run fails). Waits for the
notification, then saves screenshots to docs/images/: the event feed, the fired automation, the
output asset's materialization event (its upstream: the input). Exit 0 only if the run failed,
the notification arrived and every page showed what it should.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from local_servers import PostgresServer, WebhookReceiver, free_port, wait_for_prefect  # noqa: E402

BROWSER = r"""
import json, sys
from playwright.sync_api import sync_playwright
shots = json.loads(sys.argv[1])
seen = {}
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    for name, (url, path, expect) in shots.items():
        page.goto(url, wait_until="networkidle")
        try:
            page.wait_for_function("t => document.body.innerText.includes(t)", arg=expect, timeout=30000)
        except Exception:
            pass
        page.wait_for_timeout(1500)
        seen[name] = expect in page.inner_text("body")
        page.screenshot(path=path, full_page=False)
    browser.close()
print(json.dumps(seen))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--browser-python", default="/tmp/pw/bin/python", help="a Python with playwright")
    parser.add_argument("--images", default=str(REPO / "docs" / "images"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nightshift-story-"))
    postgres = PostgresServer()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api, "HF_HUB_OFFLINE": "1",
           "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url}  # fmt: skip
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip
    hook = WebhookReceiver()
    try:
        wait_for_prefect(api)
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=env["PREFECT_HOME"])
        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        from nightshift.blocks import ModelConfig

        template = {"subject": "{{subject}}", "body": "{{body}}"}
        CustomWebhookNotificationBlock(name="on-call", url=hook.url, json_data=template).save("on-call")
        ModelConfig(model="tiny", engine={"max_num_seqs": 16}).save("tiny-story")
        # What docs/deployments.md tells an operator: pools, blocks, deployments, automations.
        subprocess.run([str(REPO / "scripts" / "deploy.sh")], cwd=REPO, check=True,
                       env={**env, "NIGHTSHIFT_NOTIFY_BLOCK": "custom-webhook/on-call"})  # fmt: skip
        worker = subprocess.Popen([str(bin_dir / "prefect"), "worker", "start", "--pool", "nightshift-cpu"],
                                  cwd=REPO, env=env, stdout=open(work / "worker.log", "wb"),
                                  stderr=subprocess.STDOUT)  # fmt: skip
        rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"messages": [{"role": "user", "content": f"Summarize item {i}"}], "max_tokens": 16,
                          "temperature": 0}} for i in range(40)]  # fmt: skip
        (work / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        canary = {**rows[0], "custom_id": "must-say-hello", "expect": {"exact": "Hello, the canary is fine."}}
        (work / "canaries.jsonl").write_text(json.dumps(canary) + "\n")
        # The nightly deployment as CI starts it, its engine on the CPU pool's worker (no fan-out here).
        parameters = {
            "input_path": str(work / "in.jsonl"), "run_dir": str(work / "nightly"), "model": "tiny-story",
            "shard_size": 20, "fan_out": None, "validation": {"canaries": str(work / "canaries.jsonl")},
        }  # fmt: skip
        run = subprocess.run(
            [str(bin_dir / "prefect"), "deployment", "run", "nightshift-batch/nightly", "--params",
             json.dumps(parameters), "--watch", "--watch-timeout", "600"],
            cwd=REPO, env=env,
        )  # fmt: skip
        worker.terminate()
        page = hook.wait_for("validation failed")
        notified = json.loads(page) if page else None
        ui = f"http://127.0.0.1:{port}"
        automation = next(a for a in httpx.post(f"{api}/automations/filter", json={}).json()
                          if a["name"] == "nightshift-validation-failed")  # fmt: skip
        event = _event(api, "prefect.asset.materialization.succeeded", "output.jsonl")
        images = Path(args.images)
        shots = {
            "event feed": (f"{ui}/events", str(images / "event-feed.png"), "nightshift.validation.failed"),
            "automation": (f"{ui}/automations/automation/{automation['id']}", str(images / "automation-fired.png"),
                           "nightshift-validation-failed"),
            "asset materialized": (f"{ui}/events/event/{event['occurred'][:10]}/{event['id']}",
                                   str(images / "asset-materialized.png"), "in.jsonl"),
        }  # fmt: skip
        shown = subprocess.run([args.browser_python, "-c", BROWSER, json.dumps(shots)], capture_output=True,
                               text=True, timeout=300)  # fmt: skip
        if shown.returncode != 0:
            print(shown.stderr[-3000:], file=sys.stderr)
            return 1
        seen = json.loads(shown.stdout.strip().splitlines()[-1])
        print(json.dumps({"run_exit": run.returncode, "notification": notified, "pages": seen,
                          "screenshots": [s[1] for s in shots.values()]}, indent=2))  # fmt: skip
        return 0 if run.returncode != 0 and notified and all(seen.values()) else 1
    finally:
        hook.close()
        server.terminate()
        server.wait(timeout=30)
        postgres.stop()


def _event(api: str, name: str, resource_suffix: str) -> dict:
    for _ in range(60):
        page = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 50}).json()
        found = [e for e in page.get("events", []) if e["resource"]["prefect.resource.id"].endswith(resource_suffix)]
        if found:
            return found[0]
        time.sleep(1)
    raise SystemExit(f"no {name} event for {resource_suffix}")


if __name__ == "__main__":
    sys.exit(main())

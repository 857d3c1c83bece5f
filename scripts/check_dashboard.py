"""Does the cost report render in the Prefect dashboard? Look, with a real browser.

    apt-get install chromium && python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    .venv/bin/python scripts/check_dashboard.py --browser-python /tmp/pw/bin/python

Starts a Prefect server on a free port, runs a small job on the tiny model against it, opens
the flow run's cost-report artifact in headless Chromium, checks that the chart image decoded
(naturalWidth > 0) and that the page shows the report's figures, and saves a screenshot to
docs/images/report-artifact.png. Exit status 0 only if the chart rendered.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from local_servers import free_port, wait_for_prefect  # noqa: E402

BROWSER = r"""
import json, sys
from playwright.sync_api import sync_playwright
url, shot = sys.argv[1], sys.argv[2]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(url, wait_until="networkidle")
    page.wait_for_selector("img", timeout=60000)
    page.wait_for_timeout(2000)
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({src: e.src.slice(0, 40), w: e.naturalWidth, h: e.naturalHeight}))"
    )
    text = page.inner_text("body")
    page.screenshot(path=shot, full_page=True)
    print(json.dumps({"images": images, "has_figures": "tokens/s" in text and "cost" in text.lower()}))
    browser.close()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--browser-python", default="/tmp/pw/bin/python", help="a Python with playwright")
    parser.add_argument("--screenshot", default=str(REPO / "docs" / "images" / "report-artifact.png"))
    args = parser.parse_args()

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api, "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="nightshift-dashboard-"))
    env["PREFECT_HOME"] = str(work / "prefect")
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(work / "server.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_prefect(api)
        rows = [
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 64,
                      "temperature": 0, "ignore_eos": True}}
            for i in range(2000)
        ]  # fmt: skip
        (work / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        subprocess.run(
            [str(bin_dir / "nightshift"), "run", str(work / "in.jsonl"), "--output", str(work / "run"),
             "--model", "tiny", "--shard-size", "500"],
            env=env, check=True,
        )  # fmt: skip
        artifacts = httpx.post(
            f"{api}/artifacts/filter", json={"artifacts": {"type": {"any_": ["markdown"]}}}, timeout=10
        ).json()
        report = next(a for a in artifacts if (a.get("key") or "").startswith("nightshift-report-"))
        url = f"http://127.0.0.1:{port}/artifacts/artifact/{report['id']}"
        shown = subprocess.run(
            [args.browser_python, "-c", BROWSER, url, args.screenshot], capture_output=True, text=True, timeout=300
        )
        if shown.returncode != 0:
            print(shown.stderr[-3000:], file=sys.stderr)
            return 1
        seen = json.loads(shown.stdout.strip().splitlines()[-1])
        chart = [i for i in seen["images"] if i["src"].startswith("data:image/png")]
        print(json.dumps({"artifact_page": url, "screenshot": args.screenshot, **seen}, indent=2))
        return 0 if chart and chart[0]["w"] > 0 and seen["has_figures"] else 1
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())

"""Attack a running `nightshift serve` as a hostile API-key holder would, and print what held.

    python scripts/probe_serve_security.py --base-url http://127.0.0.1:8000/v1 --key sk-a --other-key sk-b

Run it on the server's host (it plants a secret file and listens on a loopback port, and checks
that the server neither reads the one nor calls the other). Every attack is an ordinary request
of OpenAI's Batch API; each line says what was tried, what a safe server answers, what this one
answered, and HELD or OPEN. Exit status 0 only when every attack held. `--json` prints the same
as one JSON document (the suite reads it: tests/test_serve_security.py).

The attacks (docs/security.md): image_url sources naming the server's files, devices, buckets,
fsspec chains and its network; too many images; a body sent before the key is checked; an
upload past the limit; a poisoned batch cancelled before validation and a batch whose input is
deleted, each beside another key's batch that must still complete; deleting a live batch's input.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

TERMINAL = ("completed", "failed", "expired", "cancelled")
SECRET = "nightshift-probe-secret-4f1c9a"


@dataclass
class Outcome:
    attack: str
    expected: str
    got: str
    held: bool


class Listener:
    """A loopback HTTP server that must receive nothing: any request to it is an SSRF."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(_png())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _png(size: int = 8) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _image_row(custom_id: str, *urls: str) -> dict:
    content = [{"type": "text", "text": "What colour is this?"}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def hostile_rows(secret_dir: Path, listener: Listener) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """custom_id → (row, the error codes a safe server answers it with)."""
    secret_png = secret_dir / "secret.png"
    secret_png.write_bytes(_png())
    (secret_dir / "secret.txt").write_text(SECRET)
    inline = "data:image/png;base64," + base64.b64encode(_png()).decode()
    refused = ("media_not_allowed",)
    attacks = {
        "file-url": (f"file://{secret_dir}/secret.txt", refused),
        "bare-path": (str(secret_png), refused),
        "relative-path": (f"../../../../../../..{secret_png}", refused),
        "passwd": ("file:///etc/passwd", refused),
        "device": ("/dev/zero", refused),
        "bucket": ("s3://nightshift-probe-any-bucket/key.png", refused),
        "chained-http": (f"simplecache::{listener.url}/chained.png", refused),
        "blockcache": (f"blockcache::{listener.url}/block.png", refused),
        "webhdfs": (f"webhdfs://127.0.0.1:{listener.url.rsplit(':', 1)[1]}/x.png", refused),
        "ftp": ("ftp://127.0.0.1:21/x.png", refused),
        "loopback-http": (f"{listener.url}/direct.png", refused),
        "ipv6-loopback-http": (f"http://[::1]:{listener.url.rsplit(':', 1)[1]}/v6.png", refused),
    }
    rows = {cid: (_image_row(cid, url), codes) for cid, (url, codes) in attacks.items()}
    rows["many-images"] = (_image_row("many-images", *[inline] * 64), ("too_many_images",))
    rows["inline-ok"] = (_image_row("inline-ok", inline), ())
    return rows


class Probe:
    def __init__(self, base_url: str, key: str, other_key: str, max_file_bytes: int, timeout: float) -> None:
        self.base, self.key, self.other, self.max_file_bytes = base_url.rstrip("/"), key, other_key, max_file_bytes
        self.timeout = timeout
        self.outcomes: list[Outcome] = []

    def say(self, attack: str, expected: str, got: str, held: bool) -> None:
        self.outcomes.append(Outcome(attack, expected, got, bool(held)))

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def upload(self, key: str, lines: list) -> str:
        text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
        with self.client(key) as client:
            answer = client.post("/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", text.encode())})
        answer.raise_for_status()
        return answer.json()["id"]

    def create(self, key: str, file_id: str) -> dict:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        with self.client(key) as client:
            answer = client.post("/batches", json=body)
        answer.raise_for_status()
        return answer.json()

    def wait(self, key: str, batch_id: str) -> dict:
        deadline = time.monotonic() + self.timeout
        with self.client(key) as client:
            while time.monotonic() < deadline:
                batch = client.get(f"/batches/{batch_id}").json()
                if batch["status"] in TERMINAL:
                    return batch
                time.sleep(0.5)
        return batch

    def lines(self, key: str, file_id: str | None) -> list[dict]:
        if not file_id:
            return []
        with self.client(key) as client:
            return [json.loads(line) for line in client.get(f"/files/{file_id}/content").text.splitlines() if line]


def probe_media(probe: Probe, listener: Listener) -> None:
    """Every hostile source refused per row with its code, saying nothing of the file; the
    listener called by no one; the inline image answered."""
    with tempfile.TemporaryDirectory(prefix="nightshift-probe-") as secret_dir:
        rows = hostile_rows(Path(secret_dir), listener)
        batch = probe.wait(
            probe.key, probe.create(probe.key, probe.upload(probe.key, [r for r, _ in rows.values()]))["id"]
        )
        errors = {e["custom_id"]: e for e in probe.lines(probe.key, batch.get("error_file_id"))}
        answered = {o["custom_id"] for o in probe.lines(probe.key, batch.get("output_file_id"))}
    for custom_id, (_, codes) in rows.items():
        if not codes:
            probe.say(f"image: {custom_id}", "answered", "answered" if custom_id in answered else "not answered",
                      custom_id in answered)  # fmt: skip
            continue
        error = (errors.get(custom_id) or {}).get("error") or {}
        said = json.dumps(error)
        quiet = SECRET not in said and "root:" not in said and "No such file" not in said
        probe.say(
            f"image: {custom_id}",
            "/".join(codes),
            error.get("code") or "answered",
            error.get("code") in codes and quiet,
        )
    probe.say(
        "network: nothing reached the listener", "no request", f"{len(listener.hits)} requests", not listener.hits
    )


def probe_bodies(probe: Probe) -> None:
    """A body is not read before the key is checked, and an upload past the limit is refused
    as soon as it passes it — by its declared length or as it streams."""
    host, port = httpx.URL(probe.base).host, httpx.URL(probe.base).port or 80
    path = httpx.URL(probe.base).path.rstrip("/") + "/files"
    for name, key in (("no key", None), ("wrong key", "sk-not-a-key")):
        status = _answer_before_body(host, port, path, key, 10**10)
        probe.say(
            f"upload: {name}, 10 GB declared, no byte sent", "401 before any body", status, status.startswith("401")
        )
    status = _answer_before_body(host, port, path, probe.key, probe.max_file_bytes * 4)
    probe.say("upload: 4 × the limit declared", "413 before any body", status, status.startswith("413"))
    status = _streamed_past_limit(probe)
    probe.say("upload: chunked, no length, past the limit", "413", status, status.startswith("413"))


def _answer_before_body(host: str, port: int, path: str, key: str | None, length: int) -> str:
    """Send only the headers of an upload declaring `length` bytes: the status line the server
    answers within 10 s (without reading a body), or 'no answer'."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {length}\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head.encode())
        try:
            return sock.recv(200).decode(errors="replace").split("\r\n", 1)[0].removeprefix("HTTP/1.1 ") or "closed"
        except TimeoutError:
            return "no answer within 10 s"


def _streamed_past_limit(probe: Probe) -> str:
    boundary = "nightshiftprobe"

    def body():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
        sent, block = 0, b"x" * (1 << 16)
        while sent < probe.max_file_bytes * 2:
            sent += len(block)
            yield block

    headers = {"Authorization": f"Bearer {probe.key}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    try:
        return str(httpx.post(f"{probe.base}/files", content=body(), headers=headers, timeout=60).status_code)
    except httpx.HTTPError as exc:  # the server answered and closed while the body still streamed
        return f"413 (connection closed early: {type(exc).__name__})"


def probe_isolation(probe: Probe) -> None:
    """A poisoned batch of one key (a file of `[1, 2]` cancelled before validation; a batch
    whose input is deleted) fails or cancels alone, and another key's batch completes."""
    inline = "data:image/png;base64," + base64.b64encode(_png()).decode()
    poisoned = probe.create(probe.key, probe.upload(probe.key, ["[1, 2]", "not json", '{"custom_id": 7}']))
    with probe.client(probe.key) as client:
        client.post(f"/batches/{poisoned['id']}/cancel")
    victim_file = probe.upload(probe.key, [_image_row("v", inline)])
    vanishing = probe.create(probe.key, victim_file)
    with probe.client(probe.key) as client:
        deleted = client.delete(f"/files/{victim_file}").status_code
    probe.say("delete: the input of a live batch", "409", str(deleted), deleted == 409)
    other = probe.create(probe.other, probe.upload(probe.other, [_image_row("other", inline)]))
    finished = probe.wait(probe.other, other["id"])
    probe.say("isolation: another key's batch beside a poisoned one", "completed", finished["status"],
              finished["status"] == "completed")  # fmt: skip
    ended = probe.wait(probe.key, poisoned["id"])["status"]  # failed if validation came before the cancel
    probe.say("isolation: the poisoned batch, cancelled in validating", "cancelled or failed", ended,
              ended in ("cancelled", "failed"))  # fmt: skip
    probe.wait(probe.key, vanishing["id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", required=True, help="the server's /v1, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--key", required=True, help="an API key of the server")
    parser.add_argument("--other-key", required=True, help="another tenant's key")
    parser.add_argument("--max-file-bytes", type=int, default=200 * 1024**2, help="the server's --max-file-bytes")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a batch may take")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    probe = Probe(args.base_url, args.key, args.other_key, args.max_file_bytes, args.timeout)
    listener = Listener()
    probe_bodies(probe)
    probe_media(probe, listener)
    probe_isolation(probe)
    if args.json:
        print(json.dumps([asdict(o) for o in probe.outcomes], indent=2))
    else:
        for o in probe.outcomes:
            print(f"{'HELD' if o.held else 'OPEN':4}  {o.attack:58}  expected {o.expected:24}  got {o.got}")
        print(f"{sum(o.held for o in probe.outcomes)} of {len(probe.outcomes)} attacks held")
    return 0 if all(o.held for o in probe.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A fault-injecting HTTP proxy to put between clients and a server: an S3-compatible server
(`FaultyS3Proxy`) or an OpenAI-compatible engine server (`FaultyEngineProxy`).

Each request is, at random: forwarded as it is; answered with the server's own throttling or
internal-error reply without reaching it; forwarded after a stall; or forwarded and then cut off
(the connection dropped before any response byte). The counts of each are kept, so a test can
prove the faults happened.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

_THROTTLED = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"""
_INTERNAL = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"""


_S3_REPLIES = {"throttle": (503, "application/xml", _THROTTLED), "internal": (500, "application/xml", _INTERNAL)}
_ENGINE_REPLIES = {
    "throttle": (429, "application/json", b'{"error": {"message": "Too many requests", "type": "rate_limit"}}'),
    "internal": (503, "application/json", b'{"error": {"message": "The server is overloaded", "type": "server"}}'),
}


class FaultyProxy:
    def __init__(
        self, upstream: str, replies: dict, fault_rate: float = 0.1, stall_s: float = 1.0, seed: int = 0
    ) -> None:
        self.upstream, self.fault_rate, self.stall_s = upstream.rstrip("/"), fault_rate, stall_s
        self.random = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.client = httpx.Client(timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._draw()
                if fault in ("throttle", "internal"):
                    status, content_type, payload = replies[fault]
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream = proxy.client.request(self.command, proxy.upstream + self.path, headers=headers, content=body)
                if fault == "drop":  # the request reached the server; its answer never comes back
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(upstream.status_code)
                for key, value in upstream.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                # A HEAD's length is the object's, not that of the (empty) body.
                length = upstream.headers.get("content-length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(upstream.content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(upstream.content)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # a dropped connection is the point
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self) -> str:
        with self.lock:
            roll = self.random.random()
            kind = "ok"
            if roll < self.fault_rate:
                kind = self.random.choice(["throttle", "internal", "stall", "drop"])
            self.counts[kind] += 1
            return kind

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.client.close()


class FaultyS3Proxy(FaultyProxy):
    def __init__(self, upstream: str, **options) -> None:
        super().__init__(upstream, _S3_REPLIES, **options)


class FaultyEngineProxy(FaultyProxy):
    def __init__(self, upstream: str, **options) -> None:
        super().__init__(upstream, _ENGINE_REPLIES, **options)

"""A recording OpenAI-compatible engine server: it answers /v1/models, chat and completions with
a deterministic text, and keeps every request's raw body, so a test can say what reached the
engine (an image's bytes, a row's priority) — and what never did."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubEngine:
    def __init__(self, model: str = "tiny", max_model_len: int = 2048) -> None:
        self.bodies: list[bytes] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    entry = {"id": model, "object": "model", "owned_by": "stub", "max_model_len": max_model_len}
                    return self._json(200, {"object": "list", "data": [entry]})
                self._json(404, {"error": {"message": "no such route"}})

            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                stub.bodies.append(raw)
                if not self.path.endswith("/completions"):
                    return self._json(404, {"error": {"message": "only chat and completions here"}})
                body = json.loads(raw)
                asked = body.get("messages", body.get("prompt"))
                text = "stub " + hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:8]
                usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
                if self.path.endswith("/completions") and not self.path.endswith("/chat/completions"):
                    choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
                    return self._json(200, {"id": "cmpl-stub", "object": "text_completion", "created": 0,
                                            "model": model, "choices": [choice], "usage": usage})  # fmt: skip
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                self._json(200, {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": model,
                                 "choices": [choice], "usage": usage})  # fmt: skip

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self) -> bytes:
        return b"\n".join(self.bodies)

    def chat_bodies(self) -> list[dict]:
        return [json.loads(b) for b in self.bodies if b"messages" in b and b'"ping"' not in b]

    def close(self) -> None:
        self.server.shutdown()

"""A scripted OpenAI-compatible chat server on 127.0.0.1 for expander tests.

Each request takes the next behaviour from a script (the last one repeats): a caption to return, a status code,
garbage, a cut-off reply, a slow reply. Every request is recorded (headers and JSON body). The server listens on a
free port, sleeps at most `MAX_SLEEP` seconds in a slow reply, and shuts itself down after `lifetime` seconds even
if a test forgets to.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_SLEEP = 2.0


@dataclass
class Reply:
    """One scripted behaviour: `kind` is caption | status | garbage | truncated | slow | reject_format."""

    kind: str
    content: str = ""
    status: int = 200
    sleep: float = 0.0


def caption(text: str) -> Reply:
    return Reply("caption", content=text)


@dataclass
class Recorded:
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class ChatServer:
    script: list[Reply]
    lifetime: float = 30.0
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append(Recorded(dict(self.headers.items()), body))
                    index = min(len(server.requests) - 1, len(server.script) - 1)
                    reply = server.script[index]
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error":"not found"}')
                if reply.kind == "status":
                    return self._send(reply.status, b'{"error":{"message":"scripted failure"}}')
                if reply.kind == "reject_format":
                    if "response_format" in body:
                        return self._send(400, b'{"error":{"message":"response_format is not supported"}}')
                    reply = Reply("caption", content=reply.content)
                if reply.kind == "garbage":
                    return self._send(200, b"<html>upstream exploded</html>", "text/html")
                if reply.kind == "slow":
                    time.sleep(min(reply.sleep, MAX_SLEEP))
                finish = "stop"
                content = reply.content
                if reply.kind == "truncated":
                    content, finish = content[: len(content) // 2], "length"
                payload = {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "model": body.get("model", ""),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": finish,
                        }
                    ],
                }
                self._send(200, json.dumps(payload, ensure_ascii=False).encode("utf-8"))

            def _send(self, status: int, data: bytes, content_type: str = "application/json") -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._watchdog = threading.Timer(self.lifetime, self._server.shutdown)
        self._watchdog.daemon = True

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ChatServer:
        self._thread.start()
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self._watchdog.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

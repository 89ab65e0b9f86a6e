"""A scripted Anthropic Messages API server on 127.0.0.1 for the agent tests and bench.

The real `anthropic` client talks to it over real sockets (base_url). Each POST /v1/messages
is recorded (parsed JSON body) and answered by the script: a list of replies used in order, or
a function of the request body. A reply can be delayed (`delay_s`, slept outside the lock so
that concurrent requests overlap); `spans` records when each request arrived and was answered
(server-side monotonic times), which is how concurrency is observed.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from pydantic import BaseModel, ConfigDict


class Reply(BaseModel):
    """One HTTP response of the fake server."""

    model_config = ConfigDict(frozen=True)

    status: int = 200
    body: dict[str, Any]
    headers: dict[str, str] = {}
    #: Seconds the server waits before answering.
    delay_s: float = 0.0


Script = list[Reply] | Callable[[dict[str, Any]], Reply]

_ids = itertools.count(1)


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def tool_use(name: str, input: Any, id: str | None = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": id or f"toolu_{next(_ids):04d}", "name": name, "input": input}


def message(
    *content: dict[str, Any],
    stop_reason: str | None = None,
    model: str = "claude-sonnet-4-6",
    usage: dict[str, int] | None = None,
    delay_s: float = 0.0,
) -> Reply:
    """A successful Messages API response; stop_reason defaults from the content."""
    if stop_reason is None:
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
    return Reply(body={
        "id": f"msg_{next(_ids):04d}", "type": "message", "role": "assistant", "model": model,
        "content": list(content), "stop_reason": stop_reason, "stop_sequence": None,
        "usage": usage or {"input_tokens": 10, "output_tokens": 5},
    }, delay_s=delay_s)


def error(
    status: int, type: str, msg: str = "scripted error", retry_after: str | None = "0"
) -> Reply:
    """An API error response (retry-after 0 by default so tests do not sleep)."""
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return Reply(status=status, headers=headers,
                 body={"type": "error", "error": {"type": type, "message": msg}})


class FakeAnthropic:
    """`with FakeAnthropic(script) as server:` ... `server.url`, `server.requests`."""

    def __init__(self, script: Script) -> None:
        self.requests: list[dict[str, Any]] = []
        #: (arrived, answered, request body) of each request, monotonic seconds.
        self.spans: list[tuple[float, float, dict[str, Any]]] = []
        self._script = script
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def models(self) -> list[str]:
        """The model of each request received, in order."""
        return [r["model"] for r in self.requests]

    def tool_results(self) -> list[dict[str, Any]]:
        """Every tool_result block the client sent, in order, without duplicates (each request
        repeats the whole conversation)."""
        seen: dict[str, dict[str, Any]] = {}
        for req in self.requests:
            for msg in req["messages"]:
                if msg["role"] == "user" and isinstance(msg["content"], list):
                    for block in msg["content"]:
                        if block.get("type") == "tool_result":
                            seen.setdefault(block["tool_use_id"], block)
        return list(seen.values())

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            if callable(self._script):
                return self._script(body)
            if not self._script:
                return error(500, "api_error", "fake server: script exhausted", retry_after=None)
            return self._script.pop(0)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # replies are two writes: no delayed-ACK stalls

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.split("?")[0].endswith("/v1/messages"):
                    reply = error(404, "not_found_error", f"no route {self.path}", None)
                else:
                    arrived = time.monotonic()
                    reply = fake._next(body)
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    with fake._lock:
                        fake.spans.append((arrived, time.monotonic(), body))
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_{next(_ids):04d}")
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

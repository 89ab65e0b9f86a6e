"""A stand-in for the Claude Managed Agents endpoints the SDK's environment worker calls, on
127.0.0.1, serving one scripted session: work poll/ack/heartbeat/stop, session retrieve,
session events list/stream/send, one skill (retrieve + content) and the memory stores the
session names in its resources (memories list/retrieve/create/update/delete).

The script is a list of (tool name, input); the stand-in emits one `agent.tool_use` at a
time on the event stream, waits for the worker's `user.tool_result`, then emits the next, and
ends with `session.status_terminated`. Everything the worker sent is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import json
import threading
import zipfile
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

NOW = "2026-01-01T00:00:00Z"
SKILL_TEXT = "# greeting\nSay hello.\n"


@dataclass
class StandIn:
    """The server's script and what it saw."""

    script: list[tuple[str, dict[str, Any]]]
    environment_id: str = "env_test"
    session_id: str = "sesn_test"
    work_id: str = "work_test"
    #: (endpoint, detail) in arrival order, e.g. ("ack", work_id), ("result", event).
    seen: list[tuple[str, Any]] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    url: str = ""
    #: Answer every poll 401, as for a wrong environment key.
    reject_key: bool = False
    port: int = 0
    #: The session's memory-store resources (`memory_store_id`, `access`, `mount_path`,
    #: `name`); with any, the work item carries a sessions token (the memory endpoints need
    #: one).
    memory_stores: list[dict[str, Any]] = field(default_factory=list)
    #: memory_store_id -> path -> content: the server side of the stores.
    memories: dict[str, dict[str, str]] = field(default_factory=dict)
    #: script index -> session thread id of that call (others are the primary thread's).
    threads: dict[int, str] = field(default_factory=dict)
    #: script index -> seconds after which the call's thread goes idle (an interrupt: the
    #: session no longer takes the call's result); the script goes on without it.
    interrupts: dict[int, float] = field(default_factory=dict)
    #: Set by the test to let the session end (awaited, at most 30 s, before the stand-in
    #: terminates the session), so it can look at the sandbox while the session is open.
    hold: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self._claimed = False
        self._answered: asyncio.Queue[str] | None = None
        self._ids = itertools.count(1)
        self._memory_ids: dict[tuple[str, str], str] = {}  # (store, path) -> id

    # ---- work -----------------------------------------------------------------------------

    async def poll(self, request: web.Request) -> web.Response:
        self.seen.append(("poll", request.headers.get("authorization")))
        if self.reject_key:
            return web.json_response({"type": "error", "error": {
                "type": "authentication_error", "message": "invalid environment key"}},
                status=401)
        if self._claimed:
            await asyncio.sleep(0.2)
            return web.json_response(None)
        self._claimed = True
        return web.json_response({
            "id": self.work_id, "type": "work", "environment_id": self.environment_id,
            "data": {"type": "session", "id": self.session_id}, "secret": self._secret(),
            "created_at": NOW, "state": "queued",
        })

    async def ack(self, request: web.Request) -> web.Response:
        self.seen.append(("ack", request.match_info["work"]))
        return web.json_response({})

    async def heartbeat(self, request: web.Request) -> web.Response:
        self.seen.append(("heartbeat", request.match_info["work"]))
        return web.json_response({
            "type": "work_heartbeat", "last_heartbeat": NOW, "lease_extended": True,
            "state": "active", "ttl_seconds": 60,
        })

    async def stop(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(("stop", request.match_info["work"]))
        # Answered before `stopped` is set: a test that ends the worker once the item is
        # stopped must not catch it waiting for this answer.
        response = web.json_response({})
        await response.prepare(request)
        await response.write_eof()
        self.stopped.set()
        return response

    # ---- session --------------------------------------------------------------------------

    async def session(self, request: web.Request) -> web.Response:
        self.seen.append(("session", request.match_info["session"]))
        return web.json_response({
            "id": self.session_id, "type": "session", "status": "running",
            "environment_id": self.environment_id, "created_at": NOW, "updated_at": NOW,
            "metadata": {}, "outcome_evaluations": [],
            "resources": [{"type": "memory_store", **r} for r in self.memory_stores],
            "agent": {"id": "agent_test", "type": "agent", "name": "test",
                      "skills": [{"type": "custom", "skill_id": "skill_greet", "version": "1"}]},
        })

    async def skill_version(self, request: web.Request) -> web.Response:
        return web.json_response({
            "id": "skillver_1", "type": "skill_version", "name": "greeting",
            "skill_id": request.match_info["skill"], "version": "1", "created_at": NOW,
            "description": "", "directory": "greeting",
        })

    async def skill_content(self, request: web.Request) -> web.Response:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("SKILL.md", SKILL_TEXT)
        return web.Response(body=buf.getvalue(), content_type="application/zip")

    async def list_events(self, request: web.Request) -> web.Response:
        self.seen.append(("list", len(self.history)))
        return web.json_response({"data": self.history, "next_page": None})

    async def send_events(self, request: web.Request) -> web.Response:
        body = await request.json()
        for ev in body["events"]:
            self.seen.append(("result", ev))
            self.results[ev["tool_use_id"]] = ev
            self.history.append({**ev, "id": "sevt_r" + ev["tool_use_id"], "processed_at": NOW})
            assert self._answered is not None
            self._answered.put_nowait(ev["tool_use_id"])
        return web.json_response({"data": []})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(("stream", None))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def emit(event: dict[str, Any]) -> None:
            self.history.append(event)
            data = json.dumps(event)
            await resp.write(f"event: {event['type']}\ndata: {data}\n\n".encode())

        assert self._answered is not None
        for i, (name, tool_input) in enumerate(self.script):
            tool_id = f"sevt_tool{i:02d}"
            if tool_id in self.results:
                continue
            event = {"id": tool_id, "type": "agent.tool_use", "name": name,
                     "input": tool_input, "processed_at": NOW, "evaluated_permission": "allow"}
            if i in self.threads:
                event["session_thread_id"] = self.threads[i]
            await emit(event)
            if i in self.interrupts:
                await asyncio.sleep(self.interrupts[i])
                self.seen.append(("interrupt", tool_id))
                await emit({"id": f"sevt_idle{i:02d}", "type": "session.thread_status_idle",
                            "agent_name": "test", "processed_at": NOW,
                            "session_thread_id": self.threads[i],
                            "stop_reason": {"type": "end_turn"}})
                continue
            while await self._answered.get() != tool_id:
                pass
        if self.hold is not None:
            try:
                await asyncio.wait_for(self.hold.wait(), 30)
            except TimeoutError:
                pass
        await emit({"id": "sevt_end", "type": "session.status_terminated", "processed_at": NOW})
        return resp

    # ---- memory stores ----------------------------------------------------------------------

    def _secret(self) -> str | None:
        if not self.memory_stores:
            return None
        payload = json.dumps({"sessions_token": "sessions-token-test"}).encode()
        return base64.urlsafe_b64encode(payload).decode().rstrip("=")

    def _memory(self, store: str, path: str, *, full: bool) -> dict[str, Any]:
        content = self.memories[store][path]
        key = (store, path)
        if key not in self._memory_ids:
            self._memory_ids[key] = f"mem_{next(self._ids)}"
        data = content.encode()
        return {
            "id": self._memory_ids[key], "type": "memory", "memory_store_id": store,
            "memory_version_id": f"memver_{hashlib.sha256(data).hexdigest()[:12]}",
            "path": path, "content": content if full else None,
            "content_sha256": hashlib.sha256(data).hexdigest(),
            "content_size_bytes": len(data), "created_at": NOW, "updated_at": NOW,
        }

    def _path_of(self, store: str, memory_id: str) -> str | None:
        return next((p for (s, p), i in self._memory_ids.items()
                     if s == store and i == memory_id and p in self.memories[store]), None)

    async def list_memories(self, request: web.Request) -> web.Response:
        store = request.match_info["store"]
        self.seen.append(("memories", store))
        full = request.query.get("view") == "full"
        data = [self._memory(store, p, full=full) for p in sorted(self.memories[store])]
        return web.json_response({"data": data, "has_more": False, "next_page": None})

    async def get_memory(self, request: web.Request) -> web.Response:
        store, memory_id = request.match_info["store"], request.match_info["memory"]
        path = self._path_of(store, memory_id)
        if path is None:
            return web.json_response({"type": "error", "error": {
                "type": "not_found_error", "message": "no such memory"}}, status=404)
        return web.json_response(self._memory(store, path, full=True))

    async def create_memory(self, request: web.Request) -> web.Response:
        store, body = request.match_info["store"], await request.json()
        self.seen.append(("memory-create", (store, body["path"])))
        self.memories[store][body["path"]] = body["content"]
        return web.json_response(self._memory(store, body["path"], full=False))

    async def update_memory(self, request: web.Request) -> web.Response:
        store, memory_id = request.match_info["store"], request.match_info["memory"]
        body = await request.json()
        path = self._path_of(store, memory_id)
        self.seen.append(("memory-update", (store, path)))
        if path is None:
            return web.json_response({"type": "error", "error": {
                "type": "not_found_error", "message": "no such memory"}}, status=404)
        expected = (body.get("precondition") or {}).get("content_sha256")
        if expected and expected != self._memory(store, path, full=False)["content_sha256"]:
            return web.json_response({"type": "error", "error": {
                "type": "conflict_error", "message": "precondition failed"}}, status=409)
        self.memories[store][path] = body["content"]
        return web.json_response(self._memory(store, path, full=False))

    async def delete_memory(self, request: web.Request) -> web.Response:
        store, memory_id = request.match_info["store"], request.match_info["memory"]
        path = self._path_of(store, memory_id)
        self.seen.append(("memory-delete", (store, path)))
        if path is not None:
            del self.memories[store][path]
        return web.json_response({"id": memory_id, "type": "memory_deleted"})

    # ---- serving --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        env = "/v1/environments/{env}/work"
        app.router.add_get(f"{env}/poll", self.poll)
        app.router.add_post(f"{env}/{{work}}/ack", self.ack)
        app.router.add_post(f"{env}/{{work}}/heartbeat", self.heartbeat)
        app.router.add_post(f"{env}/{{work}}/stop", self.stop)
        app.router.add_get("/v1/sessions/{session}", self.session)
        app.router.add_get("/v1/sessions/{session}/events", self.list_events)
        app.router.add_post("/v1/sessions/{session}/events", self.send_events)
        app.router.add_get("/v1/sessions/{session}/events/stream", self.stream)
        app.router.add_get("/v1/skills/{skill}/versions/{version}", self.skill_version)
        app.router.add_get("/v1/skills/{skill}/versions/{version}/content", self.skill_content)
        mem = "/v1/memory_stores/{store}/memories"
        app.router.add_get(mem, self.list_memories)
        app.router.add_post(mem, self.create_memory)
        app.router.add_get(mem + "/{memory}", self.get_memory)
        app.router.add_post(mem + "/{memory}", self.update_memory)
        app.router.add_delete(mem + "/{memory}", self.delete_memory)
        return app

    async def start(self) -> web.AppRunner:
        """Starts serving on 127.0.0.1 (an ephemeral port) in the running loop."""
        self._answered = asyncio.Queue()
        runner = web.AppRunner(self.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        return runner

    def result_text(self, index: int) -> tuple[str, bool]:
        """The text of the result of script call `index`, and whether it is an error."""
        ev = self.results[f"sevt_tool{index:02d}"]
        content = ev.get("content") or []
        text = "".join(block.get("text", "") for block in content if block.get("type") == "text")
        return text, bool(ev.get("is_error"))


def serve_in_thread(standin: StandIn) -> tuple[threading.Thread, asyncio.AbstractEventLoop]:
    """Runs the stand-in in its own loop and thread (for a worker in another process); stop
    it with ``loop.call_soon_threadsafe(loop.stop)`` and join the thread."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(standin.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    ready.wait(10)
    return thread, loop

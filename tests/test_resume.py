"""Resume after kill -9: a child process runs `cellblock agent` against the local fake Anthropic
server (tests/fake_anthropic.py) with checkpoints in SQLite or PostgreSQL; the test SIGKILLs it
at random moments (model requests, tool calls, checkpoint writes), resumes with `--resume
latest` until the run ends, and checks that no tool call ran twice and none was lost.

Each turn the model asks for a shell call that appends one line to /workspace/log.txt and
prints the line count, and a memory-tool insert of the call's id into /memories/log.md. With a
counter server, the shell call first reports its id to a loopback HTTP server the test runs.
The workspace comes back from the checkpoint, so its log shows the calls the run kept; the
memory file (in the store, never restored) and the counter (on the host) show every execution:
an id there twice is a call run twice. A shell call interrupted by a kill is reported to the
model as interrupted (never re-run); the scripted model then asks for that line again.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fake_anthropic import FakeAnthropic, Reply, message, text, tool_use
from postgres_server import pg  # noqa: F401  (the fixture)

from cellblock.agent import Agent, ToolFinished
from cellblock.memory import CheckpointConfig, MemoryStore

MODEL = "claude-sonnet-4-6"
LINES = 12
EXPECTED = [f"s{n}" for n in range(LINES)]
MEMORY_LOG = "/memories/log.md"


class Counter:
    """Loopback HTTP server counting `GET /<id>` requests (executions seen from the host)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path.strip("/"))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def is_interrupted(result: dict[str, Any]) -> bool:
    return bool(result.get("is_error")) and str(result["content"]).startswith("interrupted:")


def results_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for m in messages if m["role"] == "user" and isinstance(m["content"], list)
            for b in m["content"] if b.get("type") == "tool_result"]


def scripted_model(delay: float = 0.05, counter_port: int | None = None) -> Any:
    """Replies from the conversation alone (so a resumed run gets the same reply): turn k asks
    for line n (n = shell calls completed so far) with id t{k}_0, and a memory insert with
    id t{k}_1; once LINES lines are appended, the answer."""
    def reply(body: dict[str, Any]) -> Reply:
        time.sleep(delay)
        k = sum(1 for m in body["messages"] if m["role"] == "assistant")
        n = sum(1 for r in results_of(body["messages"])
                if r["tool_use_id"].endswith("_0") and not is_interrupted(r))
        if n >= LINES:
            return message(text("done"))
        hit = (f"python3 -c 'import urllib.request as u; u.urlopen("
               f"\"http://127.0.0.1:{counter_port}/t{k}_0\", timeout=20).read()' && "
               if counter_port else "")
        return message(
            tool_use("run_shell", {"command": f"{hit}sleep 0.1; echo s{n} >> log.txt; "
                                              f"wc -l < log.txt"}, id=f"t{k}_0"),
            tool_use("memory", {"command": "insert", "path": MEMORY_LOG, "insert_line": 0,
                                "insert_text": f"t{k}_1"}, id=f"t{k}_1"))
    return reply


def prepare(url: str) -> None:
    """The memory file the model's inserts go to."""
    with MemoryStore(url) as store:
        store.write("tester", MEMORY_LOG, "")


def child_env(server: FakeAnthropic) -> dict[str, str]:
    keep = ("PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "LANG")
    return {**{k: os.environ[k] for k in keep if k in os.environ},
            "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": server.url}


def agent_argv(url: str, resume: bool, counter: Counter | None = None) -> list[str]:
    base = ["agent", "--json", "--model", MODEL, "--memory-db", url, "--user", "tester",
            "--max-turns", "40"]
    if counter is not None:
        base += ["--allow-net", f"127.0.0.1:{counter.port}"]
    return base + (["--resume", "latest"] if resume else ["append the lines"])


class Child:
    """One `cellblock agent` process forked by the fork server, signalled through a pidfd."""

    _n = itertools.count()

    def __init__(self, forks: ForkServer, argv: list[str], env: dict[str, str]) -> None:
        n = next(self._n)
        self.forks = forks
        self.out, self.err = forks.tmp / f"out{n}", forks.tmp / f"err{n}"
        self.pid = forks.ask({"op": "start", "argv": argv, "env": env,
                              "stdout": str(self.out), "stderr": str(self.err)})["pid"]
        self.pidfd = os.pidfd_open(self.pid)
        self.status: int | None = None

    def wait(self, timeout: float | None = None) -> bool:
        """True once the process has ended (then `status` is set)."""
        if self.status is None:
            if not select.select([self.pidfd], [], [], timeout)[0]:
                return False
            self.status = self.forks.ask({"op": "wait", "pid": self.pid})["status"]
            os.close(self.pidfd)
        return True

    def signal(self, sig: int) -> None:
        signal.pidfd_send_signal(self.pidfd, sig)

    def stop(self) -> None:
        """SIGSTOP, returning once every thread of the process is stopped (the signal is
        delivered asynchronously: a thread on another CPU runs on briefly)."""
        self.signal(signal.SIGSTOP)

        def stopped() -> bool:
            states = []
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                try:
                    states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
                except FileNotFoundError:
                    continue  # a thread that just ended
            return all(s in ("T", "t") for s in states)
        wait_for(stopped)

    def kill(self) -> None:
        """SIGKILL unless it has ended (an exited child is a zombie until `wait`, so the
        signal still reaches the right process; it just has no effect)."""
        if self.status is None:
            self.signal(signal.SIGKILL)
            self.wait()

    def output(self) -> tuple[str, str]:
        return self.out.read_text(), self.err.read_text()


class ForkServer:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("agent_forkserver.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def forks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("forks"))
    yield server
    server.close()


def has_session(url: str) -> bool:
    with MemoryStore(url) as store:
        return bool(store.checkpoints.sessions("tester"))


def progress(url: str) -> int:
    """Tool calls completed in the newest checkpoint (-1 before the first one)."""
    with MemoryStore(url) as store:
        if not store.checkpoints.sessions("tester"):
            return -1
        return len(store.checkpoints.latest("tester").state["tool_calls"])


def check_final(url: str, result: dict[str, Any], server: FakeAnthropic | None,
                counter: Counter | None = None) -> None:
    """No call ran twice, none was lost (see the module's docstring)."""
    assert result["stop_reason"] == "end_turn" and result["final_text"] == "done"
    calls = result["tool_calls"]
    ids = [c["id"] for c in calls]
    assert len(set(ids)) == len(ids)
    shell = [c for c in calls if c["name"] == "run_shell"]
    completed = [c["id"] for c in shell if c["reason"] != "interrupted"]
    memory_ids = [c["id"] for c in calls if c["name"] == "memory"]
    assert len(completed) == LINES and all(not c["is_error"] for c in calls
                                           if c["name"] == "memory")
    with MemoryStore(url) as store:
        final = store.checkpoints.latest("tester", result["session_id"])
        assert final.reason == "finished"
        log = next(f for f in final.files if f.path == "log.txt")
        assert log.hash is not None
        lines = store.checkpoints.blob("tester", log.hash).decode().split()
        # Every memory insert applied exactly once: none re-applied on resume, none lost.
        inserted = store.read("tester", MEMORY_LOG).content.split()
    assert lines == EXPECTED  # each completed call exactly once, in order
    assert collections.Counter(inserted) == collections.Counter(memory_ids), inserted
    if counter is not None:
        # Seen from the host: no shell call executed twice; every completed one once; an
        # interrupted one at most once (it may have run before the kill).
        seen = collections.Counter(counter.hits)
        assert max(seen.values()) == 1, seen
        assert set(completed) <= set(seen) <= {c["id"] for c in shell}, (seen, completed)
    if server is None:
        return
    # What the model saw last: every result once, each completed line reporting its number.
    results = results_of(server.requests[-1]["messages"])
    assert [r["tool_use_id"] for r in results] == ids
    counts = [int(r["content"].split("[stdout]")[1].split()[0]) for r in results
              if r["tool_use_id"] in completed]
    assert counts == list(range(1, LINES + 1))


def wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the child")
        time.sleep(0.01)


@pytest.fixture
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(scripted_model()) as s:
        yield s


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_at_random_points_then_resume(backend: str, tmp_path: Path,
                                              forks: ForkServer,
                                              request: pytest.FixtureRequest) -> None:
    url = (f"sqlite://{tmp_path / 'memory.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg").new_database())
    prepare(url)
    rng = random.Random(19)
    arrivals: list[float] = []
    counter = Counter()
    request.addfinalizer(counter.close)
    model = scripted_model(counter_port=counter.port)

    def timed(body: dict[str, Any]) -> Reply:
        arrivals.append(time.monotonic())
        return model(body)

    kills, phases, turn_s = 0, [], 1.0
    with FakeAnthropic(timed) as server:
        env = child_env(server)
        # Bounded: 10 kills, then the run is allowed to finish. A kill lands at a random
        # moment of the turn after the child's first model request (model reply, tool calls,
        # checkpoint writes), so a child makes at most about one turn of progress and the run
        # cannot end before the kills are spent; every fourth lands in start-up or restore.
        for attempt in range(40):
            child = Child(forks, agent_argv(url, resume=has_session(url), counter=counter),
                          env)
            try:
                if kills < 10:
                    before = len(arrivals)
                    if attempt % 4 != 3:
                        wait_for(lambda b=before, c=child: len(arrivals) > b or c.wait(0))
                    delay = rng.uniform(0.0, 1.0 if attempt % 4 == 3 else 1.3 * turn_s)
                    if not child.wait(timeout=delay):
                        child.kill()
                        if child.status == -signal.SIGKILL:
                            kills += 1
                            phases.append(progress(url))
                            mine = arrivals[before:]
                            if len(mine) >= 2:  # seconds per turn, as this child ran
                                turn_s = (mine[-1] - mine[0]) / (len(mine) - 1)
                            continue
                assert child.wait(timeout=120)
            finally:
                child.kill()
            out, err = child.output()
            assert child.status == 0, err
            check_final(url, json.loads(out), server, counter)
            break
        else:
            pytest.fail("the run never finished")
    assert kills == 10, phases
    # Kills landed at different stages of the run (tool calls checkpointed at each kill).
    assert len(set(phases)) >= 3, phases


def test_a_stale_process_that_comes_back_cannot_overwrite(
        tmp_path: Path, server: FakeAnthropic, forks: ForkServer) -> None:
    url = f"sqlite://{tmp_path / 'memory.db'}"
    prepare(url)
    env = child_env(server)
    stale = Child(forks, agent_argv(url, resume=False), env)
    try:
        def three_checkpoints() -> bool:
            with MemoryStore(url) as store:
                sessions = store.checkpoints.sessions("tester")
            return bool(sessions) and sessions[0].checkpoints >= 3
        wait_for(three_checkpoints)
        # Stopped between two transactions: one stopped inside a transaction keeps SQLite's
        # write lock, and every other process's write then fails with "database is locked"
        # once the busy timeout runs out (a paused writer blocks a SQLite store, by design).
        # While this holds the write lock, the child is outside any transaction of its own.
        with MemoryStore(url) as store, store.db.transaction():
            stale.stop()
        fresh = Child(forks, agent_argv(url, resume=True), env)
        assert fresh.wait(timeout=120) and fresh.status == 0, fresh.output()[1]
        result = json.loads(fresh.output()[0])
        check_final(url, result, server)
        stale.signal(signal.SIGCONT)
        assert stale.wait(timeout=120)
    finally:
        stale.kill()
    err = stale.output()[1]
    assert stale.status == 2 and "StaleCheckpoint" in err, err
    with MemoryStore(url) as store:
        latest = store.checkpoints.latest("tester", result["session_id"])
    assert latest.reason == "finished" and latest.state["result"]["final_text"] == "done"
    # The store still holds the fresh run's complete log (the stale process did send one more
    # model request, with its old conversation, before its first checkpoint was refused).
    check_final(url, result, None)


def test_agent_resume_api_after_an_interrupted_run(tmp_path: Path, server: FakeAnthropic,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    url = f"sqlite://{tmp_path / 'memory.db'}"
    prepare(url)
    with MemoryStore(url) as store:
        agent = Agent(model=MODEL, memory=store, user_id="tester",
                      checkpoints=CheckpointConfig(max_checkpoints=3))
        finished = 0
        events = agent.stream("append the lines")
        for event in events:
            finished += isinstance(event, ToolFinished)
            if finished == 5:
                break  # the run stops in the middle of turn 3 (turn index 2)
        events.close()
        session = store.checkpoints.sessions("tester")[0]
        assert session.status == "running" and session.checkpoints == 3
        seen: list[str] = []
        result = Agent(model=MODEL, memory=store, user_id="tester",
                       checkpoints=CheckpointConfig(max_checkpoints=3)).resume(
            "latest", on_event=lambda e: seen.append(e.call.id)
            if isinstance(e, ToolFinished) else None)
        # Only the calls not completed before are run: t2_1 onwards.
        assert seen == [f"t{k}_{j}" for k in range(LINES) for j in range(2)][5:]
        # (the 5th call was checkpointed before its event was delivered)
        assert result.session_id == session.id
        check_final(url, result.to_dict(), server)
        assert len(store.checkpoints.kept("tester", session.id)) == 3
        # Resuming a finished session returns its result without running anything.
        before = len(server.requests)
        again = Agent(model=MODEL, memory=store, user_id="tester").resume(session.id)
        assert again.final_text == "done" and len(server.requests) == before


def test_a_run_that_failed_on_the_model_api_resumes_where_it_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fake_anthropic import error

    good = scripted_model(0)
    outage = {"on": True}

    def script(body: dict[str, Any]) -> Reply:
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if turn == 3 and outage["on"]:
            return error(400, "invalid_request_error", "scripted outage")
        return good(body)

    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    prepare(f"sqlite://{tmp_path / 'm.db'}")
    with FakeAnthropic(script) as server, MemoryStore(f"sqlite://{tmp_path / 'm.db'}") as store:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        failed = Agent(model=MODEL, memory=store, user_id="tester").run("append the lines")
        assert failed.stop_reason == "error" and len(failed.tool_calls) == 6
        assert store.checkpoints.latest("tester", failed.session_id).reason == "failed"
        outage["on"] = False
        seen: list[str] = []
        result = Agent(model=MODEL, memory=store, user_id="tester").resume(
            failed.session_id, on_event=lambda e: seen.append(e.call.id)
            if isinstance(e, ToolFinished) else None)
        assert seen[0] == "t3_0" and len(seen) == 2 * LINES - 6
        check_final(f"sqlite://{tmp_path / 'm.db'}", result.to_dict(), server)


class Died(BaseException):
    """The process 'dies' here (raised past every handler, like a kill)."""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("tool", ["run_shell", "memory"])
def test_a_call_that_finished_just_before_its_checkpoint_is_not_run_again(
        backend: str, tool: str, tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact window of a kill -9 between a tool call's end and its checkpoint's commit: the
    memory insert is not applied again (its recorded outcome is replayed) and the shell call
    is not executed again (reported as interrupted, then asked for anew by the model)."""
    from cellblock import Policy
    from cellblock.memory.agent import Persistence

    url = (f"sqlite://{tmp_path / 'memory.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg").new_database())
    prepare(url)
    counter = Counter()
    request.addfinalizer(counter.close)
    policy = Policy(allow_net=[f"127.0.0.1:{counter.port}"])
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    original = Persistence.tool_done

    def dying(self: Persistence, name: str) -> None:
        if name == tool and len(self.run.tool_calls) >= 3:  # t1_0 (shell) or t1_1 (memory)
            raise Died
        original(self, name)

    with FakeAnthropic(scripted_model(0, counter.port)) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        with monkeypatch.context() as m, MemoryStore(url) as store:
            m.setattr(Persistence, "tool_done", dying)
            with pytest.raises(Died):
                Agent(model=MODEL, memory=store, user_id="tester", policy=policy).run(
                    "append the lines")
            assert store.read("tester", MEMORY_LOG).content.split() == (
                ["t1_1", "t0_1"] if tool == "memory" else ["t0_1"])
        with MemoryStore(url) as store:
            result = Agent(model=MODEL, memory=store, user_id="tester", policy=policy).resume()
        check_final(url, result.to_dict(), server, counter)
    calls = {c.id: c for c in result.tool_calls}
    if tool == "run_shell":
        assert calls["t1_0"].reason == "interrupted" and counter.hits.count("t1_0") == 1
        assert calls["t2_0"].reason == "exited"  # line s1 asked for again, run once
    else:
        assert calls["t1_1"].reason == "ok" and calls["t2_0"].reason == "exited"
        assert all(c.reason != "interrupted" for c in result.tool_calls)

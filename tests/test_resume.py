"""Resume after kill -9: a child process runs `cellblock agent` against the local fake Anthropic
server (tests/fake_anthropic.py) with checkpoints in SQLite; the test SIGKILLs it at random
moments (model requests, tool calls, checkpoint writes), resumes with `--resume latest` until
the run ends, and checks that every tool call took effect exactly once and in order.

Each tool call appends one line to /workspace/log.txt and prints the line count, so a
completed call run twice shows as a duplicate line (and a wrong count), a lost one as a gap.
The workspace comes back from the checkpoint, so the log is the sandbox's own record.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_anthropic import FakeAnthropic, Reply, message, text, tool_use
from postgres_server import pg  # noqa: F401  (the fixture)

from cellblock.agent import Agent, ToolFinished
from cellblock.memory import CheckpointConfig, MemoryStore

MODEL = "claude-sonnet-4-6"
TURNS = 12
CALLS_PER_TURN = 2
EXPECTED = [f"s{k}.{j}" for k in range(TURNS) for j in range(CALLS_PER_TURN)]


def scripted_model(delay: float = 0.05) -> Any:
    """Replies from the conversation alone (so a resumed run gets the same reply): turn k asks
    for CALLS_PER_TURN appends with fixed ids; after TURNS turns, the answer."""
    def reply(body: dict[str, Any]) -> Reply:
        time.sleep(delay)
        k = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if k >= TURNS:
            return message(text("done"))
        return message(*[
            tool_use("run_shell", {"command": f"sleep 0.1; echo s{k}.{j} >> log.txt; "
                                              f"wc -l < log.txt"}, id=f"t{k}_{j}")
            for j in range(CALLS_PER_TURN)])
    return reply


def child_env(server: FakeAnthropic) -> dict[str, str]:
    keep = ("PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "LANG")
    return {**{k: os.environ[k] for k in keep if k in os.environ},
            "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": server.url}


def agent_argv(url: str, resume: bool) -> list[str]:
    base = ["agent", "--json", "--model", MODEL, "--memory-db", url, "--user", "tester",
            "--max-turns", "20"]
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
        return bool(store.checkpoints.sessions())


def progress(url: str) -> int:
    """Tool calls completed in the newest checkpoint (-1 before the first one)."""
    with MemoryStore(url) as store:
        if not store.checkpoints.sessions():
            return -1
        return len(store.checkpoints.latest().state["tool_calls"])


def check_final(url: str, result: dict[str, Any], server: FakeAnthropic | None) -> None:
    assert result["stop_reason"] == "end_turn" and result["final_text"] == "done"
    ids = [c["id"] for c in result["tool_calls"]]
    assert ids == [f"t{k}_{j}" for k in range(TURNS) for j in range(CALLS_PER_TURN)]
    with MemoryStore(url) as store:
        final = store.checkpoints.latest(result["session_id"])
        assert final.reason == "finished"
        log = next(f for f in final.files if f.path == "log.txt")
        assert log.hash is not None
        lines = store.checkpoints.blob(log.hash).decode().split()
    assert lines == EXPECTED  # each completed call exactly once, in order
    if server is None:
        return
    # What the model saw last: every result once, each reporting its own line number.
    last = server.requests[-1]["messages"]
    results = [b for m in last if m["role"] == "user" and isinstance(m["content"], list)
               for b in m["content"] if b.get("type") == "tool_result"]
    assert [r["tool_use_id"] for r in results] == ids
    counts = [int(r["content"].split("[stdout]")[1].split()[0]) for r in results]
    assert counts == list(range(1, len(EXPECTED) + 1))


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
    rng = random.Random(19)
    arrivals: list[float] = []
    model = scripted_model()

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
            child = Child(forks, agent_argv(url, resume=has_session(url)), env)
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
            check_final(url, json.loads(out), server)
            break
        else:
            pytest.fail("the run never finished")
    assert kills == 10, phases
    # Kills landed at different stages of the run (tool calls checkpointed at each kill).
    assert len(set(phases)) >= 3, phases


def test_a_stale_process_that_comes_back_cannot_overwrite(
        tmp_path: Path, server: FakeAnthropic, forks: ForkServer) -> None:
    url = f"sqlite://{tmp_path / 'memory.db'}"
    env = child_env(server)
    stale = Child(forks, agent_argv(url, resume=False), env)
    try:
        def three_checkpoints() -> bool:
            with MemoryStore(url) as store:
                sessions = store.checkpoints.sessions()
            return bool(sessions) and sessions[0].checkpoints >= 3
        wait_for(three_checkpoints)
        stale.signal(signal.SIGSTOP)
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
        latest = store.checkpoints.latest(result["session_id"])
    assert latest.reason == "finished" and latest.state["result"]["final_text"] == "done"
    # The store still holds the fresh run's complete log (the stale process did send one more
    # model request, with its old conversation, before its first checkpoint was refused).
    check_final(url, result, None)


def test_agent_resume_api_after_an_interrupted_run(tmp_path: Path, server: FakeAnthropic,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    url = f"sqlite://{tmp_path / 'memory.db'}"
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
        session = store.checkpoints.sessions()[0]
        assert session.status == "running" and session.checkpoints == 3
        seen: list[str] = []
        result = Agent(model=MODEL, memory=store, user_id="tester",
                       checkpoints=CheckpointConfig(max_checkpoints=3)).resume(
            "latest", on_event=lambda e: seen.append(e.call.id)
            if isinstance(e, ToolFinished) else None)
        # Only the calls not completed before are run: t2_1 onwards.
        assert seen == [f"t{k}_{j}" for k in range(TURNS) for j in range(CALLS_PER_TURN)][5:]
        # (the 5th call was checkpointed before its event was delivered)
        assert result.session_id == session.id
        check_final(url, result.to_dict(), server)
        assert len(store.checkpoints.kept(session.id)) == 3
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
    with FakeAnthropic(script) as server, MemoryStore(f"sqlite://{tmp_path / 'm.db'}") as store:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        failed = Agent(model=MODEL, memory=store, user_id="tester").run("append the lines")
        assert failed.stop_reason == "error" and len(failed.tool_calls) == 6
        assert store.checkpoints.latest(failed.session_id).reason == "failed"
        outage["on"] = False
        seen: list[str] = []
        result = Agent(model=MODEL, memory=store, user_id="tester").resume(
            failed.session_id, on_event=lambda e: seen.append(e.call.id)
            if isinstance(e, ToolFinished) else None)
        assert seen[0] == "t3_0" and len(seen) == len(EXPECTED) - 6
        check_final(f"sqlite://{tmp_path / 'm.db'}", result.to_dict(), server)

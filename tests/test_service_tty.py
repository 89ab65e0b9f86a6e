"""Terminals through the real `cellblock serve` on loopback (run by root and by uid 65534): tty
runs and tty processes with `cellblock.Client` give what the in-process `Sandbox` gives for the
same calls and keystrokes; the wire protocol (the terminal WebSocket, the resize route) with
plain HTTP and `websockets`, its errors by name, its auth and limits; and `aio.Process`."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets.sync.client as ws_client
from test_service_processes import problem_of, sse_events, svc, unique_sleep
from websockets.exceptions import InvalidStatus

import cellblock
from cellblock import aio
from cellblock.service.problems import LimitExceeded
from cellblock.terminal import WindowSize
from conftest import processes_with_argv, wait_for

__all__ = ["svc"]  # the service fixture (root, and uid 65534), shared with the process tests

SECRET = "tty-remote-secret-5c1e9a7b"

#: What a program learns from its terminal; reads one typed line; writes to stderr.
PROBE = ("import os, sys; print('isatty', os.isatty(0), os.isatty(1), os.isatty(2), "
         "os.environ['TOKEN']); print('size', *os.get_terminal_size()); "
         "print('line', input('> ')); print('err', file=sys.stderr)")

#: (what to wait for: text shown after the previous step's, or a condition; what to do: keys
#: to type, or a function to call).
Step = tuple[bytes | Callable[[], bool], bytes | Callable[[], None]]


class Driver:
    """Keystrokes for a tty run, typed by a thread once each step's text has been shown (as a
    user at a keyboard); the run gets `keys` as `tty_input`, `show` as `on_output` and
    `window` as `tty_size`."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.keys, self._typing = os.pipe()
        self.shown = b""
        self.size: WindowSize = (24, 80)
        self.done: list[int] = []
        self._cond = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._type, daemon=True)

    def window(self) -> WindowSize:
        return self.size

    def show(self, stream: int, data: bytes) -> None:
        with self._cond:
            self.shown += data
            self._cond.notify_all()

    def _type(self) -> None:
        mark = 0
        for i, (wait, action) in enumerate(self.steps):
            with self._cond:
                while not self._ended:
                    if callable(wait) and wait():
                        break
                    if not callable(wait) and (at := self.shown.find(wait, mark)) >= 0:
                        mark = at + len(wait)
                        break
                    self._cond.wait(0.1)
                if self._ended:
                    return
            if callable(action):
                action()
            else:
                os.write(self._typing, action)
            self.done.append(i)

    def run(self, call: Callable[..., cellblock.RunResult]) -> tuple[cellblock.RunResult, str]:
        self._thread.start()
        try:
            result = call(tty=True, tty_input=self.keys, tty_size=self.window,
                          on_output=self.show, timeout=90)
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()
            self._thread.join(10)
            os.close(self.keys)
            os.close(self._typing)
        return result, self.shown.decode(errors="replace")


def repl_steps(marker: str, driver: Callable[[], Driver]) -> list[Step]:
    """A Python REPL session: state kept across lines, Ctrl-C interrupting the foreground
    command (a `sleep <marker>` child) but not the REPL, a window change seen inside."""
    return [
        (b">>> ", b"x = 6 * 7; import os, subprocess, time\r"),
        (b">>> ", f"subprocess.run(['sleep', '{marker}'])\r".encode()),
        (lambda: bool(processes_with_argv(["sleep", marker])), b"\x03"),
        (b"KeyboardInterrupt", lambda: setattr(driver(), "size", (50, 132))),
        (b">>> ", b"n = 0\r"),
        # The resize travels while the REPL waits: a bounded loop sees it arrive.
        (b">>> ", b"while tuple(os.get_terminal_size()) != (132, 50) and n < 400: "
                  b"n += 1; time.sleep(0.05)\r"),
        (b"\r\n", b"\r"),  # the end of the compound statement
        (b">>> ", b"print('size', *os.get_terminal_size(), 'x is', x)\r"),
        (b"x is 42", b"exit()\r"),
    ]


def bash_steps() -> list[Step]:
    """bash on the terminal: readline's line editing and history (up arrow recalls the
    line, Ctrl-A moves to its start, where more is typed)."""
    return [
        (b"$ ", b"echo first-$((6 * 7))\r"),
        (b"first-42", b""),
        (b"$ ", b"\x1b[A\x01echo again; \r"),
        (b"again\r\nfirst-42", b"history | tail -n 2 | cut -c8-\r"),
        (b"$ ", b"exit\r"),
    ]


def drive_both(make_steps: Callable[[Callable[[], Driver]], list[Step]], argv: list[str],
               sb: Any, **kwargs: Any) -> list[tuple[cellblock.RunResult, str, Driver]]:
    """The same keystrokes into the in-process Sandbox's run and `sb`'s (remote) run."""
    out = []
    with cellblock.Sandbox() as local:
        for target in (local, sb):
            holder: list[Driver] = []
            d = Driver(make_steps(lambda holder=holder: holder[0]))  # type: ignore[misc]
            holder.append(d)
            result, shown = d.run(lambda target=target, **kw: target.run(argv, **kwargs, **kw))
            out.append((result, shown, d))
    return out


def test_tty_runs_and_processes_match_in_process(svc: Any) -> None:
    args: dict[str, Any] = {"tty": True, "tty_size": (30, 100), "stdin": "typed\n",
                            "secrets": {"TOKEN": SECRET}, "timeout": 60}
    #: Bad terminal arguments, and the in-process errors they give.
    bad_args: list[dict[str, Any]] = [
        {"tty_size": (24, 80)}, {"tty": True, "tty_size": (0, 80)},
        {"tty": True, "tty_size": "24x80"}, {"tty_input": 0}]
    local_errors = []
    with cellblock.Sandbox() as local:
        here = local.run(["python3", "-c", PROBE], **args)
        for bad in bad_args:
            with pytest.raises(cellblock.InvalidSpec) as local_error:
                local.run(["true"], **bad)
            local_errors.append(str(local_error.value))
    with cellblock.Client(svc.url, svc.tokens["alice"]) as c, c.Sandbox() as sb:
        chunks: list[tuple[int, bytes]] = []
        remote = sb.run(["python3", "-c", PROBE], **args)
        streamed = sb.run(["python3", "-c", PROBE], on_output=lambda s, d: chunks.append((s, d)),
                          **args)
        proc = sb.start(["python3", "-c", PROBE], **args)
        assert proc.tty
        started = proc.wait(60)
        assert {c.stream for c in proc.iter_output(30)} == {"stdout"}
        assert {s for s, _ in chunks} == {1}
        assert b"".join(d for _, d in chunks) == streamed.stdout_bytes

        fields = ("exit_code", "reason", "stderr", "redactions")

        def lines(r: cellblock.RunResult) -> list[str]:
            # The terminal echoes the typed line when it arrives, before or after the prompt
            # (a race with the program's start, here as in-process): compared unordered.
            return sorted(r.stdout.replace("> ", "").split("\r\n"))

        for got in (remote, streamed, started):
            assert [getattr(got, f) for f in fields] == [getattr(here, f) for f in fields]
            assert lines(got) == lines(here), (got.stdout, here.stdout)
        assert here.exit_code == 0 and here.stderr == "", here
        assert "isatty True True True" in here.stdout and SECRET not in here.stdout
        assert "size 100 30" in here.stdout and "line typed" in here.stdout
        assert "err\r\n" in here.stdout  # stderr merged, as on any terminal

        # Bad terminal arguments: the in-process errors, by name and message.
        for bad, message in zip(bad_args, local_errors, strict=True):
            with pytest.raises(cellblock.InvalidSpec) as remote_error:
                sb.run(["true"], **bad)
            assert str(remote_error.value) == message, bad
        # A window function of the caller is followed (each change is a resize).
        window = [(20, 60)]
        follower = sb.start(["python3", "-c", "import os, time\n"
                             "while os.get_terminal_size() == (60, 20): time.sleep(0.05)\n"
                             "print('now', *os.get_terminal_size())"],
                            tty=True, tty_size=lambda: window[0], timeout=60)
        window[0] = (33, 77)
        assert follower.wait(60).stdout == "now 77 33\r\n"
        plain = sb.start(["cat"])
        assert not plain.tty
        with pytest.raises(cellblock.InvalidSpec, match="no terminal"):
            plain.resize(10, 10)
        plain.close_stdin()
        plain.wait(30)
        with pytest.raises(cellblock.SandboxIOError):
            proc.resize(10, 10)  # ended


def test_interactive_python_repl_remote_as_in_process(svc: Any, marker: str) -> None:
    with cellblock.Client(svc.url, svc.tokens["alice"]) as c, c.Sandbox() as sb:
        runs = drive_both(lambda d: repl_steps(marker, d), ["python3", "-q"], sb)
    for (result, shown, driver), where in zip(runs, ("in-process", "remote"), strict=True):
        assert len(driver.done) == len(driver.steps), (where, driver.done, shown[-3000:])
        assert (result.reason, result.exit_code) == ("exited", 0), (where, shown[-3000:])
        assert "KeyboardInterrupt" in shown and "size 132 50 x is 42" in shown, shown[-3000:]
        assert result.stdout == shown  # what on_output showed live is the report's output
    wait_for(lambda: not processes_with_argv(["sleep", marker]), "the interrupted sleep to end")


def test_bash_line_editing_and_history_remote_as_in_process(svc: Any) -> None:
    with cellblock.Client(svc.url, svc.tokens["alice"]) as c, c.Sandbox() as sb:
        runs = drive_both(lambda d: bash_steps(), ["bash", "--norc", "--noprofile", "-i"], sb,
                          env={"PS1": "$ ", "HISTFILE": "/tmp/history"})
    for (result, shown, driver), where in zip(runs, ("in-process", "remote"), strict=True):
        assert len(driver.done) == len(driver.steps), (where, driver.done, shown[-3000:])
        assert (result.reason, result.exit_code) == ("exited", 0), (where, shown[-3000:])
        # The recalled, edited line ran, and the history holds it as edited.
        assert "again\r\nfirst-42\r\n" in shown, shown[-3000:]
        assert "echo again; echo first-$((6 * 7))\r\n" in shown, shown[-3000:]


def ws_url(svc: Any, session_id: str) -> str:
    return f"ws{svc.url.removeprefix('http')}/v1/sessions/{session_id}/terminal"


def frames_until_end(ws: Any) -> tuple[bytes, dict[str, Any]]:
    """The output frames and the last (text) frame of a terminal socket."""
    shown = b""
    for message in ws:
        if isinstance(message, bytes):
            shown += message
        else:
            return shown, json.loads(message)
    raise AssertionError(f"the socket closed without a last frame: {shown!r}")


def test_terminal_wire_protocol_errors_auth_and_limits(svc: Any) -> None:
    alice = svc.headers("alice")
    with httpx.Client(base_url=svc.url, headers=alice, timeout=60) as http:
        sid = http.post("/v1/sessions", json={}).json()["id"]
        base = f"/v1/sessions/{sid}/processes"

        # A tty process over plain HTTP: output as server-sent events, keys, resize.
        info = http.post(base, json={"argv": ["python3", "-q"], "tty": True,
                                     "tty_size": [20, 60]}).json()
        assert info["tty"] is True
        pid = info["id"]
        shown = ""

        def type_after(wanted: str, keys: bytes) -> None:
            """Reads the output (from where it was left) until `wanted`, then types."""
            nonlocal shown
            with http.stream("GET", f"{base}/{pid}/output",
                             params={"start": shown.count("\0")}) as events:
                for event, _, data, _ in sse_events(events.iter_lines()):
                    assert event == "stdout", (event, data)
                    shown += data["text"] + "\0"  # \0: one per chunk, to resume after it
                    if wanted in shown.replace("\0", ""):
                        break
            r = http.post(f"{base}/{pid}/stdin", content=keys,
                          headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 204, r.text

        type_after(">>> ", b"import os; print(*os.get_terminal_size())\r")
        type_after("60 20\r\n>>> ", b"")
        assert http.post(f"{base}/{pid}/resize", json={"rows": 33, "cols": 77}).status_code == 204
        r = http.post(f"{base}/{pid}/resize", json={"rows": 0, "cols": 77})
        assert problem_of(r)["title"] == "InvalidSpec" and r.status_code == 422
        for headers, title in ((svc.headers("bob"), "SessionClosed"),
                               ({"Authorization": "Bearer nope"}, "Unauthorized")):
            r = http.post(f"{base}/{pid}/resize", json={"rows": 5, "cols": 5}, headers=headers)
            assert problem_of(r)["title"] == title
        type_after("", b"print(*os.get_terminal_size())\r")
        type_after("77 33\r\n>>> ", b"")
        http.post(f"{base}/{pid}/stdin", params={"close": "true"})  # Ctrl-D: the REPL ends
        report = http.post(f"{base}/{pid}/wait", params={"timeout": 30}).json()
        assert report["exit_code"] == 0 and report["stderr"] == "", report
        assert report["stdout"].startswith(shown.replace("\0", "")), report
        r = http.post(f"{base}/{pid}/resize", json={"rows": 10, "cols": 10})
        assert problem_of(r)["title"] == "SandboxIOError"
        plain = http.post(base, json={"argv": ["cat"]}).json()["id"]
        r = http.post(f"{base}/{plain}/resize", json={"rows": 10, "cols": 10})
        assert (r.status_code, problem_of(r)["title"]) == (422, "InvalidSpec")
        http.delete(f"{base}/{plain}")

        # The terminal socket: refused upgrades are problem+json, named.
        for headers, title, status in ((None, "Unauthorized", 401),
                                       (svc.headers("bob"), "SessionClosed", 404),
                                       ({"Authorization": "Bearer nope"}, "Unauthorized", 401)):
            with pytest.raises(InvalidStatus) as refused:
                ws_client.connect(ws_url(svc, sid), additional_headers=headers)
            response = refused.value.response
            assert response.status_code == status
            assert response.headers["content-type"] == "application/problem+json"
            assert json.loads(response.body)["title"] == title

        # A run typed into, resized and ended by the socket.
        with ws_client.connect(ws_url(svc, sid), additional_headers=alice) as ws:
            # The window is polled while the run goes on: a bounded loop waits for the change.
            script = ('read line; n=0; while [ "$(stty size)" != "40 100" ] && [ $n -lt 200 ]; '
                      'do sleep 0.05; n=$((n+1)); done; stty size; echo got $line')
            ws.send(json.dumps({"argv": ["sh", "-c", script], "tty_size": [20, 60]}))
            ws.send(json.dumps({"type": "resize", "rows": 40, "cols": 100}))
            ws.send(b"hello")
            ws.send(b" there\r")
            shown, last = frames_until_end(ws)
        assert last["type"] == "result" and last["result"]["exit_code"] == 0, (shown, last)
        assert b"got hello there" in shown
        assert last["result"]["stdout_base64"]  # the report holds the output too
        assert b"40 100" in shown, shown

        # Bad messages: an error frame naming what was wrong; the run, if any, killed.
        for first, then in ((json.dumps({"argv": []}), None),
                            ("not json", None),
                            (json.dumps({"argv": ["true"], "tty_size": [0, 1]}), None),
                            (json.dumps({"argv": unique_sleep()}),
                             json.dumps({"type": "resize", "rows": 0, "cols": 1}))):
            with ws_client.connect(ws_url(svc, sid), additional_headers=alice) as ws:
                ws.send(first)
                if then is not None:
                    argv = json.loads(first)["argv"]
                    wait_for(lambda argv=argv: processes_with_argv(argv), "the run to start")
                    ws.send(then)
                shown, last = frames_until_end(ws)
            assert last["type"] == "error", (first, last)
            assert last["problem"]["title"] == "InvalidSpec", (first, last)
            if then is not None:
                wait_for(lambda argv=argv: not processes_with_argv(argv), "the run killed")

        # Leaving the socket kills the run.
        argv = unique_sleep()
        with ws_client.connect(ws_url(svc, sid), additional_headers=alice) as ws:
            ws.send(json.dumps({"argv": argv, "timeout": 120}))
            wait_for(lambda: processes_with_argv(argv), "the run to start")
        wait_for(lambda: not processes_with_argv(argv), "the abandoned run to be killed", 15)

    # carol has one concurrent run: a tty process holds it, so the socket's run is refused.
    with cellblock.Client(svc.url, svc.tokens["carol"]) as c, c.Sandbox() as sb:
        holder = sb.start(["cat"], tty=True)
        keys_r, keys_w = os.pipe()
        try:
            with pytest.raises(LimitExceeded):
                sb.run(["true"], tty=True, tty_input=keys_r)
        finally:
            os.close(keys_r)
            os.close(keys_w)
        holder.kill()


def test_aio_tty_process_resizes() -> None:
    code = ("import os; print('first', *os.get_terminal_size(), flush=True); input(); "
            "print('then', *os.get_terminal_size())")

    async def main() -> cellblock.RunResult:
        async with aio.Sandbox() as sb:
            p = await sb.start(["python3", "-c", code], tty=True, tty_size=(20, 60),
                               timeout=60)
            assert p.tty
            async for chunk in p.iter_output():
                if b"first" in chunk.data:
                    break
            await p.resize(33, 77)
            await p.write_stdin("go\n")
            result = await p.wait(60)
            with pytest.raises(cellblock.SandboxIOError):
                await p.resize(10, 10)
            return result

    result = asyncio.run(main())
    assert "first 60 20" in result.stdout and "then 77 33" in result.stdout, result.stdout

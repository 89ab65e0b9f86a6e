"""The client side of the service's terminal WebSocket (`cellblock.service.terminal`): a tty
run of a `RemoteSandbox` whose keystrokes come from a file descriptor (`tty_input`) or whose
window follows a function (`tty_size`), as `Sandbox.run(..., tty=True)` does in-process."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cellblock.errors import SandboxIOError
from cellblock.sandbox import OutputCallback
from cellblock.service.models import RunReport
from cellblock.service.problems import Cancelled, error_from_problem
from cellblock.terminal import SizeArg, WindowSize, window_source

if TYPE_CHECKING:
    from cellblock.client import Client

#: How often the window function, and `cancel`, are looked at, seconds.
POLL_S = 0.1


def _ws_url(client: Client, path: str) -> str:
    base = str(client._http.base_url).rstrip("/")
    scheme, _, rest = base.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"


def connect(client: Client, path: str) -> Any:
    """Opens the terminal socket at `path`; a refused upgrade (problem+json) is raised as its
    exception class."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect as ws_connect

    headers = {"Authorization": client._http.headers["Authorization"]}
    try:
        return ws_connect(_ws_url(client, path), additional_headers=headers,
                          open_timeout=client._http.timeout.connect, max_size=None)
    except InvalidStatus as e:
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(e.response.body or b"")
        raise error_from_problem(body, e.response.status_code) from None
    except OSError as e:
        raise SandboxIOError(f"the connection to the service failed: {e}") from None


def run_on_terminal(
    client: Client, path: str, body: dict[str, Any], *, on_output: OutputCallback | None,
    cancel: threading.Event | None, tty_input: int | None, tty_size: SizeArg,
) -> RunReport:
    """Runs `body` (a CommandRun) through the terminal socket at `path`: keystrokes read
    from `tty_input` as they come, the window followed, output to `on_output` live; the
    run's report. Setting `cancel` closes the socket (the service kills the run) and raises
    `Cancelled`."""
    from websockets.exceptions import ConnectionClosed

    if cancel is not None and cancel.is_set():
        raise Cancelled("the call was cancelled before it was sent")
    window = window_source(True, tty_size)
    ws = connect(client, path)
    stop = threading.Event()
    feeder = threading.Thread(target=_feed, args=(ws, stop, tty_input, window, cancel),
                              name="cellblock-remote-keys", daemon=True)
    try:
        ws.send(json.dumps(body))
        feeder.start()
        for message in ws:
            if isinstance(message, bytes):
                if on_output is not None:
                    on_output(1, message)
                continue
            frame = json.loads(message)
            if frame.get("type") == "result":
                return RunReport.model_validate(frame["result"])
            problem = frame.get("problem") or {}
            raise error_from_problem(problem, int(problem.get("status", 500)))
    except ConnectionClosed:
        pass
    finally:
        stop.set()
        ws.close()
        if feeder.is_alive():
            feeder.join()
    if cancel is not None and cancel.is_set():
        raise Cancelled("the call was cancelled: the service killed its run")
    raise SandboxIOError("the service closed the terminal without a result")


def _feed(ws: Any, stop: threading.Event, source: int | None,
          window: Callable[[], WindowSize | None] | None, cancel: threading.Event | None
          ) -> None:
    """Sends keystrokes from `source` and window changes until `stop` (or the socket ends);
    closes the socket when `cancel` is set."""
    from websockets.exceptions import ConnectionClosed

    last = window() if window is not None else None
    reading = source is not None
    try:
        while not stop.is_set():
            if cancel is not None and cancel.is_set():
                ws.close()
                return
            ready = select.select([source], [], [], POLL_S)[0] if source is not None and reading \
                else []
            if not reading:
                stop.wait(POLL_S)
            if ready and source is not None:
                data = os.read(source, 4096)
                if data:
                    ws.send(data)
                else:
                    reading = False  # the source ended: nothing more is typed (as locally)
            if window is not None:
                now = window()
                if now is not None and now != last:
                    last = now
                    ws.send(json.dumps({"type": "resize", "rows": now[0], "cols": now[1]}))
    except (ConnectionClosed, OSError):
        return  # the run ended (or the source failed): the main thread reports it


def follow_window(resize: Callable[[int, int], None], running: Callable[[], bool],
                  size: Callable[[], WindowSize | None]) -> None:
    """For a remote process started with a window function: resizes its terminal whenever
    the function's value changes, until the process ends (on a thread of its own)."""
    window = window_source(True, size)
    assert window is not None

    def follow() -> None:
        last = window()
        for turn in itertools.count(1):
            time.sleep(POLL_S)
            now = window()
            if now is not None and now != last:
                last = now
                try:
                    resize(*now)
                except Exception:
                    return
            elif turn % 20 == 0:  # asking the service whether it still runs: not every turn
                try:
                    if not running():
                        return
                except Exception:  # the client was closed, or the service left
                    return

    threading.Thread(target=follow, name="cellblock-remote-window", daemon=True).start()

"""The service's surface against the in-process API's: every exception class of
`cellblock.errors` crosses the HTTP boundary under its own name and is raised again by the
client, and `RemoteSandbox` / `aio.Sandbox` have `Sandbox`'s methods and arguments."""

from __future__ import annotations

import hashlib
import inspect
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from service_fixtures import free_port

import cellblock
from cellblock import aio, errors
from cellblock.client import RemoteSandbox
from cellblock.seccomp import SeccompPolicy
from cellblock.service.app import create_app
from cellblock.service.auth import TokenLimits, TokenRecord, TokenStore, token_hash
from cellblock.service.problems import CLASSES, STATUS, Cancelled, ServiceError, status_of
from conftest import IS_ROOT, processes_with_argv, wait_for

TOKEN = "cbk_surface-test"


def exception_classes() -> list[type[errors.CellblockError]]:
    """Every exception class `cellblock.errors` exports (walked, not listed by hand)."""
    found = [getattr(errors, name) for name in dir(errors)]
    classes = [c for c in found if isinstance(c, type) and issubclass(c, BaseException)]
    assert all(issubclass(c, errors.CellblockError) for c in classes)
    return classes


@pytest.fixture(scope="module")
def raising_service() -> Iterator[str]:
    """The real app on loopback, plus a route that raises the `cellblock.errors` class it is
    named (as a sandbox call would), both as a plain answer and inside a live stream."""
    store = TokenStore([TokenRecord(name="t", sha256=token_hash(TOKEN),
                                    **TokenLimits().model_dump())])
    app = create_app(store)

    @app.get("/test/raise/{name}")
    async def raise_it(name: str) -> None:
        raise getattr(errors, name)(f"raised {name}")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(30)


def test_every_error_class_round_trips_by_name(raising_service: str) -> None:
    classes = exception_classes()
    assert {"FileTooLarge", "SetupTimeout", "SandboxIOError"} <= {c.__name__ for c in classes}
    with cellblock.Client(raising_service, TOKEN) as client:
        for cls in classes:
            name = cls.__name__
            assert CLASSES[name] is cls
            r = httpx.get(f"{raising_service}/test/raise/{name}")
            assert r.headers["content-type"] == "application/problem+json", (name, r.text)
            body = r.json()
            assert (body["title"], body["type"]) == (name, f"urn:cellblock:error:{name}")
            assert body["detail"] == f"raised {name}"
            assert r.status_code == body["status"] == status_of(cls("x")), name
            with pytest.raises(cls) as raised:
                client.request("GET", f"/test/raise/{name}")
            assert type(raised.value) is cls and str(raised.value) == f"raised {name}"


def test_statuses_are_specific() -> None:
    assert STATUS[errors.FileTooLarge] == 413
    assert status_of(errors.FileTooLarge("x")) == 413
    assert status_of(errors.SetupTimeout("x")) == 504
    assert status_of(errors.SandboxIOError("x")) == 404
    # Every error has a status of its own class or a listed base, never the 500 fallback,
    # except the base class itself and the service's InternalError.
    for cls in exception_classes():
        if cls is not errors.CellblockError:
            assert status_of(cls("x")) < 500 or cls.__name__ in {
                "NamespaceUnavailable", "SetupError", "SetupTimeout"}, cls
    assert issubclass(CLASSES["ServiceError"], ServiceError)


def public_surface(cls: type) -> dict[str, object]:
    return {name: inspect.getattr_static(cls, name) for name in dir(cls)
            if not name.startswith("_")}


def shape(member: object) -> object:
    """What must match: a property, or a callable's parameters (names, kinds, defaults)."""
    if isinstance(member, property):
        return "property"
    fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
    assert callable(fn)
    params = list(inspect.signature(fn).parameters.values())[1:]  # without self
    return [(p.name, p.kind, p.default) for p in params]


#: Where the async and remote sandboxes differ from `cellblock.Sandbox`, on purpose.
DIFFERENCES: dict[tuple[str, str], str] = {
    ("aio", "enforcement"): "a coroutine: it asks the core on a worker thread",
}
#: Methods only they have.
EXTRAS = {
    "aio": {"wrap", "sync", "stream"},
    "remote": {"connect", "info", "labels", "set_labels", "set_timeout"},
}


def test_sandbox_surfaces_match() -> None:
    sync = public_surface(cellblock.Sandbox)
    assert {"iter_file", "paused_seconds", "pause_deadline", "idle_deadline"} <= set(sync)
    for name, cls in (("aio", aio.Sandbox), ("remote", RemoteSandbox)):
        other = public_surface(cls)
        assert set(sync) - set(other) == set(), f"{name} lacks these"
        assert set(other) - set(sync) == EXTRAS[name], f"{name} has undocumented extras"
        for method, member in sync.items():
            if (name, method) in DIFFERENCES:
                assert shape(other[method]) != shape(member), "a stale listed difference"
                continue
            assert shape(other[method]) == shape(member), f"{name}.{method}"
    assert shape(aio.Sandbox.__init__) == shape(cellblock.Sandbox.__init__)


#: Keyword arguments of the in-process calls that are not fields of their requests, and why.
NOT_ON_THE_WIRE: dict[str, dict[str, str]] = {
    "run": {
        "policy": "not taken by Client.run: its fields are keywords",
        "seccomp": "refused (InvalidSpec): a compiled filter does not travel; use profile",
        "rootfs": "refused (InvalidSpec): it names a directory of the caller's host",
        "tls_ca_bundle": "read by the client: its content travels as tls_ca_pem",
        "on_output": "client side: selects the streaming route",
        "cancel": "client side: closes the request",
        "cells": "the service's own choice",
        "tty_input": "client side: the terminal WebSocket (RemoteSandbox.run)",
    },
    "Sandbox": {
        "policy": "client side: its fields are sent",
        "seccomp": "refused (InvalidSpec): a compiled filter does not travel; use profile",
        "rootfs": "refused (InvalidSpec): it names a directory of the caller's host",
    },
}
#: Request fields with no keyword of the same name in-process, and why.
WIRE_ONLY: dict[str, dict[str, str]] = {
    "run": {"argv": "positional in-process", "stdin_base64": "binary stdin",
            "tls_ca_pem": "the content of the caller's tls_ca_bundle file"},
    "Sandbox": {
        "labels": "metadata of the service's sessions",
        "lifetime_s": "the service closes sessions",
        "on_credential_leak": "a Policy field (in-process through policy=)",
        "tls_ca_pem": "the content of the policy's tls_ca_bundle file",
    },
}


def test_request_models_take_the_in_process_arguments() -> None:
    """Every keyword of `cellblock.run` / `cellblock.Sandbox` is a field of the one-shot /
    session request, or listed above with its reason (both lists exact: no stale entry)."""
    from cellblock.service.models import OneShotRun, SessionCreate

    for name, fn, model in (("run", cellblock.run, OneShotRun),
                            ("Sandbox", cellblock.Sandbox.__init__, SessionCreate)):
        params = {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY or p.name == "policy"}
        fields = set(model.model_fields)
        assert params - fields == set(NOT_ON_THE_WIRE[name]), name
        assert fields - params == set(WIRE_ONLY[name]), name
    assert {"environment", "credentials"} <= set(OneShotRun.model_fields) & set(
        SessionCreate.model_fields)


def test_remote_refusals_name_the_argument() -> None:
    """A directory of the caller's host is refused by the client before any request; its CA
    bundle travels as content; credentials go on the wire with their values (the service
    keeps them as SecretStr)."""
    from cellblock.client import _remote_isolation

    with pytest.raises(errors.InvalidSpec, match="rootfs"):
        _remote_isolation({"rootfs": "/"})
    with pytest.raises(errors.InvalidSpec, match="tls_ca_bundle"):
        _remote_isolation({"tls_ca_bundle": "/nonexistent/ca.pem"})
    assert _remote_isolation({"tls_ca_bundle": "/etc/hostname"}) == {
        "tls_ca_pem": Path("/etc/hostname").read_text()}  # checked as PEM by the service
    cred = cellblock.Credential(name="K", value="v-123", hosts=["h"])
    wire = _remote_isolation({"credentials": [cred], "environment": "e"})
    assert wire == {"environment": "e", "credentials": [{
        "name": "K", "value": "v-123", "hosts": ["h"], "methods": None, "header": None,
        "in_query": False, "in_body": False, "scope": "session"}]}
    assert _remote_isolation({"credentials": []}) == {}


def unique_sleep() -> list[str]:
    return ["sleep", f"{700 + secrets.randbelow(10**6) / 10**6:.6f}"]


def test_remote_calls_take_the_in_process_arguments(raising_service: str) -> None:
    with cellblock.Client(raising_service, TOKEN) as c, c.Sandbox(idle_timeout=300) as sb:
        blob = bytes(range(256)) * 4
        r = sb.run(["python3", "-c", "import sys, hashlib; "
                    "print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"], stdin=blob)
        assert r.stdout.strip() == hashlib.sha256(blob).hexdigest()
        r = sb.run_python("import sys; print(len(sys.stdin.buffer.read()))", stdin=b"\xff\0")
        assert r.stdout == "2\n"
        r = sb.run(["sh", "-c", "echo key=$API_KEY"], secrets={"API_KEY": "sk-remote-9f8e7d"})
        assert r.stdout.startswith("key=") and "sk-remote-9f8e7d" not in r.stdout
        r = sb.run_python("import os; print(os.environ['API_KEY'])",
                          secrets={"API_KEY": "sk-remote-9f8e7d"})
        assert r.stdout.strip() and "sk-remote-9f8e7d" not in r.stdout
        idle = sb.idle_deadline()
        assert idle is not None and 250 < idle - time.monotonic() <= 300
        assert sb.pause_deadline() is None and sb.paused_seconds == 0.0
        with pytest.raises(errors.InvalidSpec, match="seccomp"):
            sb.run(["true"], seccomp=SeccompPolicy())
        with pytest.raises(errors.FileTooLarge):
            sb.write_file("f", b"x" * 100)
            sb.read_file("f", max_size=10)


@pytest.mark.skipif(not IS_ROOT, reason="auto_pause needs a freezer cgroup (root)")
def test_remote_auto_pause(raising_service: str) -> None:
    with cellblock.Client(raising_service, TOKEN) as c, c.Sandbox(auto_pause=0.3) as sb:
        assert sb.run(["true"]).ok
        due = sb.pause_deadline()
        assert due is not None and due - time.monotonic() <= 0.3
        wait_for(lambda: sb.paused_seconds > 0.2, "the idle session to be frozen")
        assert sb.run(["echo", "thawed"]).stdout == "thawed\n"


@pytest.mark.parametrize("how", ["run", "stream", "python"])
def test_client_cancel_closes_the_request_and_the_run_dies(raising_service: str,
                                                           how: str) -> None:
    argv = unique_sleep()
    cancel = threading.Event()
    with cellblock.Client(raising_service, TOKEN) as c, c.Sandbox() as sb:
        def cancel_once_running() -> None:
            wait_for(lambda: processes_with_argv(argv), "the run to start")
            cancel.set()

        threading.Thread(target=cancel_once_running, daemon=True).start()
        with pytest.raises(Cancelled):
            if how == "run":
                sb.run(argv, timeout=120, cancel=cancel)
            elif how == "stream":
                sb.run(argv, timeout=120, cancel=cancel, on_output=lambda s, d: None)
            else:
                sb.run_python(f"import subprocess; subprocess.run({argv!r})", timeout=120,
                              cancel=cancel)
        wait_for(lambda: not processes_with_argv(argv), "the cancelled run to be killed", 15)
        assert sb.run(["echo", "next"]).stdout == "next\n"
        with pytest.raises(Cancelled):  # already set: nothing is sent
            sb.run(["true"], cancel=cancel)

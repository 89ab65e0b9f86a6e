"""The service's surface against the in-process API's: every exception class of
`cellblock.errors` crosses the HTTP boundary under its own name and is raised again by the
client, and `RemoteSandbox` / `aio.Sandbox` have `Sandbox`'s methods and arguments."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

import cellblock
from cellblock import aio, errors
from cellblock.client import RemoteSandbox
from cellblock.service.app import create_app
from cellblock.service.auth import TokenLimits, TokenRecord, TokenStore, token_hash
from cellblock.service.problems import CLASSES, STATUS, ServiceError, status_of
from service_fixtures import free_port

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

"""The service fuzzed from its own OpenAPI document (schemathesis, a bounded number of
examples per operation): no input makes it answer 5xx. Operations on a session get the id of a
real open session, so fuzzed bodies reach the sandbox, not only the 404 path."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from service_fixtures import Service, start_service

from cellblock.service.app import create_app
from cellblock.service.auth import TokenStore
from conftest import Cli

#: Examples per operation (each may start a sandbox: keep the test short).
EXAMPLES = 3


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    script = Path(sys.executable).parent / "cellblock"
    svc = start_service(Cli("root", [str(script)], dict(os.environ)),
                        tmp_path_factory.mktemp("fuzz"))
    yield svc
    svc.stop()


#: The document the service serves (checked equal below), loaded at collection time.
DOCUMENT = create_app(TokenStore([])).openapi()
#: Only the random-fuzzing phase, so EXAMPLES bounds the run (the coverage phase generates
#: every boundary case of every schema, minutes of sandboxes).
CONFIG = SchemathesisConfig.from_str(
    "[phases.coverage]\nenabled = false\n[phases.examples]\nenabled = false\n"
    "[phases.stateful]\nenabled = false\n"
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


def test_the_service_serves_this_document(fuzzed: Service) -> None:
    assert httpx.get(fuzzed.url + "/openapi.json").json() == DOCUMENT


def open_session(svc: Service) -> str:
    """The id of an open session of the fuzz token (one is kept, made again once closed)."""
    headers = svc.headers("fuzz")
    listed = httpx.get(svc.url + "/v1/sessions", params={"label": "role=target"},
                       headers=headers).json()
    if listed:
        return str(listed[0]["id"])
    for other in httpx.get(svc.url + "/v1/sessions", headers=headers).json():
        httpx.delete(f"{svc.url}/v1/sessions/{other['id']}", headers=headers)  # make room
    made = httpx.post(svc.url + "/v1/sessions", json={"labels": {"role": "target"}},
                      headers=headers)
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, fuzzed: Service) -> None:
    if "session_id" in (case.path_parameters or {}):
        case.path_parameters["session_id"] = open_session(fuzzed)
    case.call_and_validate(base_url=fuzzed.url, headers=fuzzed.headers("fuzz"),
                           checks=[not_a_server_error])

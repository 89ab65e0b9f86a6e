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
from conftest import Cli
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from service_fixtures import Service, start_service

#: Examples per operation (each may start a sandbox: keep the test short).
EXAMPLES = 6


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    script = Path(sys.executable).parent / "cellblock"
    svc = start_service(Cli("root", [str(script)], dict(os.environ)),
                        tmp_path_factory.mktemp("fuzz"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def api(fuzzed: Service) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


def open_session(svc: Service) -> str:
    """The id of an open session of the fuzz token (one is kept, made again once closed)."""
    headers = svc.headers("fuzz")
    listed = httpx.get(svc.url + "/v1/sessions", params={"label": "role=target"},
                       headers=headers).json()
    if listed:
        return str(listed[0]["id"])
    made = httpx.post(svc.url + "/v1/sessions", json={"labels": {"role": "target"}},
                      headers=headers)
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, fuzzed: Service) -> None:
    if "session_id" in (case.path_parameters or {}):
        case.path_parameters["session_id"] = open_session(fuzzed)
    case.call_and_validate(headers=fuzzed.headers("fuzz"), checks=[not_a_server_error])

"""Environments and credentials through the HTTP service (issues 15 and 16, remote parity),
against the real `cellblock serve` on loopback, run by root and by uid 65534.

Environments: the service resolves `environment=NAME` in its OWN store (its XDG_DATA_HOME);
the name can never be a path, and `rootfs` (a host directory) is refused. Credentials: the
client sends the values once; the sandbox's environment holds only a placeholder, a server
on 127.0.0.1 bound to the credential receives the real value, another gets neither; no byte
the service sent back to the test (bodies and headers, tapped at the HTTP transport) and no
line of the service's log holds the value.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from envfixtures import make_wheel, serve, simple_index, world_readable_dir
from service_fixtures import Service, share_service_packages, start_service
from test_credentials import Recorder, tls_dir  # noqa: F401 (a fixture)

import cellblock
from cellblock.environments.build import build
from cellblock.environments.spec import EnvironmentSpec
from cellblock.environments.store import Store
from cellblock.errors import CredentialError, EnvironmentNotFound, InvalidSpec
from conftest import NOBODY, Cli

VALUE = "svc-real-value-" + secrets.token_hex(12)
PLACEHOLDER_PREFIX = "cellblock_placeholder_API_TOKEN_"


@pytest.fixture(scope="module")
def env_store() -> Iterator[Path]:
    """XDG_DATA_HOME of a store (world-readable, outside /tmp) holding environment `svcdemo`
    (package `cbsvc`), built from a PEP 503 index served on 127.0.0.1."""
    base = world_readable_dir("cellblock-svcenv-")
    data = world_readable_dir("cellblock-svcstore-")
    wheel = make_wheel(base, "cbsvc", "1.0", "GREETING = 'hello from cbsvc'\n")
    simple_index(base / "idx", [wheel])
    saved = {k: os.environ.get(k) for k in ("XDG_DATA_HOME", "PIP_INDEX_URL",
                                            "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL")}
    try:
        with serve(base / "idx") as url:
            os.environ.update(XDG_DATA_HOME=str(data), PIP_INDEX_URL=f"{url}/simple")
            os.environ.pop("PIP_FIND_LINKS", None)
            os.environ.pop("PIP_EXTRA_INDEX_URL", None)
            build(EnvironmentSpec.build(name="svcdemo", pip=["cbsvc"]), Store())
        for k, v in saved.items():  # the tests' own process uses no store
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield data
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


def with_env(cli: Cli, **variables: str) -> Cli:
    """The same caller with more environment variables (uid 65534's command line starts with
    `env -i`: they go after it)."""
    assignments = [f"{k}={v}" for k, v in variables.items()]
    if "-i" in cli.prefix:
        at = cli.prefix.index("-i") + 1
        return Cli(cli.name, [*cli.prefix[:at], *assignments, *cli.prefix[at:]], cli.env)
    return Cli(cli.name, cli.prefix, {**cli.env, **variables})


@pytest.fixture
def service(cli: Cli, request: pytest.FixtureRequest, tmp_path: Path,
            env_store: Path) -> Iterator[tuple[Service, Path]]:
    """The service, run by root and by uid 65534, with `env_store` as its store; and the
    directory holding its log."""
    directory = tmp_path
    if cli.name == "nobody":
        nobody_dir = request.getfixturevalue("nobody_dir")
        share_service_packages(nobody_dir)
        directory = Path(tempfile.mkdtemp(dir=nobody_dir / "tmp"))
        os.chown(directory, NOBODY, NOBODY)
    svc = start_service(with_env(cli, XDG_DATA_HOME=str(env_store)), directory)
    try:
        yield svc, directory
    finally:
        svc.stop()


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every response the test's HTTP clients get, headers and body, as the bytes arrived
    (tapped at httpx's transport: streamed and error responses included)."""
    seen: list[bytes] = []
    original = httpx.HTTPTransport.handle_request

    def tap(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        response = original(self, request)
        seen.append(json.dumps(list(response.headers.multi_items())).encode())
        inner = response.stream
        assert isinstance(inner, httpx.SyncByteStream)

        class Tee(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in inner:
                    seen.append(chunk)
                    yield chunk

            def close(self) -> None:
                inner.close()

        response.stream = Tee()
        return response

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", tap)
    return seen


def problem(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"] == "application/problem+json", r.text
    body: dict[str, Any] = r.json()
    assert body["status"] == r.status_code
    assert body["type"] == f"urn:cellblock:error:{body['title']}"
    return body


IMPORT = ["python3", "-c", "import cbsvc; print(cbsvc.GREETING)"]


def test_remote_runs_in_an_environment_of_the_services_store(
        service: tuple[Service, Path], env_store: Path) -> None:
    svc, _ = service
    with cellblock.Client(svc.url, svc.tokens["alice"]) as c:
        r = c.run(IMPORT, environment="svcdemo")
        assert (r.exit_code, r.stdout) == (0, "hello from cbsvc\n"), r.stderr
        streamed: list[bytes] = []
        r = c.run(IMPORT, environment="svcdemo", on_output=lambda s, d: streamed.append(d))
        assert r.ok and b"".join(streamed) == b"hello from cbsvc\n"
        # Without it the package is not there: the environment is what brought it.
        plain = c.run(IMPORT)
        assert plain.exit_code == 1 and "ModuleNotFoundError" in plain.stderr
        with c.Sandbox(environment="svcdemo") as sb:
            assert sb.run(IMPORT).stdout == "hello from cbsvc\n"
            code = sb.run_python("import cbsvc\nprint(cbsvc.GREETING.upper())")
            assert code.stdout == "HELLO FROM CBSVC\n", code
        # Through a policy too.
        with c.Sandbox(cellblock.Policy(environment="svcdemo")) as sb:
            assert sb.run(IMPORT).ok

        # Unknown: the in-process class, without the service's store path in its message.
        for call in (lambda: c.run(["true"], environment="nope"),
                     lambda: c.run(["true"], environment="nope", on_output=lambda s, d: None),
                     lambda: c.Sandbox(environment="nope")):
            with pytest.raises(EnvironmentNotFound, match="nope") as raised:
                call()
            assert str(env_store) not in str(raised.value)
        r = httpx.post(f"{svc.url}/v1/run", headers=svc.headers("alice"),
                       json={"argv": ["true"], "environment": "nope"})
        assert (r.status_code, problem(r)["title"]) == (404, "EnvironmentNotFound")
        assert c.sessions() == []

        # A name is never a path: the store's own layers, a directory, a climb out.
        layer = next((env_store / "cellblock" / "envs" / "layers").iterdir())
        for name in ("../svcdemo", "/usr", str(layer), "svcdemo/../svcdemo", ".", ""):
            with pytest.raises(InvalidSpec, match="environment"):
                c.run(["true"], environment=name)
            r = httpx.post(f"{svc.url}/v1/sessions", headers=svc.headers("alice"),
                           json={"environment": name})
            assert (r.status_code, problem(r)["title"]) == (422, "InvalidSpec"), name
        # rootfs names a host directory: refused by the client, and by the service.
        with pytest.raises(InvalidSpec, match="rootfs"):
            c.run(["true"], rootfs="/")
        with pytest.raises(InvalidSpec, match="rootfs"):
            c.Sandbox(rootfs="/")
        for path, body in (("/v1/run", {"argv": ["true"], "rootfs": "/"}),
                           ("/v1/sessions", {"rootfs": "/"})):
            r = httpx.post(f"{svc.url}{path}", headers=svc.headers("alice"), json=body)
            assert (r.status_code, problem(r)["title"]) == (422, "InvalidSpec")
            assert "rootfs" in problem(r)["detail"]
        assert c.sessions() == []


PAYLOAD = textwrap.dedent("""\
    import json, os, ssl, sys, urllib.request
    token = os.environ["API_TOKEN"]
    out = {"token": token, "env_has_value": any(sys.argv[1] in v for v in os.environ.values())}
    for name, scheme in (("bound", "http"), ("tls", "https"), ("other", "http")):
        req = urllib.request.Request(
            f"{scheme}://127.0.0.1:{os.environ['PORT_' + name.upper()]}/{sys.argv[2]}/{name}",
            headers={"Authorization": "Bearer " + token})
        try:
            with urllib.request.urlopen(req, timeout=20,
                                        context=ssl.create_default_context()) as r:
                out[name] = f"{r.status} {r.read().decode()}"
        except Exception as e:
            out[name] = type(e).__name__
    print(json.dumps(out))
""")


def test_remote_credentials_reach_only_the_bound_host(
        service: tuple[Service, Path], received: list[bytes],
        tls_dir: Path) -> None:  # noqa: F811 (the fixture)
    """Plain HTTP and HTTPS: the TLS server's CA goes to the service as content (the client
    reads its `tls_ca_bundle`); without it the proxy cannot verify that server."""
    svc, directory = service
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_dir / "srv.pem", tls_dir / "srv.key")
    bound, tls, other = Recorder(), Recorder(ctx), Recorder()
    ca = str(tls_dir / "ca.pem")
    credential = cellblock.Credential(name="API_TOKEN", value=VALUE,
                                      hosts=[f"127.0.0.1:{bound.port}", f"127.0.0.1:{tls.port}"])
    servers = {"BOUND": bound, "TLS": tls, "OTHER": other}
    net = {"allow_net": [f"127.0.0.1:{s.port}" for s in servers.values()],
           "env": {f"PORT_{k}": str(s.port) for k, s in servers.items()}}
    try:
        with cellblock.Client(svc.url, svc.tokens["alice"]) as c:
            # The payload gets a prefix of the value (a full copy would be masked by the
            # supervisor's output redaction, hiding a leak rather than showing it).
            probe_arg = VALUE[:20]

            def probe(run: Any, tag: str, verified: bool = True) -> dict[str, Any]:
                res = run(["python3", "-c", PAYLOAD, probe_arg, tag])
                assert res.reason == "exited", (res.reason, res.stderr)
                out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
                violations = [v for v in res.violations if v.get("kind") == "credential"]
                # Every call's report has its own refusals (a session's second call too).
                assert violations, res.violations
                assert out["token"].startswith(PLACEHOLDER_PREFIX), out
                assert out["env_has_value"] is False
                assert out["bound"] == "200 ok", out
                assert out["other"] != "200 ok", out
                for name, server in (("bound", bound), ("tls", tls)):
                    got = [r for r in server.requests if r["path"] == f"/{tag}/{name}"]
                    if name == "tls" and not verified:
                        assert got == [] and out["tls"] != "200 ok", out
                        continue
                    assert out[name] == "200 ok", out
                    assert [r["headers"]["authorization"] for r in got] == [f"Bearer {VALUE}"]
                assert not [r for r in other.requests if tag in r["path"]], "forwarded"
                return out

            with c.Sandbox(credentials=[credential], tls_ca_bundle=ca, **net) as sb:
                first = probe(sb.run, "s1")["token"]
                # One placeholder per session: the same for each call of the session...
                assert probe(sb.run, "s2")["token"] == first
            with c.Sandbox(cellblock.Policy(credentials=[credential], tls_ca_bundle=ca),
                           **net) as sb:
                # ... and a different one for another session.
                assert probe(sb.run, "s3")["token"] != first
            # A one-shot run, plain and streamed; without the CA, HTTPS cannot be verified.
            probe(lambda argv: c.run(argv, credentials=[credential], timeout=60,
                                     tls_ca_bundle=ca, **net), "o1")
            probe(lambda argv: c.run(argv, credentials=[credential], timeout=60,
                                     tls_ca_bundle=ca, on_output=lambda s, d: None, **net),
                  "o2")
            probe(lambda argv: c.run(argv, credentials=[credential], timeout=60, **net), "o3",
                  verified=False)
            # kill: the leak ends the run (the policy field travels).
            res = c.run(["python3", "-c", PAYLOAD, probe_arg, "k1"], credentials=[credential],
                        on_credential_leak="kill", timeout=60, **net)
            assert res.reason == "credential", (res.reason, res.stderr)
            assert not [r for r in other.requests if "k1" in r["path"]]

            # tls_ca_bundle is a file of the client's host; the service never takes a path,
            # and takes only PEM certificates as content.
            with pytest.raises(InvalidSpec, match="tls_ca_bundle"):
                c.Sandbox(credentials=[credential], tls_ca_bundle=str(tls_dir / "nope.pem"))
            with pytest.raises(InvalidSpec, match="tls_ca_pem"):
                c.run(["true"], credentials=[credential], tls_ca_bundle="/etc/hostname")
            wire = {"name": "API_TOKEN", "value": VALUE, "hosts": ["127.0.0.1"]}
            bad_bodies = [
                ({"argv": ["true"], "credentials": [wire], "tls_ca_bundle": "/etc/hostname"},
                 "InvalidSpec"),
                ({"argv": ["true"], "credentials": [{**wire, "extra": 1}]}, "InvalidSpec"),
                ({"argv": ["true"], "credentials": [{**wire, "hosts": ["a/b"]}]},
                 "CredentialError"),
                ({"argv": ["true"], "credentials": [{**wire, "value": VALUE + "\n"}]},
                 "CredentialError"),
                ({"argv": ["true"], "credentials": [wire, wire]}, "CredentialError"),
                ({"argv": ["true"], "credentials": [wire], "on_credential_leak": VALUE},
                 "InvalidSpec"),
                ({"argv": ["true"], "credentials": [wire], "tls_ca_pem": "-----BEGIN x"},
                 "InvalidSpec"),
            ]
            for body, title in bad_bodies:
                for path in ("/v1/run", "/v1/sessions"):
                    if path == "/v1/sessions":
                        body = {k: v for k, v in body.items() if k != "argv"}
                    r = httpx.post(f"{svc.url}{path}", headers=svc.headers("alice"), json=body)
                    assert problem(r)["title"] == title, (path, body, r.text)
            with pytest.raises(CredentialError):
                c.run(["true"], credentials=[wire, wire])
            # The OpenAPI document: values are write-only secrets, with no example.
            schema = c.request("GET", "/openapi.json").json()
            value = schema["components"]["schemas"]["Credential"]["properties"]["value"]
            assert value.get("writeOnly") is True and value.get("format") == "password"
    finally:
        for server in servers.values():
            server.close()
    assert len(received) > 20
    everything = b"".join(received)
    assert b"cellblock_placeholder_API_TOKEN_" in everything  # the tap saw the run reports
    assert VALUE.encode() not in everything, "the service sent the value back"
    svc.stop()
    assert VALUE not in (directory / "service.log").read_text(errors="replace")

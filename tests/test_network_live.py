"""Live network policy: `Sandbox.set_network(allow=[...])` on a running session.

Each scenario drives a session from a separate process, as root and as uid 65534 (through
setpriv, like tests/test_processes_api.py). The servers are the test's own, on the host's
loopback (tests/test_network.py's HostServer); names are `.test` names the payload only asks
the DNS stub about (AAAA queries, which the stub answers without any lookup on the host).
Inside the sandbox 127.0.0.1 is its own loopback unless the list names the host's: so a raw
connection to an unlisted host port finds nothing (ECONNREFUSED, nothing leaves), and the
proxy (127.0.0.1:3128) is where a refusal is answered (403) and reported.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_network import BAD_PATTERNS, HostServer

from conftest import IS_ROOT, SETPRIV

WHO = ["root", "nobody"] if IS_ROOT else ["user"]

#: Helpers every scenario gets (runs in the driving process; PAYLOAD runs in the sandbox).
PRELUDE = textwrap.dedent("""\
    import json, socket, sys, time
    import cellblock
    from cellblock import Sandbox
    out = {}
    def run(sb, code):
        res = sb.run(["python3", "-c", PAYLOAD + code], timeout=60)
        assert res.exit_code == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1]), res.violations
    def error_of(fn, *args):
        try:
            fn(*args)
        except Exception as e:
            return type(e).__name__
        return None
""")

#: Helpers of the payloads inside the sandbox.
PAYLOAD = textwrap.dedent('''\
    import errno, http.client, json, socket, struct
    def raw_get(port, path):
        """GET over a plain socket to 127.0.0.1:port (the transparent path)."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
                s.sendall(f"GET {path} HTTP/1.0\\r\\n\\r\\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            return data.split(b"\\r\\n\\r\\n", 1)[-1].decode()
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e))
    def proxy_get(port, path):
        """GET through the proxy: HTTP status and body."""
        c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=15)
        c.request("GET", f"http://127.0.0.1:{port}{path}")
        r = c.getresponse()
        return f"{r.status} {r.read().decode().strip()}"
    def dns_rcode(name):
        """rcode of an AAAA query to the stub (no host lookup is needed to answer it)."""
        q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
        q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\\0"
        q += struct.pack(">HH", 28, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            s.sendto(q, ("127.0.0.1", 53))
            return s.recv(512)[3] & 0x0F
''')


def scenario(who: str, code: str, nobody_dir: Path | None, **params: Any) -> dict[str, Any]:
    """Runs PRELUDE + `code` (which fills `out`) as `who`; returns `out`."""
    script = (PRELUDE + f"PAYLOAD = {PAYLOAD!r}\nPARAMS = {params!r}\n" + textwrap.dedent(code)
              + "\nprint('RESULT ' + json.dumps(out))\n")
    if who == "nobody":
        assert nobody_dir is not None
        argv = [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={nobody_dir}",
                "/usr/bin/python3", "-c", script]
    else:
        argv = [sys.executable, "-c", script]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd="/", check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out: dict[str, Any] = json.loads(line[len("RESULT "):])
    return out


@pytest.fixture(params=WHO)
def who(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path | None]]:
    if request.param == "nobody":
        yield "nobody", request.getfixturevalue("nobody_dir")
    else:
        yield request.param, None


@pytest.fixture
def servers() -> Iterator[tuple[HostServer, HostServer]]:
    a = HostServer("cellblock-live-a-" + secrets.token_hex(6), v6=False)
    b = HostServer("cellblock-live-b-" + secrets.token_hex(6), v6=False)
    yield a, b
    a.close()
    b.close()


def policy_changed(violations: list[dict[str, Any]], port: int) -> bool:
    return any(v.get("kind") == "network" and v.get("host") == "127.0.0.1"
               and v.get("port") == port and v.get("reason") == "policy changed"
               for v in violations)


def test_removed_host_is_refused_and_reported(who: tuple[str, Path | None],
                                              servers: tuple[HostServer, HostServer]) -> None:
    a, b = servers
    out = scenario(who[0], """
        A, B = PARAMS["a"], PARAMS["b"]
        with Sandbox(allow_net=[f"127.0.0.1:{A}", f"127.0.0.1:{B}"]) as sb:
            first = f"[raw_get({A}, '/a1'), proxy_get({A}, '/a2')]"
            out["before"], _ = run(sb, f"print(json.dumps({first}))")
            out["cut"] = sb.set_network([f"127.0.0.1:{B}"])
            then = f"[raw_get({A}, '/a3'), proxy_get({A}, '/a4'), raw_get({B}, '/b1')]"
            out["after"], out["violations"] = run(sb, f"print(json.dumps({then}))")
    """, who[1], a=a.port, b=b.port)
    assert out["before"] == [a.body("/a1"), "200 " + a.body("/a2")]
    assert out["cut"] == []
    raw, proxied, other = out["after"]
    # The redirect to the host is gone: 127.0.0.1:A is the sandbox's own loopback again.
    assert raw == "ECONNREFUSED"
    assert proxied == f"403 cellblock: 127.0.0.1:{a.port} refused: not allowed"
    assert other == b.body("/b1"), "the host still listed stays reachable"
    assert "/a3" not in a.hits and "/a4" not in a.hits, "nothing reached the removed host"
    assert {"kind": "network", "host": "127.0.0.1", "port": a.port,
            "reason": "not allowed"} in out["violations"]


def test_open_connection_to_removed_host_is_closed_and_reported(
        who: tuple[str, Path | None], servers: tuple[HostServer, HostServer]) -> None:
    a, b = servers
    hold = textwrap.dedent("""\
        import select
        def hold(port):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"GET /hang HTTP/1.0\\r\\n\\r\\n")
            head = b""
            while b"\\r\\n\\r\\n" not in head:
                head += s.recv(1)
            return s
        sa, sb_ = hold(PORT_A), hold(PORT_B)
        print("OPEN", flush=True)
        sa.settimeout(60)
        try:
            end = "EOF" if sa.recv(4096) == b"" else "DATA"
        except OSError as e:
            end = errno.errorcode.get(e.errno or 0, str(e))
        # The connection to the host still listed is left alone: no EOF, no error pending.
        alive = select.select([sb_], [], [], 1)[0] == []
        print(json.dumps([end, alive]), flush=True)
    """)
    out = scenario(who[0], """
        A, B = PARAMS["a"], PARAMS["b"]
        with Sandbox(allow_net=[f"127.0.0.1:{A}", f"127.0.0.1:{B}"]) as sb:
            code = PAYLOAD + f"PORT_A, PORT_B = {A}, {B}\\n" + PARAMS["hold"]
            p = sb.start(["python3", "-c", code], timeout=90)
            seen = b""
            for chunk in p.iter_stdout(timeout=60):
                seen += chunk
                if b"OPEN" in seen:
                    break
            out["cut"] = sb.set_network([f"127.0.0.1:{B}"])
            res = p.wait(timeout=90)
            out["stdout"], out["stderr"] = res.stdout, res.stderr
            out["violations"] = res.violations
    """, who[1], a=a.port, b=b.port, hold=hold)
    assert "OPEN" in out["stdout"], out["stderr"]
    end, alive = json.loads(out["stdout"].strip().splitlines()[-1])
    assert end in ("EOF", "ECONNRESET"), out
    assert alive is True
    assert out["cut"] == [{"kind": "network", "host": "127.0.0.1", "port": a.port,
                           "reason": "policy changed"}]
    assert policy_changed(out["violations"], a.port), out["violations"]
    assert not policy_changed(out["violations"], b.port)


def test_host_added_later_becomes_reachable(who: tuple[str, Path | None],
                                            servers: tuple[HostServer, HostServer]) -> None:
    a, _ = servers
    out = scenario(who[0], """
        A = PARAMS["a"]
        probe = f"print(json.dumps([raw_get({A}, '/x'), proxy_get({A}, '/y')]))"
        with Sandbox(allow_net=[]) as sb:
            out["before"], out["violations"] = run(sb, probe)
            out["cut"] = sb.set_network([f"localhost:{A}"])
            out["after"], _ = run(sb, probe)
    """, who[1], a=a.port)
    refused = f"403 cellblock: 127.0.0.1:{a.port} refused: not allowed"
    assert out["before"] == ["ECONNREFUSED", refused]
    assert "/x" in a.hits and "/y" in a.hits
    assert a.hits.count("/x") == 1 and a.hits.count("/y") == 1, "only the later calls arrived"
    assert out["after"] == [a.body("/x"), "200 " + a.body("/y")]
    assert out["cut"] == []


def test_credential_hosts_stay_reachable_after_a_new_list(
        who: tuple[str, Path | None], servers: tuple[HostServer, HostServer]) -> None:
    """A credential allows egress to its hosts (build_spec adds them at creation): a new list
    that does not name them keeps them, or the session's credential would be useless, while
    every other host follows the new list."""
    a, b = servers
    out = scenario(who[0], """
        A, B = PARAMS["a"], PARAMS["b"]
        token = cellblock.Credential(name="API_TOKEN", value="s3cret-" + "x" * 20,
                                     hosts=[f"127.0.0.1:{A}"])
        probe = (f"print(json.dumps([raw_get({A}, '/a1'), proxy_get({A}, '/a2'), "
                 f"raw_get({B}, '/b1'), proxy_get({B}, '/b2')]))")
        with Sandbox(allow_net=[f"127.0.0.1:{B}"], credentials=[token]) as sb:
            out["before"], _ = run(sb, probe.replace("1'", "3'").replace("2'", "4'"))
            out["cut"] = sb.set_network([])
            out["after"], out["violations"] = run(sb, probe)
    """, who[1], a=a.port, b=b.port)
    assert out["before"] == [a.body("/a3"), "200 " + a.body("/a4"),
                             b.body("/b3"), "200 " + b.body("/b4")]
    assert out["cut"] == []
    raw_a, proxied_a, raw_b, proxied_b = out["after"]
    assert raw_a == a.body("/a1") and proxied_a == "200 " + a.body("/a2"), out["after"]
    # The host only the old list named is gone.
    assert raw_b == "ECONNREFUSED"
    assert proxied_b == f"403 cellblock: 127.0.0.1:{b.port} refused: not allowed"
    assert "/b1" not in b.hits and "/b2" not in b.hits


def test_dns_answers_follow_the_new_list(who: tuple[str, Path | None]) -> None:
    out = scenario(who[0], """
        probe = "print(json.dumps([dns_rcode('api.test'), dns_rcode('other.test')]))"
        with Sandbox(allow_net=["api.test:443"]) as sb:
            out["before"], _ = run(sb, probe)
            sb.set_network(["other.test"])
            out["after"], out["violations"] = run(sb, probe)
    """, who[1])
    noerror, nxdomain = 0, 3
    assert out["before"] == [noerror, nxdomain]
    assert out["after"] == [nxdomain, noerror]
    assert any(v.get("host") == "api.test" and v.get("port") == 0 for v in out["violations"])
    assert not any(v.get("host") == "other.test" for v in out["violations"])


def test_bad_patterns_are_typed_errors_and_keep_the_old_list(
        who: tuple[str, Path | None], servers: tuple[HostServer, HostServer]) -> None:
    a, _ = servers
    out = scenario(who[0], """
        A = PARAMS["a"]
        with Sandbox(allow_net=[f"127.0.0.1:{A}"]) as sb:
            out["errors"] = [error_of(sb.set_network, ["127.0.0.1:1", bad])
                             for bad in PARAMS["bad"]]
            out["string"] = error_of(sb.set_network, "api.test")
            out["still"], _ = run(sb, f"print(json.dumps(raw_get({A}, '/still')))")
        with Sandbox() as sb:
            # Opened without network: no egress to change.
            out["no_net"] = error_of(sb.set_network, [f"127.0.0.1:{A}"])
            out["no_net_empty"] = error_of(sb.set_network, [])
            out["no_net_probe"], _ = run(sb, f"print(json.dumps(raw_get({A}, '/no')))")
    """, who[1], a=a.port, bad=BAD_PATTERNS)
    assert out["errors"] == ["NetworkPolicyError"] * len(BAD_PATTERNS)
    assert out["string"] == "InvalidSpec"
    assert out["still"] == a.body("/still")
    assert out["no_net"] == "InvalidSpec"
    assert out["no_net_empty"] is None
    assert out["no_net_probe"] == "ECONNREFUSED"
    assert "/no" not in a.hits


def test_exposed_ports_and_the_live_list_never_overlap(who: tuple[str, Path | None]) -> None:
    """A listed loopback target sends the sandbox's own port to the host: a port exposed from
    the sandbox cannot become one, and one the live list names cannot be exposed."""
    out = scenario(who[0], """
        with Sandbox(allow_net=[]) as sb:
            sb.expose(8000)
            out["shadow_exposed"] = error_of(sb.set_network, ["127.0.0.1:8000"])
            out["other_port"] = error_of(sb.set_network, ["127.0.0.1:9000"])
            out["expose_listed"] = error_of(sb.expose, 9000)
            out["expose_free"] = error_of(sb.expose, 9001)
    """, who[1])
    assert out == {"shadow_exposed": "InvalidSpec", "other_port": None,
                   "expose_listed": "InvalidSpec", "expose_free": None}

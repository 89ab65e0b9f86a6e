"""Network isolation: each run has its own network namespace holding only `lo`.

Services the test starts on the host's loopback (TCP, UDP, abstract unix socket) are proved
reachable from the host first, then attempted from inside. The only outside address ever used
is 192.0.2.1 (TEST-NET-1), which fails before anything is sent: there is no route.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator

import pytest

from conftest import Runner

OUTSIDE_V4 = "192.0.2.1"
OUTSIDE_V6 = "2001:db8::1"


@pytest.fixture
def host_services() -> Iterator[dict[str, object]]:
    """A TCP listener, a UDP socket and an abstract unix listener on the host's loopback."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    abstract = "\0cellblock-test-" + secrets.token_hex(6)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(abstract)
    unix.listen()
    # Sanity: each is reachable from the host, so a refusal inside means isolation.
    with socket.create_connection(tcp.getsockname(), timeout=5):
        pass
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(abstract)
    yield {"tcp": tcp.getsockname()[1], "udp": udp.getsockname()[1], "abstract": abstract,
           "udp_socket": udp}
    for s in (tcp, udp, unix):
        s.close()


def test_only_loopback_exists_and_works(sandbox: Runner) -> None:
    out = sandbox.probe("""
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        c = socket.create_connection(srv.getsockname(), timeout=5)
        peer, _ = srv.accept()
        c.sendall(b"ping")
        devs = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
        report(ifaces=[n for _, n in socket.if_nameindex()], devs=devs, echo=peer.recv(4).decode(),
               hostname=socket.gethostname())
    """)
    assert out == {"ifaces": ["lo"], "devs": ["lo"], "echo": "ping", "hostname": "cellblock"}


def test_host_loopback_services_are_unreachable(sandbox: Runner,
                                                host_services: dict[str, object]) -> None:
    out = sandbox.probe(f"""
        def tcp():
            socket.create_connection(("127.0.0.1", {host_services["tcp"]}), timeout=5).close()
        def unix():
            socket.socket(socket.AF_UNIX).connect({host_services["abstract"]!r})
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        report(tcp=attempt(tcp), unix=attempt(unix),
               udp=attempt(u.sendto, b"escaped", ("127.0.0.1", {host_services["udp"]})))
    """)
    assert out["tcp"] == "ECONNREFUSED" and out["unix"] == "ECONNREFUSED"
    # The datagram is sent into the sandbox's own loopback: it must not arrive on the host's.
    udp = host_services["udp_socket"]
    assert isinstance(udp, socket.socket)
    with pytest.raises(BlockingIOError):
        udp.recv(64)


def test_no_route_to_the_outside(sandbox: Runner) -> None:
    out = sandbox.probe(f"""
        def tcp(family, addr):
            s = socket.socket(family)
            s.settimeout(10)
            s.connect(addr)
        def dns():
            try:
                socket.getaddrinfo("example.com", 80)
            except socket.gaierror:
                raise OSError(errno.EHOSTUNREACH, "no resolution")
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        report(tcp4=attempt(tcp, socket.AF_INET, ({OUTSIDE_V4!r}, 80)),
               udp4=attempt(u.sendto, b"x", ({OUTSIDE_V4!r}, 53)),
               tcp6=attempt(tcp, socket.AF_INET6, ({OUTSIDE_V6!r}, 80)),
               dns=attempt(dns))
    """)
    assert out["tcp4"] == "ENETUNREACH" and out["udp4"] == "ENETUNREACH"
    assert out["tcp6"] in ("ENETUNREACH", "EADDRNOTAVAIL", "EAFNOSUPPORT")
    assert out["dns"] == "EHOSTUNREACH"

"""Credential substitution cost: latency per HTTPS request, sandbox with credentials (TLS
terminated by the proxy, placeholder replaced, upstream TLS connections pooled) vs a plain CONNECT
tunnel (no credentials: bytes relayed) vs direct on the host.

A TLS server on the host's loopback (certificate from a CA this bench makes with openssl,
given to the proxy as `tls_ca_bundle`) answers a tiny GET. A Python client makes N sequential
requests, each on a new connection (connect + TLS handshake + GET), timed inside the client;
a last row keeps one client connection alive for all N requests.
"""

from __future__ import annotations

import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _env import print_environment_table

import cellblock

N = 100
RUNS = 3
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

CLIENT = """
import http.client, os, ssl, sys, time
port, n, mode, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
# With credentials the sandbox trusts its own CA through SSL_CERT_FILE (the default paths).
if mode.startswith("creds"):
    ctx = ssl.create_default_context()
else:
    ctx = ssl.create_default_context(cadata=ca)
h = {"Authorization": "Bearer " + os.environ.get("TOKEN", "none")}
def conn():
    if mode == "direct":
        return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
    c = http.client.HTTPSConnection("127.0.0.1", 3128, context=ctx, timeout=20)
    c.set_tunnel("127.0.0.1", port)
    return c
t = time.perf_counter()
if mode == "creds-keepalive":
    c = conn()
    for _ in range(n):
        c.request("GET", "/", headers=h)
        assert c.getresponse().read() == b"ok"
else:
    for _ in range(n):
        c = conn()
        c.request("GET", "/", headers=h)
        assert c.getresponse().read() == b"ok"
        c.close()
print((time.perf_counter() - t) / n * 1e3)
"""


def make_tls(d: Path) -> ssl.SSLContext:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    (d / "ext").write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=bench CA", "-days", "1", "-keyout", "ca.key", "-out", "ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=127.0.0.1", "-keyout", "srv.key", "-out", "srv.csr")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", "ext", "-out", "srv.pem")
    for f in [d, *d.iterdir()]:
        f.chmod(0o755 if f.is_dir() else 0o644)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "srv.pem", d / "srv.key")
    return ctx


def start_server(ctx: ssl.SSLContext) -> int:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body are two writes: with Nagle, a kept-alive connection waits for the
        # client's delayed ACK (40 ms) between them.
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1])


def main() -> None:
    if not shutil.which("openssl"):
        raise SystemExit("benches/credentials.py needs openssl")
    d = Path(tempfile.mkdtemp(prefix="cellblock-bench-creds-"))
    port = start_server(make_tls(d))
    ca = (d / "ca.pem").read_text()
    allow = [f"127.0.0.1:{port}"]
    cred = cellblock.Credential(name="TOKEN", value="bench-secret-value", hosts=allow)

    def host(mode: str) -> float:
        argv = [PYTHON, "-c", CLIENT, str(port), str(N), mode, ca]
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        return float(out.stdout)

    def sandbox(mode: str) -> float:
        kw: dict[str, Any] = {"allow_net": allow, "timeout": 300}
        if mode.startswith("creds"):
            kw.update(credentials=[cred], tls_ca_bundle=str(d / "ca.pem"))
        r = cellblock.run([PYTHON, "-c", CLIENT, str(port), str(N), mode, ca], **kw)
        if r.exit_code != 0 or r.violations:
            raise SystemExit(f"sandboxed run failed: {r.reason} {r.stderr} {r.violations}")
        return float(r.stdout)

    rows = [
        ("direct on the host", statistics.median(host("direct") for _ in range(RUNS))),
        ("sandbox, CONNECT tunnel (no credentials)",
         statistics.median(sandbox("tunnel") for _ in range(RUNS))),
        ("sandbox, credentials (TLS terminated, substituted)",
         statistics.median(sandbox("creds") for _ in range(RUNS))),
        ("sandbox, credentials, one kept-alive client connection",
         statistics.median(sandbox("creds-keepalive") for _ in range(RUNS))),
    ]
    shutil.rmtree(d, ignore_errors=True)
    print(f"## HTTPS request latency: tiny GET, mean of {N} sequential requests "
          f"(median of {RUNS} runs)")
    print("| path | ms per request | added vs direct |")
    print("| --- | ---: | ---: |")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms - rows[0][1]:+.2f} |")
    print(f"| **substitution vs plain tunnel** | | **{rows[2][1] - rows[1][1]:+.2f}** |")
    print()
    print_environment_table()


if __name__ == "__main__":
    main()

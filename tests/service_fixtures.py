"""Starting the real `cellblock serve` on loopback for tests (as root, or as uid 65534 through
the `cli` fixture's command line), with tokens made by `cellblock serve --add-token`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cellblock.service.auth import TokenLimits, add_token
from conftest import NOBODY, Cli, share_tree

#: Tokens every test service has: name -> --add-token limit options.
TOKENS: dict[str, list[str]] = {
    "alice": [],
    "bob": [],
    "carol": ["--max-sessions", "2", "--max-concurrent-runs", "1",
              "--max-request-bytes", "2048"],
    "fuzz": ["--max-sessions", "8", "--max-concurrent-runs", "4"],
    "big": ["--max-request-bytes", str(256 << 20)],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A running `cellblock serve`."""

    url: str
    proc: subprocess.Popen[bytes]
    tokens: dict[str, str]

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def stop(self) -> int:
        """SIGTERM, then the exit status (143: ended by SIGTERM after a graceful shutdown)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(60)


def make_tokens(cli: Cli, directory: Path) -> tuple[Path, dict[str, str]]:
    """A tokens file (readable by the service's user) and the tokens themselves."""
    path = directory / "tokens.json"
    tokens = {}
    for name, options in TOKENS.items():
        if not tokens:  # the first through the command line, the others directly (faster)
            done = cli.run(["serve", "--tokens", str(path), "--add-token", name, *options])
            assert done.returncode == 0, done.stderr.decode()
            tokens[name] = done.stdout.decode().strip()
            continue
        limits = dict(zip(options[::2], options[1::2], strict=True))
        tokens[name] = add_token(path, name, TokenLimits(**{
            k.removeprefix("--").replace("-", "_"): int(v) for k, v in limits.items()}))
    stored = path.read_text()
    assert not any(t in stored for t in tokens.values()), "a token is stored in clear"
    if cli.name == "nobody":
        os.chown(path, NOBODY, NOBODY)
    return path, tokens


def start_service(cli: Cli, directory: Path, args: list[str] | None = None,
                  **popen: Any) -> Service:
    """Starts the service (`args`: more options; `popen`: more arguments of Popen) and waits
    until it answers."""
    directory.chmod(0o755)
    path, tokens = make_tokens(cli, directory)
    port = free_port()
    log = directory / "service.log"
    with log.open("wb") as err:
        proc = cli.popen(["serve", "--tokens", str(path), "--port", str(port), *(args or [])],
                         stdout=subprocess.DEVNULL, stderr=err, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return Service(url, proc, tokens)
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the service did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def share_service_packages(nobody_dir: Path) -> None:
    """Adds what the service imports beyond the CLI (FastAPI, uvicorn, ...) to the
    world-readable package copy that uid 65534 runs."""
    code = textwrap.dedent("""\
        import json, sys, sysconfig
        import cellblock.service.app, cellblock.service.server, cellblock.client, uvicorn
        import uvicorn.lifespan.on, uvicorn.protocols.http.h11_impl, uvicorn.loops.asyncio
        import uvicorn.protocols.websockets.auto, websockets
        site = sysconfig.get_paths()["purelib"]
        tops = set()
        for mod in list(sys.modules.values()):
            f = getattr(mod, "__file__", None) or ""
            if f.startswith(site + "/"):
                tops.add(f[len(site) + 1:].split("/")[0])
        print(json.dumps(sorted(tops)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ""})
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    for name in json.loads(out.stdout):
        if name.startswith("cellblock") or (nobody_dir / name).exists():
            continue
        share_tree(site / name, nobody_dir / name)
    for meta in site.glob("*.dist-info"):
        if not (nobody_dir / meta.name).exists():
            share_tree(meta, nobody_dir / meta.name)
    for root, dirs, _ in os.walk(nobody_dir):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)

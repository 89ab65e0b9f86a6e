"""Offline package sources for the environment tests and bench: wheels made with the stdlib
(per the wheel spec), a PEP 503 simple index served on 127.0.0.1, and a Debian-style repository
(a .deb made with dpkg-deb, indexed with dpkg-scanpackages) served the same way."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import os
import shutil
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path


def make_wheel(dest: Path, name: str, version: str, code: str) -> Path:
    """A pure-Python wheel of one module package `name` whose __init__ is `code`."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": code.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: cellblock-tests\n"
                         b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={h},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


class _Quiet(http.server.SimpleHTTPRequestHandler):
    gate: threading.Event | None = None
    arrived: threading.Event | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        # A gated server holds package downloads (not the index) until the gate opens: the
        # interrupted-build test kills the build while it waits here.
        if self.gate is not None and self.path.endswith((".whl", ".deb")):
            if self.arrived is not None:
                self.arrived.set()
            self.gate.wait(120)
        try:
            super().do_GET()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed (the interrupted-build test does that)


@contextlib.contextmanager
def serve(directory: Path, gate: threading.Event | None = None,
          arrived: threading.Event | None = None) -> Iterator[str]:
    """Serves `directory` on 127.0.0.1 (a free port); yields its base URL. With `gate`,
    package downloads wait for it (and set `arrived` when one does)."""
    handler = type("H", (_Quiet,), {"gate": gate, "arrived": arrived})

    def factory(*args: object, **kw: object) -> http.server.SimpleHTTPRequestHandler:
        return handler(*args, directory=str(directory), **kw)  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        if gate is not None:
            gate.set()
        server.shutdown()
        server.server_close()


def simple_index(root: Path, wheels: list[Path]) -> None:
    """A PEP 503 index at root/simple of `wheels` (files under root/files)."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[Path]] = {}
    for w in wheels:
        shutil.copy(w, root / "files" / w.name)
        projects.setdefault(w.name.split("-")[0].replace("_", "-").lower(), []).append(w)
    for project, ws in projects.items():
        d = root / "simple" / project
        d.mkdir(parents=True, exist_ok=True)
        links = "".join(
            f'<a href="/files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
            f"{w.name}</a>\n" for w in ws)
        (d / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    (root / "simple" / "index.html").write_text(
        "".join(f'<a href="/simple/{p}/">{p}</a>\n' for p in projects))


def make_deb(dest: Path, name: str, version: str, script: str) -> Path:
    """A .deb installing `script` as /usr/bin/<name>, made with dpkg-deb."""
    tree = dest / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: tests <t@example.invalid>\nDescription: test package\n")
    tool = tree / "usr" / "bin" / name
    tool.write_text(script)
    tool.chmod(0o755)
    deb = dest / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True,
                   capture_output=True)
    shutil.rmtree(tree)
    return deb


def deb_repo(root: Path, debs: list[Path]) -> None:
    """A flat repository (`deb [trusted=yes] URL ./`) of `debs`."""
    root.mkdir(parents=True, exist_ok=True)
    for d in debs:
        shutil.copy(d, root / d.name)
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=root,
                              capture_output=True, check=True).stdout
    (root / "Packages").write_bytes(packages)
    (root / "Packages.gz").write_bytes(gzip.compress(packages))


def apt_config(dir: Path, url: str) -> Path:
    """An APT_CONFIG file whose only source is the flat repository at `url`."""
    sources = dir / "sources.list"
    sources.write_text(f"deb [trusted=yes] {url}/ ./\n")
    parts = dir / "sources.list.d"
    parts.mkdir(exist_ok=True)
    conf = dir / "apt.conf"
    conf.write_text(f'Dir::Etc::sourcelist "{sources}";\nDir::Etc::sourceparts "{parts}";\n')
    return conf


def world_readable_dir(prefix: str) -> Path:
    """A fresh directory outside /tmp (runs have a /tmp of their own), readable by everyone."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    d.chmod(0o755)
    os.chmod(d, 0o755)
    return d

"""Root-filesystem bases: unpacking directories, tarballs and OCI layouts safely, and running
on them read-only with nothing of the host visible.

The rootfs is made here: the host's /bin/dash and /bin/cat with the libraries `ldd` lists, plus
a marker file. Every test runs as this process's user and as uid 65534 (the `caller` fixture).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import NOBODY, Caller, Cli

BINARIES = ["/bin/dash", "/bin/cat"]
MARKER = "rootfs-marker-7f3a"


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    return re.findall(r"(/\S+\.so[^\s]*)", out)


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A directory uid 65534 can read and write, holding the test rootfs (`tree`), its tarball
    and its two-layer OCI layout."""
    if not all(Path(b).exists() for b in BINARIES):
        pytest.fail(f"the test rootfs is made from {BINARIES}")
    top = Path(tempfile.mkdtemp(prefix="cellblock-rootfs-"))
    try:
        top.chmod(0o755)
        tree = top / "tree"
        for path in {*BINARIES, *(lib for b in BINARIES for lib in _libraries(b))}:
            real = os.path.realpath(path)
            dst = tree / path.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real, dst)
        (tree / "bin" / "sh").symlink_to("dash")
        (tree / "etc").mkdir()
        (tree / "etc" / "marker").write_text(MARKER + "\n")
        for d in ("tmp", "proc", "dev", "workspace"):
            (tree / d).mkdir()
        for root, dirs, files in os.walk(top):
            for n in dirs:
                os.chmod(os.path.join(root, n), 0o755)
            for n in files:
                p = os.path.join(root, n)
                if not os.path.islink(p):
                    os.chmod(p, 0o755)
        with tarfile.open(top / "tree.tar.gz", "w:gz") as tar:
            tar.add(tree, arcname=".")
        _oci_layout(top / "oci", tree)
        work = top / "work"
        work.mkdir()
        os.chown(work, NOBODY, NOBODY)
        for p in top.rglob("*"):
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o444)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _blob(layout: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _oci_layout(layout: Path, tree: Path) -> None:
    """Two layers: the tree plus files to hide, then whiteouts hiding them and a new marker."""
    layout.mkdir()
    base = io.BytesIO()
    with tarfile.open(fileobj=base, mode="w:gz") as tar:
        tar.add(tree, arcname=".")
        for info, data in [_file("etc/gone", b"lower"), _file("opt/dir/a", b"a")]:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    top = _tar([
        _file("etc/.wh.gone", b""),
        _file("opt/dir/.wh..wh..opq", b""),
        _file("opt/dir/b", b"b"),
        _file("etc/marker", f"{MARKER}-layer2\n".encode(), 0o755),
    ])
    gz = "application/vnd.oci.image.layer.v1.tar+gzip"
    layers = [_blob(layout, base.getvalue(), gz),
              _blob(layout, top, "application/vnd.oci.image.layer.v1.tar")]
    config = _blob(layout, b"{}", "application/vnd.oci.image.config.v1+json")
    manifest = json.dumps({"schemaVersion": 2, "config": config, "layers": layers}).encode()
    desc = _blob(layout, manifest, "application/vnd.oci.image.manifest.v1+json")
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


#: Run inside the sandbox by /bin/sh of the rootfs: what it sees of the host, what it can write.
PAYLOAD = r"""
read -r m < /etc/marker; echo "marker=$m"
for p in /work /usr /usr/bin/python3 /etc/shadow /root /home /opt/dir/a /etc/gone; do
  if [ -e "$p" ]; then echo "visible=$p"; fi
done
read -r h < /etc/hostname; echo "hostname=$h"
(echo x > /etc/marker) 2>/dev/null && echo "wrote=/etc/marker"
(echo x > /new) 2>/dev/null && echo "wrote=/new"
(echo x > /bin/dash) 2>/dev/null && echo "wrote=/bin/dash"
(mkdir /etc/newdir) 2>/dev/null && echo "wrote=/etc/newdir"
(echo x > /workspace/ok) 2>/dev/null && echo "scratch=ok"
echo "uid=$(cat /proc/self/status | while read -r k v rest; do [ "$k" = Uid: ] && echo $v; done)"
"""

CALLER_RUN = """
import sys, json
from pathlib import Path
import cellblock
from cellblock.environments.rootfs import unpack
source, work, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dest = work / f"{kind}-{os.getpid()}"
unpack(source, dest)
res = cellblock.run(["/bin/sh", "-c", sys.argv[4]], rootfs=dest, timeout=30)
before = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
marker = (dest / "etc" / "marker").read_text()
import shutil; shutil.rmtree(dest)
print(json.dumps({"exit": res.exit_code, "stdout": res.stdout,
                  "stderr": res.stderr, "reason": res.reason,
                  "tree": before, "marker": marker}))
"""


@pytest.mark.parametrize("kind", ["tree", "tree.tar.gz", "oci"])
def test_a_run_on_a_rootfs_sees_only_it_and_cannot_change_it(
    kind: str, caller: Caller, shared: Path
) -> None:
    out = caller.run(CALLER_RUN, str(shared / kind), str(shared / "work"),
                     kind.replace(".", "-"), PAYLOAD)
    assert out["exit"] == 0, out
    lines = out["stdout"].splitlines()
    want = MARKER + ("-layer2" if kind == "oci" else "")
    assert f"marker={want}" in lines, out
    # The host's files (this checkout under /work, its python, /etc/shadow) are not there, nor
    # what the OCI whiteouts removed.
    assert not [x for x in lines if x.startswith("visible=")], out
    assert "hostname=cellblock" in lines, out
    # Writes to the rootfs fail, for root in the sandbox too; the scratch space works.
    assert not [x for x in lines if x.startswith("wrote=")], out
    assert "scratch=ok" in lines, out
    # And the directory is as unpacked.
    assert out["marker"] == want + "\n"
    assert "new" not in out["tree"] and "etc/newdir" not in out["tree"]
    assert "workspace/ok" not in out["tree"]
    if kind == "oci":
        assert "etc/gone" not in out["tree"] and "opt/dir/a" not in out["tree"]
        assert "opt/dir/b" in out["tree"]


CALLER_HOSTILE = r"""
import io, json, os, stat, sys, tarfile
from pathlib import Path
from cellblock.environments import rootfs
from cellblock.errors import UnsafeLayer

work = Path(sys.argv[1]) / f"hostile-{os.getpid()}"
work.mkdir()
outside = work / "outside"
outside.mkdir()

def tar(entries, name):
    path = work / name
    with tarfile.open(path, "w") as t:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path

def info(name, type=tarfile.REGTYPE, mode=0o644, link=""):
    i = tarfile.TarInfo(name); i.type = type; i.mode = mode; i.linkname = link
    return i

def refused(case, entries):
    dest = work / f"dest-{case}"
    try:
        rootfs.unpack(tar(entries, case + ".tar"), dest)
    except UnsafeLayer as e:
        left = [p.name for p in work.iterdir() if p.name.startswith(f".dest-{case}")]
        return {"error": str(e), "dest": os.path.lexists(dest), "temp": left}
    return {"error": None}

out = {}
out["dotdot"] = refused("dotdot", [(info("ok"), b"x"), (info("a/../../escaped"), b"x")])
out["absolute"] = refused("absolute", [(info(str(outside / "abs")), b"x")])
out["symlink"] = refused("symlink", [
    (info("link", tarfile.SYMTYPE, link=str(outside)), None),
    (info("link/through"), b"x")])
out["symlink_rel"] = refused("symlink_rel", [
    (info("link", tarfile.SYMTYPE, link="../outside"), None),
    (info("link/through"), b"x")])
out["hardlink_abs"] = refused("hardlink_abs", [
    (info("pw", tarfile.LNKTYPE, link="/etc/passwd"), None)])
out["hardlink_up"] = refused("hardlink_up", [
    (info("pw", tarfile.LNKTYPE, link="../../../../etc/passwd"), None)])
out["hardlink_via_symlink"] = refused("hardlink_via_symlink", [
    (info("etc", tarfile.SYMTYPE, link="/etc"), None),
    (info("pw", tarfile.LNKTYPE, link="etc/passwd"), None)])
rootfs.MAX_ENTRIES = 1000
out["entries"] = refused("entries", [(info(f"f{i}"), b"") for i in range(1001)])
out["entries_written"] = sorted(p.name for p in work.iterdir() if "entries" in p.name)
rootfs.MAX_ENTRIES = 500_000
rootfs.MAX_BYTES = 1 << 20
out["bytes"] = refused("bytes", [(info("a"), b"x" * (600 << 10)), (info("b"), b"y" * (600 << 10))])
rootfs.MAX_BYTES = 16 << 30
(work / "corrupt.tar").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(2000))
try:
    rootfs.unpack(work / "corrupt.tar", work / "dest-corrupt")
    out["corrupt"] = "unpacked"
except UnsafeLayer as e:
    out["corrupt"] = "UnsafeLayer"

# Neutralised: device nodes and fifos dropped, setuid/setgid cleared; a symlink pointing out
# is kept as a symlink (it resolves inside the sandbox's root there) and never followed here.
dev = info("dev/null2", tarfile.CHRTYPE); dev.devmajor, dev.devminor = 1, 3
blk = info("dev/sda9", tarfile.BLKTYPE); blk.devmajor, blk.devminor = 8, 9
fifo = info("fifo", tarfile.FIFOTYPE)
dest = work / "dest-neutral"
rootfs.unpack(tar([(dev, None), (blk, None), (fifo, None),
                   (info("suid", mode=0o6755), b"#!/bin/sh\n"),
                   (info("dir", tarfile.DIRTYPE, mode=0o2755), None),
                   (info("out", tarfile.SYMTYPE, link=str(outside)), None),
                   (info("same", tarfile.LNKTYPE, link="suid"), None)], "neutral.tar"), dest)
out["neutral"] = {
    "names": sorted(str(p.relative_to(dest)) for p in dest.rglob("*")),
    "suid": oct(os.lstat(dest / "suid").st_mode & 0o7777),
    "dir": oct(os.lstat(dest / "dir").st_mode & 0o7000),
    "out_is_link": os.path.islink(dest / "out"),
    "same_inode": os.lstat(dest / "same").st_ino == os.lstat(dest / "suid").st_ino,
}
out["outside"] = sorted(p.name for p in outside.iterdir())
out["exists"] = None
try:
    rootfs.unpack(work / "neutral.tar", dest)
except Exception as e:
    out["exists"] = type(e).__name__
print(json.dumps(out))
"""


def test_hostile_tarballs_are_refused_or_neutralised(caller: Caller, shared: Path) -> None:
    out = caller.run(CALLER_HOSTILE, str(shared / "work"))
    for case, why in [("dotdot", "'..'"), ("absolute", "absolute"), ("symlink", "not a dir"),
                      ("symlink_rel", "not a dir"), ("hardlink_abs", "absolute"),
                      ("hardlink_up", "'..'"), ("hardlink_via_symlink", "not a dir"),
                      ("entries", "more than 1000 entries"), ("bytes", "bytes of file data")]:
        got = out[case]
        assert got["error"] is not None and why in got["error"], (case, got)
        # Nothing is left: neither the destination nor its temporary directory.
        assert got["dest"] is False and got["temp"] == [], (case, got)
    # The entry count is checked before anything is written.
    assert out["entries_written"] == ["entries.tar"]
    assert out["corrupt"] == "UnsafeLayer"
    n = out["neutral"]
    assert n["names"] == ["dir", "out", "same", "suid"], n
    assert n["suid"] == "0o755" and n["dir"] == "0o0" and n["out_is_link"] and n["same_inode"]
    # Nothing was ever written outside the destination.
    assert out["outside"] == []
    assert out["exists"] == "InvalidSpec"


def test_a_corrupt_oci_blob_is_refused(shared: Path, tmp_path: Path) -> None:
    from cellblock.environments.rootfs import unpack
    from cellblock.errors import UnsafeLayer

    layout = tmp_path / "oci"
    shutil.copytree(shared / "oci", layout)
    # The smallest blob that is a layer: the second (uncompressed) one.
    manifest_desc = json.loads((layout / "index.json").read_text())["manifests"][0]
    manifest_path = layout / "blobs" / "sha256" / manifest_desc["digest"].split(":")[1]
    layer = json.loads(manifest_path.read_text())["layers"][1]["digest"].split(":")[1]
    blob = layout / "blobs" / "sha256" / layer
    data = bytearray(blob.read_bytes())
    data[600] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(UnsafeLayer, match="does not match its digest"):
        unpack(layout, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["oci"]


def test_a_rootfs_that_is_not_a_directory_is_a_typed_error(tmp_path: Path) -> None:
    import cellblock

    with pytest.raises(cellblock.InvalidSpec, match="rootfs"):
        cellblock.run(["/bin/sh", "-c", "true"], rootfs=tmp_path / "missing")
    with pytest.raises(cellblock.InvalidSpec, match="warm"):
        cellblock.Sandbox(rootfs=tmp_path, warm=["python"])


def test_a_session_runs_on_the_rootfs(shared: Path) -> None:
    import cellblock

    with cellblock.Sandbox(rootfs=shared / "tree") as sb:
        first = sb.run(["/bin/sh", "-c", "echo made > /workspace/f; read -r m < /etc/marker;"
                        " echo $m; [ -e /usr ] && echo host-usr; true"])
        second = sb.run(["/bin/cat", "/workspace/f"])
    assert first.stdout.split() == [MARKER], first
    assert second.stdout == "made\n"


CALLER_CREDENTIAL = r"""
import json, sys
import cellblock
res = cellblock.run(["/bin/sh", "-c", 'echo "$TOKEN"; read -r l < "$SSL_CERT_FILE"; echo "$l"'],
                    rootfs=sys.argv[1],
                    credentials=[{"name": "TOKEN", "value": "rootfs-cred-5e1f0a",
                                  "hosts": ["bound.test"]}])
print(json.dumps({"exit": res.exit_code, "stdout": res.stdout, "stderr": res.stderr}))
"""


def test_credentials_work_on_a_rootfs(caller: Caller, shared: Path) -> None:
    # The proxy's CA goes into the overlay's top layer (a rootfs keeps its own system bundle):
    # the sandbox has the placeholder and a CA file its clients are pointed at.
    out = caller.run(CALLER_CREDENTIAL, str(shared / "tree"))
    assert out["exit"] == 0, out
    placeholder, first_line = out["stdout"].splitlines()
    assert placeholder.startswith("cellblock_placeholder_TOKEN_"), out
    assert first_line == "-----BEGIN CERTIFICATE-----", out
    assert "rootfs-cred-5e1f0a" not in out["stdout"]


# --- Debian bases: mmdebstrap against a local archive served on 127.0.0.1 -------------------


def _deb(top: Path, name: str, files: dict[str, str | bytes]) -> str:
    """Builds `name`_1.0_amd64.deb into top/repo/pool; returns its Packages stanza."""
    control = (f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\n"
               f"Maintainer: cellblock tests <tests@cellblock.invalid>\n")
    root = top / f"build-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(control + f"Description: test package {name}\n")
    for dst, src in files.items():
        p = root / dst.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            p.write_bytes(src)
        else:
            shutil.copy2(os.path.realpath(src), p)
    out = top / "repo" / "pool" / f"{name}_1.0_amd64.deb"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    data = out.read_bytes()
    return (control + f"Filename: pool/{out.name}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\nDescription: test package {name}\n")


@pytest.fixture(scope="module")
def archive() -> Iterator[str]:
    """A Debian-style archive (suite `stable`, two packages made by dpkg-deb: a shell with tar
    and their libraries, and a marker file) served on 127.0.0.1; yields its sources.list line."""
    import email.utils
    import functools
    import http.server
    import threading

    if not shutil.which("mmdebstrap") or not shutil.which("dpkg-deb"):
        pytest.fail("needs mmdebstrap and dpkg-deb (make deps)")
    top = Path(tempfile.mkdtemp(prefix="cellblock-archive-"))
    server = None
    try:
        tools = ["/bin/dash", "/bin/tar"]
        shell: dict[str, str | bytes] = {t: t for t in tools}
        shell.update({lib: lib for t in tools for lib in _libraries(t)})
        stanzas = [_deb(top, "cb-shell", shell),
                   _deb(top, "cb-marker", {"/usr/share/cb/marker": b"from-the-local-archive\n"})]
        packages = "\n".join(stanzas).encode()
        d = top / "repo" / "dists" / "stable" / "main" / "binary-amd64"
        d.mkdir(parents=True)
        (d / "Packages").write_bytes(packages)
        (top / "repo" / "dists" / "stable" / "Release").write_text(
            f"Suite: stable\nCodename: stable\nDate: {email.utils.formatdate(usegmt=True)}\n"
            f"Architectures: amd64\nComponents: main\nSHA256:\n"
            f" {hashlib.sha256(packages).hexdigest()} {len(packages)} main/binary-amd64/Packages\n")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                    directory=str(top / "repo"))
        handler.log_message = lambda *a: None  # type: ignore[attr-defined]
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"deb [trusted=yes] http://127.0.0.1:{server.server_address[1]}/ stable main"
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        shutil.rmtree(top, ignore_errors=True)


CALLER_DEBIAN = """
import json, stat, sys
from pathlib import Path
import cellblock
from cellblock.environments import debian
work, mirror = Path(sys.argv[1]), sys.argv[2]
os.environ.setdefault("HOME", str(work))
dest = work / f"debian-{os.getpid()}"
debian.build("debian:stable", dest, mirrors=[mirror], variant="extract",
             packages=["cb-shell", "cb-marker"])
res = cellblock.run(["/bin/dash", "-c", "read -r m < /usr/share/cb/marker; echo $m;"
                     " echo x > /usr/share/cb/marker || echo refused"], rootfs=dest, timeout=30)
devices = [p.name for p in dest.rglob("*")
           if stat.S_ISCHR(p.lstat().st_mode) or stat.S_ISBLK(p.lstat().st_mode)]
marker = (dest / "usr/share/cb/marker").read_text()
import shutil; shutil.rmtree(dest)
print(json.dumps({"stdout": res.stdout, "exit": res.exit_code, "devices": devices,
                  "marker": marker}))
"""


def test_a_debian_base_is_built_by_mmdebstrap_from_a_local_archive(
    caller: Caller, shared: Path, archive: str
) -> None:
    out = caller.run(CALLER_DEBIAN, str(shared / "work"), archive)
    assert out["exit"] == 0, out
    assert out["stdout"].split("\n")[0] == "from-the-local-archive", out
    assert "refused" in out["stdout"], out
    assert out["marker"] == "from-the-local-archive\n"
    # mmdebstrap's tarball has /dev/null, /dev/zero, ...: unpack drops them.
    assert out["devices"] == []


def test_the_cli_runs_on_a_rootfs_and_names_a_bad_one(cli: Cli, shared: Path) -> None:
    ok = cli.run(["run", "--rootfs", str(shared / "tree"), "--", "/bin/cat", "/etc/marker"])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{MARKER}\n".encode()
    bad = cli.run(["run", "--rootfs", str(shared / "missing"), "--", "/bin/true"])
    assert bad.returncode != 0
    assert b"cellblock: error: InvalidSpec: rootfs:" in bad.stderr, bad.stderr


CALLER_SYMLINKED = """
import json, os, shutil, sys
from pathlib import Path
import cellblock
tree, work = Path(sys.argv[1]), Path(sys.argv[2])
dest = work / f"symlinked-{os.getpid()}"
shutil.copytree(tree, dest, symlinks=True)
# Where the plan puts its own files and mount points, the rootfs has symlinks out to the
# host's tree (followed before pivot_root, they would write or mount there).
for name, target in [("etc", "/etc"), ("workspace", str(work)), ("tmp", "/tmp"),
                     ("proc", "/"), ("dev", "/dev")]:
    shutil.rmtree(dest / name)
    (dest / name).symlink_to(target)
res = cellblock.run(["/bin/sh", "-c", sys.argv[3]], rootfs=dest, timeout=30)
shutil.rmtree(dest)
print(json.dumps({"exit": res.exit_code, "stdout": res.stdout, "stderr": res.stderr,
                  "work": sorted(p.name for p in work.iterdir())}))
"""

SYMLINKED_PAYLOAD = r"""
read -r h < /etc/hostname; echo "hostname=$h"
for p in /etc/shadow /etc/os-release /etc/marker; do [ -e "$p" ] && echo "visible=$p"; done
echo x > /workspace/planted && echo "scratch=ok"
[ -L /workspace ] && echo "link=/workspace"
read -r c < /proc/self/comm; echo "comm=$c"
"""


def test_symlinks_where_the_plan_puts_its_files_are_hidden_not_followed(
    caller: Caller, shared: Path
) -> None:
    host_hostname = Path("/etc/hostname").read_bytes()
    out = caller.run(CALLER_SYMLINKED, str(shared / "tree"), str(shared / "work"),
                     SYMLINKED_PAYLOAD)
    assert out["exit"] == 0, out
    lines = out["stdout"].splitlines()
    assert "hostname=cellblock" in lines and "scratch=ok" in lines, out
    assert "comm=sh" in lines, out
    assert not [x for x in lines if x.startswith(("visible=", "link="))], out
    # The write went to the sandbox's scratch, not through the symlink to the host directory.
    assert not [n for n in out["work"] if n == "planted"], out
    assert Path("/etc/hostname").read_bytes() == host_hostname


CALLER_SHAPES = """
import json, os, shutil, sys
from pathlib import Path
import cellblock
import cellblock.cells
tree, work = Path(sys.argv[1]), Path(sys.argv[2])
other = work / f"other-{os.getpid()}"
shutil.copytree(tree, other, symlinks=True)
(other / "etc" / "marker").write_text("other\\n")
seen = []
# Ready cells are kept per shape: a cell made for one root must never serve a run on another.
for i in range(8):
    for root in (tree, other, None):
        argv = ["/bin/sh", "-c", "read -r m < /etc/marker 2>/dev/null || m=host;"
                " [ -e /usr/bin/python3 ] && m=$m+usr; echo $m"]
        seen.append([str(root), cellblock.run(argv, rootfs=root, timeout=30).stdout.strip()])
shutil.rmtree(other)
print(json.dumps({"seen": seen, "hits": cellblock.cells.stats().hits}))
"""


def test_ready_cells_never_serve_a_run_on_another_root(caller: Caller, shared: Path) -> None:
    out = caller.run(CALLER_SHAPES, str(shared / "tree"), str(shared / "work"))
    want = {str(shared / "tree"): MARKER, "None": "host+usr"}
    for root, got in out["seen"]:
        assert got == want.get(root, "other"), out
    # The pool did serve some of them (else this proves nothing about cells).
    assert out["hits"] > 0, out

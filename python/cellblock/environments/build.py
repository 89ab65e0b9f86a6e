"""Building an environment: one layer per step (base, apt, pip, npm, files), each made inside a
cellblock sandbox whose network allowlist is only that step's package sources.

A step's sandbox installs into its own /workspace/out and streams it back as a tar archive on
stdout; the host unpacks it with tarfile's `data` filter (no absolute or `..` paths, no links
out of the layer, no device nodes, no setuid bits) into a temporary directory of the store,
which becomes the layer by rename. The sandbox never gets a writable view of the host.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellblock import _native
from cellblock.environments import sources
from cellblock.environments.spec import EnvironmentSpec
from cellblock.environments.store import LayerRef, Record, Store, digest, tree_digest
from cellblock.errors import (
    CellblockError,
    CorruptEnvironment,
    EnvironmentBuildError,
    PackageNotFound,
    SourceUnreachable,
)
from cellblock.policy import Policy
from cellblock.sandbox import build_spec, encode_spec, resolve_seccomp

#: Limits of a build step's sandbox: installs are bigger and slower than ordinary runs.
BUILD_LIMITS: dict[str, Any] = {"memory": "3G", "disk": "2G", "pids": 512, "timeout": 900,
                                "max_output": "2G"}

#: Where a step's sandbox puts what it installed.
OUT = "/workspace/out"

Log = Callable[[str], None]


@dataclass
class StepResult:
    """What happened to one step of a build."""

    step: str
    key: str
    cached: bool
    seconds: float


@dataclass
class BuildResult:
    """The built environment and what each step did."""

    record: Record
    steps: list[StepResult] = field(default_factory=list)


def build_python() -> str:
    """The interpreter runs use (the host's base Python), which pip layers are built for."""
    return os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3"))


def _sandboxed(step: str, script: str, args: Sequence[str], *, allow: Sequence[str],
               binds: Sequence[str] = (), env: dict[str, str] | None = None,
               stdin: bytes | None = None) -> bytes:
    """Runs `script` (sh) in a build sandbox; returns its stdout (the tar of OUT)."""
    argv = ["sh", "-c", script, step, *args]
    policy = Policy.build(**BUILD_LIMITS, allow_net=list(allow), env=env or {},
                          profile="default")
    compiled = resolve_seccomp(argv, policy.profile, policy.seccomp)
    spec = build_spec(argv, policy, [], compiled)
    spec["ro_binds"] = [*spec["ro_binds"], *binds]
    try:
        report = _native.run(encode_spec(spec, compiled), stdin,
                             compiled.bpf if compiled else None, None, None, False)
    except CellblockError as e:
        raise EnvironmentBuildError(f"{step}: the build sandbox failed: {e}") from None
    out: bytes = report["stdout_bytes"]
    err = bytes(report["stderr_bytes"]).decode("utf-8", "replace")
    if report["reason"] != "exited" or report["exit_code"] != 0:
        _raise_for(step, report, err)
    return out


#: Failure messages of the package tools: which kind of error each means.
_NOT_FOUND = re.compile(
    r"No matching distribution found for (\S+)|Unable to locate package (\S+)"
    r"|Package '?(\S+?)'? has no installation candidate|E404 .*? - (\S+)"
    r"|404 Not Found - GET \S+/(\S+)")
#: apt moves each download from partial/ into its parent: a kernel whose Landlock lacks
#: reparenting rights (ABI 1) refuses that inside a run (EXDEV). Named so the failure says so.
_CROSS_DIR = re.compile(r"rename failed, Invalid cross-device link")
_UNREACHABLE = re.compile(
    r"Failed to establish a new connection|Connection refused|Could not fetch URL"
    r"|Failed to fetch|Could not connect|Unable to connect|ECONNREFUSED|ENOTFOUND|EAI_AGAIN"
    r"|Temporary failure resolving|Network is unreachable|ProxyError")


def _raise_for(step: str, report: dict[str, Any], err: str) -> None:
    tail = " | ".join(ln.strip() for ln in err.strip().splitlines()[-4:])
    if report["reason"] != "exited":
        raise EnvironmentBuildError(f"{step}: the build ended ({report['reason']}): {tail}")
    if _CROSS_DIR.search(err):
        raise EnvironmentBuildError(
            f"{step}: the sandbox refuses renames between directories (EXDEV), which apt "
            f"needs: this kernel's Landlock has no reparenting right (ABI 1): {tail}")
    m = _NOT_FOUND.search(err)
    if m:
        name = next(g for g in m.groups() if g)
        raise PackageNotFound(f"{step}: no package {name!r} in the configured sources: {tail}")
    if _UNREACHABLE.search(err):
        raise SourceUnreachable(f"{step}: a package source could not be reached: {tail}")
    raise EnvironmentBuildError(f"{step}: exit status {report['exit_code']}: {tail}")


def _keep(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's `data` filter, except that links pointing out of the layer (Debian packages
    have absolute ones, e.g. into /etc/alternatives) and device nodes are dropped rather than
    failing the layer; a path that would land outside it still fails it."""
    try:
        return tarfile.data_filter(member, dest)
    except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError,
            tarfile.SpecialFileError):
        return None


def _unpack_tar(data: bytes, dest: Path) -> None:
    """Extracts a step's tar into `dest`, refusing anything that would leave it."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            tar.extractall(dest, filter=_keep)
    except (tarfile.TarError, OSError) as e:
        raise EnvironmentBuildError(f"the build's output could not be unpacked: {e}") from None


# ---- steps -----------------------------------------------------------------------------------

_APT_SCRIPT = r"""
set -e
A=/workspace/apt
mkdir -p $A/lists/partial $A/archives/partial $A/state $A/log $A/etc/apt.conf.d \
  $A/etc/preferences.d """ + OUT + r"""
cat > $A/status
printf '%s\n' "$APT_SOURCES" > $A/sources.list
O="-o Dir::Etc=$A/etc -o Dir::Etc::SourceList=$A/sources.list -o Dir::Etc::SourceParts=/dev/null
 -o Dir::State=$A/state -o Dir::State::Lists=$A/lists -o Dir::State::status=$A/status
 -o Dir::Cache=$A -o Dir::Cache::archives=$A/archives -o Dir::Log=$A/log
 -o Debug::NoLocking=1 -o APT::Sandbox::User=root -o Acquire::Retries=0
 -o Acquire::http::Timeout=20 -o APT::Get::List-Cleanup=0"
apt-get $O -q update >&2
ls $A/lists/*Packages* >/dev/null 2>&1 ||
  { echo "Failed to fetch any package index" >&2; exit 100; }
apt-get $O -q -y --no-install-recommends install --download-only "$@" >&2
for f in $A/archives/*.deb; do [ -e "$f" ] && dpkg-deb -x "$f" """ + OUT + r"""; done
tar -C """ + OUT + r""" -cf - .
"""


def _dpkg_status() -> bytes:
    """The host's installed packages (empty without dpkg: then every dependency is fetched)."""
    try:
        return Path("/var/lib/dpkg/status").read_bytes()
    except OSError:
        return b""


def _apt_layer(packages: list[str], root: Path) -> None:
    src = sources.apt_sources()
    if not src.lines:
        raise EnvironmentBuildError("apt: this machine has no apt sources configured")
    # The host's installed set: only what the host lacks is downloaded (and dependencies).
    status = _dpkg_status()
    data = _sandboxed("apt", _APT_SCRIPT, packages, allow=src.allow(), binds=src.binds(),
                      env={"APT_SOURCES": "\n".join(src.lines)}, stdin=status)
    _unpack_tar(data, root)


#: Run first in a pip step: pip reports an unreachable index as "no versions" of a package.
_REACH = """
import sys, urllib.error, urllib.request
for url in sys.argv[1:]:
    if url.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(url, timeout=20).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except OSError as e:
            sys.exit(f"Could not connect to {url}: {e}")
"""

_PIP_SCRIPT = (
    '"$PY" -c "$REACH" $PIP_INDEX_URL $PIP_EXTRA_INDEX_URL $PIP_FIND_LINKS >&2 && '
    '"$PY" -m pip install --no-cache-dir --retries 0 --timeout 20 --no-warn-script-location'
    f' --target {OUT}/site-packages "$@" >&2 && tar -C {OUT} -cf - .')


def _pip_layer(packages: list[str], root: Path, src: sources.PipSources, python: str) -> None:
    binds = src.binds()
    # Requirements naming local files (wheels, sdists, project directories) are bound too.
    for item in packages:
        path = sources.local_path(item)
        if path and os.path.exists(path):
            binds.append(os.path.dirname(path) if os.path.isfile(path) else path)
    script = f"mkdir -p {OUT} && " + _PIP_SCRIPT
    data = _sandboxed("pip", script, packages, allow=src.allow(), binds=sorted(set(binds)),
                      env={**src.env(), "PY": python, "REACH": _REACH})
    _unpack_tar(data, root)


_NPM_SCRIPT = (
    f'mkdir -p {OUT} && npm install --prefix {OUT} --no-audit --no-fund --no-save'
    ' --no-package-lock --ignore-scripts --fetch-retries=0 --registry "$REGISTRY" "$@" >&2'
    f' && rm -f {OUT}/package.json && tar -C {OUT} -cf - .')


def _npm_layer(packages: list[str], root: Path, registry: str) -> None:
    allow = [p for p in [sources.allow_pattern(registry)] if p]
    binds = []
    for item in packages:
        path = sources.local_path(item)
        if path and os.path.exists(path):
            binds.append(os.path.dirname(path) if os.path.isfile(path) else path)
    data = _sandboxed("npm", _NPM_SCRIPT, packages, allow=allow, binds=sorted(set(binds)),
                      env={"REGISTRY": registry})
    _unpack_tar(data, root)


def _files_layer(spec: EnvironmentSpec, root: Path) -> None:
    for rel, f in sorted(spec.files.items()):
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.source is not None:
            try:
                shutil.copyfile(f.source, dest, follow_symlinks=True)
            except OSError as e:
                raise EnvironmentBuildError(f"files: {rel}: cannot copy {f.source}: {e}"
                                            ) from None
        else:
            dest.write_text(f.content or "")
        dest.chmod(f.mode)
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)


def _file_inputs(spec: EnvironmentSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rel, f in sorted(spec.files.items()):
        if f.source is not None:
            try:
                content = hashlib.sha256(Path(f.source).read_bytes()).hexdigest()
            except OSError as e:
                raise EnvironmentBuildError(f"files: {rel}: cannot read {f.source}: {e}"
                                            ) from None
            out[rel] = {"sha256": content, "mode": f.mode}
        else:
            out[rel] = {"sha256": hashlib.sha256((f.content or "").encode()).hexdigest(),
                        "mode": f.mode}
    return out


def _base_layer(source: str, root: Path) -> None:
    """A root filesystem base: `debian:SUITE` (mmdebstrap), a directory, a tarball or an OCI
    layout, unpacked by the rules for untrusted layers into the (new, empty) `root`."""
    from cellblock.environments import debian

    root.rmdir()
    debian.build(source, root)


def _base_inputs(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return {"source": source, "sha256": h.hexdigest()}
    if path.is_dir():
        return {"source": source, "tree": tree_digest(path)[0]}
    return {"source": source}


# ---- the build -------------------------------------------------------------------------------

#: Variables each step's layer extends, as paths relative to the layer's root.
LAYER_PATHS: dict[str, dict[str, list[str]]] = {
    "apt": {"PATH": ["usr/local/bin", "usr/bin", "bin", "usr/sbin", "sbin"],
            "LD_LIBRARY_PATH": ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu",
                                "usr/lib/aarch64-linux-gnu", "lib/aarch64-linux-gnu",
                                "usr/lib", "lib"],
            "PYTHONPATH": ["usr/lib/python3/dist-packages"],
            "NODE_PATH": ["usr/lib/nodejs", "usr/share/nodejs"]},
    "pip": {"PATH": ["site-packages/bin"], "PYTHONPATH": ["site-packages"]},
    "npm": {"PATH": ["node_modules/.bin"], "NODE_PATH": ["node_modules"]},
    "files": {"CELLBLOCK_ENV_FILES": [""]},
}


def layer_paths(store: Store, ref: LayerRef) -> dict[str, list[str]]:
    """The variable paths a layer adds (only directories it really has)."""
    root = store.layer_dir(ref.key) / "root"
    out: dict[str, list[str]] = {}
    for var, rels in LAYER_PATHS.get(ref.step, {}).items():
        found = [str(root / r).rstrip("/") for r in rels if (root / r).is_dir()]
        if found:
            out[var] = found
    return out


def build(spec: EnvironmentSpec, store: Store | None = None, log: Log | None = None
          ) -> BuildResult:
    """Builds (or finds already built) every layer of `spec` and records it under its name."""
    store = store or Store()
    say = log or (lambda _msg: None)
    python = build_python()
    steps: list[tuple[str, dict[str, Any], Callable[[Path], None]]] = []
    if not spec.host_base:
        if spec.apt or spec.pip or spec.npm:
            raise EnvironmentBuildError(
                "base: packages on a root filesystem base are not supported yet: "
                "declare them on base = \"host\", or bake them into the root filesystem")
        steps.append(("base", _base_inputs(spec.base),
                      lambda root: _base_layer(spec.base, root)))
    if spec.apt:
        src_apt = sources.apt_sources()
        status = hashlib.sha256(_dpkg_status()).hexdigest()
        steps.append(("apt", {"packages": spec.apt, "sources": src_apt.lines,
                              "host_status": status},
                      lambda root: _apt_layer(spec.apt, root)))
    if spec.pip:
        src_pip = sources.pip_sources(python)
        version = ".".join(map(str, sys.version_info[:2]))
        steps.append(("pip", {"packages": spec.pip, "sources": src_pip.fingerprint(),
                              "python": python, "version": version},
                      lambda root: _pip_layer(spec.pip, root, src_pip, python)))
    if spec.npm:
        registry = sources.npm_registry()
        steps.append(("npm", {"packages": spec.npm, "registry": registry},
                      lambda root: _npm_layer(spec.npm, root, registry)))
    if spec.files:
        steps.append(("files", {"files": _file_inputs(spec)},
                      lambda root: _files_layer(spec, root)))

    result_steps: list[StepResult] = []
    refs: list[LayerRef] = []
    parent: str | None = None
    for step, inputs, make in steps:
        key = digest({"format": 1, "step": step, "parent": parent, "inputs": inputs})
        start = time.perf_counter()
        with store.locked(key):
            cached = False
            if store.has_layer(key):
                try:
                    store.verify_layer(key)
                    cached = True
                except CorruptEnvironment as e:
                    say(f"{step}: {e}: rebuilding it")
            if not cached:
                say(f"{step}: building {key[:12]}")
                with store.new_layer(key) as work:
                    make(work / "root")
                    store.commit(work, key, step, parent, inputs)
            refs.append(LayerRef(key=key, step=step, manifest=store.manifest_digest(key)))
        result_steps.append(StepResult(step, key, cached, time.perf_counter() - start))
        say(f"{step}: {'cached' if cached else 'built'} {key[:12]}")
        parent = key

    paths: dict[str, list[str]] = {}
    for ref in refs:
        for var, found in layer_paths(store, ref).items():
            # Later layers come first: their packages shadow earlier ones.
            paths[var] = found + paths.get(var, [])
    env_id = digest({"layers": [r.key for r in refs], "env": spec.env, "paths": paths})
    record = Record(name=spec.name, id=env_id, layers=refs, env=spec.env, paths=paths,
                    declaration=spec.model_dump(mode="json"), built=time.time())
    try:
        old = store.record(spec.name)
    except CellblockError:
        old = None
    if old is None or old.id != record.id or old.layers != record.layers:
        store.save(record)
    else:
        record = old
    return BuildResult(record, result_steps)

"""Shared fixtures: sandboxes run by root (this process) and by uid 65534, plus host-side probes.

Every isolation test takes the `sandbox` fixture and so runs twice:
- "root": `cellblock.run` called in this process (pytest runs as root in CI);
- "nobody": the same call made by a worker process running as uid/gid 65534 (started with
  `setpriv`), using Debian's /usr/bin/python3 and a world-readable copy of the package and its
  dependencies, where user namespaces make the same isolation real without privileges.
Results cross back as `RunResult.to_dict()`; errors as the exception class name.

Payloads run inside the sandbox as `python3 -c PRELUDE + code` and report one JSON line
(`report(...)`), so every escape attempt is made by the sandboxed program itself.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import cellblock
import cellblock.sandbox
from cellblock import _native

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "cellblock"
NOBODY = 65534
IS_ROOT = os.geteuid() == 0
HOST_INFO = _native.host_info()
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
SPAWN_BINARY = TARGET_DIR / "release" / "cellblock-spawn"
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
#: Seconds a worker request may take before the worker is declared hung.
WORKER_DEADLINE = 180.0
#: Seccomp profile for runs that do not choose one (unset: cellblock's default, chosen from
#: argv[0]). `CELLBLOCK_TEST_PROFILE=none` proves the namespaces hold without seccomp.
TEST_PROFILE = os.environ.get("CELLBLOCK_TEST_PROFILE")

#: Put in front of every payload: `attempt` turns an OSError into its errno name.
PRELUDE = textwrap.dedent('''\
    import errno, json, os, socket, sys
    def attempt(fn, *args):
        """'OK' if fn(*args) succeeds, else the errno name of the OSError it raised."""
        try:
            fn(*args)
            return "OK"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    def report(**fields):
        print(json.dumps(fields), flush=True)
''')

#: The unprivileged worker: one JSON request per line on stdin, one JSON reply per line. Runs
#: are made in threads (concurrently when several are asked for at once).
WORKER = textwrap.dedent('''\
    import json, os, sys, tempfile, threading
    import cellblock, cellblock.sandbox

    def stats():
        threads = [l for l in open("/proc/self/status") if l.startswith("Threads:")]
        return {"fds": len(os.listdir("/proc/self/fd")), "threads": int(threads[0].split()[1]),
                "pid": os.getpid(), "prefix": os.path.realpath(sys.base_prefix),
                "ro_binds": cellblock.sandbox.runtime_prefixes(), "tmpdir": tempfile.gettempdir()}

    def run(req):
        try:
            return {"result": cellblock.run(req["argv"], **req["kwargs"]).to_dict()}
        except cellblock.CellblockError as e:
            return {"error": type(e).__name__, "message": str(e)}

    def run_many(reqs):
        out = [None] * len(reqs)
        def one(i):
            out[i] = run(reqs[i])
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"result": out}

    import cellblock.cells
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "run_many":
            reply = run_many(req["runs"])
        elif req["op"] == "prepare":
            try:
                runs = [(r["argv"], r["kwargs"]) for r in req["runs"]]
                reply = {"result": cellblock.cells.prepare_many(runs).model_dump()}
            except cellblock.CellblockError as e:
                reply = {"error": type(e).__name__, "message": str(e)}
        elif req["op"] == "configure":
            cellblock.cells.configure(True, max_cells=req["max_cells"], per_shape=req["max_cells"])
            reply = {"result": None}
        elif req["op"] == "cells":
            if req.get("drain"):
                cellblock.cells.drain()
            reply = {"result": cellblock.cells.stats().model_dump()}
        else:
            reply = {"result": stats()}
        print(json.dumps(reply), flush=True)
''')


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cells", choices=("auto", "pooled"), default="auto",
        help="pooled: before every run of the `sandbox` fixture, make a cell of its shape ready "
             "(cellblock.cells.prepare_many) and fail the test unless a ready cell served it")


def pytest_configure(config: pytest.Config) -> None:
    global POOLED
    POOLED = config.getoption("--cells") == "pooled"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--cells=pooled keeps only the tests it checks: those running sandboxes through the
    `sandbox` fixture (a `cold_path` test too: its marker must still apply). The rest are
    reported as deselected."""
    if config.getoption("--cells") != "pooled":
        return
    keep, drop = [], []
    for item in items:
        (keep if "sandbox" in getattr(item, "fixturenames", ()) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


#: Set by --cells=pooled (see `Runner.pooled`).
POOLED = False
#: Most ready cells the pool keeps unless configured otherwise (cellblock_core::cell::pool).
DEFAULT_MAX_CELLS = 4
#: For tests whose runs list egress (`allow_net`): with --cells=pooled they take the cold path
#: by design (cellblock_core::cell::pool::Shape::of), and say so.
EGRESS_IS_COLD = pytest.mark.cold_path(
    "an egress allowlist needs a proxy and a network namespace made for the run: cells never "
    "serve it")
#: The same for runs with a terminal (`tty=True`): it is opened by the command's own process.
TTY_IS_COLD = pytest.mark.cold_path(
    "a terminal is opened by the command's process and its master passed out: cells never "
    "serve it")


def expected_cgroup_enforcer() -> str:
    """What enforces memory, pids, cpus and cpu_time for a root caller on this host."""
    if set(HOST_INFO["cgroup_v2_controllers"]) & {"memory", "pids", "cpu"}:
        return "cgroup-v2"
    return "cgroup-v1"


def outcome(result: dict[str, Any]) -> SimpleNamespace:
    """A run's report (to_dict form) with attribute access."""
    return SimpleNamespace(**result)


def raise_named(name: str, message: str) -> None:
    """Re-raise an error reported by the worker as the same cellblock exception class."""
    cls = getattr(cellblock, name, None)
    # A failure of the test itself, not a type problem: the worker only reports cellblock errors.
    assert isinstance(cls, type) and issubclass(cls, cellblock.CellblockError), (name, message)
    raise cls(message)


class Runner:
    """Runs sandboxes on behalf of one caller identity."""

    name: str
    #: The caller is real root: limits go to cgroups, uid 0 inside maps to an unused host uid.
    privileged: bool
    #: Host uid of the calling process.
    caller_uid: int

    def start_many(self, runs: list[tuple[list[str], dict[str, Any]]]
                   ) -> Callable[[], list[SimpleNamespace]]:
        """Starts (argv, kwargs) runs concurrently, one thread each, in the calling process;
        the returned function waits for their reports."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """fds, threads, pid, interpreter prefix and runtime binds of the calling process."""
        raise NotImplementedError

    def cells(self, drain: bool = False) -> dict[str, Any]:
        """The caller's cell pool counters; `drain` first drops its ready cells and waits for
        every teardown (what is left afterwards is a leak)."""
        raise NotImplementedError

    #: With --cells=pooled: why the current test's runs may take the cold path (its
    #: `cold_path` marker), and how many did.
    cold_reason: str | None = None
    cold_runs = 0

    def prepare(self, runs: list[tuple[list[str], dict[str, Any]]]) -> dict[str, Any]:
        """`cellblock.cells.prepare_many(runs)` in the calling process."""
        raise NotImplementedError

    def bound_cells(self, max_cells: int) -> None:
        """Bounds the calling process's pool to `max_cells` (in all and per shape)."""
        raise NotImplementedError

    def pooled(self, runs: list[tuple[list[str], dict[str, Any]]],
               start: Callable[[], Callable[[], list[SimpleNamespace]]]
               ) -> Callable[[], list[SimpleNamespace]]:
        """With --cells=pooled: makes a cell ready for each run, starts them, and (when they
        are waited for) asserts that ready cells served every run that does not say
        `cells=False`, so that a run which took the cold path fails the test. A run of a shape
        cells never serve (egress allowlist, terminal) fails it too unless the test says so
        with `@pytest.mark.cold_path(reason)`."""
        if not POOLED:
            return start()
        asked = [(a, k) for a, k in runs if k.get("cells", True)]
        refused: BaseException | None = None
        served = 0
        if len(asked) > DEFAULT_MAX_CELLS:
            # More concurrent runs than the pool keeps by default: room for one cell each.
            self.bound_cells(len(asked))
        if asked:
            try:
                prep = self.prepare(asked)
            except cellblock.CellblockError as e:
                # A run the core refuses before choosing its path: the same run must fail the
                # same way, served by nothing.
                assert len(runs) == 1, f"cannot prepare cells for a batch: {e!r}"
                refused = e
            else:
                never = prep["served"].count(False)
                assert not never or self.cold_reason, (
                    f"{never} of these runs have a shape cells never serve: mark the test "
                    f"@pytest.mark.cold_path(reason) if that is by design; runs: "
                    f"{str(asked)[:300]}")
                self.cold_runs += never
                assert prep["status"] == "ready", f"as {self.name}: no ready cell: {prep}"
                served = len(asked) - never
        before = self.cells()

        def check() -> None:
            if len(asked) > DEFAULT_MAX_CELLS:
                self.bound_cells(DEFAULT_MAX_CELLS)
            after = self.cells()
            assert after["hits"] - before["hits"] == served, (
                f"as {self.name}: {served} runs should have been served by ready cells, "
                f"{after['hits'] - before['hits']} were (fallbacks "
                f"{after['fallbacks'] - before['fallbacks']}); before {before}, after {after}")

        try:
            wait = start()
        except BaseException:
            check()
            raise

        def waited() -> list[SimpleNamespace]:
            try:
                results = wait()
            except BaseException as e:
                check()
                if refused is not None:
                    assert type(e) is type(refused), (refused, e)
                raise
            check()
            assert refused is None, f"prepare refused a run that then succeeded: {refused!r}"
            return results
        return waited

    def run(self, argv: list[str], **kwargs: Any) -> SimpleNamespace:
        return self.start_many([(argv, kwargs)])()[0]

    def start(self, argv: list[str], **kwargs: Any) -> Callable[[], SimpleNamespace]:
        wait = self.start_many([(argv, kwargs)])
        return lambda: wait()[0]

    def run_many(self, runs: list[tuple[list[str], dict[str, Any]]]) -> list[SimpleNamespace]:
        return self.start_many(runs)()

    def probe(self, code: str, **kwargs: Any) -> dict[str, Any]:
        """Runs a Python payload in the sandbox and returns the JSON object it reported."""
        res = self.run(["python3", "-c", PRELUDE + textwrap.dedent(code)], **kwargs)
        assert (res.reason, res.exit_code) == ("exited", 0), (res.reason, res.exit_code, res.stderr)
        lines = res.stdout.strip().splitlines()
        assert lines, f"payload reported nothing; stderr: {res.stderr}"
        return json.loads(lines[-1])

    def enforcer(self, limit: str) -> str | None:
        """What this caller's runs report as enforcing `limit`."""
        if self.privileged:
            return expected_cgroup_enforcer()
        return None if limit == "cpus" else "rlimit"

    @staticmethod
    def with_profile(kwargs: dict[str, Any]) -> dict[str, Any]:
        if TEST_PROFILE and "profile" not in kwargs and "seccomp" not in kwargs:
            return {**kwargs, "profile": TEST_PROFILE}
        return kwargs


class InProcessRunner(Runner):
    """`cellblock.run` in this (pytest) process."""

    def __init__(self) -> None:
        self.name = "root" if IS_ROOT else "user"
        self.privileged = IS_ROOT
        self.caller_uid = os.getuid()

    def run(self, argv: list[str], **kwargs: Any) -> SimpleNamespace:
        kwargs = self.with_profile(kwargs)

        def start() -> Callable[[], list[SimpleNamespace]]:
            return lambda: [outcome(cellblock.run(argv, **kwargs).to_dict())]
        return self.pooled([(argv, kwargs)], start)()[0]

    def start_many(self, runs: list[tuple[list[str], dict[str, Any]]]
                   ) -> Callable[[], list[SimpleNamespace]]:
        runs = [(argv, self.with_profile(kw)) for argv, kw in runs]

        def start() -> Callable[[], list[SimpleNamespace]]:
            pool = concurrent.futures.ThreadPoolExecutor(len(runs))
            futures = [pool.submit(cellblock.run, argv, **kw) for argv, kw in runs]

            def wait() -> list[SimpleNamespace]:
                results = [outcome(f.result(timeout=WORKER_DEADLINE).to_dict())
                           for f in futures]
                pool.shutdown(wait=True)
                return results
            return wait
        return self.pooled(runs, start)

    def prepare(self, runs: list[tuple[list[str], dict[str, Any]]]) -> dict[str, Any]:
        import cellblock.cells

        return cellblock.cells.prepare_many(runs).model_dump()

    def bound_cells(self, max_cells: int) -> None:
        import cellblock.cells

        cellblock.cells.configure(True, max_cells=max_cells, per_shape=max_cells)

    def stats(self) -> dict[str, Any]:
        threads = [ln for ln in Path("/proc/self/status").read_text().splitlines()
                   if ln.startswith("Threads:")]
        return {"fds": len(os.listdir("/proc/self/fd")), "threads": int(threads[0].split()[1]),
                "pid": os.getpid(), "prefix": os.path.realpath(sys.base_prefix),
                "ro_binds": cellblock.sandbox.runtime_prefixes(), "tmpdir": tempfile.gettempdir()}

    def cells(self, drain: bool = False) -> dict[str, Any]:
        import cellblock.cells

        if drain:
            assert cellblock.cells.drain(), "cells did not drain in time"
        return cellblock.cells.stats().model_dump()


class WorkerRunner(Runner):
    """`cellblock.run` in a long-lived worker process running as uid 65534."""

    def __init__(self, pkgdir: Path, canary: str) -> None:
        self.name = "nobody"
        self.privileged = False
        self.caller_uid = NOBODY
        self.pkgdir = pkgdir
        self.canary = canary
        self.proc: subprocess.Popen[str] | None = None

    def launch(self) -> None:
        with open(self.pkgdir / "worker.log", "a") as log:
            self.proc = subprocess.Popen(
                [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={self.pkgdir}",
                 f"TMPDIR={self.pkgdir / 'tmp'}", f"CELLBLOCK_TEST_CANARY={self.canary}",
                 # CELLBLOCK_CELLS=wait (every run through a cell) applies to the worker too.
                 f"CELLBLOCK_CELLS={os.environ.get('CELLBLOCK_CELLS', '')}",
                 "/usr/bin/python3",
                 str(self.pkgdir / "worker.py")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd="/",
            )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream:
                    stream.close()
            self.proc = None

    def send(self, request: dict[str, Any]) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self.launch()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> Any:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WORKER_DEADLINE)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            log = (self.pkgdir / "worker.log").read_text()[-3000:]
            self.stop()
            raise AssertionError(f"unprivileged worker gave no reply; its log:\n{log}")
        reply = json.loads(line)
        if "error" in reply:
            raise_named(reply["error"], reply["message"])
        return reply["result"]

    def start_many(self, runs: list[tuple[list[str], dict[str, Any]]]
                   ) -> Callable[[], list[SimpleNamespace]]:
        runs = [(a, self.with_profile(k)) for a, k in runs]

        def start() -> Callable[[], list[SimpleNamespace]]:
            self.send({"op": "run_many", "runs": [{"argv": a, "kwargs": k} for a, k in runs]})

            def wait() -> list[SimpleNamespace]:
                out = []
                for reply in self.receive():
                    if "error" in reply:
                        raise_named(reply["error"], reply["message"])
                    out.append(outcome(reply["result"]))
                return out
            return wait
        return self.pooled(runs, start)

    def prepare(self, runs: list[tuple[list[str], dict[str, Any]]]) -> dict[str, Any]:
        self.send({"op": "prepare", "runs": [{"argv": a, "kwargs": k} for a, k in runs]})
        result: dict[str, Any] = self.receive()
        return result

    def bound_cells(self, max_cells: int) -> None:
        self.send({"op": "configure", "max_cells": max_cells})
        self.receive()

    def stats(self) -> dict[str, Any]:
        self.send({"op": "stats"})
        return self.receive()

    def cells(self, drain: bool = False) -> dict[str, Any]:
        self.send({"op": "cells", "drain": drain})
        return self.receive()


def package_closure() -> list[Path]:
    """What of site-packages cellblock and its CLI import (top-level names), plus metadata."""
    code = textwrap.dedent("""\
        import json, sys, sysconfig
        import cellblock, cellblock.cli
        cellblock.cli.make_parser()
        # What the README's snippets import too (they run as uid 65534 from this copy).
        import anthropic, cellblock.agent.loop, cellblock.memory, cellblock.telemetry
        # The client imports its HTTP transport only when made (the orchestration tests).
        anthropic.Anthropic(api_key="x", base_url="http://127.0.0.1:9").close()
        site = sysconfig.get_paths()["purelib"]
        tops = set()
        for mod in list(sys.modules.values()):
            f = getattr(mod, "__file__", None) or ""
            if f.startswith(site + "/"):
                tops.add(f[len(site) + 1:].split("/")[0])
        print(json.dumps(sorted(tops)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ""})
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    skip = {"cellblock", "cellblock.pth", "__pycache__", "_distutils_hack"}
    # Package metadata too: some dependencies read their own version at import.
    metadata = [p for p in site.glob("*.dist-info") if not p.name.startswith("cellblock-")]
    return [site / n for n in json.loads(out.stdout) if n not in skip] + metadata


def share_file(src: str, dst: str) -> str:
    """Hard-links a world-readable plain file (fast; its mode already fits); copies
    executables and shared objects (a rebuild must not change them under a running worker)
    and anything not world-readable, making the copy world-readable."""
    mode = os.stat(src).st_mode
    if mode & 0o004 and not mode & 0o111 and not src.endswith(".so"):
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    shutil.copy2(src, dst)
    os.chmod(dst, 0o755 if mode & 0o100 else 0o644)
    return dst


def share_tree(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=share_file,
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        share_file(str(src), str(dst))


@pytest.fixture(scope="session")
def nobody_dir() -> Iterator[Path]:
    """A world-readable copy of the package (with `_native`), its dependencies and
    cellblock-spawn, for callers running as uid 65534 (the checkout may not be readable)."""
    if not IS_ROOT:
        pytest.skip("running as uid 65534 needs root to setpriv")
    if not Path("/usr/bin/python3").exists() or not shutil.which("setpriv"):
        pytest.skip("needs /usr/bin/python3 and setpriv")
    tmp = Path(tempfile.mkdtemp(prefix="cellblock-nobody-"))
    try:
        share_tree(PACKAGE, tmp / "cellblock")
        for src in package_closure():
            share_tree(src, tmp / src.name)
        if SPAWN_BINARY.exists():
            share_file(str(SPAWN_BINARY), str(tmp / "cellblock-spawn"))
        (tmp / "worker.py").write_text(WORKER)
        for root, dirs, _ in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        tmp.chmod(0o755)
        (tmp / "worker.py").chmod(0o644)
        (tmp / "tmp").mkdir()
        (tmp / "tmp").chmod(0o1777)  # the worker's private TMPDIR
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def canary() -> str:
    """A value placed in the callers' environments that no sandbox may see."""
    return "cellblock-canary-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def nobody_runner(nobody_dir: Path, canary: str) -> Iterator[WorkerRunner]:
    runner = WorkerRunner(nobody_dir, canary)
    runner.launch()
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def self_runner() -> InProcessRunner:
    return InProcessRunner()


@pytest.fixture(params=["self", "nobody"], ids=["root" if IS_ROOT else "user", "nobody"])
def sandbox(request: pytest.FixtureRequest, canary: str, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[Runner]:
    """A runner for each caller identity: this process, and uid 65534. With --cells=pooled,
    every run is served by a ready cell (see `Runner.pooled`)."""
    runner = runner_for(request, canary, monkeypatch)
    marker = request.node.get_closest_marker("cold_path")
    runner.cold_reason = str(marker.args[0]) if marker else None
    runner.cold_runs = 0
    try:
        yield runner
    finally:
        reason, runner.cold_reason = runner.cold_reason, None
    # A stale marker would hide a test's runs from the pooled check: it must still apply.
    assert not (POOLED and reason and not runner.cold_runs), (
        f"marked cold_path ({reason}) but every run was served by a cell: drop the marker")


def runner_for(request: pytest.FixtureRequest, canary: str, monkeypatch: pytest.MonkeyPatch
               ) -> Runner:
    if request.param == "nobody":
        runner: Runner = request.getfixturevalue("nobody_runner")
        return runner
    # The canary is set in our environment for every in-process run, and temp files go to a
    # private directory where leftovers are seen.
    monkeypatch.setenv("CELLBLOCK_TEST_CANARY", canary)
    tmpdir = str(request.getfixturevalue("tmp_path_factory").mktemp("tmpdir"))
    monkeypatch.setenv("TMPDIR", tmpdir)
    monkeypatch.setattr(tempfile, "tempdir", tmpdir)
    runner = request.getfixturevalue("self_runner")
    return runner


@pytest.fixture
def marker() -> str:
    """A unique `sleep` argument: processes started with it can be found from the host."""
    return f"3600.{secrets.randbelow(10**9):09d}"


def processes_with_argv(argv: list[str]) -> list[int]:
    """Host pids whose command line is exactly `argv`."""
    want = b"".join(a.encode() + b"\0" for a in argv)
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if f.read() == want:
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


def own_cgroup_dirs() -> list[Path]:
    """The directories of this process's own cgroups, one per mounted hierarchy."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if fields[3] == "/" and rfields[0] in ("cgroup", "cgroup2"):
            ctrls = set(rfields[2].split(",")) if rfields[0] == "cgroup" else set()
            mounts.append((rfields[0], ctrls, Path(fields[4])))
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for fstype, opts, mount in mounts:
            v2 = fstype == "cgroup2" and not ctrls
            if v2 or (fstype == "cgroup" and ctrls and set(ctrls.split(",")) <= opts):
                dirs.append(mount / path.lstrip("/"))
    return dirs


def own_cellblock_cgroups(pid: int | None = None) -> list[str]:
    """cellblock cgroups created by process `pid` (this one by default; a child shares our
    cgroups) that still exist: they are named cellblock-<pid>-<n>."""
    prefix = f"cellblock-{pid or os.getpid()}-"
    return sorted(str(d / e) for d in own_cgroup_dirs() if d.is_dir()
                  for e in os.listdir(d) if e.startswith(prefix))


def remove_cgroups_of(pid: int) -> None:
    """Cleanup after a test that killed a supervisor (child `pid`) on purpose."""
    for path in own_cellblock_cgroups(pid):
        def gone(path: str = path) -> bool:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                return False
            return True
        wait_for(gone, f"removal of {path}", 10)


class Cli:
    """The `cellblock` command line as one caller identity."""

    def __init__(self, name: str, prefix: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.prefix = prefix
        self.env = env

    def argv(self, args: list[str]) -> list[str]:
        if TEST_PROFILE and args[:1] == ["run"] and "--profile" not in args:
            args = ["run", "--profile", TEST_PROFILE, *args[1:]]
        return [*self.prefix, *args]

    def run(self, args: list[str], input: bytes | None = None
            ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(args), input=input or b"", check=False, capture_output=True,
                              env=self.env, timeout=WORKER_DEADLINE, cwd="/")

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(args), env=self.env, cwd="/", **kwargs)


@pytest.fixture(params=["self", "nobody"], ids=["root" if IS_ROOT else "user", "nobody"])
def cli(request: pytest.FixtureRequest, canary: str) -> Cli:
    """`cellblock` run by this process's user, and by uid 65534."""
    if request.param == "nobody":
        pkgdir = request.getfixturevalue("nobody_dir")
        return Cli("nobody", [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={pkgdir}",
                              f"CELLBLOCK_TEST_CANARY={canary}", "/usr/bin/python3", "-m",
                              "cellblock.cli"], {"PATH": "/usr/bin:/bin"})
    script = Path(sys.executable).parent / "cellblock"
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "cellblock.cli"]
    env = {**os.environ, "CELLBLOCK_TEST_CANARY": canary}
    return Cli("root" if IS_ROOT else "user", prefix, env)


def wait_for(predicate: Callable[[], Any], what: str, limit: float = 30.0) -> Any:
    """Polls until `predicate()` is truthy (bounded: a liveness check, not a speed check)."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, f"gave up waiting for {what}"
            return value
        time.sleep(0.02)


#: Runs argv[1:] (as root) in a new user namespace mapping 0..65535 to host 100000..165535, as
#: uid IN_USERNS_UID inside; with IN_USERNS_NO_NESTING=1 it first sets that namespace's
#: max_user_namespaces to 0, i.e. a kernel that refuses user namespaces. Host state is untouched:
#: both the mapping and the sysctl belong to the new namespace.
IN_USERNS = textwrap.dedent('''\
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if libc.unshare(0x10000000) != 0:
            os._exit(90)
        os.write(ready_w, b"1")
        os.read(go_r, 1)
        if os.environ.get("IN_USERNS_NO_NESTING") == "1":
            with open("/proc/sys/user/max_user_namespaces", "w") as f:
                f.write("0")
        uid = int(os.environ["IN_USERNS_UID"])
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        os.execv(sys.argv[1], sys.argv[1:])
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write("0 100000 65536\\n")
    os.write(go_w, b"1")
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
''')


def run_in_userns(pkgdir: Path, argv: list[str], *, uid: int, no_nesting: bool = False
                  ) -> subprocess.CompletedProcess[str]:
    """Runs `argv` inside a fresh user namespace (see IN_USERNS) with the package importable."""
    script = pkgdir / "in_userns.py"
    script.write_text(IN_USERNS)
    script.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pkgdir), "IN_USERNS_UID": str(uid),
           "IN_USERNS_NO_NESTING": "1" if no_nesting else "0"}
    return subprocess.run(["/usr/bin/python3", str(script), *argv], check=False,
                          capture_output=True, text=True, env=env, timeout=WORKER_DEADLINE, cwd="/")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many of this process's runs pre-created cells served (the rest: cold path)."""
    import cellblock.cells

    s = cellblock.cells.stats()
    terminalreporter.write_line(f"cellblock cells (in-process runs): {s.hits} served by a ready "
                                f"cell, {s.misses} cold, {s.built} built, {s.failed} failed")


#: Prepended to the scripts a `Caller` runs: what test code inside them needs (no pytest there).
CALLER_PRELUDE = textwrap.dedent('''\
    import contextlib, errno, json, os, sys, time
    import cellblock
    from cellblock.session import Sandbox

    class Raised:
        value = None

    @contextlib.contextmanager
    def raises(cls):
        got = Raised()
        try:
            yield got
        except cls as e:
            got.value = e
        else:
            raise AssertionError(f"{cls.__name__} was not raised")
''')


class Caller:
    """Runs test code in a fresh process as one caller identity: this process's user, or
    uid 65534 through setpriv (with its world-readable package copy)."""

    def __init__(self, name: str, nobody_dir: Path | None) -> None:
        self.name = name
        self.nobody_dir = nobody_dir
        #: The caller is real root (cgroups, a freezer).
        self.privileged = name == "self" and IS_ROOT

    def run(self, source: str, *args: str) -> Any:
        """Runs `source` (its asserts are the test) after CALLER_PRELUDE, with `args` as
        sys.argv[1:]; fails with its stderr unless it exits 0. Returns the JSON of its last
        stdout line, if it prints one."""
        code = CALLER_PRELUDE + textwrap.dedent(source)
        env = {"PATH": "/usr/bin:/bin"}
        if self.name == "nobody":
            assert self.nobody_dir is not None
            argv = [*SETPRIV, "env", "-i", f"PYTHONPATH={self.nobody_dir}", "PATH=/usr/bin:/bin",
                    "/usr/bin/python3", "-c", code, *args]
        else:
            argv = [sys.executable, "-c", code, *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_DEADLINE,
                             cwd="/", env=env, check=False)
        assert res.returncode == 0, f"as {self.name}:\n{res.stderr[-4000:]}"
        lines = res.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else None


@pytest.fixture(params=["self", "nobody"], ids=["root" if IS_ROOT else "user", "nobody"])
def caller(request: pytest.FixtureRequest) -> Caller:
    """Each caller identity, running test code in its own process (see `Caller`)."""
    if request.param == "nobody":
        return Caller("nobody", request.getfixturevalue("nobody_dir"))
    return Caller("self", None)


def run_json_script(identity: str, nobody_dir: Path | None, script: str,
                    spec: dict[str, Any]) -> dict[str, Any]:
    """Runs `script` (given `spec` as JSON in argv[1]) in a process of its own as this user
    ("self") or as uid 65534 ("nobody", with the Debian python and the copy in `nobody_dir`),
    one ready cell at most, and returns the JSON it prints."""
    env = {"PATH": "/usr/bin:/bin", "CELLBLOCK_POOL_SIZE": "1"}
    arg = json.dumps(spec)
    if identity == "nobody":
        assert nobody_dir is not None
        argv = [*SETPRIV, "env", "-i", f"PYTHONPATH={nobody_dir}", "CELLBLOCK_POOL_SIZE=1",
                "PATH=/usr/bin:/bin", "/usr/bin/python3", "-c", script, arg]
    else:
        argv = [sys.executable, "-c", script, arg]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_DEADLINE,
                         cwd="/", env=env, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out: dict[str, Any] = json.loads(res.stdout)
    return out

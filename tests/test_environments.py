"""Environments (cellblock.environments): built once inside a sandbox from package sources the
test serves on 127.0.0.1 (a PEP 503 index of wheels made here), cached content-addressed, and
mounted read-only into runs. Offline: pip's sources are pointed at the local index through
PIP_INDEX_URL (the machine's pip configuration, as a build reads it)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envfixtures import (
    apt_config,
    deb_repo,
    make_deb,
    make_wheel,
    serve,
    simple_index,
    world_readable_dir,
)

import cellblock
from cellblock.cli import main as cli_main
from cellblock.environments import sources
from cellblock.environments.build import _sandboxed, _unpack_tar, build, build_python
from cellblock.environments.spec import EnvironmentSpec
from cellblock.environments.store import Store, tree_digest
from cellblock.errors import (
    CorruptEnvironment,
    EnvironmentBuildError,
    EnvironmentNotFound,
    InvalidSpec,
    PackageNotFound,
    SourceUnreachable,
)
from conftest import IS_ROOT, SETPRIV

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def index() -> Iterator[tuple[Path, str]]:
    """A PEP 503 index with `cbgreet` 1.0 and 2.0 and `cbmath` 1.0, served on 127.0.0.1."""
    base = world_readable_dir("cellblock-envidx-")
    wheels = [
        make_wheel(base, "cbgreet", "1.0", "GREETING = 'hello from cbgreet 1.0'\n"),
        make_wheel(base, "cbgreet", "2.0", "GREETING = 'hello from cbgreet 2.0'\n"),
        make_wheel(base, "cbmath", "1.0", "def double(x):\n    return 2 * x\n"),
    ]
    simple_index(base / "idx", wheels)
    try:
        with serve(base / "idx") as url:
            yield base, url
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def store(index: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """A fresh store (outside /tmp, world-readable), with pip configured for the local index."""
    data = world_readable_dir("cellblock-envstore-")
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    monkeypatch.setenv("PIP_INDEX_URL", f"{index[1]}/simple")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    try:
        yield Store()
    finally:
        shutil.rmtree(data, ignore_errors=True)


def declare(**fields: Any) -> EnvironmentSpec:
    fields.setdefault("name", "demo")
    return EnvironmentSpec.build(**fields)


def snapshot(store: Store) -> dict[str, Any]:
    """Everything in the store that a failed build must leave as it was."""
    out: dict[str, Any] = {}
    for sub in ("layers", "names", "tmp"):
        d = store.root / sub
        out[sub] = sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.is_dir() else []
    return out


DEMO = {"pip": ["cbgreet==1.0", "cbmath"], "files": {"conf/app.txt": "config-v1"},
        "env": {"APP_MODE": "batch"}}

PROBE = textwrap.dedent("""\
    import json, os, cbgreet, cbmath
    print(json.dumps({"greeting": cbgreet.GREETING, "double": cbmath.double(21),
                      "where": cbgreet.__file__, "mode": os.environ.get("APP_MODE"),
                      "conf": open(os.environ["CELLBLOCK_ENV_FILES"] + "/conf/app.txt").read()}))
""")


def test_build_then_run_imports_the_packages(store: Store) -> None:
    result = build(declare(**DEMO), store)
    assert [s.step for s in result.steps] == ["pip", "files"]
    assert not any(s.cached for s in result.steps)
    res = cellblock.run(["python3", "-c", PROBE], environment="demo")
    assert res.ok, res.stderr
    got = json.loads(res.stdout)
    assert got["greeting"] == "hello from cbgreet 1.0" and got["double"] == 42
    assert got["where"].startswith(str(store.layers)), got["where"]
    assert got["mode"] == "batch" and got["conf"] == "config-v1"
    # Without the environment the package is not there.
    plain = cellblock.run(["python3", "-c", "import cbgreet"])
    assert plain.exit_code == 1 and "ModuleNotFoundError" in plain.stderr
    # A session takes it too (its warm Python included).
    with cellblock.Sandbox(environment="demo") as sb:
        assert sb.run(["python3", "-c", PROBE]).ok
        code = sb.run_python("import cbmath\nprint(cbmath.double(5))")
        assert code.stdout.strip() == "10", code
    # The async API too.
    async def in_aio() -> tuple[str, str]:
        from cellblock import aio

        one = await aio.run(["python3", "-c", "import cbgreet"], environment="demo")
        async with aio.Sandbox(environment="demo") as asb:
            two = await asb.run(["python3", "-c", "import cbmath; print(cbmath.double(3))"])
        return one.stderr, two.stdout.strip()

    assert asyncio.run(in_aio()) == ("", "6")
    # And a batch, through its policy.
    jobs = [cellblock.Job(argv=["python3", "-c", "import cbmath; print(cbmath.double(4))"])]
    outcome = cellblock.run_many(jobs, policy=cellblock.Policy(environment="demo"))
    assert outcome[0].stdout.strip() == "8", outcome


def test_rebuild_is_a_noop_and_a_change_reuses_unchanged_layers(store: Store) -> None:
    first = build(declare(**DEMO), store)
    inodes = {s.key: (store.layer_dir(s.key) / "manifest.json").stat().st_ino
              for s in first.steps}
    again = build(declare(**DEMO), store)
    assert all(s.cached for s in again.steps)
    assert again.record.id == first.record.id
    assert {s.key: (store.layer_dir(s.key) / "manifest.json").stat().st_ino
            for s in again.steps} == inodes  # nothing was rewritten

    # A changed file: the pip layer is reused, the files layer rebuilt.
    changed = build(declare(**{**DEMO, "files": {"conf/app.txt": "config-v2"}}), store)
    assert [(s.step, s.cached) for s in changed.steps] == [("pip", True), ("files", False)]
    assert changed.steps[0].key == first.steps[0].key
    # A changed pip list: its layer and every layer above it are new.
    upgraded = build(declare(**{**DEMO, "pip": ["cbgreet==2.0", "cbmath"]}), store)
    assert [s.cached for s in upgraded.steps] == [False, False]
    res = cellblock.run(["python3", "-c", PROBE], environment="demo")
    assert json.loads(res.stdout)["greeting"] == "hello from cbgreet 2.0"


def test_unknown_package_is_a_typed_error_and_the_cache_is_unchanged(store: Store) -> None:
    build(declare(**DEMO), store)
    before = snapshot(store)
    record = store.record("demo")
    with pytest.raises(PackageNotFound, match="no-such-package"):
        build(declare(**{**DEMO, "pip": ["cbgreet==1.0", "no-such-package"]}), store)
    assert snapshot(store) == before
    assert store.record("demo") == record  # the old environment still stands
    assert cellblock.run(["python3", "-c", PROBE], environment="demo").ok


def test_unreachable_source_is_a_typed_error(store: Store, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    with pytest.raises(SourceUnreachable):
        build(declare(pip=["cbgreet"]), store)
    assert snapshot(store)["layers"] == [] and snapshot(store)["names"] == []


def test_the_build_sandbox_reaches_only_the_package_sources(store: Store,
                                                            index: tuple[Path, str]) -> None:
    """The allowlist of a pip step is the configured index and nothing else: from inside the
    build sandbox the index answers and another server on the host's loopback does not."""
    src = sources.pip_sources(build_python())
    port = index[1].rsplit(":", 1)[1]
    assert src.allow() == [f"127.0.0.1:{port}"]
    other = world_readable_dir("cellblock-envother-")
    (other / "secret.txt").write_text("not for builds")
    try:
        with serve(other) as other_url:
            probe = textwrap.dedent("""\
                import sys, urllib.request
                for url in sys.argv[1:]:
                    try:
                        urllib.request.urlopen(url, timeout=5).read()
                        print("reached", url)
                    except OSError as e:
                        print("blocked", url, e)
            """)
            out = _sandboxed("probe", 'python3 -c "$0" "$@"'.replace("$0", "$PROBE"),
                             [f"{index[1]}/simple/cbmath/", f"{other_url}/secret.txt"],
                             allow=src.allow(), env={"PROBE": probe}).decode()
    finally:
        shutil.rmtree(other, ignore_errors=True)
    assert f"reached {index[1]}/simple/cbmath/" in out, out
    assert f"blocked {other_url}/secret.txt" in out, out


def test_interrupted_build_leaves_nothing(store: Store, index: tuple[Path, str]) -> None:
    """The build process is killed while pip downloads a wheel (the server holds it): no layer
    and no record appear, and the next build completes and clears the leftovers."""
    gate, arrived = threading.Event(), threading.Event()
    with serve(index[0] / "idx", gate=gate, arrived=arrived) as url:
        code = textwrap.dedent("""\
            from cellblock.environments.build import build
            from cellblock.environments.spec import EnvironmentSpec
            build(EnvironmentSpec.build(name="demo", pip=["cbmath"]))
        """)
        env = {**os.environ, "PIP_INDEX_URL": f"{url}/simple",
               "PYTHONPATH": f"{REPO / 'python'}:{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not arrived.is_set():
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the build never reached the download"
                time.sleep(0.05)
            assert [p.name for p in (store.root / "tmp").iterdir()]  # the layer in the making
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(30)
            if proc.stderr:
                proc.stderr.close()
    snap = snapshot(store)
    assert snap["layers"] == [] and snap["names"] == [], snap
    with pytest.raises(EnvironmentNotFound):
        cellblock.run(["true"], environment="demo")
    build(declare(pip=["cbmath"]), store)
    assert snapshot(store)["tmp"] == []
    assert cellblock.run(["python3", "-c", "import cbmath"], environment="demo").ok


def test_corrupt_cache_entries_are_detected_and_never_used(store: Store) -> None:
    result = build(declare(**DEMO), store)
    pip_key = result.steps[0].key
    layer = store.layer_dir(pip_key)
    # Tampered contents: found by a verify and by the next build, which rebuilds the layer.
    target = next((layer / "root" / "site-packages" / "cbgreet").glob("__init__.py"))
    target.chmod(0o644)
    target.write_text("GREETING = 'tampered'\n")
    with pytest.raises(CorruptEnvironment, match="do not match"):
        store.verify_layer(pip_key)
    rebuilt = build(declare(**DEMO), store)
    assert not rebuilt.steps[0].cached
    store.verify_layer(pip_key)
    # A tampered manifest: runs refuse the environment (typed), and so does inspect.
    manifest = layer / "manifest.json"
    data = json.loads(manifest.read_text())
    data["tree"] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(CorruptEnvironment, match="manifest digest"):
        cellblock.run(["python3", "-c", PROBE], environment="demo")
    with pytest.raises(CorruptEnvironment):
        cellblock.Sandbox(environment="demo")
    # A record that is not JSON.
    (store.root / "names" / "demo.json").write_text("{")
    with pytest.raises(CorruptEnvironment):
        cellblock.run(["true"], environment="demo")


def test_unknown_environment_name(store: Store) -> None:
    with pytest.raises(EnvironmentNotFound, match="nope"):
        cellblock.run(["true"], environment="nope")
    with pytest.raises(EnvironmentNotFound):
        cellblock.Sandbox(environment="nope")
    with pytest.raises(InvalidSpec):
        cellblock.run(["true"], environment="../escape")


def test_bad_declarations_are_typed(tmp_path: Path) -> None:
    bad: list[dict[str, Any]] = [
        {"name": "../x"}, {"name": "ok", "pip": "cbgreet"},
        {"name": "ok", "pip": ["--index-url=x"]},
        {"name": "ok", "files": {"../escape": "x"}}, {"name": "ok", "files": {"/etc/x": "x"}},
        {"name": "ok", "env": {"PATH": "/x"}}, {"name": "ok", "colour": "blue"},
        {"name": "ok", "files": {"a": {"content": "x", "source": "/etc/hostname"}}},
    ]
    for fields in bad:
        with pytest.raises(InvalidSpec):
            EnvironmentSpec.build(**fields)
    toml = tmp_path / "env.toml"
    toml.write_text('name = "t"\npip = ["a"]\n[files]\n"x/y" = { source = "data.txt" }\n')
    spec = EnvironmentSpec.from_toml(toml)
    assert spec.files["x/y"].source == str(tmp_path / "data.txt")
    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(InvalidSpec):
        EnvironmentSpec.from_toml(tmp_path / "broken.toml")


def test_a_root_filesystem_base_is_the_runs_root(store: Store) -> None:
    # A base of dash + cat with their libraries: the run's root is that tree (the host's /usr
    # is not there), the files layer is bound on it, and packages on such a base are refused.
    top = world_readable_dir("cellblock-envbase-")
    tree = top / "tree"
    for binary in ("/bin/dash", "/bin/cat"):
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
        for path in [binary, *re.findall(r"(/\S+\.so[^\s]*)", ldd)]:
            dst = tree / path.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dst)
    for d in ("etc", "tmp", "proc", "dev", "workspace"):
        (tree / d).mkdir(exist_ok=True)
    build(declare(base=str(tree), files={"note.txt": {"content": "on the base\n"}}), store)
    res = cellblock.run(["/bin/dash", "-c", 'cat "$CELLBLOCK_ENV_FILES/note.txt"; '
                         "test -e /usr/bin/python3 && echo HOST-USR-VISIBLE; echo done"],
                        environment="demo")
    assert (res.reason, res.exit_code) == ("exited", 0), (res.reason, res.stderr)
    assert res.stdout == "on the base\ndone\n", res.stdout
    with pytest.raises(InvalidSpec, match="give one of them"):
        cellblock.run(["/bin/true"], environment="demo", rootfs=str(tree))
    with pytest.raises(EnvironmentBuildError, match="not supported"):
        build(declare(name="withpip", base=str(tree), pip=["cbgreet"]), store)


ATTACK = textwrap.dedent("""\
    import json, os, subprocess, sys
    site = [p for p in os.environ["PYTHONPATH"].split(":") if p.endswith("site-packages")][0]
    files = os.environ["CELLBLOCK_ENV_FILES"]
    pkg = os.path.join(site, "cbgreet", "__init__.py")

    def attempt(fn, *args):
        try:
            fn(*args)
            return "succeeded"
        except OSError as e:
            return e.strerror

    def append(path):
        with open(path, "a") as f:
            f.write("x")

    def create(path):
        with open(path, "x") as f:
            f.write("x")

    out = {"uid": os.getuid(), "results": {
        "append_module": attempt(append, pkg),
        "truncate_module": attempt(os.truncate, pkg, 0),
        "create_module": attempt(create, os.path.join(site, "evil.py")),
        "unlink_module": attempt(os.unlink, pkg),
        "rename_module": attempt(os.rename, pkg, pkg + ".bak"),
        "chmod_module": attempt(os.chmod, pkg, 0o777),
        "mkdir_in_layer": attempt(os.mkdir, os.path.join(files, "newdir")),
        "overwrite_file": attempt(append, os.path.join(files, "conf", "app.txt")),
        "utime": attempt(os.utime, pkg, (0, 0)),
        "symlink": attempt(os.symlink, "/etc/passwd", os.path.join(site, "link")),
    }}
    mount = subprocess.run(["mount", "-o", "remount,rw", site], capture_output=True, text=True)
    out["remount_rw"] = "succeeded" if mount.returncode == 0 else mount.stderr.strip()[:200]
    print(json.dumps(out))
""")


def _python_of(request: pytest.FixtureRequest, caller: str) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment of a Python process of this user or of uid 65534,
    importing this tree's cellblock."""
    if caller == "nobody":
        pkgdir = request.getfixturevalue("nobody_dir")
        prefix = [*SETPRIV, "env", "-i", f"PYTHONPATH={pkgdir}", "PATH=/usr/bin:/bin",
                  "/usr/bin/python3"]
        return prefix, {"PATH": "/usr/bin:/bin"}
    return [sys.executable], {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "python")}


@pytest.mark.parametrize("caller", ["self", "nobody"],
                         ids=["caller-root" if IS_ROOT else "caller-user", "caller-65534"])
def test_a_run_cannot_modify_the_environment(store: Store, request: pytest.FixtureRequest,
                                             caller: str) -> None:
    """Writes into the environment from inside a run fail, as root of the sandbox, whoever the
    caller (this user, or uid 65534 whose sandbox root is uid 65534 on the host); the layers'
    contents are unchanged after."""
    result = build(declare(**DEMO), store)
    before = {s.key: tree_digest(store.layer_dir(s.key) / "root") for s in result.steps}
    argv = ["python3", "-c", ATTACK]
    code = textwrap.dedent("""\
        import json, os, sys
        os.environ["XDG_DATA_HOME"] = sys.argv[1]
        import cellblock
        res = cellblock.run(json.loads(sys.argv[2]), environment="demo", profile="none")
        assert res.exit_code == 0, res.stderr
        print(res.stdout.strip().splitlines()[-1])
    """)
    prefix, env = _python_of(request, caller)
    proc = subprocess.run([*prefix, "-c", code, os.environ["XDG_DATA_HOME"], json.dumps(argv)],
                          capture_output=True, text=True, env=env, cwd="/", timeout=180,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["uid"] == 0  # root of the sandbox (mapped to the caller's uid)
    for what, outcome in got["results"].items():
        assert outcome != "succeeded", (what, got)
        assert outcome in ("Read-only file system", "Permission denied",
                           "Operation not permitted"), (what, outcome)
    assert got["remount_rw"] != "succeeded", got
    after = {s.key: tree_digest(store.layer_dir(s.key) / "root") for s in result.steps}
    assert after == before


def test_cli_build_ls_inspect_rm(store: Store, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", None)
    capsys = capfd
    decl = tmp_path / "env.toml"
    (tmp_path / "words.txt").write_text("alpha beta\n")
    decl.write_text(textwrap.dedent("""\
        name = "cli-env"
        pip = ["cbmath"]
        [files]
        "words.txt" = { source = "words.txt" }
        [env]
        GREETING = "hi"
    """))
    assert cli_main(["env", "build", "--json", "-q", str(decl)]) == 0
    built = json.loads(capsys.readouterr().out)
    assert [s["cached"] for s in built["steps"]] == [False, False]
    assert cli_main(["env", "build", "--json", "-q", str(decl)]) == 0
    assert [s["cached"] for s in json.loads(capsys.readouterr().out)["steps"]] == [True, True]
    assert cli_main(["env", "ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in listed] == ["cli-env"]
    assert cli_main(["env", "inspect", "--verify", "cli-env"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] and [la["step"] for la in info["layers"]] == ["pip", "files"]
    # `run --env NAME` (and --env K=V alongside it).
    assert cli_main(["run", "--env", "cli-env", "--env", "X=1", "--", "sh", "-c",
                     'python3 -c "import cbmath" && cat "$CELLBLOCK_ENV_FILES/words.txt" '
                     '&& echo "$GREETING$X"']) == 0
    assert capsys.readouterr().out.split() == ["alpha", "beta", "hi1"]
    assert cli_main(["env", "rm", "cli-env"]) == 0
    capsys.readouterr()
    assert store.names() == [] and list(store.layers.iterdir()) == []
    with pytest.raises(SystemExit) as status:
        cli_main(["run", "--env", "cli-env", "--", "true"])
    assert status.value.code == 2
    assert "cellblock: error: EnvironmentNotFound:" in capsys.readouterr().err


def _npm_tarball(dest: Path) -> Path:
    pkg = dest / "npmpkg"
    (pkg / "package").mkdir(parents=True)
    (pkg / "package" / "package.json").write_text(
        json.dumps({"name": "cb-left", "version": "1.0.0", "main": "index.js"}))
    (pkg / "package" / "index.js").write_text("module.exports = (s) => '<' + s;\n")
    tgz = dest / "cb-left-1.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(pkg / "package", arcname="package")
    tgz.chmod(0o644)
    return tgz


def test_npm_packages_from_a_local_tarball(store: Store, index: tuple[Path, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """npm is on this machine but no registry is: a local package tarball installs offline
    (the registry, npm's configured one, is allowed but never needed)."""
    if shutil.which("npm") is None:
        with pytest.raises(EnvironmentBuildError, match="npm"):
            build(declare(npm=["cb-left"]), store)
        return
    tgz = _npm_tarball(index[0])
    build(declare(npm=[str(tgz)]), store)
    res = cellblock.run(["node", "-e", "console.log(require('cb-left')('x'))"],
                        environment="demo")
    assert res.ok, res.stderr
    assert res.stdout.strip() == "<x"


def test_npm_missing_is_a_typed_error(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EnvironmentBuildError, match="npm packages need npm"):
        build(declare(npm=["cb-left"]), store)


def test_debian_packages_from_a_local_repository(store: Store,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A .deb made with dpkg-deb, indexed with dpkg-scanpackages and served on 127.0.0.1 (this
    machine's apt configuration pointed at it through APT_CONFIG): apt downloads it inside the
    build sandbox, dpkg-deb extracts it into the layer, and a run finds its program on PATH.
    Unknown packages and an unreachable repository are typed errors; the cache is unchanged."""
    base = world_readable_dir("cellblock-envdeb-")
    try:
        deb = make_deb(base, "cbtool", "1.0", "#!/bin/sh\necho hello from cbtool\n")
        deb_repo(base / "repo", [deb])
        with serve(base / "repo") as url:
            monkeypatch.setenv("APT_CONFIG", str(apt_config(base, url)))
            assert sources.apt_sources().allow() == [url.removeprefix("http://")]
            result = build(declare(apt=["cbtool"], pip=["cbmath"]), store)
            assert [s.step for s in result.steps] == ["apt", "pip"]
            res = cellblock.run(["sh", "-c", "cbtool && python3 -c 'import cbmath'"],
                                environment="demo")
            assert res.ok, res.stderr
            assert res.stdout.strip() == "hello from cbtool"
            assert not cellblock.run(["sh", "-c", "command -v cbtool"]).ok  # not without it
            before = snapshot(store)
            with pytest.raises(PackageNotFound, match="no-such-deb"):
                build(declare(apt=["no-such-deb"]), store)
            assert snapshot(store) == before
        # The server is gone: the same source no longer answers.
        with pytest.raises(SourceUnreachable):
            build(declare(apt=["cbtool", "cbtool2"]), store)
        assert snapshot(store) == before
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("caller", ["self", "nobody"],
                         ids=["caller-root" if IS_ROOT else "caller-user", "caller-65534"])
def test_renames_between_directories_inside_a_run(request: pytest.FixtureRequest,
                                                  caller: str) -> None:
    """What apt does with every download (partial/X -> X) works in a run, whoever the caller:
    the run's Landlock domain allows reparenting (it refused it with EXDEV before)."""
    code = textwrap.dedent("""\
        import cellblock
        res = cellblock.run(["python3", "-c", (
            "import os; os.makedirs('/workspace/a/partial'); "
            "open('/workspace/a/partial/x', 'w').write('1'); "
            "os.rename('/workspace/a/partial/x', '/workspace/a/x'); "
            "os.link('/workspace/a/x', '/workspace/a/partial/y'); print('ok')")])
        assert res.stdout.strip() == "ok", res.stderr
    """)
    prefix, env = _python_of(request, caller)
    proc = subprocess.run([*prefix, "-c", code], capture_output=True, text=True, env=env,
                          cwd="/", timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
            link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info


def test_a_build_output_cannot_leave_its_layer(tmp_path: Path) -> None:
    """What a build sandbox sends back is untrusted: paths out of the layer fail the step
    (absolute ones are made relative);
    links out of it and device nodes are dropped; setuid bits and group/other write go."""
    absolute = tmp_path / "abs"
    absolute.mkdir()
    _unpack_tar(_tar([(_member("/abs/escape"), b"x")]), absolute)
    assert (absolute / "abs" / "escape").read_bytes() == b"x"  # made relative: stays inside
    for bad in ("../escape", "a/../../escape"):
        dest = tmp_path / f"d{abs(hash(bad))}"
        dest.mkdir()
        with pytest.raises(EnvironmentBuildError):
            _unpack_tar(_tar([(_member(bad), b"x")]), dest)
        assert not (tmp_path / "escape").exists()
    dest = tmp_path / "ok"
    dest.mkdir()
    _unpack_tar(_tar([
        (_member("bin/tool", mode=0o6777), b"#!/bin/sh\n"),
        (_member("bin/abs", tarfile.SYMTYPE, link="/etc/alternatives/x"), b""),
        (_member("bin/out", tarfile.SYMTYPE, link="../../../etc/passwd"), b""),
        (_member("bin/rel", tarfile.SYMTYPE, link="tool"), b""),
        (_member("dev/disk", tarfile.BLKTYPE, mode=0o666), b""),
        (_member("dev/fifo", tarfile.FIFOTYPE), b""),
    ]), dest)
    assert sorted(p.name for p in (dest / "bin").iterdir()) == ["rel", "tool"]
    assert not (dest / "dev" / "disk").exists() and not (dest / "dev" / "fifo").exists()
    assert (dest / "bin" / "tool").stat().st_mode & 0o7777 == 0o755
    assert os.readlink(dest / "bin" / "rel") == "tool"


@pytest.mark.parametrize("caller", ["self", "nobody"],
                         ids=["caller-root" if IS_ROOT else "caller-user", "caller-65534"])
def test_removing_an_environment_in_use_keeps_its_layers_for_the_session(
        store: Store, request: pytest.FixtureRequest, caller: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`cellblock env rm` while a session (of this user or of uid 65534) uses the environment:
    the name is gone at once (a new run is refused with EnvironmentNotFound), but the layers
    the session holds stay whole (its next call imports from them, after the rm) until it
    closes; the next collect then removes them."""
    result = build(declare(**DEMO), store)
    keys = sorted(s.key for s in result.steps)
    code = textwrap.dedent("""\
        import json, os, sys
        os.environ["XDG_DATA_HOME"] = sys.argv[1]
        import cellblock
        out = {}
        with cellblock.Sandbox(environment="demo") as sb:
            out["before"] = sb.run(["python3", "-c", sys.argv[2]]).stdout
            print("READY", flush=True)
            sys.stdin.readline()  # the environment is removed meanwhile
            res = sb.run(["python3", "-c", sys.argv[2]])
            out["after"], out["stderr"] = res.stdout, res.stderr
            try:
                cellblock.run(["true"], environment="demo")
                out["new_run"] = "started"
            except cellblock.CellblockError as e:
                out["new_run"] = type(e).__name__
        print(json.dumps(out), flush=True)
    """)
    prefix, env = _python_of(request, caller)
    proc = subprocess.Popen([*prefix, "-c", code, os.environ["XDG_DATA_HOME"], PROBE],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd="/")
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline()
        assert ready.strip() == "READY", ready + proc.communicate(timeout=60)[1][-3000:]
        assert cli_main(["env", "rm", "demo"]) == 0
        assert capsys.readouterr().out == (  # every layer is in use: kept
            "removed demo (0 unused layer(s) freed; 2 kept while a run or session uses "
            "them, freed by a later 'cellblock env gc')\n")
        assert store.names() == []
        assert sorted(p.name for p in store.layers.iterdir()) == keys
        stdout, stderr = proc.communicate("go\n", timeout=180)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["after"] == out["before"], out["stderr"]
    assert json.loads(out["after"])["greeting"] == "hello from cbgreet 1.0"
    assert out["new_run"] == "EnvironmentNotFound"
    # The session is closed: its layers are unused, and the next collect removes them.
    assert cli_main(["env", "gc"]) == 0
    assert capsys.readouterr().out == "2 unused layer(s) freed\n"
    assert list(store.layers.iterdir()) == []


def test_a_run_starting_while_its_environment_is_removed_is_refused(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The removal lands between a run resolving the environment and holding its layers: the
    hold sees the layer moved away and refuses with EnvironmentNotFound (it never starts on
    a layer being deleted)."""
    import fcntl

    from cellblock.environments import runtime

    build(declare(**DEMO), store)
    real = fcntl.flock
    raced: list[list[str]] = []

    def remove_first(fd: int, op: int) -> None:
        if op == fcntl.LOCK_SH and not raced:
            raced.append(store.remove("demo"))
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", remove_first)
    with pytest.raises(EnvironmentNotFound, match="removed while a run was starting"):
        runtime.hold("demo")
    assert raced and raced[0], "the removal ran, and removed the layers"
    monkeypatch.setattr(fcntl, "flock", real)
    with pytest.raises(EnvironmentNotFound):
        cellblock.run(["true"], environment="demo")


def test_a_ready_cell_never_serves_an_environment_built_again(store: Store) -> None:
    """A cell is built with the environment's layers bound in and waits for a run of that
    shape. The environment is removed (its layers deleted: the cell's binds are empty now) and
    built again at the same store paths: the next run gets the new layers, never that cell
    (it imported nothing: ModuleNotFoundError)."""
    import cellblock.cells

    build(declare(**DEMO), store)
    probe = ["python3", "-c", PROBE]
    ready_before = cellblock.cells.stats().ready
    for _ in range(2):  # the second run of the shape asks the pool for cells of it
        res = cellblock.run(probe, environment="demo")
        assert res.ok, res.stderr
    deadline = time.monotonic() + 60
    while cellblock.cells.stats().ready <= ready_before:
        assert time.monotonic() < deadline, cellblock.cells.stats()
        time.sleep(0.1)
    assert store.remove("demo")  # nothing holds the layers: deleted
    build(declare(**DEMO), store)
    res = cellblock.run(probe, environment="demo")
    assert res.ok, res.stderr
    assert json.loads(res.stdout)["greeting"] == "hello from cbgreet 1.0"


FILES_ONLY = {"files": {"conf/app.txt": "config-v1"}, "env": {"APP_MODE": "batch"}}
READ_CONF = ["/bin/sh", "-c", 'cat "$CELLBLOCK_ENV_FILES/conf/app.txt"; echo " $APP_MODE"']


def _session_process(request: pytest.FixtureRequest, caller: str,
                     code: str) -> subprocess.Popen[str]:
    """`code` in a process of this user or of uid 65534, given the store and READ_CONF."""
    prefix, env = _python_of(request, caller)
    return subprocess.Popen(
        [*prefix, "-c", code, os.environ["XDG_DATA_HOME"], json.dumps(READ_CONF)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd="/")


_FORK_AFTER_RM = textwrap.dedent("""\
    import json, os, sys
    os.environ["XDG_DATA_HOME"] = sys.argv[1]
    import cellblock
    argv, out = json.loads(sys.argv[2]), {}
    parent = cellblock.Sandbox(environment="demo")
    out["parent"] = parent.run(argv).stdout
    parent.write_file("/workspace/note.txt", "from the parent")
    print("READY", flush=True)
    sys.stdin.readline()  # the environment is removed meanwhile
    try:
        cellblock.Sandbox(environment="demo").close()
        out["new"] = "opened"
    except cellblock.CellblockError as e:
        out["new"] = type(e).__name__
    parent.prepare_fork()  # a spare session, opened ahead, is the parent's too
    spare = parent.fork()
    out["spare"] = spare.run(argv).stdout
    spare.close()
    child = parent.fork()
    parent.close()
    res = child.run(argv)
    out["child"], out["stderr"] = res.stdout, res.stderr
    out["note"] = child.read_file("/workspace/note.txt").decode()
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # a collect runs meanwhile
    print(json.dumps({"after_collect": child.run(argv).stdout}), flush=True)
    child.close()
""")


@pytest.mark.parametrize("caller", ["self", "nobody"],
                         ids=["caller-root" if IS_ROOT else "caller-user", "caller-65534"])
def test_a_fork_keeps_the_layers_its_parent_holds_after_env_rm(
        store: Store, request: pytest.FixtureRequest, caller: str) -> None:
    """`cellblock env rm` while a session (of this user or of uid 65534) lives, then the
    session forks (also through a spare session `prepare_fork` opened): the fork does not look
    the environment up by name (that is EnvironmentNotFound now) but uses the layers its
    parent holds, and holds them itself: they stay after the parent closes, a collect keeps
    them while the fork is open and frees them once it closes."""
    result = build(declare(**FILES_ONLY), store)
    keys = sorted(s.key for s in result.steps)
    proc = _session_process(request, caller, _FORK_AFTER_RM)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline()
        assert ready.strip() == "READY", ready + proc.communicate(timeout=60)[1][-3000:]
        assert store.remove("demo") == []  # every layer is in use: kept
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)[1][-3000:]
        out = json.loads(line)
        assert store.collect() == []  # the fork holds them
        assert sorted(p.name for p in store.layers.iterdir()) == keys
        stdout, stderr = proc.communicate("go\n", timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert out == {"parent": "config-v1 batch\n", "new": "EnvironmentNotFound",
                   "spare": "config-v1 batch\n", "child": "config-v1 batch\n",
                   "stderr": "", "note": "from the parent"}
    assert json.loads(stdout) == {"after_collect": "config-v1 batch\n"}
    assert store.collect() == keys
    assert list(store.layers.iterdir()) == []


_HOLD_THEN_READ = textwrap.dedent("""\
    import json, os, sys
    os.environ["XDG_DATA_HOME"] = sys.argv[1]
    import cellblock
    argv, out = json.loads(sys.argv[2]), []
    with cellblock.Sandbox(environment="demo") as sb:
        out.append(sb.run(argv).stdout)
        print("READY", flush=True)
        sys.stdin.readline()  # the layer is tampered with and rebuilt meanwhile
        res = sb.run(argv)
        out.append(res.stdout + res.stderr)
        print(json.dumps(out), flush=True)
        sys.stdin.readline()  # a collect runs meanwhile
""")


@pytest.mark.parametrize("caller", ["self", "nobody"],
                         ids=["caller-root" if IS_ROOT else "caller-user", "caller-65534"])
def test_rebuilding_a_corrupt_layer_keeps_the_one_a_session_holds(
        store: Store, request: pytest.FixtureRequest, caller: str) -> None:
    """A layer a session (of this user or of uid 65534) holds is tampered with; the next
    build replaces it (runs get the rebuilt one), but does not delete the held one under the
    session: its calls go on with the files it was opened with, and the old layer is freed
    by a collect once it closes."""
    result = build(declare(**FILES_ONLY), store)
    key = result.steps[0].key
    conf = store.layer_dir(key) / "root" / "conf" / "app.txt"
    proc = _session_process(request, caller, _HOLD_THEN_READ)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline()
        assert ready.strip() == "READY", ready + proc.communicate(timeout=60)[1][-3000:]
        conf.chmod(0o644)
        conf.write_text("tampered")
        rebuilt = build(declare(**FILES_ONLY), store)
        assert not rebuilt.steps[0].cached
        store.verify_layer(key)
        res = cellblock.run(READ_CONF, environment="demo")
        assert res.stdout == "config-v1 batch\n", res.stderr
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)[1][-3000:]
        # What the session was opened with, as it is now: never emptied under it.
        assert json.loads(line) == ["config-v1 batch\n", "tampered batch\n"]
        kept = store.unnamed_layers()
        assert [k.split(".replaced-")[0] for k in kept] == [key]
        assert store.collect() == []  # held
        _, stderr = proc.communicate("go\n", timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert store.collect() == kept
    assert [p.name for p in store.layers.iterdir()] == [key]
    assert cellblock.run(READ_CONF, environment="demo").stdout == "config-v1 batch\n"

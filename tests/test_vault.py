"""The credential vault: encrypted at rest, authenticated, write-only, per user, safe under
concurrent writers; its CLI; agent-scoped credentials reaching an agent's sandbox."""

from __future__ import annotations

import base64
import errno
import json
import os
import pty
import secrets
import select
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import cellblock
import cellblock.agent.loop as loop
from cellblock.agent import Agent
from cellblock.credentials import Credential
from cellblock.errors import InvalidSpec, VaultError
from cellblock.vault import Vault, _document_mac, _Keys, _Sealed
from cellblock.vault_key import create_key_file, encode_key, read_key_file
from conftest import IS_ROOT, NOBODY, SETPRIV, WORKER_DEADLINE


def secret_value() -> str:
    # Mixed characters, so that every encoding below differs from the others.
    return "tok-" + secrets.token_hex(12) + "-Zz9"


def cred(name: str, value: str, **kw: Any) -> Credential:
    return Credential(name=name, value=SecretStr(value), hosts=kw.pop("hosts", ["api.test"]), **kw)


@pytest.fixture
def home() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cellblock-vault-"))
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


def encodings(value: str) -> list[bytes]:
    """The value as stored naively: raw, base64 (every alignment), hex, UTF-16."""
    raw = value.encode()
    out = [raw, raw.hex().encode(), raw.hex().upper().encode(),
           value.encode("utf-16-le"), value.encode("utf-16-be")]
    for shift in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            # The stable middle of the base64 of the value at any offset in a larger buffer.
            out.append(enc(raw[shift:]).rstrip(b"=")[:-4])
    return out


def assert_no_plaintext(directory: Path, value: str) -> None:
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        for form in encodings(value):
            assert form not in data, f"{p} holds the value ({form[:12]!r}...)"


# -- storage --------------------------------------------------------------------------------


def test_round_trip_and_metadata(home: Path, key: bytes) -> None:
    v = Vault(home / "vault.json", key=key)
    gh, db = secret_value(), secret_value()
    v.add(cred("GH", gh, hosts=["api.github.com"], methods=["get", "HEAD"],
               header="Authorization"))
    v.add(cred("DB", db, hosts=["db.test:5432"], in_body=True))
    got = {c.name: c for c in Vault(home / "vault.json", key=key).resolve(["GH", "DB"])}
    assert got["GH"].value.get_secret_value() == gh
    assert got["DB"].value.get_secret_value() == db
    assert got["GH"].methods == ["GET", "HEAD"] and got["GH"].header == "Authorization"
    assert got["DB"].in_body and got["DB"].hosts == ["db.test:5432"]
    assert v.names() == ["DB", "GH"]
    with pytest.raises(VaultError, match="already in the vault"):
        v.add(cred("GH", "other"))
    v.add(cred("GH", "replaced"), replace=True)
    assert v.resolve(["GH"])[0].value.get_secret_value() == "replaced"
    v.remove("GH")
    assert v.names() == ["DB"]
    with pytest.raises(VaultError, match="no credential 'GH'"):
        v.resolve(["GH"])
    with pytest.raises(VaultError, match="no credential 'GH'"):
        v.remove("GH")
    assert stat.S_IMODE((home / "vault.json").stat().st_mode) == 0o600


def test_agent_scope(home: Path, key: bytes) -> None:
    v = Vault(home / "vault.json", key=key)
    v.add(cred("REVIEW_TOKEN", "r-value"), agent="reviewer")
    v.add(cred("SHARED", "session-value"))
    v.add(cred("SHARED", "agent-value"), agent="reviewer")
    v.add(cred("OTHER", "o-value"), agent="writer")
    mine = {c.name: c for c in v.resolve(agent="reviewer")}
    assert set(mine) == {"REVIEW_TOKEN", "SHARED"}
    assert mine["SHARED"].value.get_secret_value() == "agent-value"
    assert all(c.scope == "agent" for c in mine.values())
    # A session of the agent gets its own credentials plus the session ones it names.
    v.add(cred("GH", "gh-value"))
    assert {c.name for c in v.resolve(["GH"], agent="reviewer")} == {"REVIEW_TOKEN", "SHARED",
                                                                     "GH"}
    # Another agent's credential is not reachable, by agent or by name.
    with pytest.raises(VaultError, match="no credential 'OTHER'"):
        v.resolve(["OTHER"], agent="reviewer")
    with pytest.raises(VaultError, match="no credential 'OTHER'"):
        v.resolve(["OTHER"])
    assert v.resolve(["SHARED"])[0].value.get_secret_value() == "session-value"
    assert v.names("reviewer") == ["REVIEW_TOKEN", "SHARED"] and v.names() == ["GH", "SHARED"]
    with pytest.raises(VaultError, match="scope 'agent'"):
        v.add(cred("X", "x", scope="agent"))
    with pytest.raises(VaultError, match="agent name"):
        v.add(cred("X", "x"), agent="../etc")
    v.remove("SHARED", agent="reviewer")
    assert v.names("reviewer") == ["REVIEW_TOKEN"]


def test_vault_file_holds_no_plaintext(home: Path, key: bytes) -> None:
    values = [secret_value() for _ in range(3)]
    v = Vault(home / "data" / "vault.json", key=key)
    for i, value in enumerate(values):
        v.add(cred(f"C{i}", value), agent="a" if i == 2 else None)
    # The test's search finds the value where it is stored in any of these forms.
    probe = home / "probe"
    probe.write_bytes(b"x" + base64.b64encode(values[0].encode()) + values[0].encode("utf-16-le"))
    with pytest.raises(AssertionError):
        assert_no_plaintext(home, values[0])
    probe.unlink()
    for value in values:
        assert_no_plaintext(home / "data", value)
    assert stat.S_IMODE((home / "data").stat().st_mode) == 0o700


def test_wrong_key_leaves_the_file_as_it_was(home: Path, key: bytes) -> None:
    path = home / "vault.json"
    Vault(path, key=key).add(cred("GH", "gh-value"))
    before = path.read_bytes()
    wrong = Vault(path, key=secrets.token_bytes(32))
    for attempt in (wrong.list, lambda: wrong.resolve(["GH"]), lambda: wrong.add(cred("X", "x")),
                    lambda: wrong.remove("GH")):
        with pytest.raises(VaultError, match="key does not open the vault"):
            attempt()
    assert path.read_bytes() == before


def _edit(path: Path, key: bytes, change: Any, remac: bool) -> None:
    doc = json.loads(path.read_text())
    change(doc["entries"])
    if remac:  # as someone holding the key would: only the per-entry binding remains
        doc["mac"] = _document_mac(_Keys(key), [_Sealed(**e) for e in doc["entries"]])
    path.write_text(json.dumps(doc))


def _flip(entries: list[dict[str, Any]]) -> None:
    raw = bytearray(base64.b64decode(entries[0]["ciphertext"]))
    raw[3] ^= 1
    entries[0]["ciphertext"] = base64.b64encode(bytes(raw)).decode()


def _swap(entries: list[dict[str, Any]]) -> None:
    a, b = entries[0], entries[1]
    for k in ("nonce", "ciphertext"):
        a[k], b[k] = b[k], a[k]


def _widen(entries: list[dict[str, Any]]) -> None:
    entries[0]["hosts"].append("evil.test")


def _drop(entries: list[dict[str, Any]]) -> None:
    del entries[1]


@pytest.mark.parametrize("change", [_flip, _swap, _widen, _drop])
def test_tampering_is_refused_and_nothing_is_written(home: Path, key: bytes, change: Any) -> None:
    path = home / "vault.json"
    v = Vault(path, key=key)
    v.add(cred("AAA", "a-value"))
    v.add(cred("BBB", "b-value"))
    _edit(path, key, change, remac=False)
    tampered = path.read_bytes()
    with pytest.raises(VaultError, match="integrity check"):
        v.resolve(["AAA", "BBB"])
    with pytest.raises(VaultError, match="integrity check"):
        v.add(cred("CCC", "c-value"))
    with pytest.raises(VaultError, match="integrity check"):
        v.list()
    assert path.read_bytes() == tampered


@pytest.mark.parametrize("change", [_flip, _swap, _widen])
def test_each_value_opens_only_under_its_own_metadata(home: Path, key: bytes,
                                                      change: Any) -> None:
    """Even with the file's MAC recomputed, a value cannot be moved to another entry nor its
    hosts widened: the AEAD's associated data is the entry's metadata."""
    path = home / "vault.json"
    v = Vault(path, key=key)
    v.add(cred("AAA", "a-value"))
    v.add(cred("BBB", "b-value"))
    _edit(path, key, change, remac=True)
    with pytest.raises(VaultError, match="'AAA' does not open under its metadata"):
        v.resolve(["AAA"])


def test_truncated_or_garbage_file(home: Path, key: bytes) -> None:
    path = home / "vault.json"
    v = Vault(path, key=key)
    v.add(cred("AAA", "a-value"))
    full = path.read_bytes()
    for broken in (full[: len(full) // 2], b"", b"\x00" * 64, b"[]"):
        path.write_bytes(broken)
        with pytest.raises(VaultError, match="corrupt or truncated"):
            v.add(cred("BBB", "b-value"))
        with pytest.raises(VaultError, match="corrupt or truncated"):
            v.resolve(["AAA"])
        assert path.read_bytes() == broken


def test_a_failed_write_leaves_the_file_as_it_was(home: Path, key: bytes,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import cellblock.vault as vault_module

    path = home / "vault.json"
    v = Vault(path, key=key)
    v.add(cred("AAA", "a-value"))
    before = path.read_bytes()

    def full_disk(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vault_module.os, "replace", full_disk)
    with pytest.raises(VaultError, match=r"cannot write the vault .*No space left on device"):
        v.add(cred("BBB", "b-value"))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in home.iterdir()) == ["vault.json", "vault.json.lock"]
    assert v.names() == ["AAA"]


# -- the key --------------------------------------------------------------------------------


def test_key_file_modes(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = create_key_file(home / "cfg" / "vault.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(read_key_file(path)) == 32
    with pytest.raises(VaultError, match="exists"):
        create_key_file(path)
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(VaultError) as e:
            Vault(home / "v.json", key_file=path).add(cred("X", "x-value"))
        assert str(path) in str(e.value) and f"mode {mode:04o}" in str(e.value)
    path.chmod(0o600)
    assert not (home / "v.json").exists()  # nothing was written with a refused key
    link = home / "link.key"
    link.symlink_to(path)
    with pytest.raises(VaultError, match="cannot open key file"):
        read_key_file(link)
    with pytest.raises(VaultError, match="no vault key"):
        read_key_file(home / "missing.key")
    monkeypatch.setenv("CELLBLOCK_VAULT_KEY", "not-a-key")
    with pytest.raises(VaultError, match=r"\$CELLBLOCK_VAULT_KEY is not a vault key"):
        Vault(home / "v.json").list()
    monkeypatch.setenv("CELLBLOCK_VAULT_KEY", encode_key(read_key_file(path)))
    Vault(home / "v.json").add(cred("X", "x-value"))
    assert Vault(home / "v.json", key_file=path).names() == ["X"]


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_key_file_of_another_user_is_refused(home: Path) -> None:
    path = create_key_file(home / "vault.key")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(VaultError, match=f"belongs to uid {NOBODY}"):
        read_key_file(path)


# -- concurrency ----------------------------------------------------------------------------

ADDER = """
import sys
from pydantic import SecretStr
from cellblock.credentials import Credential
from cellblock.vault import Vault
v = Vault()
for i in range(int(sys.argv[2])):
    v.add(Credential(name=f"P{sys.argv[1]}_{i}", value=SecretStr(f"v{sys.argv[1]}-{i}"),
                     hosts=["h.test"]))
"""


def test_concurrent_adds_lose_nothing(home: Path, key: bytes) -> None:
    env = {**os.environ, "CELLBLOCK_VAULT": str(home / "vault.json"),
           "CELLBLOCK_VAULT_KEY": encode_key(key),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    procs, per = 6, 8
    running = [subprocess.Popen([sys.executable, "-c", ADDER, str(p), str(per)], env=env,
                                stderr=subprocess.PIPE) for p in range(procs)]
    for p in running:
        _, err = p.communicate(timeout=WORKER_DEADLINE)
        assert p.returncode == 0, err.decode()[-2000:]
    v = Vault(home / "vault.json", key=key)
    assert len(v.names()) == procs * per
    got = {c.name: c.value.get_secret_value()
           for c in v.resolve([f"P{p}_{i}" for p in range(procs) for i in range(per)])}
    assert got == {f"P{p}_{i}": f"v{p}-{i}" for p in range(procs) for i in range(per)}
    assert sorted(p.name for p in home.iterdir()) == ["vault.json", "vault.json.lock"]


# -- values never come out ------------------------------------------------------------------


def test_values_never_listed_or_printed(home: Path, key: bytes) -> None:
    value = secret_value()
    v = Vault(home / "vault.json", key=key)
    v.add(cred("GH", value, methods=["GET"]), agent="rev")
    texts = [repr(v), str(v), repr(v.list()), json.dumps([e.model_dump(mode="json")
                                                           for e in v.list()]),
             repr(v.names("rev")), repr(v.resolve(agent="rev")), str(v.resolve(agent="rev")),
             repr(v.resolve(agent="rev")[0].model_dump()), repr(v.__dict__)]
    for attempt in (lambda: v.add(cred("GH", value), agent="rev"),
                    lambda: v.resolve(["NOPE"], agent="rev"),
                    lambda: Vault(home / "vault.json", key=secrets.token_bytes(32)).list()):
        with pytest.raises(VaultError) as e:
            attempt()
        texts.append(str(e.value))
    for t in texts:
        for form in encodings(value):
            assert form.decode("latin-1") not in t
    assert "value" not in {k for e in v.list() for k in e.model_dump()}


def test_cli_reads_the_value_from_a_terminal_without_echo(home: Path) -> None:
    value = secret_value()
    env = {"PATH": "/usr/bin:/bin", "XDG_DATA_HOME": str(home / "data"),
           "XDG_CONFIG_HOME": str(home / "config"), "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-m", "cellblock.cli", "vault", "init"], env=env,
                          capture_output=True, check=False).returncode == 0
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a terminal of its own
        os.execve(sys.executable, [sys.executable, "-m", "cellblock.cli", "vault", "add", "GH",
                                   "--host", "h.test"], env)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        sent = False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if not sent and b"(not echoed): " in seen:
                os.write(fd, value.encode() + b"\n")
                sent = True
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen.decode(errors="replace")
    assert sent and b"added GH" in seen
    assert value.encode() not in seen
    got = Vault(home / "data" / "cellblock" / "vault.json",
                key_file=home / "config" / "cellblock" / "vault.key").resolve(["GH"])
    assert got[0].value.get_secret_value() == value


# -- CLI, as root and as uid 65534 ----------------------------------------------------------


class VaultCli:
    """`cellblock vault ...` with its own XDG dirs, as this user or as uid 65534."""

    def __init__(self, who: str, home: Path, nobody_dir: Path | None) -> None:
        self.who = who
        self.env = {"PATH": "/usr/bin:/bin", "XDG_DATA_HOME": str(home / "data"),
                    "XDG_CONFIG_HOME": str(home / "config"), "HOME": str(home)}
        if who == "nobody":
            assert nobody_dir is not None
            self.head = [*SETPRIV, "env", "-i", f"PYTHONPATH={nobody_dir}",
                         *(f"{k}={v}" for k, v in self.env.items())]
            self.python = "/usr/bin/python3"
        else:
            self.env["PYTHONPATH"] = os.pathsep.join(sys.path)
            self.head, self.python = ["env"], sys.executable

    def __call__(self, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None,
                 command: str = "vault") -> subprocess.CompletedProcess[str]:
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        argv = [*self.head, *extra, self.python, "-m", "cellblock.cli", command, *args]
        return subprocess.run(argv, input=stdin.decode(), capture_output=True, text=True,
                              env=self.env, timeout=WORKER_DEADLINE, cwd="/", check=False)


@pytest.fixture(params=["self", "nobody"], ids=["root" if IS_ROOT else "user", "nobody"])
def vault_cli(request: pytest.FixtureRequest, home: Path) -> VaultCli:
    if request.param == "nobody":
        nobody_dir = request.getfixturevalue("nobody_dir")
        home.chmod(0o700)
        os.chown(home, NOBODY, NOBODY)
        return VaultCli("nobody", home, nobody_dir)
    return VaultCli("self", home, None)


def test_cli_round_trip(vault_cli: VaultCli, home: Path) -> None:
    stdin_value, env_value, file_value = secret_value(), secret_value(), secret_value()
    r = vault_cli("init")
    assert r.returncode == 0, r.stderr
    keyfile = home / "config" / "cellblock" / "vault.key"
    assert "mode 0600" in r.stderr and str(keyfile) in r.stderr
    r = vault_cli("add", "GH", "--host", "api.github.com", "--method", "GET", "--header",
                  "Authorization", stdin=stdin_value.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    r = vault_cli("add", "DB", "--host", "db.test", "--host", "db2.test", "--agent", "rev",
                  "--in-body", "--from-env", "SRC", env={"SRC": env_value})
    assert r.returncode == 0, r.stderr
    src = home / "tok.txt"
    src.write_text(file_value + "\n")
    src.chmod(0o600)
    if vault_cli.who == "nobody":
        os.chown(src, NOBODY, NOBODY)
    r = vault_cli("add", "TOK", "--host", "t.test", "--in-query", "--from-file", str(src))
    assert r.returncode == 0, r.stderr
    table = vault_cli("ls")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "AGENT", "HOSTS", "METHODS", "HEADER", "ALSO", "CREATED"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert rows["GH"][1:5] == ["-", "api.github.com", "GET", "Authorization"]
    assert rows["DB"][1:3] == ["rev", "db.test,db2.test"] and rows["DB"][5] == "body"
    listed = vault_cli("ls", "--json")
    entries = {e["name"]: e for e in json.loads(listed.stdout)}
    assert entries["DB"]["scope"] == "agent" and entries["GH"]["methods"] == ["GET"]
    assert entries["TOK"]["in_query"] is True
    assert all("value" not in e for e in entries.values())
    only = json.loads(vault_cli("ls", "--json", "--agent", "rev").stdout)
    assert [e["name"] for e in only] == ["DB"]
    # `cellblock run --credential NAME` takes the vault's credential: the sandbox sees only
    # its placeholder.
    ran = vault_cli("--credential", "TOK", "--", "sh", "-c", 'echo "$TOK"', command="run")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("cellblock_placeholder_TOK_"), ran.stdout
    # The stored values are the ones given (opened with the key the CLI wrote).
    out = [table, listed, ran]
    if vault_cli.who == "self":
        v = Vault(home / "data" / "cellblock" / "vault.json", key_file=keyfile)
        got = {c.name: c.value.get_secret_value() for c in v.resolve(["GH", "TOK"], agent="rev")}
        assert got == {"GH": stdin_value, "DB": env_value, "TOK": file_value}
    # Never from argv: a value as an extra argument is refused, and not echoed.
    r = vault_cli("add", "X", stdin_value, "--host", "h.test")
    assert r.returncode == 2 and "no value on the command line" in r.stderr, r.stderr
    out.append(r)
    r = vault_cli("rm", "GH")
    assert r.returncode == 0, r.stderr
    r = vault_cli("rm", "GH")
    assert r.returncode == 2
    assert r.stderr.startswith("cellblock: error: VaultError: no credential 'GH'"), r.stderr
    out.append(r)
    left = vault_cli("ls")
    assert [ln.split()[0] for ln in left.stdout.splitlines()[1:]] == ["TOK", "DB"]
    src.unlink()
    for data in (home / "data" / "cellblock").iterdir():
        for value in (stdin_value, env_value, file_value):
            for form in encodings(value):
                assert form not in data.read_bytes()
    for r in out:
        for value in (stdin_value, env_value, file_value):
            assert value not in r.stdout + r.stderr


def test_cli_refuses_a_readable_key_file(vault_cli: VaultCli, home: Path) -> None:
    assert vault_cli("init").returncode == 0
    keyfile = home / "config" / "cellblock" / "vault.key"
    keyfile.chmod(0o644)
    r = vault_cli("add", "GH", "--host", "h.test", stdin=b"v-value")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"cellblock: error: VaultError: key file {keyfile} has mode "
                                f"0644: group and others may read it; it must be 0600 (chmod "
                                f"600 {keyfile})")
    assert not (home / "data" / "cellblock" / "vault.json").exists()
    r = vault_cli("init")
    assert r.returncode == 2 and "exists" in r.stderr


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run as uid 65534")
def test_a_users_vault_is_not_readable_by_another(home: Path, key: bytes,
                                                  nobody_dir: Path) -> None:
    """root's vault and key file (mode 0600, in a directory others may traverse) cannot be
    read by uid 65534, even when it is told where they are and has the key."""
    home.chmod(0o755)
    keyfile = create_key_file(home / "vault.key")
    Vault(home / "vault.json", key_file=keyfile).add(cred("GH", "root-value"))
    script = """
import json, sys
from cellblock.errors import VaultError
from cellblock.vault import Vault
out = {}
for name, kw in (("vault", {"key": bytes.fromhex(sys.argv[2])}), ("key", {})):
    try:
        Vault(sys.argv[1], **kw).resolve(["GH"])
        out[name] = "opened"
    except VaultError as e:
        out[name] = str(e)
print(json.dumps(out))
"""
    argv = [*SETPRIV, "env", "-i", f"PYTHONPATH={nobody_dir}", "PATH=/usr/bin:/bin",
            f"CELLBLOCK_VAULT_KEY_FILE={keyfile}", "/usr/bin/python3", "-c", script,
            str(home / "vault.json"), key.hex()]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_DEADLINE, cwd="/",
                       check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["vault"] == f"cannot read the vault {home / 'vault.json'}: Permission denied"
    assert out["key"] == f"cannot open key file {keyfile}: Permission denied"


# -- agents ---------------------------------------------------------------------------------


class _Opened(Exception):
    pass


def test_agent_sessions_get_the_agents_credentials(home: Path, key: bytes,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    v = Vault(home / "vault.json", key=key)
    v.add(cred("REVIEW_TOKEN", "r-value", hosts=["review.test"]), agent="reviewer")
    v.add(cred("GH", "gh-value"))
    v.add(cred("NOT_MINE", "n-value"), agent="writer")
    inline = cred("INLINE", "i-value")
    agent = Agent(model="offline", agent_name="reviewer", credentials=["GH", inline], vault=v)
    assert "REVIEW_TOKEN, GH, INLINE" not in agent.system  # sorted, names only
    assert "GH, INLINE, REVIEW_TOKEN" in agent.system
    assert not any(s in agent.system for s in ("r-value", "gh-value", "i-value", "NOT_MINE"))
    seen: dict[str, Any] = {}

    class RecordingSandbox:
        def __init__(self, *, policy: Any = None, auto_pause: Any = None,
                     credentials: list[Credential] | None = None) -> None:
            seen["credentials"] = credentials
            raise _Opened

    monkeypatch.setattr(loop, "Sandbox", RecordingSandbox)
    with pytest.raises(_Opened):
        agent.run("task")
    got = {c.name: (c.value.get_secret_value(), c.scope) for c in seen["credentials"]}
    assert got == {"REVIEW_TOKEN": ("r-value", "agent"), "GH": ("gh-value", "session"),
                   "INLINE": ("i-value", "session")}
    # A credential added for the agent later reaches its next session.
    v.add(cred("LATER", "l-value"), agent="reviewer")
    with pytest.raises(_Opened):
        agent.run("task")
    assert "LATER" in {c.name for c in seen["credentials"]}


def test_an_agents_sandbox_holds_only_placeholders(home: Path, key: bytes) -> None:
    v = Vault(home / "vault.json", key=key)
    v.add(cred("GH", "gh-value-7c1d"), agent="reviewer")
    agent = Agent(model="offline", agent_name="reviewer", vault=v)
    with cellblock.Sandbox(credentials=agent.credentials.resolve()) as sb:
        r = sb.run(["sh", "-c", 'echo "$GH"; cat /proc/self/environ | tr "\\0" "\\n"'])
    assert r.ok, r.stderr
    assert r.stdout.startswith("cellblock_placeholder_GH_"), r.stdout
    assert "gh-value-7c1d" not in r.stdout
    with pytest.raises(InvalidSpec, match="keeps its own"):
        Agent(model="offline", agent_name="reviewer", vault=v, sandbox=object())  # type: ignore[arg-type]
    with pytest.raises(VaultError, match="no credential 'NOPE'"):
        Agent(model="offline", credentials=["NOPE"], vault=v).credentials.resolve()



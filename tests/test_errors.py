"""Errors: bad input and impossible runs raise typed exceptions from the Python API, and the
CLI prints one `cellblock: error: ...` line with exit status 2, never a traceback."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest

import cellblock
import cellblock.cli
import cellblock.errors
from conftest import IS_ROOT, Cli, Runner, run_in_userns

API_ERRORS: list[tuple[Any, dict[str, Any], type[cellblock.CellblockError]]] = [
    ([], {}, cellblock.InvalidSpec),
    ("ls", {}, cellblock.InvalidSpec),
    (["true", "a\0b"], {}, cellblock.InvalidSpec),
    (["true"], {"memory": "12Q"}, cellblock.InvalidSpec),
    (["true"], {"memory": "-1M"}, cellblock.InvalidSpec),
    (["true"], {"pids": -1}, cellblock.InvalidSpec),
    (["true"], {"pids": 0}, cellblock.InvalidSpec),
    # Above the kernel's PID_MAX_LIMIT (found by the service fuzz: it failed in set-up).
    (["true"], {"pids": 396543533804735}, cellblock.InvalidSpec),
    (["true"], {"timeout": 0}, cellblock.InvalidSpec),
    (["true"], {"cpu_time": -2}, cellblock.InvalidSpec),
    (["true"], {"cpus": "abc"}, cellblock.InvalidSpec),
    (["true"], {"max_output": -5}, cellblock.InvalidSpec),
    (["true"], {"disk": "0"}, cellblock.InvalidSpec),
    (["true"], {"env": {"A=B": "x"}}, cellblock.InvalidSpec),
    (["true"], {"env": {"": "x"}}, cellblock.InvalidSpec),
    (["no-such-command-cellblock"], {}, cellblock.CommandNotFound),
    (["/usr/bin/no-such-command-cellblock"], {}, cellblock.CommandNotFound),
    (["/etc/passwd"], {}, cellblock.CommandNotFound),
    (["/workspace"], {}, cellblock.CommandNotFound),
]


@pytest.mark.parametrize(("argv", "kwargs", "error"), API_ERRORS,
                         ids=[f"{a!r}-{k!r}" for a, k, _ in API_ERRORS])
def test_api_errors_are_typed(sandbox: Runner, argv: Any, kwargs: dict[str, Any],
                              error: type[cellblock.CellblockError]) -> None:
    with pytest.raises(error) as info:
        sandbox.run(argv, **kwargs)
    assert str(info.value)


def test_exception_hierarchy() -> None:
    for name in cellblock.errors.__all__:
        cls = getattr(cellblock, name)
        assert issubclass(cls, cellblock.CellblockError) and issubclass(cls, Exception)
    assert not issubclass(cellblock.CellblockError, (ValueError, OSError))


def test_bad_policy_files(tmp_path: Path) -> None:
    bad_key = tmp_path / "key.toml"
    bad_key.write_text("memroy = '1G'\n")
    bad_toml = tmp_path / "syntax.toml"
    bad_toml.write_text("memory = \n")
    for path in (bad_key, bad_toml, tmp_path / "missing.toml"):
        with pytest.raises(cellblock.InvalidSpec):
            cellblock.Policy.from_toml(path)


CLI_ERRORS = [
    (["run", "--memory", "12Q", "--", "true"], "memory"),
    (["run", "--pids", "-1", "--", "true"], "pids"),
    (["run", "--timeout", "abc", "--", "true"], "timeout"),
    (["run", "--max-output", "lots", "--", "true"], "max_output"),
    (["run", "--bogus", "--", "true"], "--bogus"),
    (["run", "true"], "'--'"),
    (["run", "--"], "no command"),
    (["run"], "no command"),
    (["run", "--env", "NOEQUALS", "--", "true"], "--env"),
    (["run", "--policy", "/nonexistent/policy.toml", "--", "true"], "policy"),
    (["run", "--", "no-such-command-cellblock"], "CommandNotFound"),
    (["no-such-subcommand"], "no-such-subcommand"),
]


@pytest.mark.parametrize(("args", "mention"), CLI_ERRORS, ids=[" ".join(a) for a, _ in CLI_ERRORS])
def test_cli_errors_are_one_line(args: list[str], mention: str, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(SystemExit) as info:
        cellblock.cli.main(args)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("cellblock: error: "), err
    assert mention in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["run", "--memory", "12Q", "--", "true"],
                                  ["run", "--", "no-such-command-cellblock"]],
                         ids=["bad-size", "not-found"])
def test_cli_entry_point_errors(cli: Cli, args: list[str]) -> None:
    res = cli.run(args)
    err = res.stderr.decode()
    assert res.returncode == 2 and res.stdout == b""
    assert err.count("\n") == 1 and err.startswith("cellblock: error: ") and "Traceback" not in err


@pytest.mark.skipif(not IS_ROOT, reason="simulating a kernel without user namespaces needs root")
def test_no_user_namespaces_is_namespace_unavailable(nobody_dir: Path) -> None:
    api = run_in_userns(nobody_dir, ["/usr/bin/python3", "-c", (
        "import cellblock\n"
        "try:\n    cellblock.run(['true'])\n"
        "except cellblock.NamespaceUnavailable as e:\n    print('NamespaceUnavailable', e)\n")],
        uid=1000, no_nesting=True)
    assert api.stdout.startswith("NamespaceUnavailable "), (api.stdout, api.stderr)
    cli = run_in_userns(nobody_dir, ["/usr/bin/python3", "-m", "cellblock.cli", "run", "--",
                                     "true"], uid=1000, no_nesting=True)
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr.startswith("cellblock: error: NamespaceUnavailable: ")
    assert cli.stderr.count("\n") == 1


def test_a_policy_whose_rootfs_went_away_is_refused_at_run(tmp_path: Path) -> None:
    # An unchanged policy is not validated again per run, except its rootfs: a directory can
    # go away between the policy's construction and the run.
    root = tmp_path / "root"
    root.mkdir()
    policy = cellblock.Policy(rootfs=root)
    assert policy.merged() == policy
    root.rmdir()
    with pytest.raises(cellblock.InvalidSpec, match="rootfs"):
        cellblock.run(["/bin/true"], policy=policy)
    with pytest.raises(cellblock.InvalidSpec, match="memory"):
        cellblock.Policy().merged(memory="12Q")

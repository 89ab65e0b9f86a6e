"""`cellblock run`: exit statuses like timeout(1)/docker run, `--json` reports, live output.

Run through the real entry point, as root and as uid 65534.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from pathlib import Path

import pytest

from cellblock.result import FIELDS, RunResult
from conftest import Cli, own_cellblock_cgroups, processes_with_argv, remove_cgroups_of, wait_for

CASES = [
    (["sh", "-c", "exit 7"], [], 7),
    (["sh", "-c", "kill -TERM $$"], [], 128 + 15),
    (["sleep", "60"], ["--timeout", "1"], 124),
    (["true"], [], 0),
]


@pytest.mark.parametrize(("argv", "opts", "status"), CASES,
                         ids=["exit-7", "sigterm", "timeout", "ok"])
def test_exit_status(cli: Cli, argv: list[str], opts: list[str], status: int) -> None:
    res = cli.run(["run", *opts, "--", *argv])
    assert res.returncode == status, res.stderr


def test_json_report(cli: Cli, tmp_path: Path) -> None:
    res = cli.run(["run", "--json", "--memory", "64M", "--pids", "20", "--cpus", "0.5",
                   "--cpu-time", "5", "--timeout", "30", "--max-output", "1M", "--disk", "8M",
                   "--env", "GREETING=hello", "--",
                   "sh", "-c", "cat; echo $GREETING; echo oops >&2; exit 3"], input=b"from stdin\n")
    assert res.returncode == 0 and res.stderr == b""
    report = json.loads(res.stdout)  # exactly one JSON document, nothing else
    assert list(report) == list(FIELDS)
    # ... and FIELDS are RunResult's fields, with the output as text.
    text = {"stdout_bytes": "stdout", "stderr_bytes": "stderr"}
    assert set(FIELDS) == {text.get(f, f) for f in RunResult.model_fields}
    assert report["exit_code"] == 3 and report["reason"] == "exited"
    assert report["stdout"] == "from stdin\nhello\n" and report["stderr"] == "oops\n"
    assert set(report["enforcement"]) == {"memory", "pids", "cpus", "cpu_time", "timeout",
                                          "max_output", "disk"}


def test_policy_file(cli: Cli, nobody_dir: Path) -> None:
    policy = nobody_dir / f"policy-{cli.name}.toml"
    policy.write_text('timeout = 1\n[env]\nFROM_POLICY = "yes"\n')
    policy.chmod(0o644)
    res = cli.run(["run", "--json", "--policy", str(policy), "--env", "EXTRA=1", "--",
                   "sh", "-c", "echo $FROM_POLICY $EXTRA; sleep 60"])
    report = json.loads(res.stdout)
    assert report["reason"] == "timeout" and report["stdout"] == "yes 1\n"


def test_output_streams_live(cli: Cli) -> None:
    proc = cli.popen(["run", "--timeout", "60", "--",
                      "sh", "-c", "echo first; echo to-stderr >&2; sleep 3; echo second"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    first = proc.stdout.readline() if ready else b""
    # The first line arrived while the command was still sleeping: it was streamed, not buffered.
    still_running = proc.poll() is None
    rest, err = proc.communicate(timeout=60)
    assert first == b"first\n" and still_running
    assert rest == b"second\n" and err == b"to-stderr\n" and proc.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_the_cli_ends_the_run(cli: Cli, marker: str, sig: signal.Signals) -> None:
    proc = cli.popen(["run", "--timeout", "120", "--", "sleep", marker],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: processes_with_argv(["sleep", marker]), "the sandboxed sleep", 60)
        proc.send_signal(sig)
        # Like Ctrl-C on `timeout` or `docker run`: cellblock stops the run and exits at once.
        status = proc.wait(timeout=5)
        assert status in (128 + sig, -sig)
        wait_for(lambda: not processes_with_argv(["sleep", marker]), "the run to end", 5)
        assert own_cellblock_cgroups(proc.pid) == []
    finally:
        proc.kill()
        proc.communicate()
        for pid in processes_with_argv(["sleep", marker]):
            os.kill(pid, signal.SIGKILL)
        remove_cgroups_of(proc.pid)

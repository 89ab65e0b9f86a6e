"""The unprivileged path itself: the worker really is unprivileged, the `cellblock-spawn` binary
isolates as uid 65534 too, and cellblock works nested inside another user namespace (as in a
rootless container)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import NOBODY, SETPRIV, WORKER_DEADLINE, WorkerRunner, run_in_userns

PROBE = ("echo uid=$(id -u); cat /proc/self/uid_map;"
         " grep -E '^(CapEff|NoNewPrivs)' /proc/self/status;"
         " ls /work 2>&1; readlink /proc/self/ns/user /proc/self/ns/pid")


def test_worker_is_unprivileged(nobody_runner: WorkerRunner) -> None:
    status = Path(f"/proc/{nobody_runner.stats()['pid']}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["Uid"].split() == [str(NOBODY)] * 4
    assert fields["Gid"].split() == [str(NOBODY)] * 4
    assert fields["Groups"].split() == []
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0


def spawn_as_nobody(nobody_dir: Path, spec: dict[str, object]) -> dict[str, object]:
    binary = nobody_dir / "cellblock-spawn"
    # `make build` builds it: a missing binary is a failure, not a reason to skip.
    assert binary.exists(), "cellblock-spawn is not built (make build)"
    path = nobody_dir / f"spec-{os.getpid()}.json"
    path.write_text(json.dumps(spec))
    path.chmod(0o644)
    res = subprocess.run([*SETPRIV, str(binary), str(path)], check=False, capture_output=True,
                         text=True,
                         timeout=WORKER_DEADLINE, cwd="/")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_spawn_binary_as_nobody(nobody_dir: Path) -> None:
    report = spawn_as_nobody(nobody_dir, {
        "argv": ["sh", "-c", PROBE + "; exit 5"], "env": {"PATH": "/usr/bin:/bin"},
        "limits": {"memory": 64 << 20, "pids": 32, "cpus": 0.5, "cpu_time": 5.0, "timeout": 30.0,
                   "max_output": 1 << 20, "disk": 8 << 20},
    })
    out = str(report["stdout"]).splitlines()
    assert report["exit_code"] == 5 and report["reason"] == "exited"
    assert out[0] == "uid=0" and out[1].split() == ["0", str(NOBODY), "1"]
    assert out[2].split() == ["CapEff:", "0000000000000000"]
    assert out[3].split() == ["NoNewPrivs:", "1"]
    assert "No such file or directory" in out[4]
    assert out[5] != os.readlink("/proc/self/ns/user")
    assert out[6] != os.readlink("/proc/self/ns/pid")
    assert report["enforcement"] == {"memory": "rlimit", "pids": "rlimit", "cpus": None,
                                     "cpu_time": "rlimit", "timeout": "supervisor",
                                     "max_output": "supervisor", "disk": "tmpfs"}


def test_spawn_binary_timeout_as_nobody(nobody_dir: Path) -> None:
    report = spawn_as_nobody(nobody_dir, {"argv": ["sleep", "60"], "env": {"PATH": "/usr/bin:/bin"},
                                          "limits": {"timeout": 0.5}})
    assert report["reason"] == "timeout" and report["exit_code"] is None


def userns_report(nobody_dir: Path, uid: int) -> subprocess.CompletedProcess[str]:
    code = ("import json, cellblock\n"
            f"r = cellblock.run(['sh', '-c', {PROBE!r}], memory='64M')\n"
            "print(json.dumps(r.to_dict()))\n")
    return run_in_userns(nobody_dir, ["/usr/bin/python3", "-c", code], uid=uid)


def test_nested_in_a_user_namespace(nobody_dir: Path) -> None:
    res = userns_report(nobody_dir, 1000)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    out = report["stdout"].splitlines()
    assert report["reason"] == "exited" and out[0] == "uid=0"
    assert out[1].split() == ["0", "1000", "1"]  # as seen from the enclosing namespace
    assert report["enforcement"]["memory"] == "rlimit"


def test_as_root_of_a_user_namespace(nobody_dir: Path) -> None:
    # euid 0 of a non-initial user namespace (a rootless container) is not real root: the run
    # must take the unprivileged path, not fail on cgroups or unmapped uids.
    res = userns_report(nobody_dir, 0)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["reason"] == "exited" and report["stdout"].startswith("uid=0\n")
    assert report["enforcement"]["memory"] == "rlimit"

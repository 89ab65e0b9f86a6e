"""Batches: mixed outcomes per job, nothing left behind, resume, Ctrl-C, progress."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import cellblock.cells
from cellblock.batch import (
    Job,
    JobError,
    command_for,
    failed,
    is_infrastructure,
    iter_many,
    run_many,
)
from cellblock.errors import InvalidSpec
from cellblock.policy import Policy
from cellblock.progress import Progress
from cellblock.result import RunResult

CELLBLOCK = Path(sys.executable).parent / "cellblock"
#: Bounded polling for the CLI interrupt test (no timed assertions: only a give-up deadline).
POLL_LIMIT_S = 60.0


def cgroup_dirs() -> list[Path]:
    """The cgroup directories of this process in every mounted hierarchy."""
    rels = [line.split(":", 2)[2].strip().lstrip("/") for line in
            Path("/proc/self/cgroup").read_text().splitlines()]
    roots = [Path("/sys/fs/cgroup")] + [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir()]
    return [root / rel for root in roots for rel in set(rels) if (root / rel).is_dir()]


def leftover_cgroups(pid: int) -> list[Path]:
    return [p for d in cgroup_dirs() for p in d.glob(f"cellblock-{pid}-*")]


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


def children() -> set[str]:
    me = Path(f"/proc/{os.getpid()}/task")
    return {c for t in me.iterdir() for c in (t / "children").read_text().split()}


def assert_nothing_left(pid: int, marker: str, children_before: set[str]) -> None:
    if pid == os.getpid():
        # Ready cells and queued teardowns are the cell pool's standing state: drop them first.
        assert cellblock.cells.drain()
    assert leftover_cgroups(pid) == []
    assert processes_with(marker) == []
    assert children() - children_before == set()


# -- jobs -----------------------------------------------------------------------------------

def test_job_needs_exactly_one_of_argv_and_code() -> None:
    with pytest.raises(InvalidSpec, match="exactly one of argv or code"):
        Job.parse({"argv": ["true"], "code": "pass"})
    with pytest.raises(InvalidSpec, match="exactly one of argv or code"):
        Job.parse({})
    with pytest.raises(InvalidSpec, match="language"):
        Job.parse({"code": "x", "language": "ruby"})


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "", "."])
def test_file_paths_must_stay_in_the_workspace(path: str) -> None:
    with pytest.raises(InvalidSpec, match="inside /workspace"):
        Job.parse({"argv": ["true"], "files": {path: "x"}})


def test_inline_code_and_long_code_commands() -> None:
    argv, stdin = command_for(Job(code="print(1)"))
    assert argv == ["python3", "-c", "print(1)"] and stdin is None
    argv, stdin = command_for(Job(code="echo hi", language="shell", stdin="in"))
    assert argv == ["sh", "-c", "echo hi"] and stdin == b"in"
    # Longer than one argv string may be: goes through a file written by the launcher.
    argv, stdin = command_for(Job(code="#" * 200_000))
    assert argv[0] == "python3" and stdin is not None and len(stdin) > 200_000


# -- mixed outcomes --------------------------------------------------------------------------

def test_mixed_batch_gives_each_job_its_result_and_leaves_nothing(tmp_path: Path) -> None:
    marker = f"cbmark{uuid.uuid4().hex[:10]}"
    fork_bomb = (
        f"import os, time\n# {marker}\nn = 0\n"
        "for _ in range(10000):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(600)\n        os._exit(0)\n"
        "    n += 1\n"
        "print(n)\n"
    )
    delete_everything = (
        # Refuse to go on if the host's directories were writable: fail instead of destroying.
        f"for d in /usr /etc {sys.base_prefix}; do "
        f"touch $d/.cellblock-probe-{marker} 2>/dev/null && {{ echo WRITABLE $d; exit 99; }}; "
        "done; "
        "rm -rf --no-preserve-root / 2>/dev/null; "
        "ls /workspace | wc -l; test -x /usr/bin/env && echo host-intact"
    )
    jobs = [
        Job(id="pass", code="print('ok')"),
        Job(id="fail", code="raise SystemExit(3)"),
        Job(id="timeout", code="while True: pass", limits={"timeout": 1}),
        Job(id="memory", code="b = b'x' * (256 << 20)\nprint(len(b))", limits={"memory": "64M"}),
        Job(id="spew", code="while True: print('y' * 1000)",
            limits={"max_output": "64K", "timeout": 20}),
        Job(id="delete", argv=["sh", "-c", delete_everything], files={"keep.txt": "x"}),
        Job(id="forkbomb", code=fork_bomb, limits={"pids": 16, "timeout": 20}),
        Job(id="daemon", argv=["sh", "-c", f"setsid sh -c 'sleep 600; : {marker}' & echo started"]),
        Job(id="missing", argv=["no-such-command-cellblock"]),
        Job(id="files", argv=["sh", "-c", "od -An -tx1 bin/data; cat; test -x run.sh && echo exe"],
            files={"bin/data": b"\x00\xff\n", "run.sh": {"base64": "ZWNobyBoaQo=", "mode": 0o755}},
            stdin="from stdin\n"),
    ]
    children_before = children()
    ids = [j.id for j in jobs]
    results = dict(zip(ids, run_many(jobs, concurrency=2, progress=False), strict=True))

    def res(name: str) -> RunResult:
        r = results[name]
        assert isinstance(r, RunResult), r
        return r

    assert res("pass").ok and res("pass").stdout == "ok\n"
    assert (res("fail").reason, res("fail").exit_code) == ("exited", 3)
    assert res("timeout").reason == "timeout"
    assert res("memory").reason == "memory"
    assert res("spew").reason == "output_limit" and res("spew").stdout_truncated
    assert len(res("spew").stdout_bytes) <= 64 << 10
    assert res("delete").exit_code != 99, res("delete").stdout
    assert res("delete").stdout.split() == ["0", "host-intact"]
    assert Path("/usr/bin/env").exists() and Path(sys.base_prefix, "bin", "python3").exists()
    assert res("forkbomb").ok and 0 < int(res("forkbomb").stdout) < 16
    assert res("daemon").ok and res("daemon").stdout == "started\n"
    missing = results["missing"]
    assert isinstance(missing, JobError) and missing.kind == "CommandNotFound"
    assert missing.to_dict() == {"error": {"kind": "CommandNotFound", "message": missing.message}}
    assert res("files").stdout.split() == ["00", "ff", "0a", "from", "stdin", "exe"]
    assert_nothing_left(os.getpid(), marker, children_before)


def test_long_code_runs_from_a_file() -> None:
    code = "x = 1\n" * 40_000 + "print(x + 1)\n"
    [result] = run_many([Job(code=code)], progress=False)
    assert isinstance(result, RunResult) and result.stdout == "2\n"


def test_node_and_shell_code() -> None:
    jobs = [Job(code="echo $((6 * 7))", language="shell")]
    if any(Path(d, "node").exists() for d in os.environ.get("PATH", "").split(":")):
        jobs.append(Job(code="console.log(6 * 7)", language="node"))
    for result in run_many(jobs, progress=False):
        assert isinstance(result, RunResult) and result.stdout == "42\n"


# -- ordering, runner hook, policies ---------------------------------------------------------

def fake_result(job: Job) -> RunResult:
    return RunResult(exit_code=0, signal=None, reason="exited", stdout_bytes=job.id.encode(),
                     stderr_bytes=b"", stdout_truncated=False, stderr_truncated=False,
                     wall_time_s=0.0, cpu_time_s=0.0, peak_memory_bytes=0, violations=[],
                     enforcement={})


def test_results_keep_job_order_and_runner_gets_merged_policy() -> None:
    seen: dict[str, Policy] = {}
    others_received = threading.Event()

    def runner(job: Job, policy: Policy) -> RunResult:
        seen[job.id] = policy
        # The first job finishes only after the caller has received the others.
        if job.id == "0":
            others_received.wait(timeout=POLL_LIMIT_S)
        return fake_result(job)

    jobs = [Job(id=str(i), argv=["x"], limits={"timeout": 5}, env={"A": str(i)}) for i in range(4)]
    base = Policy(memory=1 << 20, timeout=9, env={"B": "b"})
    order = []
    for job, _ in iter_many(jobs, 4, False, base, runner):
        order.append(job.id)
        if len(order) == 3:
            others_received.set()
    assert order[-1] == "0"
    assert seen["2"].memory == 1 << 20 and seen["2"].timeout == 5
    assert seen["2"].env == {"B": "b", "A": "2"}
    results = run_many(jobs[::-1], concurrency=4, progress=False, runner=runner)
    assert [r.stdout for r in results] == ["3", "2", "1", "0"]


def test_runner_errors_become_records() -> None:
    def runner(job: Job, policy: Policy) -> RunResult:
        raise OSError("disk on fire")

    [r] = run_many([Job(argv=["x"])], progress=False, runner=runner)
    assert isinstance(r, JobError) and (r.kind, r.message) == ("OSError", "disk on fire")


def test_invalid_concurrency() -> None:
    with pytest.raises(InvalidSpec):
        run_many([Job(argv=["true"])], concurrency=0, progress=False)


# -- progress --------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_tty_line_and_summary() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(4, stream=out, tty=True, clock=clock)
    clock.t += 1
    bar.add("exited", False)
    clock.t += 1
    bar.add("timeout", True)
    assert bar.line() == "2/4 1.0 jobs/s ETA 0:02 failures 1"
    assert out.getvalue().startswith("\r\x1b[K1/4")
    clock.t += 2
    bar.add("exited", False)
    bar.add("error", True)
    summary = bar.close()
    assert (summary.total, summary.failures, summary.wall_time_s) == (4, 2, 4.0)
    assert summary.by_reason == {"exited": 2, "timeout": 1, "error": 1}
    assert out.getvalue().endswith(
        "\n4 jobs in 4.0s (1.0 jobs/s), 2 failed; exited 2, error 1, timeout 1\n")


def test_progress_plain_lines_are_periodic_and_quiet_prints_nothing() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(100, stream=out, tty=False, clock=clock)
    for _ in range(10):
        clock.t += 0.5
        bar.add("exited", False)
    assert out.getvalue() == ""
    clock.t += 10
    bar.add("exited", False)
    assert out.getvalue().splitlines() == ["11/100 0.7 jobs/s ETA 2:01 failures 0"]
    quiet = io.StringIO()
    q = Progress(1, stream=quiet, quiet=True, clock=clock)
    q.add("exited", False)
    assert q.close().total == 1 and quiet.getvalue() == ""


# -- CLI ---------------------------------------------------------------------------------------

def write_jobs(path: Path, jobs: list[dict]) -> None:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_batch_writes_results_and_resumes(tmp_path: Path) -> None:
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    write_jobs(jobs, [
        {"id": "a", "code": "print('a')"},
        {"code": "import sys; sys.exit(2)"},
        {"id": "c", "argv": ["sh", "-c", "sleep 5"]},
        {"id": "d", "argv": ["no-such-command-cellblock"]},
        {"id": "e", "code": 1},
    ])
    with jobs.open("a") as f:
        f.write("not json\n")
    # "a" is already done; "c" was being written when the last run crashed (torn line).
    out.write_text(json.dumps({"id": "a", "exit_code": 0}) + "\n" + '{"id": "c", "exit')
    proc = subprocess.run([str(CELLBLOCK), "batch", str(jobs), "--out", str(out),
                           "--concurrency", "2", "--timeout", "1"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = read_results(out)
    by_id = {line["id"]: line for line in lines}
    assert [line["id"] for line in lines].count("a") == 1
    assert sorted(by_id) == ["a", "c", "d", "e", "line-2", "line-6"]
    assert by_id["line-2"]["reason"] == "exited" and by_id["line-2"]["exit_code"] == 2
    assert by_id["c"]["reason"] == "timeout"
    assert by_id["d"]["error"]["kind"] == "CommandNotFound"
    assert by_id["e"]["error"]["kind"] == "InvalidSpec"
    assert by_id["line-6"]["error"]["kind"] == "InvalidSpec"
    assert set(by_id["c"]) >= {"exit_code", "signal", "stdout", "stderr", "wall_time_s",
                               "peak_memory_bytes", "violations", "enforcement"}
    assert "resuming: 1 jobs already" in proc.stderr
    assert "5 jobs in" in proc.stderr and "timeout 1" in proc.stderr
    # Everything is done now: a second run starts nothing.
    again = subprocess.run([str(CELLBLOCK), "batch", str(jobs), "--out", str(out), "--quiet"],
                           check=False, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stderr == ""
    assert read_results(out) == lines


def test_cli_batch_ctrl_c_keeps_results_and_resume_finishes(tmp_path: Path) -> None:
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    write_jobs(jobs, [{"id": "quick", "argv": ["true"]}] +
               [{"id": f"slow{i}", "argv": ["sleep", "0.3"]} for i in range(12)])
    cmd = [str(CELLBLOCK), "batch", str(jobs), "--out", str(out), "--concurrency", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + POLL_LIMIT_S
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=POLL_LIMIT_S)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "resume" in stderr
    first = read_results(out)
    assert 2 <= len(first) < 13 and all(r["reason"] == "exited" for r in first)
    assert leftover_cgroups(proc.pid) == []
    done = subprocess.run([*cmd, "--quiet"], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in read_results(out)]
    assert sorted(ids) == sorted(["quick"] + [f"slow{i}" for i in range(12)])


def test_cli_batch_rejects_duplicate_ids(tmp_path: Path) -> None:
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    write_jobs(jobs, [{"id": "x", "argv": ["true"]}, {"id": "x", "argv": ["true"]}])
    proc = subprocess.run([str(CELLBLOCK), "batch", str(jobs), "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "duplicate job id 'x'" in proc.stderr


def test_warm_runner_gives_the_same_verdicts_and_leaves_no_files_between_jobs() -> None:
    from cellblock.batch import WarmRunner

    jobs = [
        Job(id="ok", code="print('hi')"),
        Job(id="fail", code="raise SystemExit(3)"),
        Job(id="plant", code="open('/tmp/planted', 'w').write('x'); open('/workspace/w', 'w')"),
        Job(id="look",
            code="import os; print(sorted(os.listdir('/tmp')), os.listdir('/workspace'))"),
        Job(id="slow", code="import time; time.sleep(30)", limits={"timeout": 1}),
        Job(id="argv", argv=["python3", "-S", "-c", "import sys; print(sys.argv[1:])", "a", "b"]),
    ]
    with WarmRunner() as runner:
        results = run_many(jobs, concurrency=1, progress=False, runner=runner)
    by_id = dict(zip((j.id for j in jobs), results, strict=False))
    assert by_id["ok"].stdout == "hi\n" and by_id["ok"].exit_code == 0
    assert by_id["fail"].exit_code == 3
    assert "planted" not in by_id["look"].stdout and "'w'" not in by_id["look"].stdout
    assert by_id["slow"].reason == "timeout"
    assert by_id["argv"].stdout.strip() == "['a', 'b']"


def infra_error(job_id: str) -> dict:
    return {"id": job_id, "error": {"kind": "InfrastructureError",
                                     "message": "not run after 3 attempt(s): NodeDiedError"}}


def test_cli_batch_resume_runs_infrastructure_errors_again(tmp_path: Path) -> None:
    """A job recorded as an InfrastructureError (the cluster could not run it) is no result:
    a resume runs it again, its new line wins, and the file ends with each job once."""
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    write_jobs(jobs, [{"id": x, "code": f"print({x!r})"} for x in ("a", "b", "c", "d", "e")])
    done = {"exit_code": 0, "reason": "exited", "stdout": "old\n"}
    out.write_text("".join(json.dumps(r) + "\n" for r in [
        infra_error("a"),                      # not run: run again
        {"id": "b", **done},                   # done: skipped
        infra_error("c"), {"id": "c", **done},  # a later resume ran it: done
        {"id": "d", **done}, infra_error("d"),  # the newest line is an infra error: run again
    ]))  # "e" was never reached
    proc = subprocess.run([str(CELLBLOCK), "batch", str(jobs), "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 jobs already" in proc.stderr and "3 to run" in proc.stderr
    assert "2 infrastructure errors run again" in proc.stderr
    rows = read_results(out)
    assert sorted(r["id"] for r in rows) == ["a", "b", "c", "d", "e"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["b"]["stdout"] == by_id["c"]["stdout"] == "old\n"
    for x in ("a", "d", "e"):
        assert by_id[x]["stdout"] == f"{x}\n" and by_id[x]["exit_code"] == 0


def test_cli_batch_exits_3_while_infrastructure_errors_remain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Infrastructure errors are counted apart from failed jobs and make the exit status 3
    (the backend is replaced by one whose cluster cannot run job "x"); resuming clears them."""
    import cellblock.commands.batch as batch_cmd
    from cellblock.cli import main

    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
    write_jobs(jobs, [{"id": "x", "code": "print('x')"}, {"id": "y", "code": "print('y')"},
                      {"id": "z", "code": "raise SystemExit(1)"}])
    real = batch_cmd.iter_many

    def lossy(todo, concurrency, progress, policy, **kwargs):  # type: ignore[no-untyped-def]
        for job, outcome in real(todo, concurrency, False, policy, **kwargs):
            if job.id == "x":
                outcome = JobError(kind="InfrastructureError", message="no alive Ray node")
            progress.add(outcome.reason, failed(outcome), infrastructure=is_infrastructure(outcome))
            yield job, outcome

    monkeypatch.setattr(batch_cmd, "iter_many", lossy)
    assert main(["batch", str(jobs), "--out", str(out), "--concurrency", "1"]) == 3
    err = capsys.readouterr().err
    assert "1 failed, 1 not run (infrastructure errors)" in err, err
    assert "1 jobs not run (infrastructure errors); run the same command again" in err
    monkeypatch.setattr(batch_cmd, "iter_many", real)
    assert main(["batch", str(jobs), "--out", str(out), "--quiet"]) == 0
    rows = read_results(out)
    assert sorted(r["id"] for r in rows) == ["x", "y", "z"]
    assert {r["id"]: r.get("stdout") for r in rows}["x"] == "x\n"

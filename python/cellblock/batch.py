"""Batch execution: many jobs, each in its own sandbox, run concurrently.

`run_many(jobs)` returns results in job order; `iter_many(jobs)` yields `(job, result)` as jobs
finish. Every job gets a fresh sandbox (no state is shared between jobs). A job that cannot
start (unknown command, bad spec) gives a `JobError` record instead of stopping the batch.

How jobs reach the sandbox is a `Runner`: `run_cold` starts one cold sandbox per job; a warm
runner (sessions forking from a pre-started interpreter) can be passed in its place.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import threading
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import closing, contextmanager
from typing import Any, Literal, Self

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, ValidationError, model_validator

from cellblock.credentials import CredentialsArg
from cellblock.errors import InvalidSpec, SessionClosed
from cellblock.policy import Policy
from cellblock.progress import Progress
from cellblock.redaction import redact_fields, redactor_for
from cellblock.result import RunResult
from cellblock.sandbox import run, with_credentials
from cellblock.seccomp import profile_for_argv
from cellblock.secrets import normalize_secrets

Language = Literal["python", "node", "shell"]
#: Where a batch runs: threads on this machine, or actors of a Ray cluster.
Backend = Literal["local", "ray"]

#: Where jobs' files are written (the sandbox's working directory).
WORKSPACE = "/workspace"
#: Where code too long for a command-line argument is written.
CODE_DIR = "/tmp/.cellblock"
#: Inline code longer than this goes through a file (Linux caps one argv string at 128 KiB).
MAX_INLINE_CODE = 100_000
#: In-flight submissions per worker: enough to keep workers busy, bounded for huge batches.
QUEUE_PER_WORKER = 2

_INTERPRETER: dict[str, tuple[str, str, str]] = {
    # language: (program, inline-code flag, file extension)
    "python": ("python3", "-c", "py"),
    "node": ("node", "-e", "js"),
    "shell": ("sh", "-c", "sh"),
}

# Runs first in the sandbox when a job has files: reads a length-prefixed JSON bundle from
# stdin, writes the files, then execs the job's command. The rest of stdin is left unread, so
# the command sees exactly the job's stdin.
_LAUNCHER = r"""
import base64, json, os, sys
def read(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            sys.exit("cellblock: truncated job bundle")
        buf += chunk
    return buf
bundle = json.loads(read(int(read(12))))
for path, (data, mode) in bundle["files"].items():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data))
argv = bundle["argv"]
try:
    os.execvp(argv[0], argv)
except OSError as e:
    sys.stderr.write(f"cellblock: cannot run {argv[0]}: {e.strerror}\n")
    sys.exit(127)
"""


class Limits(BaseModel):
    """Per-job limits; same names and units as `cellblock.run`'s keyword arguments."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory: int | str | None = None
    pids: int | None = None
    cpus: float | None = None
    timeout: float | None = None
    cpu_time: float | None = None
    max_output: int | str | None = None
    disk: int | str | None = None


class FileData(BaseModel):
    """A file given as base64 (for binary content in JSON) with an optional mode."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base64: Base64Bytes
    mode: int = 0o644


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


class Job(BaseModel):
    """One unit of work: `argv`, or `code` in `language`; plus stdin, files, limits and env.

    `files` maps paths relative to /workspace to text, bytes or `{"base64": ..., "mode": ...}`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=_new_id)
    argv: list[str] | None = None
    code: str | None = None
    language: Language = "python"
    stdin: str | bytes | None = None
    files: dict[str, str | bytes | FileData] = {}
    limits: Limits = Limits()
    env: dict[str, str] = {}

    @model_validator(mode="after")
    def _check(self) -> Job:
        if (self.argv is None) == (self.code is None):
            raise ValueError("a job needs exactly one of argv or code")
        if self.argv is not None and not self.argv:
            raise ValueError("argv must not be empty")
        for path in self.files:
            _workspace_path(path)
        return self

    @classmethod
    def parse(cls, data: Any) -> Job:
        """Validate a dict (e.g. a JSONL line), turning pydantic errors into `InvalidSpec`."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            msg = str(err.get("msg", "invalid job")).removeprefix("Value error, ")
            raise InvalidSpec(f"{loc}: {msg}" if loc else msg) from None


class JobError(BaseModel):
    """The record of a job that could not run: the error's class name and message."""

    model_config = ConfigDict(frozen=True)

    kind: str
    message: str

    reason: Literal["error"] = "error"
    ok: Literal[False] = False

    @classmethod
    def from_exception(cls, e: BaseException) -> JobError:
        return cls(kind=type(e).__name__, message=str(e))

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "message": self.message}}


Outcome = RunResult | JobError

#: The JobError kind of a job the infrastructure could not serve (e.g. the Ray cluster lost its
#: node at every attempt): not the job's own failure, and re-run when a batch is resumed.
INFRASTRUCTURE_ERROR = "InfrastructureError"


def is_infrastructure(outcome: Outcome) -> bool:
    """Whether the outcome says nothing about the job: the infrastructure could not run it."""
    return isinstance(outcome, JobError) and outcome.kind == INFRASTRUCTURE_ERROR
#: Runs one job under its effective policy. Must be thread-safe.
Runner = Callable[[Job, Policy], RunResult]


def _workspace_path(path: str) -> str:
    norm = posixpath.normpath(path)
    if not path or posixpath.isabs(path) or norm == "." or norm.split("/")[0] == "..":
        raise ValueError(f"file path {path!r} must be relative and stay inside {WORKSPACE}")
    return posixpath.join(WORKSPACE, norm)


def _file_bytes(content: str | bytes | FileData) -> tuple[bytes, int]:
    if isinstance(content, FileData):
        return content.base64, content.mode
    return (content.encode() if isinstance(content, str) else content), 0o644


def command_for(job: Job) -> tuple[list[str], bytes | None]:
    """The argv and stdin that run `job` in a sandbox (through the launcher when it has files)."""
    stdin = job.stdin.encode() if isinstance(job.stdin, str) else job.stdin
    files = {_workspace_path(p): _file_bytes(c) for p, c in job.files.items()}
    if job.argv is not None:
        argv = list(job.argv)
    else:
        program, flag, ext = _INTERPRETER[job.language]
        code = job.code or ""
        if len(code.encode()) <= MAX_INLINE_CODE:
            argv = [program, flag, code]
        else:
            path = f"{CODE_DIR}/main.{ext}"
            files[path] = (code.encode(), 0o644)
            argv = [program, path]
    if not files:
        return argv, stdin
    bundle = json.dumps({
        "files": {p: [base64.b64encode(data).decode(), mode] for p, (data, mode) in files.items()},
        "argv": argv,
    }).encode()
    header = b"%012d" % len(bundle)
    # -I -S: the launcher ignores the job's PYTHON* variables and skips site-packages.
    return ["python3", "-I", "-S", "-c", _LAUNCHER], header + bundle + (stdin or b"")


def job_policy(job: Job, base: Policy | None) -> Policy:
    """The job's effective policy: its limits and env over the batch's base policy."""
    base = base or Policy()
    env = {**base.env, **job.env} if job.env else None
    return base.merged(**job.limits.model_dump(exclude_none=True), env=env)


def run_cold(job: Job, policy: Policy, cancel: threading.Event | None = None) -> RunResult:
    """Run a job in a fresh sandbox; the seccomp profile follows the job's own command.
    Setting `cancel` from another thread kills the run."""
    argv, stdin = command_for(job)
    target = job.argv or [_INTERPRETER[job.language][0]]
    profile = None if policy.profile or policy.seccomp else profile_for_argv(list(target))
    return run(argv, stdin=stdin, policy=policy, profile=profile, cancel=cancel)


def _run_one(runner: Runner, job: Job, base: Policy | None) -> Outcome:
    try:
        return runner(job, job_policy(job, base))
    # One bad job must not end a batch of thousands: any error becomes that job's record.
    except Exception as e:
        # The message may echo the job's argv or env: redacted like the run's output.
        redactor = redactor_for(normalize_secrets(base.secrets if base else None))
        return redact_fields(JobError.from_exception(e), redactor)


def failed(outcome: Outcome) -> bool:
    """A job failed when it could not run or did not exit with status 0."""
    return not outcome.ok


def _run_indexed(
    jobs: Iterable[Job],
    concurrency: int | None,
    progress: bool | Progress,
    policy: Policy | None,
    runner: Runner,
    backend: Backend = "local",
    address: str | None = None,
) -> Generator[tuple[int, Job, Outcome], None, None]:
    if backend == "ray":
        from cellblock.ray_backend import iter_on_ray

        name = runner_name(runner)
        if name not in RUNNER_NAMES:
            raise InvalidSpec("on Ray, runner must be run_cold, a PoolRunner or a WarmRunner "
                              "(each node opens its own with the batch's policy)")
        yield from iter_on_ray(jobs, address=address, policy=policy, progress=progress,
                               runner=name, per_node=concurrency)
        return
    if backend != "local":
        raise InvalidSpec(f"unknown backend {backend!r} (local, ray)")
    workers = concurrency if concurrency is not None else os.cpu_count() or 1
    if workers < 1:
        raise InvalidSpec(f"concurrency must be at least 1, got {concurrency}")
    bar = _make_progress(progress, jobs)
    source = enumerate(jobs)
    pending: dict[Future[Outcome], tuple[int, Job]] = {}
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cellblock-batch")
    try:
        while True:
            for i, job in source:
                pending[executor.submit(_run_one, runner, job, policy)] = (i, job)
                if len(pending) >= workers * QUEUE_PER_WORKER:
                    break
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                i, job = pending.pop(future)
                outcome = future.result()
                if bar is not None:
                    bar.add(outcome.reason, failed(outcome),
                            infrastructure=is_infrastructure(outcome))
                yield i, job, outcome
    finally:
        # Queued jobs never start; running ones end within their timeouts (their results, if
        # the iterator was closed early, are dropped).
        executor.shutdown(wait=True, cancel_futures=True)
        if bar is not None and progress is True:
            bar.close()


def _make_progress(progress: bool | Progress, jobs: Iterable[Job]) -> Progress | None:
    if isinstance(progress, Progress):
        return progress
    if not progress:
        return None
    return Progress(len(jobs) if isinstance(jobs, (list, tuple)) else None)


def iter_many(
    jobs: Iterable[Job],
    concurrency: int | None = None,
    progress: bool | Progress = False,
    policy: Policy | None = None,
    runner: Runner = run_cold,
    backend: Backend = "local",
    address: str | None = None,
) -> Generator[tuple[Job, Outcome], None, None]:
    """Run jobs concurrently, yielding `(job, result)` in completion order.

    `concurrency` defaults to the CPU count. `progress` is False (the default: silent), True
    (a bar on stderr and a summary at the end), or a `Progress` to report into. `policy` is the
    base every job's limits and env apply over. Jobs are read from `jobs` lazily, so it can be a
    long generator. Closing the iterator early (or Ctrl-C) starts no new job and waits for the
    running ones.
    `backend="ray"` fans the jobs out to a Ray cluster at `address` (one actor per node, each
    running `concurrency` jobs at once, default its CPUs; see `cellblock.ray_backend`).
    """
    with closing(_run_indexed(jobs, concurrency, progress, policy, runner, backend,
                              address)) as outcomes:
        for _, job, outcome in outcomes:
            yield job, outcome


def run_many(
    jobs: Iterable[Job],
    concurrency: int | None = None,
    progress: bool | Progress = False,
    policy: Policy | None = None,
    runner: Runner = run_cold,
    backend: Backend = "local",
    address: str | None = None,
    credentials: CredentialsArg = None,
) -> list[Outcome]:
    """Run jobs concurrently; results in job order (`JobError` for jobs that could not run).
    Arguments as for `iter_many`; `credentials` are added to the policy's (each sandbox gets
    its own placeholders)."""
    jobs = list(jobs)
    if credentials is not None:
        base = policy or Policy()
        policy = base.merged(credentials=with_credentials(base, credentials))
    results: list[Outcome | None] = [None] * len(jobs)
    for i, _, outcome in _run_indexed(jobs, concurrency, progress, policy, runner, backend,
                                      address):
        results[i] = outcome
    return [r for r in results if r is not None]


#: Removes what a job left in the session's writable places (the runtime's own dir stays).
_WIPE = """
import os, shutil
for top in ("/tmp", "/workspace", "/dev/shm"):
    for name in os.listdir(top):
        if top == "/tmp" and name == ".cellblock":
            continue
        path = os.path.join(top, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
"""


def _python_code(job: Job) -> tuple[str, list[str]] | None:
    """(code, argv[1:]) when the job is plain Python code a warm interpreter can run."""
    if job.files:
        return None
    if job.argv is None:
        return (job.code or "", []) if job.language == "python" else None
    argv = list(job.argv)
    if not argv or posixpath.basename(argv[0]) not in ("python3", "python"):
        return None
    i = 1
    while i < len(argv) and argv[i] in ("-S", "-I", "-s", "-E", "-B", "-u"):
        i += 1
    if i + 1 < len(argv) and argv[i] == "-c":
        return argv[i + 1], argv[i + 2:]
    return None


class WarmRunner:
    """A Runner serving Python jobs from warm sessions: one `Sandbox` per worker thread, each
    job a fresh fork of the session's pristine interpreter, the session's /tmp, /workspace and
    /dev/shm wiped after every job. Other jobs fall back to `run_cold`.

    The session is opened with the runner's `policy` (memory, pids, disk, env: PYTHONHASHSEED
    reaches the interpreter only this way); per job, its timeout, max_output and env apply.
    Trust model: jobs never share processes or files, but they share a runtime inside one
    sandbox, so a hostile job could interfere with later jobs of the same worker (not with the
    host). Use `run_cold` (the default) when every job must be isolated from every other one.
    Call `close()` (or use it as a context manager) to end the sessions.
    """

    #: Name recorded in results' environment.
    name = "warm"

    def __init__(self, policy: Policy | None = None) -> None:
        import threading

        self._policy = policy or Policy()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[Any] = []

    def _session(self) -> Any:
        from cellblock.session import Sandbox

        sb = getattr(self._local, "sandbox", None)
        if sb is None or not sb.is_open:
            sb = Sandbox(policy=self._policy)
            self._local.sandbox = sb
            with self._lock:
                self._sessions.append(sb)
        return sb

    def __call__(self, job: Job, policy: Policy) -> RunResult:
        found = _python_code(job)
        if found is None:
            return run_cold(job, policy)
        sb = self._session()
        try:
            result: RunResult = sb.run_python(_with_argv(*found), **_call_limits(job, policy))
        except BaseException:
            # A session that failed a call is not trusted with the next job.
            sb.close()
            raise
        if not sb.is_open:
            # The runner crashed under the job: its result says nothing about the job.
            raise SessionClosed("the warm session ended during the job")
        wiped = sb.run_python(_WIPE, timeout=10)
        if not wiped.ok:
            sb.close()  # the next job gets a fresh session rather than a dirty one
        return result

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for sb in sessions:
            sb.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PoolRunner:
    """A Runner serving Python jobs from one-shot pools (`cellblock.run_python`'s kind): each
    job runs in a fresh pre-warmed sandbox, destroyed after it. Each worker thread has its own
    pool of `size` ready sandboxes, so sandboxes are prepared in parallel while jobs run.
    Sandboxes are opened with `policy` (as `WarmRunner`). Other jobs run cold."""

    name = "pool"

    def __init__(self, policy: Policy | None = None, size: int = 1) -> None:
        import threading

        self._policy = policy or Policy()
        self._size = size
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pools: list[Any] = []

    def _pool(self) -> Any:
        from cellblock.pool import Pool

        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = Pool("python", self._policy, self._size)
            with self._lock:
                self._pools.append(pool)
        return pool

    def __call__(self, job: Job, policy: Policy) -> RunResult:
        found = _python_code(job)
        if found is None:
            return run_cold(job, policy)
        result: RunResult = self._pool().run(_with_argv(*found), **_call_limits(job, policy))
        return result

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, []
        for pool in pools:
            pool.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_argv(code: str, args: list[str]) -> str:
    """`code` preceded by setting sys.argv as `python3 -c code args...` would."""
    return f"import sys\nsys.argv = {['-c', *args]!r}\n" + code


def _call_limits(job: Job, policy: Policy) -> dict[str, Any]:
    return {"stdin": job.stdin, "timeout": policy.timeout, "max_output": policy.max_output,
            "env": dict(policy.env) or None}


RunnerName = Literal["cold", "pool", "warm"]
#: The runners `open_runner` knows, by name.
RUNNER_NAMES: tuple[RunnerName, ...] = ("cold", "pool", "warm")


def runner_name(runner: RunnerName | Runner) -> str:
    """The name a runner goes by (in results' environment, and on Ray where each node opens
    its own): "cold", "pool", "warm", or a custom runner's `name` or function name."""
    if isinstance(runner, str):
        return runner
    name = getattr(runner, "name", None)
    if isinstance(name, str):
        return name
    fn = getattr(runner, "__name__", type(runner).__name__)
    return "cold" if fn == "run_cold" else str(fn)


@contextmanager
def open_runner(name: RunnerName, policy: Policy | None = None) -> Iterator[Runner]:
    """The named runner, opened with `policy` (closed on exit): "cold" (`run_cold`), "pool"
    (`PoolRunner`) or "warm" (`WarmRunner`)."""
    if name == "cold":
        yield run_cold
    elif name == "pool":
        with PoolRunner(policy) as pool:
            yield pool
    elif name == "warm":
        with WarmRunner(policy) as warm:
            yield warm
    else:
        raise InvalidSpec(f"unknown runner {name!r} (one of {', '.join(RUNNER_NAMES)})")

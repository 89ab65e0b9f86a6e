"""Judging a dataset: records and their check programs in, result records out.

Every benchmark (HumanEval, MBPP, EvalPlus, generic JSONL) builds one check program per record
and calls `judge`, which opens the runner with the checks' policy, runs the programs through
`cellblock.check.run_checks` and returns each record with "result", "passed", "status",
"detail" and "environment" added. With `backend="ray"` every node of the cluster opens the same
runner with the same policy (`cellblock.ray_backend`): the program, the verdict and the limits
stay the same, and the environment records the backend and every node's versions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from cellblock.batch import RUNNER_NAMES, Backend, Runner, RunnerName, open_runner, runner_name
from cellblock.check import CheckOptions, Verdict, check_policy, environment, run_checks
from cellblock.errors import InvalidSpec
from cellblock.policy import Policy
from cellblock.progress import Progress

#: A runner by name ("cold", "pool", "warm"), or any Runner (opened by the caller with
#: `check_policy(options, policy)`).
RunnerArg = RunnerName | Runner


@contextmanager
def _opened(runner: RunnerArg, policy: Policy) -> Iterator[Runner]:
    if isinstance(runner, str):
        if runner not in RUNNER_NAMES:
            raise InvalidSpec(f"unknown runner {runner!r} (one of {', '.join(RUNNER_NAMES)})")
        with open_runner(runner, policy) as opened:
            yield opened
    else:
        yield runner


def judge(
    records: Sequence[Mapping[str, Any]],
    programs: Sequence[str],
    options: CheckOptions,
    *,
    policy: Policy | None = None,
    runner: RunnerArg = "cold",
    concurrency: int | None = None,
    progress: bool | Progress = True,
    on_retry: Callable[[int, Verdict], None] | None = None,
    dataset: str | None = None,
    backend: Backend = "local",
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Runs `programs[i]` as the check of `records[i]`; returns copies of the records with the
    verdicts (`passed` is None for an infrastructure error) and the run's environment
    (`dataset` names where the records came from)."""
    if len(records) != len(programs):
        raise InvalidSpec(f"{len(records)} records but {len(programs)} programs")
    checks = check_policy(options, policy)
    env = environment(options, checks, runner_name(runner), dataset, backend, address)
    with _opened(runner, checks) as opened:
        verdicts = run_checks(programs, options, checks, opened, concurrency, progress, on_retry,
                              backend, address)
    results = []
    for record, v in zip(records, verdicts, strict=True):
        result = dict(record)
        result.update(result=v.result, passed=v.passed, status=v.status, detail=v.detail,
                      environment=env)
        results.append(result)
    return results

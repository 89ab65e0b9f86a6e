"""`Sandbox.fork()` of a session with a 50 MB workspace and a stateful kernel holding about
100 MB of objects (issue 14; target: <= 100 ms), against the alternatives.

The parent: 50 files of 1 MB (random) in /workspace; its kernel holds 60 MB of bytes, a 20 MB
bytearray and 200,000 small tuples (about 20 MB more), a function and a class. Cases, run
once per round in the same order, rounds interleaved (drift hits every case alike), median
and p90 of `--runs` rounds:
- fork: `parent.fork()`, the fork's session opened, its kernel started, the copies made;
- fork, prepared: `parent.prepare_fork()` beforehand (untimed: the spare session opens in the
  background, e.g. while the agent thinks), then `parent.fork()`;
- fresh session: `Sandbox()` and its Python kernel started, empty (what a fork adds to);
- copy by hand: a fresh session, then every file copied through the files API (`iter_file`
  from the parent, `write_file` into the new one): the workspace only, no kernel state;
- pickle floor: the same objects pickled (protocol 5) to a file of /dev/shm and loaded back,
  in this process, no sandbox: the least any copy of the kernel's state by serialization costs.
Each fork made is checked (a file and a variable), then closed (untimed).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benches"))

from _env import median_ms, percentile, print_environment, table, time_once

import cellblock

FILES = 50
FILE_BYTES = 1 << 20
LIMITS = {"disk": "1g", "memory": "2g"}

KERNEL_STATE = """
import os
blob = os.urandom(60_000_000)
scratch = bytearray(20_000_000)
rows = [(i, str(i)) for i in range(200_000)]
def total():
    return len(blob) + len(scratch) + len(rows)
class Note:
    def __init__(self, text):
        self.text = text
note = Note("forked")
"""


def open_fresh() -> cellblock.Sandbox:
    sb = cellblock.Sandbox(**LIMITS)  # type: ignore[arg-type]
    sb._runtimes.start_python_kernel(60.0)
    return sb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    print_environment()
    with cellblock.Sandbox(**LIMITS) as parent:  # type: ignore[arg-type]
        for i in range(FILES):
            parent.write_file(f"data/f{i:02d}.bin", os.urandom(FILE_BYTES))
        r = parent.run_python(KERNEL_STATE, stateful=True)
        assert r.exit_code == 0, r.stderr
        made: list[cellblock.Sandbox] = []

        def check(fk: cellblock.Sandbox) -> None:
            assert fk.run_python("total(), note.text", stateful=True).value == \
                "(80200000, 'forked')"
            assert len(fk.read_file("data/f07.bin")) == FILE_BYTES

        def fork() -> None:
            made.append(parent.fork())

        def fork_prepared() -> None:
            made.append(parent.fork())

        def fresh() -> None:
            made.append(open_fresh())

        def by_hand() -> None:
            sb = open_fresh()
            for entry in parent.list_dir("data"):
                sb.write_file(f"data/{entry.name}", parent.iter_file(f"data/{entry.name}"))
            made.append(sb)

        floor_state: dict[str, object] = {}
        exec(KERNEL_STATE, floor_state)  # the same objects, in this process
        floor_state.pop("__builtins__")
        floor_objects = {k: v for k, v in floor_state.items() if k in ("blob", "scratch", "rows")}

        def pickle_floor() -> None:
            path = f"/dev/shm/cellblock-fork-bench-{os.getpid()}"
            try:
                with open(path, "wb") as f:
                    pickle.dump(floor_objects, f, protocol=5)
                with open(path, "rb") as f:
                    pickle.load(f)
            finally:
                os.unlink(path)

        def settle(case: object) -> None:
            # Untimed, between cases: check and close what the case made; prepare the spare.
            for sb in made:
                if sb.fork_report is not None:
                    check(sb)
                sb.close()
            made.clear()
            if case is fork_prepared:
                parent.prepare_fork()
                assert parent._spare is not None
                parent._spare.thread.join()

        cases = {"fork": fork, "fork, prepared": fork_prepared, "fresh session": fresh,
                 "copy by hand": by_hand, "pickle floor": pickle_floor}
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for n in range(args.runs + 1):  # the first round warms up
            for name, fn in cases.items():
                settle(fn)
                took = time_once(fn)
                if n:
                    samples[name].append(took)
        report = next((sb.fork_report for sb in made if sb.fork_report), None)
        settle(None)
        steps: dict[str, list[float]] = {}
        for _ in range(3):  # where a fork's time goes (unprepared forks)
            with parent.fork() as fk:
                assert fk.fork_report is not None
                for k, v in fk.fork_report.steps.items():
                    steps.setdefault(k, []).append(v)
    rows = [(name, f"{median_ms(xs):.0f}", f"{percentile(xs, 90) * 1000:.0f}")
            for name, xs in samples.items()]
    print(f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    print(f"Parent: {FILES} x 1 MB workspace, kernel with ~100 MB of objects; "
          f"{args.runs} interleaved rounds")
    print()
    print(table(["case", "median ms", "p90 ms"], rows))
    print()
    print(table(["step of a fork (median of 3)", "ms"],
                [(k, f"{median_ms(v):.0f}") for k, v in steps.items()]))
    if report is not None:
        print(f"\nlast fork: {report}")


if __name__ == "__main__":
    main()

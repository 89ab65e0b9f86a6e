"""`cellblock batch JOBS.jsonl --out RESULTS.jsonl`: run many jobs, resumable.

Each line of JOBS is a job (see `cellblock.batch.Job`); a job without an "id" gets
"line-N". Each line of RESULTS is `{"id": ..., **report}` or `{"id": ..., "error": {kind,
message}}`, written and flushed as jobs finish. Jobs whose id is already in RESULTS are skipped,
so running the same command again after Ctrl-C (or a crash) finishes the batch; a job recorded
as an InfrastructureError (the cluster could not run it) is run again, its new line replacing
the old one. The command exits 3 while infrastructure errors remain in RESULTS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import closing
from pathlib import Path
from typing import Any, TextIO

from cellblock.batch import INFRASTRUCTURE_ERROR, Backend, Job, JobError, Outcome, iter_many
from cellblock.commands.run import add_limit_options, policy_from_args
from cellblock.errors import InvalidSpec
from cellblock.progress import Progress

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
#: Exit status when some jobs are recorded as infrastructure errors (resume to re-run them).
EXIT_INFRA = 3


def _is_infra(row: dict[str, Any]) -> bool:
    error = row.get("error")
    return isinstance(error, dict) and error.get("kind") == INFRASTRUCTURE_ERROR


def finished_ids(path: Path) -> set[str]:
    """Ids of the jobs a results file has a result for: the newest line of each id, unless it
    is an infrastructure error (that job is to be run again)."""
    return {i for i, row in read_results(path).items() if not _is_infra(row)}


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The newest line of each id in a results file (in file order); a torn last line (a crash
    mid-write) is cut off."""
    if not path.exists():
        return {}
    try:
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with path.open("r+b") as f:
                f.truncate(len(complete))
    except OSError as e:
        raise InvalidSpec(f"cannot read results from {path}: {e.strerror}") from None
    rows: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            job_id = str(row["id"])
        except (ValueError, KeyError, TypeError):
            raise InvalidSpec(f"{path}:{n}: not a cellblock results line") from None
        rows.pop(job_id, None)  # the newer line wins, and takes its place in the order
        rows[job_id] = row
    return rows


def compact(path: Path) -> dict[str, dict[str, Any]]:
    """Rewrites a results file with one line per id (the newest) when a resume superseded
    some; atomically, so a crash leaves the old file or the new one. Returns the rows."""
    rows = read_results(path)
    lines = sum(1 for line in path.read_bytes().splitlines() if line.strip())
    if lines != len(rows):
        tmp = path.with_name(path.name + ".compact")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return rows


def read_jobs(path: Path) -> list[tuple[str, Job | JobError]]:
    """(id, job) per line of a JSONL file; lines that are not valid jobs become JobErrors."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSpec(f"cannot read jobs from {path}: {e}") from None
    jobs: list[tuple[str, Job | JobError]] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        job_id = f"line-{n}"
        item: Job | JobError
        try:
            data: Any = json.loads(line)
        except ValueError as e:
            item = JobError(kind="InvalidSpec", message=f"invalid JSON: {e}")
        else:
            if isinstance(data, dict) and data.get("id") is not None:
                job_id = str(data["id"])
            item = _parse_job(data, job_id)
        if job_id in seen:
            raise InvalidSpec(
                f"{path}:{n}: duplicate job id {job_id!r} (first on line {seen[job_id]})")
        seen[job_id] = n
        jobs.append((job_id, item))
    return jobs


def _parse_job(data: Any, job_id: str) -> Job | JobError:
    if not isinstance(data, dict):
        return JobError(kind="InvalidSpec", message="a job must be a JSON object")
    try:
        return Job.parse({**data, "id": job_id})
    except InvalidSpec as e:
        return JobError.from_exception(e)


def _write(out: TextIO, job_id: str, outcome: Outcome) -> None:
    out.write(json.dumps({"id": job_id, **outcome.to_dict()}) + "\n")
    out.flush()


def cmd_batch(args: argparse.Namespace) -> int:
    from cellblock.cli import fail

    if args.concurrency is not None and args.concurrency < 1:
        fail(f"--concurrency must be at least 1, got {args.concurrency}")
    policy = policy_from_args(args)
    out_path = Path(args.out)
    previous = read_results(out_path)
    done = finished_ids(out_path)
    todo = [(i, item) for i, item in read_jobs(Path(args.jobs)) if i not in done]
    if previous and not args.quiet:
        again = len(previous) - len(done)
        print(f"cellblock: resuming: {len(done)} jobs already in {out_path}, {len(todo)} to run"
              + (f" ({again} infrastructure errors run again)" if again else ""),
              file=sys.stderr)
    try:
        out = out_path.open("a", encoding="utf-8")
    except OSError as e:
        fail(f"cannot write results to {out_path}: {e.strerror}")
    # The bar is for people: shown on a terminal only, so piped and logged runs stay clean.
    progress = Progress(len(todo), quiet=args.quiet, live=sys.stderr.isatty())
    runnable = [item for _, item in todo if isinstance(item, Job)]
    with out:
        for job_id, item in todo:
            if isinstance(item, JobError):
                _write(out, job_id, item)
                progress.add(item.reason, True)
        try:
            backend: Backend = "ray" if args.ray else "local"
            with closing(iter_many(runnable, args.concurrency, progress, policy,
                                   backend=backend, address=args.ray)) as outcomes:
                for job, outcome in outcomes:
                    _write(out, job.id, outcome)
        except KeyboardInterrupt:
            progress.close()
            print(f"cellblock: interrupted; {progress.done} of {len(todo)} results saved in "
                  f"{out_path}; run the same command again to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
    progress.close()
    try:
        rows = compact(out_path)
    except OSError as e:
        fail(f"cannot rewrite results in {out_path}: {e.strerror}")
    infra = sum(_is_infra(row) for row in rows.values())
    if infra:
        if not args.quiet:
            print(f"cellblock: {infra} jobs not run (infrastructure errors); run the same "
                  "command again to retry them", file=sys.stderr)
        return EXIT_INFRA
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "batch", help="run the jobs of a JSONL file, each in its own sandbox (resumable)",
        usage="cellblock batch JOBS.jsonl --out RESULTS.jsonl [options]",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("jobs", metavar="JOBS.jsonl", help="one job per line")
    p.add_argument("--out", metavar="RESULTS.jsonl", required=True,
                   help="results, one per line (appended; finished ids are skipped)")
    p.add_argument("--concurrency", metavar="N", type=int, default=None,
                   help="jobs at once (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run on the Ray cluster at ADDRESS (one cellblock actor per node; "
                        "--concurrency is then per node)")
    add_limit_options(p)
    p.set_defaults(func=cmd_batch)

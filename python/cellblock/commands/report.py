"""`cellblock report FILE [--html OUT]`: a summary of batch or eval results, an agent run
(`agent --json`) or a trace (`agent --trace`), as a terminal table and optionally as a
self-contained HTML page with charts."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellblock.errors import InvalidSpec
from cellblock.telemetry.cost import DEFAULT_RATE_PER_HOUR


def cmd_report(args: argparse.Namespace) -> int:
    from cellblock.report import summarize, to_html, to_text

    summary = summarize(args.file, rate_per_hour=args.rate)
    print(to_text(summary), end="")
    if args.html:
        try:
            Path(args.html).write_text(to_html(summary), encoding="utf-8")
        except OSError as e:
            raise InvalidSpec(f"cannot write {args.html}: {e.strerror}") from None
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", help="summarize results, an agent run or a trace")
    p.add_argument("file", metavar="FILE",
                   help="RESULTS.jsonl (batch/eval), an agent --json file or a trace JSONL")
    p.add_argument("--html", metavar="OUT", help="also write a self-contained HTML page")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_HOUR, metavar="USD",
                   help=f"sandbox price per active hour (default {DEFAULT_RATE_PER_HOUR})")
    p.set_defaults(func=cmd_report)

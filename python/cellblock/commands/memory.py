"""`cellblock memory ls|show|search|forget|export|sessions`: what the agent remembers."""

from __future__ import annotations

import argparse
import json
import sys
import time

from cellblock.memory import MemoryStore, default_url
from cellblock.memory.store import default_user


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def cmd_memory(args: argparse.Namespace) -> int:
    with MemoryStore(args.db) as store:
        user = args.user
        if args.action == "ls":
            for e in store.entries(user, args.path):
                print(f"{e.size:>8}  {_when(e.updated_at)}  expires {_when(e.expires_at)}  "
                      f"{e.path}")
            for e in store.list_knowledge():
                print(f"{e.size:>8}  {_when(e.updated_at)}  shared          {e.path}")
        elif args.action == "show":
            print(store.read(user, args.path).content, end="")
        elif args.action == "search":
            for hit in store.search(user, args.query, args.limit):
                print(f"[{hit.tier}] {hit.ref}: {' '.join(hit.snippet.split())}")
        elif args.action == "forget":
            if args.all == (args.path is not None):
                from cellblock.cli import fail

                fail("forget takes a PATH or --all (not both)")
            n = store.forget(user, None if args.all else args.path)
            print(f"forgot {n} entries of user {user}", file=sys.stderr)
        elif args.action == "export":
            json.dump(store.export(user), sys.stdout, indent=1, ensure_ascii=False)
            print()
        elif args.action == "sessions":
            for s in store.checkpoints.sessions(user):
                print(f"{s.id}  {s.status:<9} {s.checkpoints:>3} checkpoints  "
                      f"{_when(s.updated_at)}  {s.task[:60]!r}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "memory", help="inspect and edit the agent's memory",
        description="The agent's memory of one user: files under /memories (medium-term), "
                    "archived turns (short-term), the shared knowledge base (long-term), and "
                    "checkpointed agent sessions.")
    p.add_argument("--db", metavar="URL", default=None,
                   help=f"store URL (default $CELLBLOCK_MEMORY_URL or {default_url()})")
    p.add_argument("--user", metavar="NAME", default=default_user(),
                   help="whose memory (default $CELLBLOCK_USER or the login name)")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = acts.add_parser("ls", help="list memory files")
    ls.add_argument("path", nargs="?", default="/memories", metavar="DIR")
    show = acts.add_parser("show", help="print a memory file")
    show.add_argument("path", metavar="PATH")
    search = acts.add_parser("search", help="full-text search of memory, turns and knowledge")
    search.add_argument("query", metavar="QUERY")
    search.add_argument("--limit", type=int, default=10, metavar="N")
    forget = acts.add_parser("forget", help="delete a memory path, or everything (--all)")
    forget.add_argument("path", nargs="?", metavar="PATH")
    forget.add_argument("--all", action="store_true",
                        help="every file, archived turn and agent session with its checkpoints")
    acts.add_parser("export", help="print everything kept for the user as JSON")
    acts.add_parser("sessions", help="list checkpointed agent sessions")
    p.set_defaults(func=cmd_memory)

"""`cellblock vault init|add|ls|rm`: the local credential vault (see `cellblock.vault`).

Values are read from the terminal without echo, from stdin, from an environment variable or
from a file: never from the command line (argv is visible to every user through /proc).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from pydantic import SecretStr, ValidationError

from cellblock.credentials import Credential
from cellblock.errors import CredentialError, VaultError
from cellblock.vault import Vault, VaultEntry, default_vault_path
from cellblock.vault_key import create_key_file, default_key_path


def _strip_newline(text: str) -> str:
    return text.removesuffix("\n").removesuffix("\r")


def read_value(args: argparse.Namespace) -> str:
    """The value to store, from --from-env, --from-file, the terminal (no echo) or stdin."""
    if args.from_env is not None:
        if args.from_env not in os.environ:
            raise VaultError(f"--from-env {args.from_env}: not set in cellblock's environment")
        return os.environ[args.from_env]
    if args.from_file is not None:
        try:
            return _strip_newline(Path(args.from_file).read_text())
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise VaultError(f"--from-file {args.from_file}: cannot read it: {why}") from None
    if sys.stdin.isatty():
        return getpass.getpass(f"value of {args.name} (not echoed): ")
    return _strip_newline(sys.stdin.read())


def _credential(args: argparse.Namespace, value: str) -> Credential:
    try:
        return Credential(name=args.name, value=SecretStr(value), hosts=args.host,
                          methods=args.method, header=args.header, in_query=args.in_query,
                          in_body=args.in_body, scope="agent" if args.agent else "session")
    except ValidationError as e:
        # Only where and what: pydantic's text would quote the input.
        what = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                         for err in e.errors(include_input=False))
        raise CredentialError(f"credential {args.name!r}: {what}") from None


def _row(e: VaultEntry) -> list[str]:
    return [e.name, e.agent or "-", ",".join(e.hosts), ",".join(e.methods or ["*"]),
            e.header or "*", "+".join(w for w, on in (("query", e.in_query), ("body", e.in_body))
                                      if on) or "-",
            e.created.strftime("%Y-%m-%d %H:%M")]


def _print_table(entries: list[VaultEntry]) -> None:
    rows = [["NAME", "AGENT", "HOSTS", "METHODS", "HEADER", "ALSO", "CREATED"]]
    rows += [_row(e) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_vault(args: argparse.Namespace) -> int:
    key_file = Path(args.key_file) if args.key_file else None
    if args.action == "init":
        path = create_key_file(key_file)
        print(f"cellblock: vault key written to {path} (mode 0600); keep a copy somewhere safe: "
              "without it the vault cannot be opened", file=sys.stderr)
        return 0
    vault = Vault(args.vault, key_file=key_file)
    if args.action == "add":
        if args.argv_value:
            # Not echoed: argparse would print it in its "unrecognized arguments" message.
            raise VaultError("vault add takes no value on the command line (other users see "
                             "argv): give it on stdin, with --from-env or with --from-file")
        if args.from_env is not None and args.from_file is not None:
            raise VaultError("give the value through --from-env or --from-file, not both")
        entry = vault.add(_credential(args, read_value(args)), agent=args.agent,
                          replace=args.replace)
        owner = f" for agent {entry.agent}" if entry.agent else ""
        print(f"cellblock: added {entry.name}{owner} to {vault.path}", file=sys.stderr)
    elif args.action == "ls":
        entries = [e for e in vault.list() if args.agent is None or e.agent == args.agent]
        if args.json:
            print(json.dumps([e.model_dump(mode="json") for e in entries], indent=1))
        else:
            _print_table(entries)
    elif args.action == "rm":
        vault.remove(args.name, agent=args.agent)
        print(f"cellblock: removed {args.name} from {vault.path}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "vault", help="store credentials encrypted for the egress proxy to use",
        description="The local credential vault: values encrypted at rest (AES-256-GCM), "
                    "listed by metadata only, given to sandboxes as placeholders that the "
                    "egress proxy replaces for the credential's hosts.")
    p.add_argument("--vault", metavar="PATH", default=None,
                   help=f"vault file (default $CELLBLOCK_VAULT or {default_vault_path()})")
    p.add_argument("--key-file", metavar="PATH", default=None,
                   help="key file, mode 0600 (default $CELLBLOCK_VAULT_KEY, else "
                        f"$CELLBLOCK_VAULT_KEY_FILE or {default_key_path()})")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    acts.add_parser("init", help="create a new random key file (mode 0600)")
    add = acts.add_parser(
        "add", help="store a credential (value from the terminal, stdin, --from-env or "
                    "--from-file; never from the command line)")
    add.add_argument("name", metavar="NAME", help="the environment variable that will hold "
                                                   "its placeholder")
    add.add_argument("argv_value", nargs="*", help=argparse.SUPPRESS)
    add.add_argument("--host", action="append", required=True, metavar="HOST",
                     help="a host it may be sent to (repeatable; *.example.com, :port)")
    add.add_argument("--method", action="append", default=None, metavar="METHOD",
                     help="substitute only in requests of this method (repeatable)")
    add.add_argument("--header", default=None, metavar="NAME",
                     help="substitute only in this request header (e.g. Authorization)")
    add.add_argument("--agent", default=None, metavar="AGENT",
                     help="agent-scoped: every session of this agent gets it")
    add.add_argument("--in-query", action="store_true", help="also substitute in URL queries")
    add.add_argument("--in-body", action="store_true", help="also substitute in request bodies")
    add.add_argument("--from-env", default=None, metavar="VAR",
                     help="take the value from this environment variable")
    add.add_argument("--from-file", default=None, metavar="PATH",
                     help="take the value from this file (one trailing newline dropped)")
    add.add_argument("--replace", action="store_true", help="replace an entry of that name")
    ls = acts.add_parser("ls", help="list credentials (metadata only, never values)")
    ls.add_argument("--agent", default=None, metavar="AGENT", help="only this agent's")
    ls.add_argument("--json", action="store_true", help="print JSON")
    rm = acts.add_parser("rm", help="remove a credential")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("--agent", default=None, metavar="AGENT",
                    help="the agent's credential of that name")
    p.set_defaults(func=cmd_vault)

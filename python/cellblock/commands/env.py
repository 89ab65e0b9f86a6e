"""`cellblock env build FILE | ls | rm NAME | gc | inspect NAME`: environments built once,
cached and mounted read-only into runs (`cellblock run --env NAME -- ...`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from cellblock.environments.build import build
from cellblock.environments.spec import EnvironmentSpec
from cellblock.environments.store import Store
from cellblock.errors import CellblockError


def _log(msg: str) -> None:
    print(f"cellblock env: {msg}", file=sys.stderr, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    spec = EnvironmentSpec.from_toml(args.file)
    start = time.perf_counter()
    result = build(spec, Store(args.store), log=None if args.quiet else _log)
    out: dict[str, Any] = {"name": result.record.name, "id": result.record.id,
           "seconds": round(time.perf_counter() - start, 3),
           "steps": [{"step": s.step, "layer": s.key, "cached": s.cached,
                      "seconds": round(s.seconds, 3)} for s in result.steps]}
    if args.json:
        print(json.dumps(out))
    else:
        built = sum(not s.cached for s in result.steps)
        print(f"{out['name']}  {out['id'][:12]}  {built} layer(s) built, "
              f"{len(result.steps) - built} cached, {out['seconds']}s")
    return 0


def _summary(store: Store, name: str) -> dict[str, Any]:
    rec = store.record(name)
    size = 0
    for layer in rec.layers:
        size += int(store.manifest(layer.key).get("bytes", 0))
    return {"name": rec.name, "id": rec.id, "layers": [layer.step for layer in rec.layers],
            "bytes": size, "built": rec.built}


def cmd_ls(args: argparse.Namespace) -> int:
    store = Store(args.store)
    rows = []
    for name in store.names():
        try:
            rows.append(_summary(store, name))
        except CellblockError as e:
            rows.append({"name": name, "error": f"{type(e).__name__}: {e}"})
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        if "error" in row:
            print(f"{row['name']}  {row['error']}")
        else:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["built"]))
            print(f"{row['name']}  {row['id'][:12]}  {'+'.join(row['layers']) or '-'}  "
                  f"{row['bytes'] >> 10} KiB  {when}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = Store(args.store)
    for name in args.names:
        removed = store.remove(name)
        print(f"removed {name} ({len(removed)} unused layer(s) freed{_kept(store)})")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    store = Store(args.store)
    removed = store.collect()
    print(f"{len(removed)} unused layer(s) freed{_kept(store)}")
    return 0


def _kept(store: Store) -> str:
    kept = store.unnamed_layers()
    return (f"; {len(kept)} kept while a run or session uses them, freed by a later "
            "'cellblock env gc'" if kept else "")


def cmd_inspect(args: argparse.Namespace) -> int:
    store = Store(args.store)
    rec = store.record(args.name)
    store.check(rec)
    layers = []
    for layer in rec.layers:
        manifest = store.verify_layer(layer.key) if args.verify else store.manifest(layer.key)
        layers.append({"step": layer.step, "key": layer.key, "files": manifest.get("files"),
                       "bytes": manifest.get("bytes"), "inputs": manifest.get("inputs"),
                       "path": str(store.layer_dir(layer.key) / "root")})
    print(json.dumps({"name": rec.name, "id": rec.id, "env": rec.env, "paths": rec.paths,
                      "declaration": rec.declaration, "layers": layers,
                      "verified": bool(args.verify)}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("env", help="build, list, inspect and remove environments")
    p.add_argument("--store", metavar="DIR",
                   help="store directory (default $XDG_DATA_HOME/cellblock/envs)")
    env_sub = p.add_subparsers(dest="env_command", metavar="ACTION", required=True)
    b = env_sub.add_parser("build", help="build an environment from a TOML declaration")
    b.add_argument("file", metavar="FILE")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    b.set_defaults(func=cmd_build)
    ls = env_sub.add_parser("ls", help="list built environments")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    rm = env_sub.add_parser("rm", help="remove environments (and their unused layers)")
    rm.add_argument("names", metavar="NAME", nargs="+")
    rm.set_defaults(func=cmd_rm)
    gc = env_sub.add_parser("gc", help="remove the layers no environment uses (those kept "
                                       "by 'rm' while a run used them)")
    gc.set_defaults(func=cmd_gc)
    i = env_sub.add_parser("inspect", help="show an environment's layers and declaration")
    i.add_argument("name", metavar="NAME")
    i.add_argument("--verify", action="store_true",
                   help="recompute every layer's digest (CorruptEnvironment on a mismatch)")
    i.set_defaults(func=cmd_inspect)

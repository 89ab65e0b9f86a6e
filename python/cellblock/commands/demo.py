"""`cellblock demo`: a short tour of isolated runs (no API key needed)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from typing import Any

from cellblock.sandbox import run

#: Each step: (title, argv, extra run() keywords).
STEPS: list[tuple[str, list[str], dict[str, Any]]] = [
    ("who am I inside?", ["sh", "-c", "id; hostname; cat /proc/self/uid_map"], {}),
    ("the host's files are not there",
        ["sh", "-c", "ls /root /home /work 2>&1; cat /etc/shadow 2>&1"], {}),
    ("only loopback", ["sh", "-c", "cat /proc/net/dev | tail -n +3 | cut -d: -f1"], {}),
    ("a fork bomb stays bounded", ["python3", "-c",
        "import os\nn=0\nfor i in range(200):\n    try:\n        if os.fork()==0:\n"
        "            import time; time.sleep(2); os._exit(0)\n        n+=1\n"
        "    except OSError as e:\n"
        "        print('fork refused after', n, 'children:', e.strerror); break"],
        {"pids": 32, "timeout": 10}),
    ("memory cap", ["python3", "-c", "x = bytearray(512 << 20)"], {"memory": "64M"}),
    ("wall-clock timeout", ["sleep", "30"], {"timeout": 0.5}),
    ("a secret is redacted from output",
        ["sh", "-c", "echo token=$API_TOKEN; printf %s \"$API_TOKEN\" | base64"],
        {"secrets": {"API_TOKEN": "sk-demo-1234567890abcdef"}}),
    ("refused syscalls are reported", ["python3", "-c",
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.unshare(0x10000000)\nprint('unshare ->', r, os.strerror(ctypes.get_errno()))"],
        {}),
]


def cmd_demo(args: argparse.Namespace) -> int:
    for title, argv, kw in STEPS:
        print(f"\n== {title}: {' '.join(argv).splitlines()[0][:70]}")
        r = run(argv, **kw)
        out = (r.stdout + r.stderr).strip()
        if out:
            print("   " + out.replace("\n", "\n   "))
        print(f"   -> reason={r.reason} exit={r.exit_code} signal={r.signal} "
              f"wall={r.wall_time_s * 1000:.1f}ms peak={r.peak_memory_bytes >> 10}KiB")
        if r.violations:
            print(f"   -> violations: {r.violations}")
        enforced = {k: v for k, v in r.enforcement.items()}
        print(f"   -> enforcement: {enforced}")
    if not args.no_agent and shutil.which(sys.executable):
        print("\n== the agent loop, driven by the offline demo model")
        cmd = [sys.executable, "-m", "cellblock.cli", "agent", "--model", "offline",
               "compute the primes below 100 with python, save them to primes.txt"
               " and read the file back"]
        subprocess.run(cmd, check=False)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="a short demonstration of isolated runs")
    p.add_argument("--no-agent", action="store_true", help="skip the agent-loop part")
    p.set_defaults(func=cmd_demo)

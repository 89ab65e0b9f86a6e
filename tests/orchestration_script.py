"""Runs an orchestrator tree against a fake Anthropic server and reports, as JSON, what
happened to the sub-agents' sandboxes and to the `sleep` processes started in them.

Run as `python3 -c "$(cat this)" SPEC_JSON` by tests/test_orchestration.py, as this user and
as uid 65534. SPEC: path (put first on sys.path), url (the fake server), mode ("timeout" or
"cancel"), timeout (seconds, the sub-agents' timeout_seconds), needle (the sleep command the
sleepers run), expect (how many sleeps run at once before "cancel" cancels the tree).
"""

import json
import os
import sys
import threading
import time

spec = json.loads(sys.argv[1])
if "path" in spec:
    sys.path.insert(0, spec["path"])
os.environ["ANTHROPIC_API_KEY"] = "test-key"
os.environ["ANTHROPIC_BASE_URL"] = spec["url"]

from cellblock.agent.spec import AgentSpec, SubAgents, Team  # noqa: E402

needle = spec["needle"].split()


def scan():
    """Host pids whose argv is exactly the needle."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")[:-1]
            except OSError:
                continue
            if [a.decode(errors="replace") for a in argv] == needle:
                found.append(int(name))
    return found


sessions = []
sub = {"max_concurrent": 3, "timeout_seconds": spec["timeout"]}
team = Team([
    AgentSpec(name="lead", instructions="[agent:lead] Delegate.", tools=[],
              sub_agents=SubAgents(allowed_agents=["sleeper", "mid"], **sub)),
    AgentSpec(name="mid", instructions="[agent:mid] Delegate further.", tools=[],
              sub_agents=SubAgents(allowed_agents=["sleeper"], **sub)),
    AgentSpec(name="sleeper", instructions="[agent:sleeper] Sleep.", tools=["run_shell"]),
], on_session=sessions.append)

seen = set()
stop = threading.Event()
most_at_once = 0


def watch():
    global most_at_once
    while not stop.is_set():
        now = scan()
        seen.update(now)
        most_at_once = max(most_at_once, len(now))
        time.sleep(0.02)


agent = team.build("lead")


def cancel_when_sleeping():
    global most_at_once
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = scan()
        if len(now) >= spec["expect"]:
            seen.update(now)  # the watcher may not look again before they are killed
            most_at_once = max(most_at_once, len(now))
            break
        time.sleep(0.02)
    agent.cancel.cancel("the test cancelled the run")


threads = [threading.Thread(target=watch, daemon=True)]
if spec["mode"] == "cancel":
    threads.append(threading.Thread(target=cancel_when_sleeping, daemon=True))
for t in threads:
    t.start()
started = time.monotonic()
result = agent.run("go")
elapsed = time.monotonic() - started
stop.set()
threads[0].join()
time.sleep(0.2)  # nothing may come back later either
print(json.dumps({
    "result": result.to_dict(), "elapsed": elapsed,
    "sessions": [s.is_open for s in sessions], "seen": sorted(seen),
    "most_at_once": most_at_once, "left": scan(),
    "alive": [p for p in seen if os.path.exists(f"/proc/{p}")],
}))

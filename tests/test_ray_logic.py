"""The Ray driver's fault handling, against a scripted stand-in for the `ray` module (no
cluster): which failures replace an actor, which count as attempts, which are re-sent, what
ends as an InfrastructureError, and what the actors' constructors get. The real cluster is in
tests/test_ray.py."""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from itertools import count
from typing import Any

import pytest

ray_exceptions = pytest.importorskip("ray.exceptions",
                                     reason="make test installs ray (the cellblock[ray] extra)")

import cellblock.ray_backend as rb  # noqa: E402
from cellblock.batch import Job, JobError, Limits, Outcome, is_infrastructure  # noqa: E402
from cellblock.policy import Policy  # noqa: E402

HANG = object()
#: Node ids (Ray checks their form).
N1, N2, DYING = "11" * 28, "22" * 28, "dd" * 28
#: script(node_id, actor number on that node, method, args) -> value, exception, or HANG
Script = Callable[[str, int, str, tuple[Any, ...]], Any]


class FakeRef:
    def __init__(self, value: Any) -> None:
        self.value = value


class FakeHandle:
    def __init__(self, ray: FakeRay, node: str, number: int, args: tuple[Any, ...]) -> None:
        self.ray, self.node, self.number, self.args = ray, node, number, args
        self.killed = False

    def __getattr__(self, method: str) -> Any:
        handle = self

        class Method:
            @staticmethod
            def remote(*args: Any) -> FakeRef:
                handle.ray.calls.append((handle.node, handle.number, method, args))
                if handle.killed:
                    return FakeRef(ray_exceptions.ActorDiedError())
                return FakeRef(handle.ray.script(handle.node, handle.number, method, args))
        return Method


class FakeRay:
    """Enough of `ray` for RayBatch: nodes, actors, remote calls, wait, get, kill."""

    exceptions = ray_exceptions

    def __init__(self, nodes: list[str], script: Script) -> None:
        self.node_ids = nodes
        self.script = script
        self.actors: list[FakeHandle] = []
        self.calls: list[tuple[str, int, str, tuple[Any, ...]]] = []
        self._numbers: dict[str, count[int]] = {}

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": n, "Alive": True, "Resources": {"CPU": 2}} for n in self.node_ids]

    def remote(self, **_: Any) -> Callable[[Any], Any]:
        ray = self

        def wrap(cls: Any) -> Any:
            class Options:
                def __init__(self, kw: dict[str, Any]) -> None:
                    self.node = kw["scheduling_strategy"].node_id

                def remote(self, *args: Any) -> FakeHandle:
                    number = next(ray._numbers.setdefault(self.node, count()))
                    handle = FakeHandle(ray, self.node, number, args)
                    ray.actors.append(handle)
                    return handle

            class ActorClass:
                @staticmethod
                def options(**kw: Any) -> Options:
                    return Options(kw)
            return ActorClass
        return wrap

    def wait(self, refs: list[FakeRef], num_returns: int, timeout: float
             ) -> tuple[list[FakeRef], list[FakeRef]]:
        done = [r for r in refs if r.value is not HANG][:num_returns]
        if not done:
            time.sleep(timeout)
        return done, [r for r in refs if r not in done]

    def get(self, ref: FakeRef, timeout: float | None = None) -> Any:
        if isinstance(ref.value, BaseException):
            raise ref.value
        return ref.value

    def kill(self, handle: FakeHandle, no_restart: bool = True) -> None:
        handle.killed = True


def ran(node: str, job: Job) -> JobError:
    """A stand-in outcome saying where the job ran."""
    return JobError(kind="Ran", message=f"{job.id} on {node}")


def normal(node: str, number: int, method: str, args: tuple[Any, ...]) -> Any:
    if method == "start":
        return {"host": node}
    if method == "run":
        return ran(node, args[0])
    return None


def run_batch(ray: FakeRay, jobs: list[Job], policy: Policy | None = None
              ) -> dict[str, Outcome]:
    batch = rb.RayBatch(ray, policy, "cold", 2)
    got: dict[str, Outcome] = {}
    try:
        for _, job, outcome in batch.run(jobs, None):
            assert job.id not in got, f"{job.id} recorded twice"
            got[job.id] = outcome
    finally:
        batch.close()
    assert sorted(got) == sorted(j.id for j in jobs)
    return got


JOBS = [Job(id=f"j{i}", argv=["true"]) for i in range(6)]


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb, "HOLD_S", 0.01)


def test_the_policy_and_its_secrets_go_to_start_not_to_the_constructor() -> None:
    ray = FakeRay([N1, N2], normal)
    policy = Policy(secrets={"API_TOKEN": "s3cret-value"}, env={"A": "1"})
    run_batch(ray, JOBS, policy)
    assert [a.args for a in ray.actors] == [("cold",), ("cold",)]
    assert all(b"s3cret-value" not in pickle.dumps(a.args) for a in ray.actors)
    starts = [args for _, _, method, args in ray.calls if method == "start"]
    assert starts == [(policy,), (policy,)]


def test_an_actor_that_died_is_replaced_on_its_alive_node() -> None:
    def script(node: str, number: int, method: str, args: tuple[Any, ...]) -> Any:
        if method == "run" and number == 0 and args[0].id == "j1":
            return ray_exceptions.ActorDiedError()
        return normal(node, number, method, args)

    ray = FakeRay([N1], script)
    got = run_batch(ray, JOBS)
    assert all(o.kind == "Ran" for o in got.values() if isinstance(o, JobError))
    assert got["j1"].message == f"j1 on {N1}"  # type: ignore[union-attr]
    assert [(a.node, a.number) for a in ray.actors] == [(N1, 0), (N1, 1)]
    assert ray.actors[0].killed
    # The rerun went to the new actor.
    reruns = [n for node, n, m, args in ray.calls if m == "run" and args[0].id == "j1"]
    assert reruns == [0, 1]


@pytest.mark.parametrize("error", [
    lambda: ray_exceptions.RuntimeEnvSetupError("pip failed"),
    lambda: ray_exceptions.ActorUnschedulableError("node is dead"),
    lambda: ray_exceptions.OutOfMemoryError("memory monitor killed the worker"),
    lambda: ray_exceptions.ActorDiedError(),
    lambda: ray_exceptions.RaySystemError("boom"),
], ids=["runtime-env", "unschedulable", "oom", "died", "other"])
def test_infrastructure_failures_are_attempts_then_an_infrastructure_error(
    error: Callable[[], BaseException],
) -> None:
    def script(node: str, number: int, method: str, args: tuple[Any, ...]) -> Any:
        if method == "run" and args[0].id == "j2":
            return error()
        return normal(node, number, method, args)

    ray = FakeRay([N1, N2], script)
    got = run_batch(ray, JOBS)
    bad = got.pop("j2")
    assert is_infrastructure(bad) and not bad.ok
    assert f"not run after {rb.MAX_ATTEMPTS} attempt(s)" in bad.message  # type: ignore[union-attr]
    assert type(error()).__name__ in bad.message  # type: ignore[union-attr]
    assert all(isinstance(o, JobError) and o.kind == "Ran" for o in got.values())
    tries = [c for c in ray.calls if c[2] == "run" and c[3][0].id == "j2"]
    assert len(tries) == rb.MAX_ATTEMPTS


def test_an_unavailable_actor_gets_the_job_again_without_counting_an_attempt() -> None:
    tries = count()

    def script(node: str, number: int, method: str, args: tuple[Any, ...]) -> Any:
        if method == "run" and args[0].id == "j0" and next(tries) < rb.MAX_TRANSIENT:
            return ray_exceptions.ActorUnavailableError("connection reset", None)
        return normal(node, number, method, args)

    ray = FakeRay([N1], script)
    got = run_batch(ray, JOBS)
    assert got["j0"] == ran(N1, JOBS[0])
    assert len(ray.actors) == 1  # not treated as a loss: no new actor
    assert len([c for c in ray.calls if c[2] == "run" and c[3][0].id == "j0"]) == \
        rb.MAX_TRANSIENT + 1


def test_a_node_whose_actor_cannot_start_is_given_up_and_jobs_are_infrastructure_errors(
) -> None:
    def script(node: str, number: int, method: str, args: tuple[Any, ...]) -> Any:
        if method == "start":
            return ray_exceptions.RuntimeEnvSetupError("no such pip package")
        return normal(node, number, method, args)

    ray = FakeRay([N1], script)
    got = run_batch(ray, JOBS)
    assert len(ray.actors) == rb.MAX_STARTS
    assert not [c for c in ray.calls if c[2] == "run"]  # no job was sent to a broken actor
    for o in got.values():
        assert is_infrastructure(o)
        assert "RuntimeEnvSetupError" in o.message  # type: ignore[union-attr]


def test_a_node_still_starting_is_not_waited_for_once_the_jobs_are_done() -> None:
    def script(node: str, number: int, method: str, args: tuple[Any, ...]) -> Any:
        if node == DYING and method == "start":
            return HANG
        return normal(node, number, method, args)

    ray = FakeRay([DYING, N1], script)
    got = run_batch(ray, JOBS)
    assert all(o == ran(N1, j) for j, o in zip(JOBS, got.values(), strict=True))


def test_a_hung_actor_is_killed_at_the_job_deadline_and_its_job_runs_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rb, "DEADLINE_GRACE_S", 0.2)

    def script(node: str, number: int, method: str, args: tuple[Any, ...]) -> Any:
        if method == "run" and number == 0 and args[0].id == "j3":
            return HANG
        return normal(node, number, method, args)

    ray = FakeRay([N1], script)
    jobs = [Job(id=f"j{i}", argv=["true"], limits=Limits(timeout=0.1)) for i in range(6)]
    got = run_batch(ray, jobs)
    assert got["j3"] == ran(N1, jobs[3])
    assert ray.actors[0].killed and len(ray.actors) == 2

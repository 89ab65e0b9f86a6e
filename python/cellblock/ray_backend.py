"""Scale-out on Ray: a batch fanned out to one long-lived cellblock actor per node.

Each actor holds its node's runner ("cold" sandboxes, a "pool" of pre-warmed ones or "warm"
sessions) and serves as many jobs at once as the node has CPUs. The driver keeps every ready
actor busy, collects results as they finish and records every job exactly once:

- an actor that died (its worker process or its whole node) is replaced on its node while the
  node is alive, and the jobs it was running are run again (on any ready actor);
- `ActorUnavailableError` (the actor is unreachable for a moment) holds the actor back briefly
  and re-sends the job, without counting it as an attempt;
- `RuntimeEnvSetupError`, `ActorUnschedulableError`, `OutOfMemoryError`, any other Ray error and
  a job outliving its deadline (its timeout + `DEADLINE_GRACE_S`: the actor is hung and is
  killed) are infrastructure failures of that attempt;
- a job that still has no result after `MAX_ATTEMPTS` attempts, or that no node can serve any
  more, is recorded as an `InfrastructureError`, never as a failed sample; the batch goes on.

A new actor gets jobs only once its `start` call has returned (so a node that is dying, or whose
runtime env cannot be set up, costs no job an attempt); a node whose actor failed to start
`MAX_STARTS` times in a row gets none for the rest of the batch.

Where the batch's data goes: an actor's constructor arguments are kept in Ray's control store
(the GCS, and its Redis when the GCS is made fault tolerant) for the actor's lifetime, so the
constructor gets only the runner's name. The policy, secrets included, reaches the actor as the
argument of its `start` call, and each job as the argument of a `run` call: both travel in the
task's RPC to the node (through the object store when larger than Ray's inline limit, 100 KiB)
and are not stored by the GCS. A job's `env` travels with the job. Ray is the optional extra
`cellblock[ray]`.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections import deque
from collections.abc import Generator, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from cellblock.batch import (
    INFRASTRUCTURE_ERROR,
    Job,
    JobError,
    Outcome,
    Runner,
    RunnerName,
    _run_one,
    is_infrastructure,
    job_policy,
    open_runner,
)
from cellblock.errors import InvalidSpec
from cellblock.policy import Policy
from cellblock.progress import Progress

#: Attempts per job before it is recorded as an infrastructure failure.
MAX_ATTEMPTS = 3
#: Seconds between looks for nodes that joined (and actors to place on them).
NODE_REFRESH_S = 5.0
#: Seconds a job may run past its own timeout before its actor counts as hung.
DEADLINE_GRACE_S = 60.0
#: Failed starts in a row after which a node gets no actor for the rest of the batch.
MAX_STARTS = 3
#: Seconds an actor may take to start (runtime env set-up included) before it counts as failed.
START_TIMEOUT_S = 300.0
#: Seconds an actor that was unreachable gets no job; re-sends of a job it could not take.
HOLD_S = 1.0
MAX_TRANSIENT = 5

_log = logging.getLogger("cellblock.ray")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidSpec("the Ray backend needs the ray extra: pip install 'cellblock[ray]'"
                          ) from None
    return ray


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def node_runtime() -> dict[str, Any]:
    """The versions on this node that a result depends on (the sandbox's python3 is asked by
    `cellblock.check.environment`)."""
    return {"host": platform.node(), "kernel": platform.release(),
            "python": platform.python_version(), "cellblock": _version("cellblock"),
            "ray": _version("ray")}


class NodeWorker:
    """The per-node actor: runs jobs with the node's runner (a Ray actor class body).

    The constructor takes only the runner's name (constructor arguments stay in the GCS); the
    policy comes with `start`."""

    def __init__(self, runner: RunnerName) -> None:
        self._name = runner
        self._stack = ExitStack()
        self._runner: Runner | None = None
        self._policy: Policy | None = None

    def start(self, policy: Policy | None) -> dict[str, Any]:
        """Opens the runner with the batch's policy; returns the node's runtime versions."""
        self._policy = policy
        self._runner = self._stack.enter_context(open_runner(self._name, policy))
        return node_runtime()

    def run(self, job: Job) -> Outcome:
        """Runs one job under the batch's policy; errors become the job's JobError."""
        if self._runner is None:
            raise RuntimeError("NodeWorker.run before start")
        return _run_one(self._runner, job, self._policy)

    def pid(self) -> int:
        """The actor's process id (for operators and fault-injection tests)."""
        return os.getpid()

    def close(self) -> None:
        """Ends the runner's sessions or pools, if any."""
        self._runner = None
        self._stack.close()


@dataclass
class _Actor:
    node_id: str
    handle: Any
    slots: int
    ready: bool = False
    alive: bool = True
    busy: int = 0
    hold_until: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    runtime: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Node:
    failed_starts: int = 0
    not_before: float = 0.0
    last_error: str = ""


@dataclass
class _Task:
    index: int
    job: Job
    attempt: int = 1
    transient: int = 0


def connect(address: str | None) -> Any:
    """The ray module, connected to `address` ("auto", "ray://host:port", "host:port"), or to
    a local instance started for this process when None."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False
                 if address is None else None, ignore_reinit_error=True)
    return ray


class RayBatch:
    """The actors and in-flight jobs of one batch on a Ray cluster (see `iter_on_ray`)."""

    def __init__(self, ray: Any, policy: Policy | None, runner: RunnerName,
                 per_node: int | None) -> None:
        self._ray = ray
        self._policy = policy
        self._runner = runner
        self._per_node = per_node
        self._cls = ray.remote(num_cpus=0)(NodeWorker)
        self._actors: dict[str, _Actor] = {}
        self._nodes: dict[str, _Node] = {}
        self._starting: dict[Any, _Actor] = {}
        self._alive_nodes: set[str] = set()
        self._refreshed = 0.0
        self._refresh_at = 0.0  # sooner than NODE_REFRESH_S when an actor died
        exc = ray.exceptions
        # The actor (its process or its node) is gone: replace it, run its jobs again.
        self._lost = (exc.RayActorError, exc.WorkerCrashedError, exc.NodeDiedError,
                      exc.ObjectLostError, exc.LocalRayletDiedError, exc.OutOfMemoryError,
                      exc.RuntimeEnvSetupError, exc.ActorUnschedulableError)

    def workers(self) -> list[Any]:
        """Handles of the ready actors (`pid.remote()` gives a worker's process id)."""
        return [a.handle for a in self._actors.values() if a.alive and a.ready]

    def running(self) -> dict[str, int]:
        """Jobs in flight on each node's live actor, by node id."""
        return {a.node_id: a.busy for a in self._actors.values() if a.alive}

    def runtimes(self) -> dict[str, dict[str, Any]]:
        """Runtime versions reported by each node's actor, by node id."""
        return {a.node_id: a.runtime for a in self._actors.values() if a.runtime}

    def refresh(self) -> None:
        """Starts an actor on every alive node that has no live one (a node that joined, or
        whose actor died), unless the node is backing off or was given up."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        now = self._refreshed = time.monotonic()
        self._refresh_at = now + NODE_REFRESH_S
        self._alive_nodes = set()
        for node in self._ray.nodes():
            node_id = node["NodeID"]
            if not node.get("Alive"):
                continue
            self._alive_nodes.add(node_id)
            current = self._actors.get(node_id)
            state = self._nodes.setdefault(node_id, _Node())
            if current is not None and current.alive:
                continue
            if state.failed_starts >= MAX_STARTS or now < state.not_before:
                continue
            slots = self._per_node or max(int(node.get("Resources", {}).get("CPU", 1)), 1)
            # One thread more than job slots: `pid` and `close` never wait behind jobs.
            handle = self._cls.options(
                max_concurrency=slots + 1, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self._runner)
            actor = _Actor(node_id, handle, slots)
            self._actors[node_id] = actor
            self._starting[handle.start.remote(self._policy)] = actor

    def _hopeful(self) -> bool:
        """Whether some actor is alive, or some alive node may still get one."""
        if any(a.alive for a in self._actors.values()):
            return True
        return any(self._nodes[n].failed_starts < MAX_STARTS for n in self._alive_nodes)

    def _started(self, ref: Any) -> None:
        actor = self._starting.pop(ref)
        try:
            actor.runtime = self._ray.get(ref)
        except self._ray.exceptions.RayError as e:
            self._start_failed(actor, _why(e))
            return
        self._nodes[actor.node_id].failed_starts = 0
        actor.ready = actor.alive

    def _start_failed(self, actor: _Actor, why: str) -> None:
        state = self._nodes[actor.node_id]
        state.failed_starts += 1
        state.not_before = time.monotonic() + HOLD_S * 2 ** state.failed_starts
        state.last_error = why
        _log.warning("node %s: cellblock actor did not start (%s)", actor.node_id[:12], why)
        self._lose(actor)

    def _check_starts(self) -> None:
        """Gives up on actors that take too long to start (the node may be dying)."""
        now = time.monotonic()
        for ref, actor in list(self._starting.items()):
            if now - actor.started_at > START_TIMEOUT_S:
                del self._starting[ref]
                self._start_failed(actor, f"not started after {START_TIMEOUT_S:g} s")

    def _lose(self, actor: _Actor) -> None:
        """Marks an actor dead (and makes sure it is), so that its node gets a new one."""
        if not actor.alive:
            return
        actor.alive = False
        self._refresh_at = 0.0
        try:
            self._ray.kill(actor.handle, no_restart=True)
        except Exception:  # already gone with its node
            pass

    def close(self) -> None:
        """Closes the actors' runners (briefly waiting for them), then ends the actors."""
        alive = [a for a in self._actors.values() if a.alive]
        closing = []
        for a in alive:
            try:
                closing.append(a.handle.close.remote())
            except Exception:  # a dead node's actor: nothing left to close
                pass
        if closing:
            self._ray.wait(closing, num_returns=len(closing), timeout=10)
        for a in alive:
            try:
                self._ray.kill(a.handle, no_restart=True)
            except Exception:
                pass

    def _deadline(self, job: Job) -> float:
        timeout = job_policy(job, self._policy).limits()["timeout"]
        return float(timeout) + DEADLINE_GRACE_S

    def _again(self, task: _Task, why: str, retry: deque[_Task]) -> JobError | None:
        """The job's record when it has used its attempts; else queues it for another."""
        if task.attempt >= MAX_ATTEMPTS:
            return _infra(task, why)
        _log.warning("job %s: attempt %d failed (%s); running it again", task.job.id,
                     task.attempt, why)
        retry.append(_Task(task.index, task.job, task.attempt + 1))
        return None

    def run(self, jobs: Iterable[Job], bar: Progress | None
            ) -> Generator[tuple[int, Job, Outcome], None, None]:
        ray = self._ray
        source = iter(enumerate(jobs))
        retry: deque[_Task] = deque()
        pending: dict[Any, tuple[_Task, _Actor, float]] = {}
        exhausted = False

        def take() -> _Task | None:
            nonlocal exhausted
            if retry:
                return retry.popleft()
            if not exhausted:
                nxt = next(source, None)
                if nxt is not None:
                    return _Task(*nxt)
                exhausted = True
            return None

        def record(task: _Task, outcome: Outcome) -> tuple[int, Job, Outcome]:
            if bar is not None:
                bar.add(outcome.reason, not outcome.ok, infrastructure=is_infrastructure(outcome))
            return task.index, task.job, outcome

        self.refresh()
        while True:
            now = time.monotonic()
            if now >= self._refresh_at or any(
                    self._refreshed < s.not_before <= now for s in self._nodes.values()):
                self.refresh()  # due, an actor died, or a node's backoff ended
            ready = [a for a in self._actors.values()
                     if a.alive and a.ready and a.hold_until <= now]
            for actor in sorted(ready, key=lambda a: a.busy - a.slots):
                while actor.busy < actor.slots:
                    task = take()
                    if task is None:
                        break
                    ref = actor.handle.run.remote(task.job)
                    pending[ref] = (task, actor, now + self._deadline(task.job))
                    actor.busy += 1
            if not self._hopeful() and (retry or not exhausted):
                # No node can run anything any more: what is left is the cluster's failure.
                why = "no alive Ray node can run a cellblock actor" + "".join(
                    f"; node {n[:12]}: {s.last_error}" for n, s in self._nodes.items()
                    if s.last_error)
                leftovers = list(retry) + [_Task(i, j) for i, j in source]
                retry.clear()
                exhausted = True
                for task in leftovers:
                    yield record(task, _infra(task, why))
            if not pending and exhausted and not retry:
                return  # actors still starting are not waited for
            waits = list(pending) + list(self._starting)
            wake = [self._refresh_at] + [d for _, _, d in pending.values()] + [
                a.hold_until for a in self._actors.values() if a.alive and a.hold_until > now] + [
                s.not_before for s in self._nodes.values() if s.not_before > now] + [
                a.started_at + START_TIMEOUT_S for a in self._starting.values()]
            timeout = max(min(wake) - now, 0.05)
            if not waits:
                time.sleep(timeout)  # every actor on hold or backing off
                continue
            done, _ = ray.wait(waits, num_returns=1, timeout=timeout)
            for ref in done:
                if ref in self._starting:
                    self._started(ref)
                    continue
                task, actor, _ = pending.pop(ref)
                actor.busy -= 1
                try:
                    outcome: Outcome = ray.get(ref)
                except ray.exceptions.ActorUnavailableError as e:
                    actor.hold_until = time.monotonic() + HOLD_S
                    if task.transient < MAX_TRANSIENT:
                        _log.warning("job %s: actor on node %s unreachable (%s); sending the "
                                     "job again", task.job.id, actor.node_id[:12], _why(e))
                        retry.appendleft(_Task(task.index, task.job, task.attempt,
                                               task.transient + 1))
                        continue
                    failed = self._again(task, _why(e), retry)
                    if failed is None:
                        continue
                    outcome = failed
                except self._lost as e:
                    self._lose(actor)
                    failed = self._again(task, _why(e), retry)
                    if failed is None:
                        continue
                    outcome = failed
                except ray.exceptions.RayError as e:
                    failed = self._again(task, _why(e), retry)
                    if failed is None:
                        continue
                    outcome = failed
                yield record(task, outcome)
            self._check_starts()
            now = time.monotonic()
            for ref, (task, actor, deadline) in list(pending.items()):
                if deadline > now:
                    continue
                # The job is far past its own timeout: the actor is hung. Its other jobs fail
                # with RayActorError when it is killed, and run again like this one.
                del pending[ref]
                actor.busy -= 1
                self._lose(actor)
                failed = self._again(task, "the actor did not answer by the job's deadline "
                                     f"({self._deadline(task.job):g} s)", retry)
                if failed is not None:
                    yield record(task, failed)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:300]}"


def _infra(task: _Task, why: str) -> JobError:
    return JobError(kind=INFRASTRUCTURE_ERROR,
                    message=f"not run after {task.attempt} attempt(s): {why}")


def iter_on_ray(
    jobs: Iterable[Job],
    *,
    address: str | None = None,
    policy: Policy | None = None,
    runner: RunnerName = "cold",
    per_node: int | None = None,
    progress: bool | Progress = False,
) -> Generator[tuple[int, Job, Outcome], None, None]:
    """Runs jobs on a Ray cluster; yields `(index, job, outcome)` as jobs finish.

    `per_node` caps the jobs one node runs at once (default: its CPUs); `runner` is the
    runner each node opens with `policy` ("cold", "pool" or "warm", see `open_runner`).
    """
    if per_node is not None and per_node < 1:
        raise InvalidSpec(f"per_node must be at least 1, got {per_node}")
    ray = connect(address)
    bar = progress if isinstance(progress, Progress) else (
        Progress(len(jobs) if isinstance(jobs, list | tuple) else None) if progress else None)
    batch = RayBatch(ray, policy, runner, per_node)
    try:
        yield from batch.run(jobs, bar)
    finally:
        batch.close()
        if bar is not None and progress is True:
            bar.close()


def node_runtimes(address: str | None, policy: Policy | None, seed: int | None
                  ) -> list[dict[str, Any]]:
    """The runtime versions of every alive node, its sandboxes' python3 included (one short
    task per node), sorted by node id; for results' environment."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray = connect(address)
    # Secrets play no part in the versions: they are not sent.
    bare = (policy or Policy()).model_copy(update={"secrets": {}}).model_dump_json()
    probe = ray.remote(num_cpus=0, max_retries=2)(_probe)
    refs = {n["NodeID"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(bare, seed)
            for n in ray.nodes() if n.get("Alive")}
    out = []
    for node_id, ref in sorted(refs.items()):
        try:
            info = ray.get(ref, timeout=120)
        except ray.exceptions.RayError as e:
            info = {"error": _why(e)}
        out.append({"node_id": node_id, **info})
    return out


def _probe(policy_json: str, seed: int | None) -> dict[str, Any]:
    from cellblock.check import interpreter_version

    return {**node_runtime(), "sandbox_python": interpreter_version(policy_json, seed)}

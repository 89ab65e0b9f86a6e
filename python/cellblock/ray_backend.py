"""Scale-out on Ray: a batch fanned out to one long-lived cellblock actor per node.

Each actor holds its node's runner (cold sandboxes, or a `WarmRunner`'s warm sessions) and
serves as many jobs at once as the node has CPUs. The driver keeps every actor busy, collects
results as they finish, and re-runs the jobs of an actor whose node was lost on another node,
so that every job is recorded exactly once. A job that still cannot be served after
`max_attempts` (no node left, or nodes keep dying under it) is recorded as an
`InfrastructureError`, never as a failed sample. Ray is the optional extra `cellblock[ray]`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

from cellblock.batch import Job, JobError, Outcome, _run_one, run_cold
from cellblock.errors import InvalidSpec
from cellblock.policy import Policy
from cellblock.progress import Progress

#: Tries per job before it is recorded as an infrastructure failure.
MAX_ATTEMPTS = 3
#: The JobError kind of a job the cluster could not serve (not the job's own failure).
INFRASTRUCTURE_ERROR = "InfrastructureError"
#: Seconds between looks for nodes that joined (and actors to place on them).
NODE_REFRESH_S = 5.0

_log = logging.getLogger("cellblock.ray")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidSpec("the Ray backend needs the ray extra: pip install 'cellblock[ray]'"
                          ) from None
    return ray


class NodeWorker:
    """The per-node actor: runs jobs with the node's runner (a Ray actor class body)."""

    def __init__(self, policy: Policy | None, warm: bool) -> None:
        from cellblock.batch import WarmRunner

        self._runner: Any = WarmRunner(policy) if warm else run_cold
        self._policy = policy

    def run(self, job: Job) -> Outcome:
        """Runs one job under the batch's policy; errors become the job's JobError."""
        return _run_one(self._runner, job, self._policy)

    def close(self) -> None:
        """Ends the warm sessions, if any."""
        close = getattr(self._runner, "close", None)
        if close is not None:
            close()


@dataclass
class _Actor:
    node_id: str
    handle: Any
    slots: int
    busy: int = 0
    alive: bool = True


@dataclass
class _Task:
    index: int
    job: Job
    attempt: int = 1


def connect(address: str | None) -> Any:
    """The ray module, connected to `address` ("auto", "ray://host:port", "host:port"), or to
    a local instance started for this process when None."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False
                 if address is None else None, ignore_reinit_error=True)
    return ray


class RayBatch:
    """The state of one batch on a Ray cluster (see `iter_on_ray`)."""

    def __init__(self, ray: Any, policy: Policy | None, warm: bool,
                 per_node: int | None) -> None:
        self._ray = ray
        self._policy = policy
        self._warm = warm
        self._per_node = per_node
        self._cls = ray.remote(num_cpus=0)(NodeWorker)
        self._actors: dict[str, _Actor] = {}
        self._refreshed = 0.0

    def refresh(self) -> None:
        """Places an actor on every alive node that has none."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._refreshed = time.monotonic()
        for node in self._ray.nodes():
            node_id = node["NodeID"]
            if not node.get("Alive") or node_id in self._actors:
                continue
            slots = self._per_node or max(int(node.get("Resources", {}).get("CPU", 1)), 1)
            handle = self._cls.options(
                max_concurrency=slots, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self._policy, self._warm)
            self._actors[node_id] = _Actor(node_id, handle, slots)

    def live(self) -> list[_Actor]:
        if time.monotonic() - self._refreshed > NODE_REFRESH_S:
            self.refresh()
        return [a for a in self._actors.values() if a.alive]

    def close(self) -> None:
        for a in self._actors.values():
            if a.alive:
                try:
                    a.handle.close.remote()
                    self._ray.kill(a.handle, no_restart=True)
                except Exception:  # a dead node's actor: nothing left to close
                    pass

    def run(self, jobs: Iterable[Job], bar: Progress | None
            ) -> Generator[tuple[int, Job, Outcome], None, None]:
        ray = self._ray
        lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                ray.exceptions.OwnerDiedError)
        source = iter(enumerate(jobs))
        retry: deque[_Task] = deque()
        pending: dict[Any, tuple[_Task, _Actor]] = {}
        exhausted = False
        self.refresh()
        while True:
            actors = self.live()
            for actor in sorted(actors, key=lambda a: a.busy - a.slots):
                while actor.busy < actor.slots:
                    task = retry.popleft() if retry else None
                    if task is None and not exhausted:
                        nxt = next(source, None)
                        if nxt is None:
                            exhausted = True
                        else:
                            task = _Task(*nxt)
                    if task is None:
                        break
                    pending[actor.handle.run.remote(task.job)] = (task, actor)
                    actor.busy += 1
            if not actors and (retry or not exhausted):
                # Nothing can run anywhere: what is left is the cluster's failure.
                leftovers = list(retry) + [_Task(i, j) for i, j in source]
                retry.clear()
                exhausted = True
                for task in leftovers:
                    yield task.index, task.job, self._infra(task, "no alive Ray node")
            if not pending:
                if exhausted and not retry:
                    return
                continue
            done, _ = ray.wait(list(pending), num_returns=1, timeout=NODE_REFRESH_S)
            for ref in done:
                task, actor = pending.pop(ref)
                actor.busy -= 1
                try:
                    outcome: Outcome = ray.get(ref)
                except lost as e:
                    actor.alive = False
                    if task.attempt >= MAX_ATTEMPTS:
                        outcome = self._infra(task, f"{type(e).__name__}: {e}")
                    else:
                        _log.warning("job %s: node %s lost (%s); running it again elsewhere",
                                     task.job.id, actor.node_id[:12], type(e).__name__)
                        retry.append(_Task(task.index, task.job, task.attempt + 1))
                        continue
                if bar is not None:
                    bar.add(outcome.reason, not outcome.ok)
                yield task.index, task.job, outcome

    @staticmethod
    def _infra(task: _Task, why: str) -> JobError:
        return JobError(kind=INFRASTRUCTURE_ERROR,
                        message=f"not run after {task.attempt} attempt(s): {why}")


def iter_on_ray(
    jobs: Iterable[Job],
    *,
    address: str | None = None,
    policy: Policy | None = None,
    warm: bool = False,
    per_node: int | None = None,
    progress: bool | Progress = False,
) -> Generator[tuple[int, Job, Outcome], None, None]:
    """Runs jobs on a Ray cluster; yields `(index, job, outcome)` as jobs finish.

    `per_node` caps the jobs one node runs at once (default: its CPUs); `warm` serves Python
    jobs from warm sessions on each node (see `WarmRunner`'s trust model).
    """
    if per_node is not None and per_node < 1:
        raise InvalidSpec(f"per_node must be at least 1, got {per_node}")
    ray = connect(address)
    bar = progress if isinstance(progress, Progress) else (
        Progress(len(jobs) if isinstance(jobs, list | tuple) else None) if progress else None)
    batch = RayBatch(ray, policy, warm, per_node)
    try:
        yield from batch.run(jobs, bar)
    finally:
        batch.close()
        if bar is not None and progress is True:
            bar.close()

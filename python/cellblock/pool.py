"""One-shot warm runs: `cellblock.run_python(code)` and `cellblock.run_node(code)`.

Each call takes a pre-warmed sandbox (its zygote listening, for Node a worker started) from a
small pool, runs once in it, and destroys it: nothing of one call can reach another. A
background thread keeps the pool full and closes used sandboxes; pools are shut down at
interpreter exit. Pools are kept per runtime and per session-wide settings (memory, pids,
cpus, disk, profile, network).

The pool size is `CELLBLOCK_POOL_SIZE` (default 2) or `configure(size=...)`.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from cellblock.errors import CellblockError, InvalidSpec
from cellblock.policy import Policy
from cellblock.runtimes.warm import START_TIMEOUT_S, CodeResult
from cellblock.seccomp import SeccompPolicy
from cellblock.secrets import SecretsArg, normalize_secrets
from cellblock.session import Sandbox

Language = Literal["python", "node"]

_size = int(os.environ.get("CELLBLOCK_POOL_SIZE", "2"))


class Pool:
    """Pre-warmed single-use sandboxes for one runtime and one session policy."""

    def __init__(self, language: Language, policy: Policy, size: int) -> None:
        if size < 0:
            raise InvalidSpec(f"pool size must be >= 0, got {size}")
        self.language = language
        self.policy = policy
        self.size = size
        self._ready: collections.deque[Sandbox] = collections.deque()
        self._used: list[Sandbox] = []
        self._starting = 0
        self._failure: CellblockError | None = None
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._refill, name="cellblock-pool", daemon=True)
        self._thread.start()

    def _open(self) -> Sandbox:
        return Sandbox(self.policy, warm=(self.language,))

    def _refill(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._used and (
                    self._failure is not None or len(self._ready) + self._starting >= self.size
                ):
                    self._cond.wait()
                if self._stopped:
                    return
                used, self._used = self._used, []
                start = self._failure is None and len(self._ready) + self._starting < self.size
                if start:
                    self._starting += 1
            for sandbox in used:
                sandbox.close()
            if not start:
                continue
            opened: Sandbox | None = None
            failure: CellblockError | None = None
            try:
                opened = self._open()
            except CellblockError as e:
                failure = e
            with self._cond:
                self._starting -= 1
                if opened is not None and not self._stopped:
                    self._ready.append(opened)
                    opened = None
                self._failure = failure
                self._cond.notify_all()
            if opened is not None:
                opened.close()

    @property
    def ready(self) -> int:
        """How many warm sandboxes wait for a call."""
        with self._cond:
            return len(self._ready)

    def take(self) -> Sandbox:
        """A warm sandbox for one call (waits for the refill; opens one itself if the refill
        cannot)."""
        with self._cond:
            if self._stopped:
                raise CellblockError("the pool is shut down")
            self._failure = None
            self._cond.notify_all()
            ok = self._cond.wait_for(
                lambda: self._ready or self._failure is not None or self.size == 0,
                timeout=START_TIMEOUT_S,
            )
            if ok and self._ready:
                # The refill starts when the call is done (`retire`): not competing with it.
                return self._ready.popleft()
        # Nothing came (size 0, or the refill failed): open one here, raising its error.
        return self._open()

    def retire(self, sandbox: Sandbox) -> None:
        """Hands a used sandbox to the background thread, which destroys it."""
        with self._cond:
            self._used.append(sandbox)
            self._cond.notify_all()

    def run(self, code: str, **call: Any) -> CodeResult:
        sandbox = self.take()
        try:
            if self.language == "python":
                return sandbox.run_python(code, **call)
            return sandbox.run_node(code, **call)
        finally:
            if self._stopped:
                sandbox.close()
            else:
                self.retire(sandbox)

    def resize(self, size: int) -> None:
        with self._cond:
            self.size = size
            while len(self._ready) > size:
                self._used.append(self._ready.pop())
            self._cond.notify_all()

    def shutdown(self) -> None:
        """Stops the refill and closes every sandbox of the pool."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=2 * START_TIMEOUT_S)
        with self._cond:
            left = [*self._ready, *self._used]
            self._ready.clear()
            self._used.clear()
        for sandbox in left:
            sandbox.close()


_pools: dict[tuple[str, str], Pool] = {}
_pools_lock = threading.Lock()


def pool_for(language: Language, policy: Policy) -> Pool:
    """The pool of `language` sandboxes with the session-wide settings of `policy`."""
    session = policy.model_copy(update={"timeout": None, "cpu_time": None, "max_output": None,
                                       "env": {}, "secrets": {}})
    key = (language, session.model_dump_json())
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = Pool(language, session, _size)
        return pool


def configure(size: int) -> None:
    """Sets how many warm sandboxes each pool keeps ready."""
    global _size
    if size < 0:
        raise InvalidSpec(f"pool size must be >= 0, got {size}")
    _size = size
    with _pools_lock:
        for pool in _pools.values():
            pool.resize(size)


@atexit.register
def shutdown() -> None:
    """Shuts every pool down (also run at interpreter exit)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown()


def _run(
    language: Language,
    code: str,
    policy: Policy | None,
    session: Mapping[str, Any],
    call: Mapping[str, Any],
) -> CodeResult:
    base = policy or Policy()
    merged = base.merged(**session)
    limits = merged.limits()
    call_kw = {k: v for k, v in call.items() if v is not None}
    for name in ("timeout", "cpu_time", "max_output"):
        call_kw.setdefault(name, limits[name])
    call_kw["env"] = {**merged.env, **(call.get("env") or {})}
    # Pooled sandboxes are shared by every caller: secrets are the call's, never the pool's.
    call_kw["secrets"] = normalize_secrets(merged.secrets) + normalize_secrets(call.get("secrets"))
    return pool_for(language, merged).run(code, **call_kw)


def run_python(
    code: str,
    *,
    timeout: float | None = None,
    cpu_time: float | None = None,
    max_output: int | str | None = None,
    stdin: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    secrets: SecretsArg = None,
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    disk: int | str | None = None,
    profile: str | None = None,
    seccomp: SeccompPolicy | None = None,
    allow_net: Sequence[str] | None = None,
    policy: Policy | None = None,
) -> CodeResult:
    """Runs Python code once in a fresh pre-warmed sandbox (then destroyed).

    As `Sandbox.run_python` (stateless); `memory`, `pids`, `cpus`, `disk`, `profile`,
    `seccomp` and `allow_net` choose the pool, the rest apply to the call.
    """
    return _run(
        "python", code, policy,
        {"memory": memory, "pids": pids, "cpus": cpus, "disk": disk, "profile": profile,
         "seccomp": seccomp, "allow_net": list(allow_net) if allow_net is not None else None},
        {"timeout": timeout, "cpu_time": cpu_time, "max_output": max_output, "stdin": stdin,
         "env": env, "secrets": secrets},
    )


def run_node(
    code: str,
    *,
    timeout: float | None = None,
    cpu_time: float | None = None,
    max_output: int | str | None = None,
    env: Mapping[str, str] | None = None,
    secrets: SecretsArg = None,
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    disk: int | str | None = None,
    profile: str | None = None,
    seccomp: SeccompPolicy | None = None,
    allow_net: Sequence[str] | None = None,
    policy: Policy | None = None,
) -> CodeResult:
    """Runs JavaScript once in a fresh pre-warmed sandbox (then destroyed); as `run_python`."""
    return _run(
        "node", code, policy,
        {"memory": memory, "pids": pids, "cpus": cpus, "disk": disk, "profile": profile,
         "seccomp": seccomp, "allow_net": list(allow_net) if allow_net is not None else None},
        {"timeout": timeout, "cpu_time": cpu_time, "max_output": max_output, "env": env,
         "secrets": secrets},
    )

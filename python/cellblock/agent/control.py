"""Budgets shared across an agent tree, and cancellation that reaches every child.

A `Ledger` holds an agent's budget (USD and tokens). A sub-agent's ledger is a slice carved
out of its parent's remaining budget: while the child runs, its whole slice counts as committed
in the parent, so the slices of children running at once never add up to more than the parent
has left, and whatever a child spends is charged up the tree. An agent stops before a model
request when its spend plus its dearest turn so far would pass its limit: turns are priced
after the fact, so this is the estimate that keeps the tree within its budget (a turn much
dearer than every earlier one of the same agent can still overshoot by the difference).

A `CancelScope` is a cancellation token with callbacks (closing a sandbox, cancelling a
child's scope); cancelling a scope cancels every scope made under it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from cellblock.errors import InvalidSpec


class Budget(BaseModel):
    """An agent's limits: USD, tokens (input, output and cache tokens together) and turns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    usd: float | None = Field(default=None, ge=0)
    tokens: int | None = Field(default=None, ge=0)
    turns: int | None = Field(default=None, ge=1)


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


class Ledger:
    """Spend and limits of one agent of a tree (thread-safe; one lock per tree)."""

    def __init__(
        self, usd: float | None = None, tokens: int | None = None,
        *, parent: Ledger | None = None,
    ) -> None:
        if (usd is not None and usd < 0) or (tokens is not None and tokens < 0):
            raise InvalidSpec("budget limits must be >= 0")
        self.usd_limit = usd
        self.tokens_limit = tokens
        self.parent = parent
        self.spent_usd = 0.0
        self.spent_tokens = 0
        self._lock: threading.RLock = parent._lock if parent is not None else threading.RLock()
        self._children: list[Ledger] = []

    def _committed(self) -> tuple[float, int]:
        """Own spend (children's included) plus the unspent slices of running children."""
        usd, tokens = self.spent_usd, self.spent_tokens
        for c in self._children:
            if c.usd_limit is not None:
                usd += max(c.usd_limit - c.spent_usd, 0.0)
            if c.tokens_limit is not None:
                tokens += max(c.tokens_limit - c.spent_tokens, 0)
        return usd, tokens

    def remaining(self) -> tuple[float | None, int | None]:
        """What is left to give a new child (None: unlimited)."""
        with self._lock:
            usd, tokens = self._committed()
            left_usd = None if self.usd_limit is None else max(self.usd_limit - usd, 0.0)
            left_tokens = None if self.tokens_limit is None else max(self.tokens_limit - tokens, 0)
            return left_usd, left_tokens

    def child(self, usd: float | None = None, tokens: int | None = None) -> Ledger:
        """A slice for a sub-agent: its own limits, capped by what this ledger has left."""
        with self._lock:
            left_usd, left_tokens = self.remaining()
            capped_tokens = _min(tokens, left_tokens)
            child = Ledger(_min(usd, left_usd),
                           None if capped_tokens is None else int(capped_tokens), parent=self)
            self._children.append(child)
            return child

    def release(self) -> None:
        """The child has ended: its unspent slice goes back to the parent."""
        if self.parent is not None:
            with self._lock:
                if self in self.parent._children:
                    self.parent._children.remove(self)

    def charge(self, usd: float, tokens: int) -> None:
        """Record a turn's cost here and in every ancestor."""
        with self._lock:
            node: Ledger | None = self
            while node is not None:
                node.spent_usd += usd
                node.spent_tokens += tokens
                node = node.parent

    def allows(self, next_usd: float = 0.0, next_tokens: int = 0) -> bool:
        """Whether a turn estimated at this cost fits (the whole of an empty budget does not)."""
        with self._lock:
            usd, tokens = self._committed()
            if self.usd_limit is not None and (
                    usd >= self.usd_limit or usd + next_usd > self.usd_limit):
                return False
            return self.tokens_limit is None or (
                tokens < self.tokens_limit and tokens + next_tokens <= self.tokens_limit)


class CancelScope:
    """A cancellation token: `cancel()` runs the callbacks once and cancels child scopes."""

    def __init__(self, parent: CancelScope | None = None) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._callbacks: list[Callable[[], object]] = []
        self.reason: str | None = None
        #: Detaches this scope from its parent (see `detach`).
        self._detach: Callable[[], None] = lambda: None
        if parent is not None:
            self._detach = parent.on_cancel(lambda: self.cancel(parent.reason or "cancelled"))

    def detach(self) -> None:
        """Stop following the parent (the work this scope covered is over)."""
        self._detach()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def on_cancel(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Run `callback` on cancel (at once if already cancelled). Returns a function that
        forgets it (when what it would close is gone), so long-lived scopes do not pile up."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._forget(callback)
        callback()
        return lambda: None

    def _forget(self, callback: Callable[[], object]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def cancel(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

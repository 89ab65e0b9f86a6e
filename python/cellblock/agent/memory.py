"""Short-term memory: the conversation sent to the model, kept within a turn count and a size.

A turn is one assistant message plus the user message carrying its tool results. The task (the
first message) is always kept. When the history is too long, older tool output is replaced by a
one-line summary first; if that is not enough, the oldest turns are dropped. Compaction goes
down to a low-water mark so that it happens rarely: between compactions the prefix of the
conversation stays the same, which keeps the model's prompt cache useful.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

#: After compacting, the history is at most this fraction of the size limit.
LOW_WATER = 0.6

#: The most recent turns whose tool output is never summarised.
KEEP_FULL_TURNS = 2

#: How a summarised tool result begins.
SUMMARY_PREFIX = "[older tool output removed to save context"

Message = dict[str, Any]


def message_size(message: Message) -> int:
    """Characters of a message as sent (a proxy for tokens: about 4 characters each)."""
    return len(json.dumps(message, ensure_ascii=False))


def summarise_tool_output(content: str) -> str:
    """The one-line stand-in for an old tool result."""
    first = content.strip().splitlines()[0][:160] if content.strip() else ""
    return f"{SUMMARY_PREFIX}: {len(content)} characters; began: {first!r}]"


class ShortTermMemory:
    """The messages of one agent run, bounded by `keep_turns` turns and `max_chars` characters."""

    def __init__(
        self, task: str, *, keep_turns: int, max_chars: int,
        on_drop: Callable[[int, list[Message]], None] | None = None,
    ) -> None:
        self.keep_turns = max(1, keep_turns)
        #: Called with (turn number, messages) for each turn dropped from the context.
        self.on_drop = on_drop
        self.max_chars = max_chars
        self.dropped_turns = 0
        self._task = task
        self._messages: list[Message] = [{"role": "user", "content": task}]
        self._sizes: list[int] = [message_size(self._messages[0])]

    @property
    def messages(self) -> list[Message]:
        """The conversation to send (the list itself: callers must not modify it)."""
        return self._messages

    @property
    def size(self) -> int:
        """Characters of the whole conversation."""
        return sum(self._sizes)

    def append(self, message: Message) -> None:
        self._messages.append(message)
        self._sizes.append(message_size(message))

    def restore(self, messages: Sequence[Message], dropped_turns: int) -> None:
        """Replaces the history with one saved from another run of the same task."""
        self._messages = list(messages)
        self._sizes = [message_size(m) for m in self._messages]
        self.dropped_turns = dropped_turns

    def turns(self) -> int:
        return sum(1 for m in self._messages if m["role"] == "assistant")

    def compact(self) -> bool:
        """Bring the history within bounds; True when anything changed."""
        changed = False
        while self.turns() > self.keep_turns:
            self._drop_oldest_turn()
            changed = True
        if self.size <= self.max_chars:
            return changed
        target = int(self.max_chars * LOW_WATER)
        for i in self._tool_result_indexes()[:-KEEP_FULL_TURNS]:
            if self.size <= target:
                break
            self._summarise(i)
        while self.size > target and self.turns() > 1:
            self._drop_oldest_turn()
        return True

    def _tool_result_indexes(self) -> list[int]:
        return [
            i for i, m in enumerate(self._messages)
            if i > 0 and m["role"] == "user" and isinstance(m["content"], list)
        ]

    def _summarise(self, index: int) -> None:
        blocks = []
        for block in self._messages[index]["content"]:
            content = block.get("content")
            if (block.get("type") == "tool_result" and isinstance(content, str)
                    and not content.startswith(SUMMARY_PREFIX)):
                block = {**block, "content": summarise_tool_output(content)}
            blocks.append(block)
        self._replace(index, {"role": "user", "content": blocks})

    def _drop_oldest_turn(self) -> None:
        # Message 1 is the oldest assistant message; message 2 its tool results (if any).
        end = 3 if len(self._messages) > 2 and self._messages[2]["role"] == "user" else 2
        if self.on_drop is not None:
            self.on_drop(self.dropped_turns + 1, self._messages[1:end])
        del self._messages[1:end]
        del self._sizes[1:end]
        self.dropped_turns += 1
        note = f"[{self.dropped_turns} earlier turns of this task were dropped to save context]"
        self._replace(0, {"role": "user", "content": f"{self._task}\n\n{note}"})

    def _replace(self, index: int, message: Message) -> None:
        self._messages[index] = message
        self._sizes[index] = message_size(message)

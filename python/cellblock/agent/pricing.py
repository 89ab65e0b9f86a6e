"""Token usage and its price: USD per million tokens, cache writes and reads included."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

#: USD per hour of active sandbox time (the guide's managed-runtime rate).
DEFAULT_RATE_PER_HOUR = 0.08


class Usage(BaseModel):
    """Tokens of one model response, or the sum over a run."""

    model_config = ConfigDict(frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
            cache_creation_input_tokens=(
                self.cache_creation_input_tokens + other.cache_creation_input_tokens
            ),
        )

    @classmethod
    def from_api(cls, usage: Any) -> Usage:
        """From the SDK's `Usage` (absent cache fields count as 0)."""
        return cls(
            input_tokens=getattr(usage, "input_tokens", 0) or 0,
            output_tokens=getattr(usage, "output_tokens", 0) or 0,
            cache_read_input_tokens=getattr(usage, "cache_read_input_tokens", 0) or 0,
            cache_creation_input_tokens=getattr(usage, "cache_creation_input_tokens", 0) or 0,
        )


class Price(BaseModel):
    """USD per million tokens. `cache_write` is the 5-minute cache write (what the loop uses)."""

    model_config = ConfigDict(frozen=True)

    input: float
    output: float
    cache_write: float
    cache_read: float

    def cost(self, usage: Usage) -> float:
        """USD for `usage` at this price."""
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_creation_input_tokens * self.cache_write
            + usage.cache_read_input_tokens * self.cache_read
        ) / 1_000_000


def _p(input: float, output: float, cache_write: float, cache_read: float) -> Price:
    return Price(input=input, output=output, cache_write=cache_write, cache_read=cache_read)


#: Model id prefix -> price (Anthropic's published list prices; the longest matching prefix
#: wins, so dated ids like "claude-opus-4-5-20251101" resolve to their family). Haiku 5.5 is
#: priced at its <=100k-token-prompt rate.
PRICES: Mapping[str, Price] = {
    "offline": _p(0, 0, 0, 0),
    "claude-fable-5-1": _p(10, 50, 12.5, 0.25),
    "claude-mythos-5-1": _p(10, 50, 12.5, 0.25),
    "claude-fable-5": _p(10, 50, 12.5, 1.0),
    "claude-mythos-5": _p(10, 50, 12.5, 1.0),
    "claude-opus-5-5": _p(4, 20, 5, 0.2),
    "claude-opus-5": _p(5, 25, 6.25, 0.5),
    "claude-opus-4-8": _p(5, 25, 6.25, 0.5),
    "claude-opus-4-7": _p(5, 25, 6.25, 0.5),
    "claude-opus-4-6": _p(5, 25, 6.25, 0.5),
    "claude-opus-4-5": _p(5, 25, 6.25, 0.5),
    "claude-opus-4": _p(15, 75, 18.75, 1.5),
    "claude-3-opus": _p(15, 75, 18.75, 1.5),
    "claude-sonnet-5-5": _p(2, 10, 2.5, 0.1),
    "claude-sonnet-5": _p(2, 10, 2.5, 0.2),
    "claude-sonnet-4": _p(3, 15, 3.75, 0.3),
    "claude-3-7-sonnet": _p(3, 15, 3.75, 0.3),
    "claude-3-5-sonnet": _p(3, 15, 3.75, 0.3),
    "claude-haiku-5-5": _p(0.1, 0.5, 0.125, 0.01),
    "claude-haiku-4-5": _p(1, 5, 1.25, 0.1),
    "claude-3-5-haiku": _p(0.8, 4, 1, 0.08),
    "claude-3-haiku": _p(0.25, 1.25, 0.3, 0.03),
}

#: Used for models missing from the table: the highest rate of each kind, so that a budget is
#: never underestimated (results say when a cost is such an estimate).
UNKNOWN_PRICE = _p(
    max(p.input for p in PRICES.values()),
    max(p.output for p in PRICES.values()),
    max(p.cache_write for p in PRICES.values()),
    max(p.cache_read for p in PRICES.values()),
)


def price_for(model: str, table: Mapping[str, Price] = PRICES) -> Price | None:
    """The price of `model` (longest matching id prefix), or None when the table lacks it."""
    best = max((k for k in table if model == k or model.startswith(k + "-")), key=len, default=None)
    return table[best] if best is not None else None

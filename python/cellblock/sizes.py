"""Parsing of human-written sizes ("64M", "1.5G", 512) and durations."""

from __future__ import annotations

import math
import re

from cellblock.errors import InvalidSpec

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: A number, then nothing, "B", or a unit letter optionally followed by "B" or "iB" ("2IB" is
#: not a size: "iB" needs a unit letter before it).
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(?:([KMGT])(?:I?B)?|B)?\s*$", re.IGNORECASE)


def parse_size(value: float | str, what: str = "size") -> int:
    """Bytes from an int or a string such as "512K", "64M", "1.5G", "2GiB"; rejects the rest."""
    if isinstance(value, bool):
        raise InvalidSpec(f"{what}: expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise InvalidSpec(f"{what}: must be a non-negative size, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    raise InvalidSpec(f"{what}: cannot parse size {value!r} (examples: 4096, 512K, 64M, 1.5G)")


def parse_count(value: int | str, what: str) -> int:
    """A strictly positive whole number."""
    try:
        n = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        n = None
    if n is None or n <= 0 or (isinstance(value, float) and value != n):
        raise InvalidSpec(f"{what}: expected a positive whole number, got {value!r}")
    return n


def parse_seconds(value: float | str, what: str, unit: str = "seconds") -> float:
    """A strictly positive, finite number (of seconds, or of `unit`)."""
    try:
        s = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        s = math.nan
    if not math.isfinite(s) or s <= 0:
        raise InvalidSpec(f"{what}: expected a positive number of {unit}, got {value!r}")
    return s

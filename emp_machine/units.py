"""Durations (`10s`, `500ms`, `5m`) and sizes (`512MiB`, `100MB`) as manifest strings.

Shared by the manifest and the telemetry config, so it depends on nothing else of ours. Values are
carried as plain floats (seconds) and ints (bytes); the annotated types only parse and validate.
"""

from __future__ import annotations

import math
import re

MAX_DURATION_S = 365 * 86400.0  # a year: more is a typo, and some waits (threading, asyncio) overflow on huge ones
MAX_SIZE = 2**50  # 1024TiB: more than any disk or memory this runs on

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|K|M|G)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, None: 1,
}


def parse_duration(value: object) -> float:
    """Seconds from `10s`, `250ms`, `5m`, `1h`, `2d` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '10s', '500ms' or '5m', not a boolean")
    if isinstance(value, (int, float)):
        seconds = _number(value, MAX_DURATION_S)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise UnitError("expected a duration such as '10s', '500ms' or '5m'", value)
    if seconds < 0:
        raise UnitError("a duration cannot be negative", value)
    if math.isnan(seconds) or seconds > MAX_DURATION_S:
        raise UnitError("expected a finite duration of at most 365d, such as '10s', '500ms' or '5m'", value)
    return seconds


def parse_size(value: object) -> int:
    """Bytes from `512MiB`, `100MB`, `2G`, `64KiB` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '512MiB' or '100MB', not a boolean")
    if isinstance(value, (int, float)):
        size = _number(value, MAX_SIZE)
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = match.group(2).lower() if match.group(2) else None
        size = float(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise UnitError("expected a size such as '512MiB', '100MB' or '2GiB'", value)
    if size < 0:
        raise UnitError("a size cannot be negative", value)
    if math.isnan(size) or size > MAX_SIZE:
        raise UnitError("expected a finite size of at most 1024TiB, such as '512MiB', '100MB' or '2GiB'", value)
    return int(size)


class UnitError(ValueError):
    """A duration or size that does not parse. `str()` repeats the value (for a --since given on a command
    line); `text` does not, for callers that show the value themselves or must not (it may be a secret)."""

    def __init__(self, text: str, value: object):
        shown = repr(value)
        super().__init__(f"{text}, got {shown if len(shown) <= 60 else shown[:50] + '...'}")
        self.text = text


def _number(value: int | float, limit: float) -> float:
    """A bare number as a float, an int past the limit as an infinity (float() of a 400-digit int raises
    OverflowError); the caller refuses infinities and NaN."""
    if isinstance(value, int) and abs(value) > limit:
        return math.inf if value > 0 else -math.inf
    return float(value)


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}"
    return f"{size}B"


def __getattr__(name: str):
    """`Duration` and `ByteSize`: pydantic field types, built on first use so that processes that only
    parse strings (the running machine) do not import pydantic. Serialised as plain numbers (seconds,
    bytes), so a dumped manifest loads back exactly."""
    if name not in ("Duration", "ByteSize"):
        raise AttributeError(name)
    from typing import Annotated

    from pydantic import BeforeValidator

    globals()["Duration"] = Annotated[float, BeforeValidator(parse_duration)]
    globals()["ByteSize"] = Annotated[int, BeforeValidator(parse_size)]
    return globals()[name]

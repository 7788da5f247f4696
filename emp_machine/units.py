"""Durations (`10s`, `500ms`, `5m`) and sizes (`512MiB`, `100MB`) as manifest strings.

Shared by the manifest and the telemetry config, so it depends on nothing else of ours. Values are
carried as plain floats (seconds) and ints (bytes); the annotated types only parse and validate.
"""

from __future__ import annotations

import re

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
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as '10s', '500ms' or '5m', got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from `512MiB`, `100MB`, `2G`, `64KiB` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '512MiB' or '100MB', not a boolean")
    if isinstance(value, (int, float)):
        size = float(value)
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = match.group(2).lower() if match.group(2) else None
        size = float(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f"expected a size such as '512MiB', '100MB' or '2GiB', got {value!r}")
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return int(size)


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

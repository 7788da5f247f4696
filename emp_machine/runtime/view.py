"""A read-only view of the resolved manifest (`run/manifest.json`) for the running machine process.

The manifest is validated once, by pydantic, in the process that loads it; the long-running machine process
then reads the resolved values through this view and never imports pydantic (about 22 MB of resident memory
with pydantic-settings: the machine + supervisord budget is 80 MB). Attribute access and mapping access
both work, so code written against the pydantic models (`manifest.health.port`,
`manifest.services.items()`) reads the view unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class View(Mapping):
    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    @classmethod
    def load(cls, path: Path) -> "View":
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    def __getattr__(self, name: str) -> Any:
        try:
            return _wrap(self._data[name])
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the resolved manifest is read-only")

    def __getitem__(self, key: str) -> Any:
        return _wrap(self._data[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"View({self._data!r})"


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return View(value)
    if isinstance(value, list):
        return tuple(_wrap(v) for v in value)
    return value

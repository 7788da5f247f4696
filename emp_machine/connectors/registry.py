"""Connectors by name, from the entry-point group `emp_machine.connectors` (name -> Connector class).

A third party adds a connector by installing a package that declares the entry point; the built-ins
register themselves the same way in pyproject.toml. Every entry point is imported up front so that a
broken one is reported (with the entry point and its import error) at start-up, while the rest load.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from emp_machine.connectors.base import Connector
from emp_machine.errors import ConnectorLoadError, ConnectorNotFound

GROUP = "emp_machine.connectors"


@dataclass(frozen=True)
class LoadFailure:
    name: str
    entry_point: str  # "module:attr" as declared
    error: str

    def render(self) -> str:
        return f"connector {self.name!r} ({self.entry_point}) failed to load: {self.error}"


class ConnectorRegistry:
    """The connectors installed in this environment. Build with `discover()`."""

    def __init__(self, connectors: dict[str, type[Connector]], failures: list[LoadFailure]):
        self._connectors = connectors
        self.failures = failures

    @classmethod
    def discover(cls, found: Iterable[EntryPoint] | None = None) -> ConnectorRegistry:
        """Load every entry point in the group (or `found`, for tests); failures are kept, not raised."""
        connectors: dict[str, type[Connector]] = {}
        failures: list[LoadFailure] = []
        for ep in entry_points(group=GROUP) if found is None else found:
            try:
                obj = ep.load()
            except Exception as exc:  # an import error of any kind must not stop the other connectors
                failures.append(LoadFailure(ep.name, ep.value, f"{type(exc).__name__}: {exc}"))
                continue
            if not (isinstance(obj, type) and issubclass(obj, Connector)):
                failures.append(LoadFailure(ep.name, ep.value, f"{obj!r} is not a Connector subclass"))
                continue
            connectors[ep.name] = obj
        return cls(connectors, failures)

    def names(self) -> list[str]:
        return sorted(self._connectors)

    def get(self, name: str) -> type[Connector]:
        """The class for `name`; ConnectorLoadError if it is installed but broken, else ConnectorNotFound
        naming the installed connectors and the nearest match."""
        if name in self._connectors:
            return self._connectors[name]
        for failure in self.failures:
            if failure.name == name:
                raise ConnectorLoadError(failure.render())
        known = self.names() + [f.name for f in self.failures]
        message = f"no connector named {name!r}; installed: {', '.join(self.names()) or '(none)'}"
        nearest = difflib.get_close_matches(name, known, n=1)
        if nearest:
            message += f"; did you mean {nearest[0]!r}?"
        raise ConnectorNotFound(message)

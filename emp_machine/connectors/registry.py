"""Connectors by name, from the entry-point group `emp_machine.connectors` (name -> Connector class).

A third party adds a connector by installing a package that declares the entry point; the built-ins
register themselves the same way in pyproject.toml. `discover()` imports the entry points it is given
(a worker gives only its own connector's: `for_connector`) and keeps a broken one as a LoadFailure naming
the entry point and its distribution, whatever it raised (SystemExit too), while the rest load. A class
that is abstract (no run()) or whose Settings is not a pydantic model is refused the same way.

Two distributions declaring one name are never resolved by filesystem order: a built-in name (an entry
point into the emp_machine package) keeps resolving to the built-in and the plugin's entry point is recorded
as a failure; between two plugins the name fails to load, naming both distributions.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from pydantic import BaseModel, ValidationError

from emp_machine.connectors.base import Connector
from emp_machine.errors import ConnectorLoadError, ConnectorNotFound, describe_exception  # noqa: F401 (re-exported)

GROUP = "emp_machine.connectors"


@dataclass(frozen=True)
class LoadFailure:
    name: str
    entry_point: str  # "module:attr" as declared
    error: str
    dist: str = ""  # the distribution that declares it, when known

    def render(self) -> str:
        where = self.entry_point + (f", distribution {self.dist}" if self.dist else "")
        return f"connector {self.name!r} ({where}) failed to load: {self.error}"


def dist_name(ep: EntryPoint) -> str:
    """The name of the distribution declaring `ep`, '' when unknown (an EntryPoint made by hand)."""
    try:
        dist = getattr(ep, "dist", None)
        return (dist.name or "") if dist is not None else ""
    except Exception:  # noqa: BLE001 - unreadable metadata: the entry point is still named
        return ""


def _is_builtin(ep: EntryPoint) -> bool:
    return ep.value.split(":", 1)[0].split(".", 1)[0].strip() == "emp_machine"


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:  # noqa: BLE001
        return f"<a {type(obj).__name__}>"


class ConnectorRegistry:
    """The connectors installed in this environment. Build with `discover()`."""

    def __init__(self, connectors: dict[str, type[Connector]], failures: list[LoadFailure],
                 origins: dict[str, tuple[str, str]] | None = None):
        self._connectors = connectors
        self.failures = failures
        self.origins = origins or {}  # name -> (entry point "module:attr", distribution or '')
        self.installed: list[str] = []  # every entry point name of the group (for_connector: not imported)

    @classmethod
    def for_connector(cls, name: str) -> ConnectorRegistry:
        """Only the entry points named `name` (a worker's own connector): another plugin that is broken,
        exits or hangs at import is never imported here. Same-named ones are all kept (clashes: discover)."""
        every = entry_points(group=GROUP)
        registry = cls.discover([ep for ep in every if ep.name == name])
        registry.installed = sorted({ep.name for ep in every})
        return registry

    @classmethod
    def discover(cls, found: Iterable[EntryPoint] | None = None) -> ConnectorRegistry:
        """Load every entry point in the group (or `found`); failures are kept, not raised."""
        connectors: dict[str, type[Connector]] = {}
        failures: list[LoadFailure] = []
        origins: dict[str, tuple[str, str]] = {}
        by_name: dict[str, list[EntryPoint]] = {}
        for ep in entry_points(group=GROUP) if found is None else found:
            same = by_name.setdefault(ep.name, [])
            if not any(other.value == ep.value for other in same):  # one module:attr declared twice is one
                same.append(ep)
        for name, eps in by_name.items():
            ep = eps[0]
            if len(eps) > 1:
                builtins = [e for e in eps if _is_builtin(e)]
                if len(builtins) != 1:
                    dists = ", ".join(f"{dist_name(e) or '?'} ({e.value})" for e in eps)
                    failures.append(LoadFailure(name, ", ".join(e.value for e in eps),
                                                f"{len(eps)} distributions declare a connector named {name!r}: "
                                                f"{dists}; none is used: uninstall one or rename its entry point",
                                                ", ".join(dist_name(e) or "?" for e in eps)))
                    continue
                ep = builtins[0]
                for other in eps:
                    if other is not ep:
                        failures.append(LoadFailure(
                            name, other.value, f"clashes with the built-in connector {name!r} ({ep.value}), which "
                            f"is used instead: give the plugin's entry point another name", dist_name(other)))
            loaded = cls._load(ep)
            if isinstance(loaded, LoadFailure):
                failures.append(loaded)
                continue
            connectors[name] = loaded
            origins[name] = (ep.value, dist_name(ep))
        return cls(connectors, failures, origins)

    @staticmethod
    def _load(ep: EntryPoint) -> type[Connector] | LoadFailure:
        dist = dist_name(ep)
        try:
            obj = ep.load()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - a plugin's import (even a SystemExit) must not stop the rest
            return LoadFailure(ep.name, ep.value, describe_exception(exc), dist)
        if not (isinstance(obj, type) and issubclass(obj, Connector)):
            return LoadFailure(ep.name, ep.value, f"{_safe_repr(obj)} is not a Connector subclass", dist)
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ()))) or "an abstract method"
            return LoadFailure(ep.name, ep.value, f"{obj.__qualname__} is abstract: it does not implement "
                                                  f"{missing}", dist)
        settings = getattr(obj, "Settings", None)
        if not (isinstance(settings, type) and issubclass(settings, BaseModel)):
            return LoadFailure(ep.name, ep.value, f"{obj.__qualname__}.Settings is {_safe_repr(settings)}, not a "
                                                  f"pydantic model: subclass emp_machine.connectors.base."
                                                  f"ConnectorSettings", dist)
        return obj

    def construction_failure(self, name: str, exc: BaseException, where: str = "its") -> str:
        """What to say when connector `name`'s construction raised `exc`: pydantic's errors field by field
        (bad settings), else the exception, with its entry point and distribution and what to fix; `where`
        names the settings' place (`workers.<group>` in a manifest)."""
        origin = self.origin(name)
        settings = f"{where}.settings" if where != "its" else "its settings"
        if isinstance(exc, ValidationError):
            try:
                detail = "bad settings: " + "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or '(settings)'}: {e['msg']}" for e in exc.errors())
            except Exception:  # noqa: BLE001 - a plugin's own validator may carry anything
                detail = describe_exception(exc)
            hint = f"fix {settings}"
        else:
            detail, hint = describe_exception(exc), f"fix the connector's __init__ or {settings}"
        return f"connector {name!r}{f' ({origin})' if origin else ''} could not be constructed: {detail}; {hint}"

    def origin(self, name: str) -> str:
        """'entry point module:attr, distribution x' for a loaded connector, for messages ('' if unknown)."""
        value, dist = self.origins.get(name, ("", ""))
        if not value:
            return ""
        return f"entry point {value}" + (f", distribution {dist}" if dist else "")

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
        installed = sorted(set(self.installed) | set(self.names()))
        known = installed + [f.name for f in self.failures]
        message = f"no connector named {name!r}; installed: {', '.join(installed) or '(none)'}"
        nearest = difflib.get_close_matches(name, known, n=1)
        if nearest:
            message += f"; did you mean {nearest[0]!r}?"
        raise ConnectorNotFound(message)

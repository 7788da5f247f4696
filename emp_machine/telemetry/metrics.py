"""A light OTel-API meter: instruments that cost about a microsecond, one registry readable by the health
server (Prometheus text) and snapshotted into the buffer for OTLP.

The SDK's Counter.add costs 7-9 us because every call looks up the attribute set and goes through the
aggregation machinery; here `bind(**attributes)` resolves the series once, so `bound.add(1)` is a lock and an
addition. Unbound calls (`counter.add(1, {"status": "ok"})`) still work, through a dict keyed by the sorted
attribute items. Aggregation is cumulative (what both OTLP and Prometheus want).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import metrics as api

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _key(attributes: Mapping[str, Any] | None) -> tuple:
    if not attributes:
        return ()
    return tuple(sorted(attributes.items()))


class _Cell:
    """One attribute set's value of a counter or gauge."""

    __slots__ = ("value", "_lock")

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, amount: float) -> None:
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class _HistogramCell:
    __slots__ = ("counts", "count", "sum", "_bounds", "_lock")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self._lock = threading.Lock()

    def record(self, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self.counts[index] += 1
            self.count += 1
            self.sum += value


class _Series:
    """Cells by attribute set, created on first use."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory = factory
        self.cells: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def cell(self, key: tuple) -> Any:
        cell = self.cells.get(key)
        if cell is None:
            with self._lock:
                cell = self.cells.setdefault(key, self._factory())
        return cell


class Counter(api.Counter):
    kind, monotonic = "sum", True

    def __init__(self, name: str, unit: str = "", description: str = "") -> None:
        self.name, self.unit, self.description = name, unit, description
        self.series = _Series(_Cell)

    def add(self, amount: float, attributes: Mapping[str, Any] | None = None, context: Any = None) -> None:
        if amount < 0 and self.monotonic:
            return  # the API says a counter ignores negative increments
        self.series.cell(_key(attributes)).add(amount)

    def bind(self, **attributes: Any) -> _Cell:
        """The cell for this attribute set: `cell.add(1)` is the fast path."""
        return self.series.cell(_key(attributes))

    def points(self) -> list[tuple[dict, float]]:
        return [(dict(key), cell.value) for key, cell in list(self.series.cells.items())]


class UpDownCounter(Counter, api.UpDownCounter):
    kind, monotonic = "sum", False


class Gauge(api._Gauge):
    """A synchronous gauge: `set(value, attributes)` (workers_active by service, ...)."""

    kind, monotonic = "gauge", False

    def __init__(self, name: str, unit: str = "", description: str = "") -> None:
        self.name, self.unit, self.description = name, unit, description
        self.series = _Series(_Cell)

    def set(self, amount: float, attributes: Mapping[str, Any] | None = None, context: Any = None) -> None:
        self.series.cell(_key(attributes)).set(amount)

    def bind(self, **attributes: Any) -> _Cell:
        return self.series.cell(_key(attributes))

    points = Counter.points


class Histogram(api.Histogram):
    kind, monotonic = "histogram", False

    def __init__(self, name: str, unit: str = "", description: str = "",
                 explicit_bucket_boundaries_advisory: Sequence[float] | None = None) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.bounds = tuple(explicit_bucket_boundaries_advisory or SECONDS_BUCKETS)
        self.series = _Series(lambda: _HistogramCell(self.bounds))

    def record(self, amount: float, attributes: Mapping[str, Any] | None = None, context: Any = None) -> None:
        self.series.cell(_key(attributes)).record(amount)

    def bind(self, **attributes: Any) -> _HistogramCell:
        return self.series.cell(_key(attributes))

    def points(self) -> list[tuple[dict, tuple]]:
        return [(dict(key), (cell.count, cell.sum, list(cell.counts), list(self.bounds)))
                for key, cell in list(self.series.cells.items())]


class _Observable:
    kind, monotonic = "gauge", False

    def __init__(self, name: str, callbacks: Sequence[Callable] | None = None, unit: str = "",
                 description: str = "") -> None:
        self.name, self.unit, self.description = name, unit, description
        self.callbacks = list(callbacks or [])

    def points(self) -> list[tuple[dict, float]]:
        out = []
        for callback in self.callbacks:
            try:
                for observation in callback(api.CallbackOptions()):
                    out.append((dict(observation.attributes or {}), observation.value))
            except Exception:  # a failing callback loses its points for this collection, nothing else
                continue
        return out


class ObservableGauge(_Observable, api.ObservableGauge):
    pass


class ObservableCounter(_Observable, api.ObservableCounter):
    kind, monotonic = "sum", True


class ObservableUpDownCounter(_Observable, api.ObservableUpDownCounter):
    kind, monotonic = "sum", False


class Meter(api.Meter):
    """The process's meter; instruments are registered by name (asking twice returns the same one)."""

    def __init__(self, name: str = "emp_machine", version: str | None = None, schema_url: str | None = None):
        super().__init__(name, version, schema_url)
        self.instruments: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.start_ns = time.time_ns()

    def _get(self, cls: type, name: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            existing = self.instruments.get(name)
            if existing is not None:
                return existing
            instrument = self.instruments[name] = cls(name, *args, **kwargs)
            return instrument

    def create_counter(self, name: str, unit: str = "", description: str = "") -> Counter:
        return self._get(Counter, name, unit, description)

    def create_up_down_counter(self, name: str, unit: str = "", description: str = "") -> UpDownCounter:
        return self._get(UpDownCounter, name, unit, description)

    def create_histogram(self, name: str, unit: str = "", description: str = "", *,
                         explicit_bucket_boundaries_advisory: Sequence[float] | None = None) -> Histogram:
        return self._get(Histogram, name, unit, description, explicit_bucket_boundaries_advisory)

    def create_gauge(self, name: str, unit: str = "", description: str = "") -> Gauge:
        return self._get(Gauge, name, unit, description)

    def create_observable_gauge(self, name: str, callbacks: Sequence[Callable] | None = None, unit: str = "",
                                description: str = "") -> ObservableGauge:
        return self._get(ObservableGauge, name, callbacks, unit, description)

    def create_observable_counter(self, name: str, callbacks: Sequence[Callable] | None = None, unit: str = "",
                                  description: str = "") -> ObservableCounter:
        return self._get(ObservableCounter, name, callbacks, unit, description)

    def create_observable_up_down_counter(self, name: str, callbacks: Sequence[Callable] | None = None,
                                          unit: str = "", description: str = "") -> ObservableUpDownCounter:
        return self._get(ObservableUpDownCounter, name, callbacks, unit, description)

    # --- reading -------------------------------------------------------------------------------------

    def snapshot(self) -> list[tuple]:
        """[(name, description, unit, kind, monotonic, points)] for every instrument with points."""
        out = []
        for instrument in list(self.instruments.values()):
            points = instrument.points()
            if points:
                out.append((instrument.name, instrument.description, instrument.unit, instrument.kind,
                            instrument.monotonic, points))
        return out

    def record(self) -> tuple:
        """A buffer record of the current values (see encode.py for the layout)."""
        return (time.time_ns(), self.start_ns, self.snapshot())

    def render_prometheus(self) -> str:
        """Prometheus text exposition (format 0.0.4) of every instrument."""
        return render_prometheus(self.snapshot())


def _prom_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_:" else "_" for c in name)


def _prom_labels(attributes: Mapping[str, Any], extra: str = "") -> str:
    parts = [f'{_prom_name(k)}="{_prom_escape(v)}"' for k, v in sorted(attributes.items())]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _prom_escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _prom_value(value: float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        if math.isnan(value):
            return "NaN"
        return repr(value)
    return str(value)


def render_prometheus(snapshot: Iterable[tuple]) -> str:
    lines: list[str] = []
    for name, description, _unit, kind, monotonic, points in snapshot:
        metric = _prom_name(name)
        prom_type = "histogram" if kind == "histogram" else "counter" if kind == "sum" and monotonic else "gauge"
        if description:
            lines.append(f"# HELP {metric} {_prom_escape(description)}")
        lines.append(f"# TYPE {metric} {prom_type}")
        for attributes, value in points:
            if kind == "histogram":
                count, total, bucket_counts, bounds = value
                cumulative = 0
                for bound, bucket in zip([*bounds, math.inf], bucket_counts):
                    cumulative += bucket
                    le = "+Inf" if math.isinf(bound) else repr(float(bound))
                    labels = _prom_labels(attributes, 'le="' + le + '"')
                    lines.append(f"{metric}_bucket{labels} {cumulative}")
                lines.append(f"{metric}_sum{_prom_labels(attributes)} {_prom_value(float(total))}")
                lines.append(f"{metric}_count{_prom_labels(attributes)} {count}")
            else:
                lines.append(f"{metric}{_prom_labels(attributes)} {_prom_value(value)}")
    return "\n".join(lines) + "\n"

"""A light OTel-API meter: instruments that cost about a microsecond, one registry readable by the health
server (Prometheus text) and snapshotted into the buffer for OTLP.

The SDK's Counter.add costs 7-9 us because every call looks up the attribute set and goes through the
aggregation machinery; here `bind(**attributes)` resolves the series once, so `bound.add(1)` is a lock and an
addition. Unbound calls (`counter.add(1, {"status": "ok"})`) still work, through a dict keyed by the sorted
attribute items. Aggregation is cumulative (what both OTLP and Prometheus want).

A worker's meter lives in the worker's process, but /metrics is served by the machine's: each worker
publishes its snapshot to a file (`write_snapshot`, every `SNAPSHOT_INTERVAL` and at exit), and the health
server reads them back (`parse_snapshot`) and merges them into its own (`merge_snapshots`).
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
import numbers
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics as api

SNAPSHOT_INTERVAL = 5.0  # seconds between two snapshots a worker publishes for the machine's /metrics
SNAPSHOT_MAX_AGE = 30.0  # a snapshot not rewritten for this long belongs to a worker that is gone
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_log = logging.getLogger(__name__)


def sample_value(value: Any) -> int | float | None:
    """The number a gauge's or a sum's point carries, the one rule of every output path (Prometheus text, OTLP,
    worker snapshots): an int as itself, a bool as 1 or 0, a float as itself (NaN and +-Inf included), another
    number that is not text (an IntEnum, a numpy scalar, a Decimal) as an int or a float; None for what is not
    a number (text, even "1.5", None, any other object): that point is left out, never an exception."""
    kind = type(value)
    if kind is int or kind is float:
        return value
    if isinstance(value, numbers.Integral):  # bool (1 or 0), IntEnum, numpy integers
        return int(value)
    if value is None or isinstance(value, (str, bytes, bytearray)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def as_float(number: int | float) -> float:
    """`number` as a float64; an int past one as +-Inf (how /metrics and OTLP write it), never OverflowError."""
    try:
        return float(number)
    except OverflowError:
        return math.inf if number > 0 else -math.inf


_warned: set[tuple] = set()
_warned_lock = threading.Lock()


def _warn_once(key: tuple, message: str, *args: Any) -> None:
    """Log `message` once per `key` in this process (at most 256 keys: names are few, not per point)."""
    with _warned_lock:
        if key in _warned or len(_warned) >= 256:
            return
        _warned.add(key)
    _log.warning(message, *args)


def warn_not_a_number(metric: str, value: Any) -> None:
    """Warn, once per metric, that a point of `metric` was left out because its value is not a number."""
    _warn_once(("not a number", metric),
               "metric %r: a point whose value is a %s, not a number, is left out (on /metrics and in OTLP); "
               "record an int or a float", str(metric)[:80], type(value).__name__)


def _key(attributes: Mapping[str, Any] | None) -> tuple:
    if not attributes:
        return ()
    return tuple(sorted(attributes.items()))


class _Cell:
    """One attribute set's value of a gauge or an up-down counter."""

    __slots__ = ("value", "_lock")

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, amount: float) -> None:
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class _CounterCell:
    """One attribute set's value of a monotonic counter: it only goes up, so a negative (or NaN) amount is
    dropped, as the OTel SDK drops it, and there is no `set`."""

    __slots__ = ("value", "_lock")

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, amount: float) -> None:
        if not amount >= 0:  # negative or NaN
            return
        with self._lock:
            self.value += amount


class _HistogramCell:
    __slots__ = ("counts", "count", "sum", "_bounds", "_lock")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self._lock = threading.Lock()

    def record(self, value: float) -> None:
        if not value >= 0:  # negative or NaN: dropped, as the OTel SDK drops a negative value
            return
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
    _cell: type = _CounterCell  # drops negative amounts: the API says a counter ignores them

    def __init__(self, name: str, unit: str = "", description: str = "") -> None:
        self.name, self.unit, self.description = name, unit, description
        self.series = _Series(self._cell)

    def add(self, amount: float, attributes: Mapping[str, Any] | None = None, context: Any = None) -> None:
        self.series.cell(_key(attributes)).add(amount)

    def bind(self, **attributes: Any) -> _CounterCell | _Cell:
        """The cell for this attribute set: `cell.add(1)` is the fast path."""
        return self.series.cell(_key(attributes))

    def points(self) -> list[tuple[dict, float]]:
        return [(dict(key), cell.value) for key, cell in list(self.series.cells.items())]


class UpDownCounter(Counter, api.UpDownCounter):
    kind, monotonic = "sum", False
    _cell = _Cell


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
        self.series.cell(_key(attributes)).record(amount)  # the cell drops a negative amount

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


# Prometheus text format 0.0.4: metric names [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]*
# (ASCII only; names starting with "__" are reserved), HELP text escapes only backslash and newline, label
# values escape backslash, double quote and newline.
_NOT_METRIC_CHAR = re.compile(r"[^a-zA-Z0-9_:]")
_NOT_LABEL_CHAR = re.compile(r"[^a-zA-Z0-9_]")


@functools.lru_cache(maxsize=4096)
def _prom_name(name: str) -> str:
    """A valid metric name: every other character becomes `_`, and `_` goes before a leading digit."""
    name = _NOT_METRIC_CHAR.sub("_", str(name))
    return "_" + name if not name or name[0].isdigit() else name


@functools.lru_cache(maxsize=4096)
def _prom_label_name(key: str) -> str:
    """A valid label name: as `_prom_name` without `:`, and a reserved leading `__` cut to one `_`."""
    name = _NOT_LABEL_CHAR.sub("_", str(key))
    if not name or name[0].isdigit():
        return "_" + name
    return "_" + name.lstrip("_") if name.startswith("__") else name


def _prom_label_pairs(attributes: Mapping[str, Any], reserved: tuple[str, ...] = ()) -> list[str]:
    """`name="value"` for each attribute, sorted by label name. Where several attribute keys make the same
    label name (`service.name` and `service_name`, or a histogram's `le`), one is kept: a key that is that
    label name already, else the smallest key; a name in `reserved` (added by the caller) is never taken."""
    if not attributes:
        return []
    labels: dict[str, str] = {}
    for key, value in sorted(attributes.items(), key=lambda item: (_prom_label_name(item[0]) != item[0],
                                                                   str(item[0]))):
        name = _prom_label_name(key)
        if name not in labels and name not in reserved:
            labels[name] = f'{name}="{_prom_escape(value)}"'
    return [labels[name] for name in sorted(labels)]


def _prom_labels(attributes: Mapping[str, Any], reserved: tuple[str, ...] = ()) -> str:
    parts = _prom_label_pairs(attributes, reserved)
    return "{" + ",".join(parts) + "}" if parts else ""


def _prom_escape(value: Any) -> str:
    """A label value: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _prom_help(text: str) -> str:
    """HELP text: only backslash and newline are escaped (a `\\"` there is not valid 0.0.4)."""
    return str(text).replace("\\", "\\\\").replace("\n", "\\n")


def _prom_value(value: Any) -> str | None:
    """A sample value (`sample_value`'s rule: a bool as 1 or 0), None for what is not a number (the sample
    is left out)."""
    value = sample_value(value)
    if value is None:
        return None
    if type(value) is int:
        if math.isinf(as_float(value)):  # past a float64: a scraper's ParseFloat refuses the digits
            return "+Inf" if value > 0 else "-Inf"
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


def render_prometheus(snapshot: Iterable[tuple]) -> str:
    """Text format 0.0.4. Names are sanitized (see `_prom_name`, `_prom_label_pairs`). Each family's names
    must be its own: a histogram `x` writes `x_bucket`, `x_sum` and `x_count` too, so a counter or gauge
    exposed as one of those (or as `x`), or another histogram whose names meet these, would make two series
    of one name. Where families collide so, the first (in snapshot order: registration order, the process's
    own before other processes') keeps its names and the later one is left out, with a comment line saying
    so and a warning logged once. Two series of a family with the same labels: the first is kept."""
    lines: list[str] = []
    taken: dict[str, tuple[str, str]] = {}  # an exposed name -> (its family, that family's type)
    for name, description, _unit, kind, monotonic, points in snapshot:
        metric = _prom_name(name)
        prom_type = "histogram" if kind == "histogram" else "counter" if kind == "sum" and monotonic else "gauge"
        names = (metric, metric + "_bucket", metric + "_sum", metric + "_count") if kind == "histogram" \
            else (metric,)
        clash = next((n for n in names if n in taken), None)
        if clash is not None:
            holder, holder_type = taken[clash]
            lines.append(f"# {prom_type} {metric} left out: {holder_type} {holder} writes {clash} already")
            _warn_once(("name collision", prom_type, metric, holder),
                       "/metrics: %s %s is left out: %s %s writes a series named %s already (a histogram x also "
                       "writes x_bucket, x_sum and x_count); rename one of the two metrics",
                       prom_type, metric, holder_type, holder, clash)
            continue
        for exposed in names:
            taken[exposed] = (metric, prom_type)
        if description:
            lines.append(f"# HELP {metric} {_prom_help(description)}")
        lines.append(f"# TYPE {metric} {prom_type}")
        seen: set[str] = set()
        for attributes, value in points:
            if kind == "histogram":
                pairs = _prom_label_pairs(attributes, ("le",))
                labels = "{" + ",".join(pairs) + "}" if pairs else ""
                if labels in seen:
                    continue
                seen.add(labels)
                count, total, bucket_counts, bounds = value
                cumulative = 0
                for bound, bucket in zip([*bounds, math.inf], bucket_counts):
                    cumulative += bucket
                    le = 'le="' + _prom_value(float(bound)) + '"'
                    lines.append(f"{metric}_bucket{{{','.join([*pairs, le])}}} {cumulative}")
                lines.append(f"{metric}_sum{labels} {_prom_value(float(total))}")
                lines.append(f"{metric}_count{labels} {count}")
            else:
                labels = _prom_labels(attributes)
                text = _prom_value(value)
                if text is None:
                    warn_not_a_number(name, value)
                    continue
                if labels in seen:
                    continue
                seen.add(labels)
                lines.append(f"{metric}{labels} {text}")
    return "\n".join(lines) + "\n"


# --- snapshots shared between processes -------------------------------------------------------------------

_KINDS = ("sum", "gauge", "histogram")


def write_snapshot(path: Path, snapshot: list[tuple], *, worker_id: str, start_ns: int) -> None:
    """Publish a meter snapshot for another process to read: JSON written to a temporary file and renamed over
    `path`, so that a reader finds the previous snapshot or this one, never part of one. Values go through
    `sample_value` (a bool as 1 or 0, a point that is not a number left out), so that one odd gauge does not
    make `parse_snapshot` refuse the whole file."""
    doc = {"version": 1, "worker_id": worker_id, "pid": os.getpid(), "start_ns": start_ns,
           "time_ns": time.time_ns(), "metrics": _numbers_only(snapshot)}
    data = json.dumps(doc, separators=(",", ":"), default=str).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _numbers_only(snapshot: Iterable[tuple]) -> list[tuple]:
    out = []
    for name, description, unit, kind, monotonic, points in snapshot:
        if kind != "histogram":  # a histogram's points come from its own cells: numbers already
            kept = []
            for attributes, value in points:
                number = sample_value(value)
                if number is None:
                    warn_not_a_number(name, value)
                else:
                    kept.append((attributes, number))
            points = kept
        if points:
            out.append((name, description, unit, kind, monotonic, points))
    return out


def parse_snapshot(data: bytes | str) -> tuple[str, list[tuple]]:
    """(worker_id, snapshot) from `write_snapshot`'s file; ValueError saying what is wrong with anything else."""
    try:
        doc = json.loads(data)
    except ValueError as exc:  # also UnicodeDecodeError
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ValueError("not a version 1 metric snapshot")
    worker_id, families = doc.get("worker_id"), doc.get("metrics")
    if not isinstance(worker_id, str) or not worker_id:
        raise ValueError("no worker_id")
    if not isinstance(families, list):
        raise ValueError("no metrics list")
    return worker_id, [_parse_family(item) for item in families]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_family(item: Any) -> tuple:
    if not isinstance(item, list) or len(item) != 6:
        raise ValueError("a metric is not [name, description, unit, kind, monotonic, points]")
    name, description, unit, kind, monotonic, points = item
    if not (isinstance(name, str) and name and isinstance(description, str) and isinstance(unit, str)
            and kind in _KINDS and isinstance(monotonic, bool) and isinstance(points, list)):
        raise ValueError(f"metric {str(name)[:80]!r}: bad name, kind or points")
    parsed = []
    for point in points:
        if not (isinstance(point, list) and len(point) == 2 and isinstance(point[0], dict)):
            raise ValueError(f"metric {name!r}: a point is not [attributes, value]")
        attributes, value = point
        if kind == "histogram":
            value = _parse_histogram(name, value)
        elif not _number(value):
            raise ValueError(f"metric {name!r}: value {str(value)[:40]!r} is not a number")
        parsed.append((attributes, value))
    return name, description, unit, kind, monotonic, parsed


def _parse_histogram(name: str, value: Any) -> tuple:
    if isinstance(value, list) and len(value) == 4:
        count, total, counts, bounds = value
        if (isinstance(count, int) and _number(total) and isinstance(counts, list) and isinstance(bounds, list)
                and len(counts) == len(bounds) + 1 and all(isinstance(c, int) for c in counts)
                and all(_number(b) for b in bounds)):
            return count, total, counts, bounds
    raise ValueError(f"metric {name!r}: a histogram point is not [count, sum, bucket counts, bounds]")


def merge_snapshots(own: Iterable[tuple], others: Iterable[tuple[str, Iterable[tuple]]], *,
                    label: str = "worker_id") -> list[tuple]:
    """This process's snapshot and other processes' (`(id, snapshot)` pairs) as one, so that each metric
    family is rendered once: other processes' points get `label="<id>"` unless they carry that label already.
    A series met twice (same name, same rendered labels) is summed for sums and histograms with the same
    bounds, else the first is kept; a family whose kind differs from the first one of its name is left out."""
    merged: dict[str, list] = {}
    series: dict[str, dict[str, int]] = {}

    def add(family: tuple, process_id: str | None) -> None:
        name, description, unit, kind, monotonic, points = family
        target = merged.get(name)
        if target is None:
            target = merged[name] = [name, description, unit, kind, monotonic, []]
            series[name] = {}
        elif (target[3], target[4]) != (kind, monotonic):
            return
        if description and not target[1]:
            target[1] = description
        seen, out = series[name], target[5]
        for attributes, value in points:
            if process_id is not None and label not in attributes:
                attributes = {**attributes, label: process_id}
            key = _prom_labels(attributes, ("le",) if kind == "histogram" else ())
            index = seen.get(key)
            if index is None:
                seen[key] = len(out)
                out.append((attributes, value))
            else:
                out[index] = (out[index][0], _combine(kind, out[index][1], value))

    for family in own:
        add(family, None)
    for process_id, snapshot in others:
        for family in snapshot:
            add(family, process_id)
    return [tuple(family) for family in merged.values() if family[5]]


def _combine(kind: str, old: Any, new: Any) -> Any:
    if kind == "sum":
        return old + new
    if kind == "histogram" and list(old[3]) == list(new[3]):
        return (old[0] + new[0], old[1] + new[1], [a + b for a, b in zip(old[2], new[2])], old[3])
    return old

"""Buffered records -> OTLP/HTTP protobuf request bodies.

Spans and log records are written straight in protobuf wire format (field numbers from opentelemetry-proto's
`trace.proto`/`logs.proto`; `tests/test_telemetry_encode.py` decodes the output with opentelemetry-proto and
compares it field by field). The generated message classes cost about 1.5 us per attribute to build, which
alone would miss the 20 us-per-span export budget; encoded attribute pairs repeat a lot (service.type,
job.id within a job) so they are cached. The resource, the scope and all metric points (few, and built once
per interval) use the opentelemetry-proto classes and the OTel exporter's common encoders.

Record layouts (tuples, so they marshal into the buffer cheaply):
  span: (trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, attributes, status_code,
         status_message, events, trace_state, flags)  with events = ((time_ns, name, attributes), ...) or None;
        a span that dropped something past the tracer's limits has two more fields, dropped_attributes_count
        and dropped_events_count, and an event that dropped attributes a 4th item, its dropped_attributes_count
        (records without them, older ones in a buffer included, encode as none dropped)
  log:  (time_ns, severity_number, severity_text, body, attributes, trace_id, span_id, event_name)
  metric: (time_ns, start_ns, [(name, description, unit, kind, monotonic, points), ...]) where kind is
          "sum", "gauge" or "histogram" and points are (attributes, value) or
          (attributes, (count, sum, bucket_counts, bounds))
"""

from __future__ import annotations

import struct
from importlib import metadata

from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes, _encode_resource
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.resources import Resource

from emp_machine.telemetry.metrics import as_float, sample_value, warn_not_a_number

SPAN_TRACE_ID, SPAN_ID, SPAN_PARENT = 0, 1, 2


def _sdk_version() -> str:
    try:
        return metadata.version("opentelemetry-sdk")
    except metadata.PackageNotFoundError:  # a vendored or frozen install: the attribute is still there
        return "unknown"


# What the resource semantic conventions require of every resource (the SDK's Resource.create() adds them;
# Resource() does not): merged into each encoder's resource, under what the caller set.
SDK_ATTRIBUTES = {"telemetry.sdk.name": "opentelemetry", "telemetry.sdk.language": "python",
                  "telemetry.sdk.version": _sdk_version()}

_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_i = struct.Struct("<I").pack


def _varint(value: int) -> bytes:
    if value < 0:
        value &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf writes negative int64
    elif value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _ld(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: tag byte (field numbers < 16), length, payload."""
    n = len(payload)
    return (bytes((tag, n)) if n < 0x80 else bytes((tag,)) + _varint(n)) + payload


def _ld2(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _any_value(value: object) -> bytes:
    kind = type(value)
    if kind is str:
        return _ld(0x0A, value.encode("utf-8", "replace"))
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        if -2**63 <= value < 2**63:
            return b"\x18" + _varint(value)
        return _ld(0x0A, str(value).encode())  # past int64 (a ComfyUI seed reaches 2**64-1): its digits, not 0
    if kind is float:
        return b"\x21" + _pack_d(value)
    if kind in (list, tuple):
        return _ld(0x2A, b"".join(_ld(0x0A, _any_value(v)) for v in value))  # ArrayValue.values
    if kind is bytes:
        return _ld(0x3A, value)
    if isinstance(value, dict):
        return _ld(0x32, b"".join(_ld(0x0A, _key_value(k, v)) for k, v in value.items()))  # KeyValueList
    if value is None:
        return b""
    return _ld(0x0A, str(value).encode("utf-8", "replace"))


def _key_value(key: str, value: object) -> bytes:
    if not isinstance(key, str):  # {200: 3}: the key as text, as the JSON line writes it
        key = str(key)
    return _ld(0x0A, key.encode("utf-8", "replace")) + _ld(0x12, _any_value(value))


_kv_cache: dict[tuple, bytes] = {}


# Keys of a log record's JSON line that OTLP carries in LogRecord fields of their own.
LOG_SKIP = frozenset(("timestamp", "level", "message", "trace_id", "span_id"))


def _attributes(tag: int, attributes: dict | None, skip: frozenset = frozenset()) -> bytes:
    """Repeated KeyValue under `tag`; scalar pairs are cached (bounded), with their tag: the same pair is
    framed as field 6 of a log record, 9 of a span and 3 of a span event."""
    if not attributes:
        return b""
    out = []
    cache = _kv_cache
    for key, value in attributes.items():
        if key in skip:
            continue
        if type(value) in (str, int, float, bool):
            ckey = (tag, key, type(value), value)
            encoded = cache.get(ckey)
            if encoded is None:
                encoded = _ld(tag, _key_value(key, value))
                if len(cache) > 20_000:
                    cache.clear()
                cache[ckey] = encoded
            out.append(encoded)
        else:
            out.append(_ld(tag, _key_value(key, value)))
    return b"".join(out)


def _id(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def encode_span(record: tuple) -> bytes:
    if len(record) > 13:  # past the tracer's limits: the dropped counts follow the 13 fields
        dropped_attributes, dropped_events = record[13], record[14]
        record = record[:13]
    else:
        dropped_attributes = dropped_events = 0
    (trace_id, span_id, parent, name, kind, start, end, attributes, status_code, status_message, events,
     trace_state, flags) = record
    parts = [
        b"\x0a\x10", _id(trace_id, 16),
        b"\x12\x08", _id(span_id, 8),
    ]
    if trace_state:
        parts.append(_ld(0x1A, trace_state.encode()))
    if parent:
        parts.append(b"\x22\x08")
        parts.append(_id(parent, 8))
    parts.append(_ld(0x2A, name.encode("utf-8", "replace")))
    if kind:
        parts.append(b"\x30" + _varint(kind))
    parts.append(b"\x39" + _pack_q(start))
    parts.append(b"\x41" + _pack_q(end))
    parts.append(_attributes(0x4A, attributes))
    if dropped_attributes:
        parts.append(b"\x50" + _varint(dropped_attributes))  # field 10, dropped_attributes_count
    if events:
        for event in events:  # (time_ns, name, attributes[, dropped_attributes_count])
            body = b"\x09" + _pack_q(event[0]) + _ld(0x12, event[1].encode("utf-8", "replace")) + \
                _attributes(0x1A, event[2])
            if len(event) > 3 and event[3]:
                body += b"\x20" + _varint(event[3])  # Event field 4, dropped_attributes_count
            parts.append(_ld(0x5A, body))
    if dropped_events:
        parts.append(b"\x60" + _varint(dropped_events))  # field 12, dropped_events_count
    if status_code:
        status = (_ld(0x12, status_message.encode("utf-8", "replace")) if status_message else b"") + \
            b"\x18" + _varint(status_code)
        parts.append(_ld(0x7A, status))
    # flags: field 16, fixed32 (tag 0x85 0x01): bit 8 says the parent's remoteness is known, bit 9 remote.
    parts.append(b"\x85\x01" + _pack_i(flags))
    return b"".join(parts)


def encode_log(record: tuple) -> bytes:
    time_ns, severity_number, severity_text, body, attributes, trace_id, span_id, event_name = record
    parts = [b"\x09" + _pack_q(time_ns)]
    if severity_number:
        parts.append(b"\x10" + _varint(severity_number))
    if severity_text:
        parts.append(_ld(0x1A, severity_text.encode()))
    if body is not None:
        parts.append(_ld(0x2A, _any_value(body)))
    parts.append(_attributes(0x32, attributes, LOG_SKIP))
    if trace_id:
        parts.append(b"\x4a\x10" + _id(trace_id, 16))
        parts.append(b"\x52\x08" + _id(span_id, 8))
    parts.append(b"\x59" + _pack_q(time_ns))  # observed_time_unix_nano
    if event_name:
        parts.append(_ld(0x62, event_name.encode("utf-8", "replace")))
    return b"".join(parts)


class Encoder:
    """Builds the three request bodies for one resource and instrumentation scope."""

    def __init__(self, resource_attributes: dict[str, object], scope_name: str = "emp_machine.telemetry",
                 scope_version: str = ""):
        # Resource(...) rather than Resource.create(): no detectors, so no environment is read here; the
        # telemetry.sdk.* attributes are added as it would (a caller's own values win).
        self._resource_pb = _encode_resource(Resource({**resource_attributes, **{
            key: value for key, value in SDK_ATTRIBUTES.items() if key not in resource_attributes}}))
        self._resource = self._resource_pb.SerializeToString()
        self._scope = InstrumentationScope(name=scope_name, version=scope_version).SerializeToString()
        self._scope_args = (scope_name, scope_version)

    def for_resource(self, resource_attributes: dict[str, object]) -> "Encoder":
        """An encoder of the same scope for another resource (records another process made)."""
        return Encoder(resource_attributes, *self._scope_args)

    def traces(self, encoded_spans: list[bytes]) -> bytes:
        """ExportTraceServiceRequest from already encoded spans (see `encode_span`)."""
        scope_spans = _ld(0x0A, self._scope) + b"".join(_ld2(b"\x12", s) for s in encoded_spans)
        resource_spans = _ld(0x0A, self._resource) + _ld2(b"\x12", scope_spans)
        return _ld2(b"\x0a", resource_spans)

    def logs(self, encoded_logs: list[bytes]) -> bytes:
        scope_logs = _ld(0x0A, self._scope) + b"".join(_ld2(b"\x12", r) for r in encoded_logs)
        resource_logs = _ld(0x0A, self._resource) + _ld2(b"\x12", scope_logs)
        return _ld2(b"\x0a", resource_logs)

    def metrics(self, records: list[tuple]) -> bytes:
        request = ExportMetricsServiceRequest()
        resource_metrics = request.resource_metrics.add()
        resource_metrics.resource.CopyFrom(self._resource_pb)
        scope_metrics = resource_metrics.scope_metrics.add()
        scope_metrics.scope.ParseFromString(self._scope)
        for time_ns, start_ns, series in records:
            for name, description, unit, kind, monotonic, points in series:
                metric = scope_metrics.metrics.add(name=name, description=description, unit=unit)
                if kind == "histogram":
                    metric.histogram.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
                    for attributes, (count, total, bucket_counts, bounds) in points:
                        metric.histogram.data_points.add(
                            attributes=_encode_attributes(attributes), start_time_unix_nano=start_ns,
                            time_unix_nano=time_ns, count=count, sum=total, bucket_counts=bucket_counts,
                            explicit_bounds=bounds)
                else:
                    container = metric.sum if kind == "sum" else metric.gauge
                    if kind == "sum":
                        container.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
                        container.is_monotonic = monotonic
                    for attributes, value in points:
                        number = sample_value(value)  # /metrics' rule: a bool as 1 or 0, text or None left out
                        if number is None:
                            warn_not_a_number(name, value)
                            continue
                        point = container.data_points.add(
                            attributes=_encode_attributes(attributes), start_time_unix_nano=start_ns,
                            time_unix_nano=time_ns)
                        if type(number) is int and -2**63 <= number < 2**63:
                            point.as_int = number
                        else:  # a float, or an int past int64 (as_int would raise); past a float64: +-Inf
                            point.as_double = as_float(number)
                    if not container.data_points:  # every point left out: no empty metric either
                        del scope_metrics.metrics[-1]
        return request.SerializeToString()

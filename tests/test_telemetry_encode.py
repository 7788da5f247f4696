"""The hand-written protobuf encoders agree with opentelemetry-proto's own messages."""

from __future__ import annotations

import enum
import logging
import math

from opentelemetry.metrics import Observation
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from emp_machine.telemetry.encode import SDK_ATTRIBUTES, Encoder, encode_log, encode_span
from emp_machine.telemetry.metrics import Meter, render_prometheus
from otlp_receiver import attributes

ATTRS = {"s": "héllo", "neg": -5, "big": 2**62, "f": 0.25, "b": False, "arr": ["a", 1], "kv": {"x": 1}, "none": None}


def test_span_round_trips_through_the_official_message():
    record = (0x0123456789ABCDEF0123456789ABCDEF, 0xFEDCBA9876543210, 0x1111, "task.preprocessing", 1,
              1_700_000_000_000_000_000, 1_700_000_000_500_000_000, ATTRS, 2, "failed",
              ((1_700_000_000_100_000_000, "exception", {"exception.type": "KeyError"}),), "emp=machine:m", 0x301)
    span = Span.FromString(encode_span(record))
    assert span.trace_id == record[0].to_bytes(16, "big") and span.span_id == record[1].to_bytes(8, "big")
    assert span.parent_span_id == (0x1111).to_bytes(8, "big")
    assert (span.name, span.kind, span.trace_state, span.flags) == ("task.preprocessing", 1, "emp=machine:m", 0x301)
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (record[5], record[6])
    assert attributes(span.attributes) == {**ATTRS, "none": None}
    assert (span.status.code, span.status.message) == (2, "failed")
    assert span.events[0].name == "exception" and attributes(span.events[0].attributes) == {"exception.type": "KeyError"}


def test_dropped_counts_are_encoded_and_records_without_them_still_encode():
    # A span past the tracer's limits carries two more fields (dropped attributes, dropped events) and an event
    # that dropped attributes a 4th item; a 13-field record (an older version's, still in a buffer) encodes as
    # before, with nothing dropped.
    base = (5, 6, 0, "service.call", 1, 1_700_000_000_000_000_000, 1_700_000_000_500_000_000, {"a": 1}, 0, "",
            ((1_700_000_000_100_000_000, "progress", {"step": 1}),), "", 0x100)
    old = Span.FromString(encode_span(base))
    assert (old.dropped_attributes_count, old.dropped_events_count, old.events[0].dropped_attributes_count) == (0, 0, 0)
    assert attributes(old.events[0].attributes) == {"step": 1} and attributes(old.attributes) == {"a": 1}
    events = ((1_700_000_000_100_000_000, "progress", {"step": 1}), (1_700_000_000_200_000_000, "wide", {"k": 2}, 7))
    span = Span.FromString(encode_span(base[:10] + (events,) + base[11:] + (3, 300)))
    assert (span.dropped_attributes_count, span.dropped_events_count) == (3, 300)
    assert [(e.name, e.dropped_attributes_count) for e in span.events] == [("progress", 0), ("wide", 7)]
    assert attributes(span.events[1].attributes) == {"k": 2} and attributes(span.attributes) == {"a": 1}
    assert span.status.code == 0 and span.flags == 0x100 and span.name == "service.call"


def test_log_round_trips_through_the_official_message():
    record = (1_700_000_000_000_000_000, 17, "ERROR", "boom ✓", {"job_id": "j"}, 5, 6, "job.failed")
    log = LogRecord.FromString(encode_log(record))
    assert (log.time_unix_nano, log.severity_number, log.severity_text) == (record[0], 17, "ERROR")
    assert log.body.string_value == "boom ✓" and log.event_name == "job.failed"
    assert attributes(log.attributes) == {"job_id": "j"}
    assert log.trace_id == (5).to_bytes(16, "big") and log.span_id == (6).to_bytes(8, "big")


def test_requests_carry_resource_and_scope():
    encoder = Encoder({"service.name": "svc", "machine.id": "m1"})
    span = encode_span((1, 2, 0, "x", 0, 1, 2, {}, 0, "", None, "", 0))
    request = ExportTraceServiceRequest.FromString(encoder.traces([span, span]))
    (resource_spans,) = request.resource_spans
    assert attributes(resource_spans.resource.attributes) == {"service.name": "svc", "machine.id": "m1",
                                                              **SDK_ATTRIBUTES}  # telemetry.sdk.*: required
    assert resource_spans.scope_spans[0].scope.name == "emp_machine.telemetry"
    assert len(resource_spans.scope_spans[0].spans) == 2
    logs = ExportLogsServiceRequest.FromString(encoder.logs([encode_log((1, 9, "INFO", "x", {}, 0, 0, ""))]))
    assert logs.resource_logs[0].scope_logs[0].log_records[0].body.string_value == "x"
    metrics = ExportMetricsServiceRequest.FromString(encoder.metrics([(10, 5, [
        ("jobs_processed_total", "jobs", "1", "sum", True, [({"status": "completed"}, 3)]),
        ("machine_cpu_usage_percent", "", "%", "gauge", False, [({}, 12.5)]),
        ("job_duration_seconds", "", "s", "histogram", False, [({"type": "sim"}, (2, 3.0, [1, 1, 0], [1.0, 5.0]))]),
    ])]))
    m = metrics.resource_metrics[0].scope_metrics[0].metrics
    assert m[0].sum.is_monotonic and m[0].sum.data_points[0].as_int == 3
    assert m[1].gauge.data_points[0].as_double == 12.5
    assert list(m[2].histogram.data_points[0].bucket_counts) == [1, 1, 0]


def test_an_attribute_encoded_for_one_message_is_not_reused_in_another():
    """Encoded attribute pairs are cached, and a pair is framed differently in a log record (field 6), a span
    (field 9) and a span event (field 3): the same pair in each, in turn, must decode in each."""
    pair = {"shared.key": "shared value"}
    log = LogRecord.FromString(encode_log((1, 9, "INFO", "x", pair, 0, 0, "")))
    span = Span.FromString(encode_span((1, 2, 0, "s", 1, 1, 2, pair, 0, "", ((1, "e", pair),), "", 0)))
    log_again = LogRecord.FromString(encode_log((1, 9, "INFO", "x", pair, 0, 0, "")))
    assert attributes(log.attributes) == attributes(span.attributes) == pair
    assert attributes(span.events[0].attributes) == attributes(log_again.attributes) == pair


class _Level(enum.IntEnum):
    HIGH = 2


# (case, value, what both /metrics and OTLP carry: None when the point is left out)
ODD_VALUES = [
    ("int", 3, 3), ("float", 2.5, 2.5), ("true", True, 1), ("false", False, 0), ("enum", _Level.HIGH, 2),
    ("nan", math.nan, math.nan), ("inf", math.inf, math.inf), ("-inf", -math.inf, -math.inf),
    ("past_int64", 2**70, float(2**70)), ("past_float64", 10**400, math.inf),
    ("text", "1.5", None), ("word", "busy", None), ("none", None, None), ("object", object(), None),
]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_metric_values_that_are_not_numbers_follow_the_prometheus_rules(caplog):
    """A gauge's or a sum's point whose value is not a number is left out of OTLP as /metrics leaves it out
    (once an exception that lost the whole metric record, or sent raw); a bool is 1 or 0 on both paths."""
    meter = Meter()
    gauge = meter.create_gauge("odd_gauge_values")
    for case, value, _ in ODD_VALUES:
        gauge.set(value, {"case": case})
    observed = [Observation(value, {"case": case}) for case, value, _ in ODD_VALUES]
    meter.create_observable_counter("odd_counted_values", [lambda _: observed])
    meter.create_observable_gauge("odd_nothing_left", [lambda _: [Observation(None), Observation("x")]])
    snapshot = meter.snapshot()
    with caplog.at_level(logging.WARNING, logger="emp_machine.telemetry.metrics"):
        body = Encoder({"service.name": "svc"}).metrics([(10, 5, snapshot), (20, 5, snapshot)])
        text = render_prometheus(snapshot)
    request = ExportMetricsServiceRequest.FromString(body)
    metrics = request.resource_metrics[0].scope_metrics[0].metrics
    assert [m.name for m in metrics] == ["odd_gauge_values", "odd_counted_values"] * 2  # no empty metric
    prom: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            prom.setdefault(family.name, {})[sample.labels["case"]] = sample.value
    expected = {case: number for case, _, number in ODD_VALUES if number is not None}
    for metric in metrics:
        points = metric.gauge.data_points if metric.name == "odd_gauge_values" else metric.sum.data_points
        otlp = {attributes(p.attributes)["case"]: getattr(p, p.WhichOneof("value")) for p in points}
        as_int = {attributes(p.attributes)["case"] for p in points if p.WhichOneof("value") == "as_int"}
        assert as_int == {"int", "true", "false", "enum"}
        assert otlp.keys() == expected.keys() == prom[metric.name].keys()
        assert all(_same(otlp[case], number) and _same(prom[metric.name][case], number)
                   for case, number in expected.items())
    assert metrics[1].sum.is_monotonic and "odd_nothing_left" not in prom
    for name in ("odd_gauge_values", "odd_counted_values", "odd_nothing_left"):
        assert len([r for r in caplog.records if r.getMessage().startswith(f"metric {name!r}:")]) == 1

"""Metrics and OTLP encoding rules no test held (mutation audit M14: each could be broken with every other test
passing): cumulative temporality and start times, the histogram's overflow bucket and upper-inclusive bounds,
span kinds and event/observed times in nanoseconds, a merged series summed, machine memory as used bytes, and
OTEL_RESOURCE_ATTRIBUTES under ours. Encoded by our encoder, decoded with opentelemetry-proto."""
from __future__ import annotations

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from emp_machine.telemetry.encode import Encoder, encode_log, encode_span
from emp_machine.telemetry.metrics import Meter, merge_snapshots, render_prometheus
from emp_machine.telemetry.sampling import AdaptiveSampler, OverheadMeter
from emp_machine.telemetry.tracing import Tracer

T0 = 1_700_000_000_000_000_000


def _metrics(meter: Meter) -> dict:
    body = Encoder({"service.name": "t"}).metrics([(T0 + 10**9, T0, meter.snapshot())])
    req = ExportMetricsServiceRequest.FromString(body)
    return {m.name: m for m in req.resource_metrics[0].scope_metrics[0].metrics}


def test_sums_and_histograms_are_cumulative_in_otlp():  # M03, M04
    meter = Meter()
    meter.create_counter("jobs_processed_total").add(3, {"type": "t", "status": "ok"})
    meter.create_up_down_counter("queue_depth").add(2)
    meter.create_histogram("job_duration_seconds", "s").record(0.2, {"type": "t"})
    got = _metrics(meter)
    cumulative = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    assert got["jobs_processed_total"].sum.aggregation_temporality == cumulative
    assert got["jobs_processed_total"].sum.is_monotonic
    assert got["queue_depth"].sum.aggregation_temporality == cumulative
    assert got["job_duration_seconds"].histogram.aggregation_temporality == cumulative


def test_otlp_histogram_keeps_the_overflow_bucket():  # M30
    meter = Meter()
    h = meter.create_histogram("job_duration_seconds", "s")
    h.record(0.2)
    h.record(700.0)  # past the last bound (600): the +Inf bucket
    [point] = _metrics(meter)["job_duration_seconds"].histogram.data_points
    assert len(point.bucket_counts) == len(point.explicit_bounds) + 1
    assert sum(point.bucket_counts) == point.count == 2
    assert point.bucket_counts[-1] == 1


def test_a_value_on_a_bound_counts_in_that_bounds_le_bucket():  # M05
    # Prometheus and OTLP buckets are upper-inclusive: 1.0 belongs to le="1.0" (OTLP: bounds[i-1] < x <= bounds[i])
    meter = Meter()
    meter.create_histogram("job_duration_seconds", "s", explicit_bucket_boundaries_advisory=(0.5, 1.0, 2.0)).record(1.0)
    families = {f.name: f for f in text_string_to_metric_families(meter.render_prometheus())}
    buckets = {s.labels["le"]: s.value for s in families["job_duration_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets == {"0.5": 0, "1.0": 1, "2.0": 1, "+Inf": 1}
    [point] = _metrics(meter)["job_duration_seconds"].histogram.data_points
    assert list(point.bucket_counts) == [0, 1, 0, 0]


def test_merge_sums_a_counter_series_met_twice():  # M10
    # The docstring: "A series met twice (same name, same rendered labels) is summed for sums".
    own = [("worker_errors_total", "", "1", "sum", True, [({"worker_id": "w1", "kind": "crash"}, 2)])]
    others = [("w1", [("worker_errors_total", "", "1", "sum", True, [({"kind": "crash"}, 3)])])]
    [(name, _, _, _, _, points)] = merge_snapshots(own, others)
    assert points == [({"worker_id": "w1", "kind": "crash"}, 5)]
    text = render_prometheus(merge_snapshots(own, others))
    assert 'worker_errors_total{kind="crash",worker_id="w1"} 5' in text


def test_log_observed_time_is_in_nanoseconds():  # M20
    record = LogRecord.FromString(encode_log((T0, 9, "INFO", "hi", {}, 0, 0, None)))
    assert record.time_unix_nano == T0 and record.observed_time_unix_nano == T0


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind, otlp", [(SpanKind.INTERNAL, Span.SPAN_KIND_INTERNAL),
                                        (SpanKind.SERVER, Span.SPAN_KIND_SERVER),
                                        (SpanKind.CLIENT, Span.SPAN_KIND_CLIENT),
                                        (SpanKind.PRODUCER, Span.SPAN_KIND_PRODUCER),
                                        (SpanKind.CONSUMER, Span.SPAN_KIND_CONSUMER)])
def test_span_kind_reaches_otlp_as_the_same_kind(kind, otlp):  # M25, M25b (job.execution is CONSUMER)
    clock, kept = _Clock(), []
    sampler = AdaptiveSampler(1e9, clock=clock, meter=OverheadMeter(), cpu_budget=float("inf"),
                              span_budget_us=float("inf"))
    tracer = Tracer(sampler, kept.append, clock=clock)
    with tracer.start_as_current_span("service.call", kind=kind):
        pass
    [(_, _, record)] = kept
    assert Span.FromString(encode_span(record)).kind == otlp


def test_machine_memory_usage_is_the_used_bytes():  # M28: .total passed (a flat line at installed RAM)
    import psutil

    from emp_machine.telemetry.standard import StandardMetrics

    meter = Meter()
    StandardMetrics(meter, system=True)
    [(_, value)] = meter.instruments["machine_memory_usage_bytes"].points()
    memory = psutil.virtual_memory()
    assert value < memory.total and abs(value - memory.used) < 0.05 * memory.total, (value, memory)


def test_cumulative_points_start_at_the_meters_start():  # M36
    # A cumulative point whose start time is its own time reads as a reset at every export (rate() of zero).
    meter = Meter()
    meter.create_counter("jobs_processed_total").add(1)
    meter.create_histogram("job_duration_seconds", "s").record(0.2)
    got = _metrics(meter)
    [s] = got["jobs_processed_total"].sum.data_points
    [h] = got["job_duration_seconds"].histogram.data_points
    assert (s.start_time_unix_nano, s.time_unix_nano) == (T0, T0 + 10**9)
    assert (h.start_time_unix_nano, h.time_unix_nano) == (T0, T0 + 10**9)


def test_span_event_time_is_in_nanoseconds():  # M45
    record = (1, 2, 0, "job.execution", 5, T0, T0 + 5 * 10**9, {}, 2, "failed",
              ((T0 + 123_456_789, "exception", {"exception.type": "KeyError"}),), "", 0x100)
    span = Span.FromString(encode_span(record))
    assert span.events[0].time_unix_nano == T0 + 123_456_789


def test_otel_resource_attributes_reach_the_resource_under_ours():  # M48
    from emp_machine.telemetry import TelemetryConfig
    from emp_machine.telemetry.config import apply_otel_env
    from emp_machine.telemetry.core import resource_attributes

    config = apply_otel_env(TelemetryConfig(), {"OTEL_RESOURCE_ATTRIBUTES": "team=gpu,machine.id=spoof",
                                                "OTEL_SERVICE_NAME": "svc"})
    attrs = resource_attributes(config, machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                                region=None)
    assert attrs["team"] == "gpu" and attrs["service.name"] == "svc"
    assert attrs["machine.id"] == "m1"  # ours win over a variable's

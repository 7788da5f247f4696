"""OTLP conformance: how the shipper reads the collector's answers (partial_success, google.rpc.Status, a 2xx
that is no OTLP answer), non-str keys, ints past int64, the resource's telemetry.sdk.* attributes, and the
units Prometheus' OTLP translation turns into name suffixes. Against the real receiver on loopback."""

from __future__ import annotations

import io
import json
import logging
import time

from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from emp_machine.telemetry import TelemetryConfig
from emp_machine.telemetry.buffer import Buffer, Kind, Value
from emp_machine.telemetry.core import setup
from emp_machine.telemetry.encode import Encoder, encode_log, encode_span
from emp_machine.telemetry.metrics import Meter, render_prometheus
from emp_machine.telemetry.redact import redact_fields
from emp_machine.telemetry.shipper import REJECTED_BY_COLLECTOR, Shipper
from emp_machine.telemetry.standard import StandardMetrics
from otlp_receiver import attributes, fast_shipper, wait_until

SHIPPER_LOG = "emp_machine.telemetry.shipper"
SECRET = "sk-abcdefghijklmnop1234"


def _span(i: int, **attrs) -> tuple:
    now = time.time_ns()
    return (0xABC0000 + i, 0x100 + i, 0, "s", 1, now, now + 1000, {"i": i, **attrs}, 0, "", None, "", 0x100)


def _log(i: int) -> tuple:
    return (time.time_ns(), 9, "INFO", f"line {i}", {"i": i}, 0, 0, "")


def _shipper(buffer: Buffer, endpoint: str, **kw) -> Shipper:
    return fast_shipper(buffer, endpoint, {"service.name": "test"}, **kw)


def _queue_spans(buffer: Buffer, count: int) -> None:
    for i in range(count):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    buffer.flush()


def _ship_until(shipper: Shipper, caplog, done) -> None:
    """Run `shipper`, its warnings captured, until `done()` holds (failing after 10 s), then stop it."""
    with caplog.at_level("WARNING", logger=SHIPPER_LOG):
        shipper.start()
        try:
            assert wait_until(done, 10)
        finally:
            shipper.stop()


def _shipper_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SHIPPER_LOG and r.levelno == logging.WARNING]


# --- 1. partial_success ----------------------------------------------------------------------------------

def test_a_partial_success_counts_the_rejected_as_dropped_not_exported_and_is_not_retried(buffer, receiver, caplog):
    answer = ExportTraceServiceResponse()
    answer.partial_success.rejected_spans = 7
    answer.partial_success.error_message = f"7 spans rejected: attribute too long (api_key={SECRET})"
    receiver.respond_next(200, body=answer.SerializeToString())
    for i in range(20):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    buffer.flush()
    exported = []
    shipper = _shipper(buffer, receiver.endpoint, on_exported=lambda signal, n: exported.append((signal, n)))
    _ship_until(shipper, caplog, lambda: buffer.pending() == 0)
    assert receiver.statuses == [200]  # one request: a partial success is never retried
    assert shipper.stats.exported["spans"] == 13 and exported == [("spans", 13)]
    assert shipper.stats.rejected == 7
    assert buffer.stats().dropped.get(REJECTED_BY_COLLECTOR) == 7
    assert shipper.stats.requests_ok == 1 and shipper.stats.dead_lettered == 0
    (warning,) = _shipper_warnings(caplog)
    assert "rejected 7 spans" in warning and "attribute too long" in warning and REJECTED_BY_COLLECTOR in warning
    assert SECRET not in warning and "[REDACTED]" in warning


def test_partial_success_of_logs_and_metrics(buffer, receiver):
    logs = ExportLogsServiceResponse()
    logs.partial_success.rejected_log_records = 2
    logs.partial_success.error_message = "2 bodies too large"
    for i in range(5):
        buffer.append(Kind.LOG, Value.NORMAL, _log(i))
    buffer.flush()
    receiver.respond_next(200, body=logs.SerializeToString())
    shipper = _shipper(buffer, receiver.endpoint).start()
    try:
        # the shipper's thread acks the batch (the buffer empties) before it counts it: wait for both
        assert wait_until(lambda: buffer.pending() == 0 and shipper.stats.exported["logs"] == 3, 10)
        assert buffer.stats().dropped[REJECTED_BY_COLLECTOR] == 2
        metrics = ExportMetricsServiceResponse()
        metrics.partial_success.rejected_data_points = 4
        receiver.respond_next(200, body=metrics.SerializeToString())
        meter = Meter("t")
        for n in range(6):
            meter.create_gauge(f"g{n}").set(n)
        buffer.append(Kind.METRIC, Value.NORMAL, meter.record())
        buffer.flush()
        assert wait_until(lambda: buffer.pending() == 0, 10)
    finally:
        shipper.stop()
    # a metric record is a point of every series: its rejected data points are counted, the record exported
    assert buffer.stats().dropped[REJECTED_BY_COLLECTOR] == 6 and shipper.stats.rejected == 6
    assert shipper.stats.exported["metrics"] == 1
    assert receiver.statuses == [200, 200]


def test_an_empty_or_json_2xx_body_is_a_full_success(buffer, receiver):
    receiver.respond_next(200)  # no body at all
    receiver.respond_next(200, body=b"{}", content_type="application/json")
    for i in range(3):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
        buffer.flush()
        shipper = _shipper(buffer, receiver.endpoint, eager=True).start()
        try:
            assert wait_until(lambda: buffer.pending() == 0, 10)
        finally:
            shipper.stop()
        assert shipper.stats.exported["spans"] == 1 and shipper.stats.requests_failed == 0
    assert len(receiver.spans()) == 1  # the third was the only one the receiver decoded (the others scripted)


def test_a_2xx_that_is_no_otlp_answer_is_retried_not_counted_as_exported(buffer, receiver, caplog):
    receiver.respond_next(200, count=2, body=b"<html><body>Sign in</body></html>", content_type="text/html")
    _queue_spans(buffer, 10)
    shipper = _shipper(buffer, receiver.endpoint)
    # the third try reaches it
    _ship_until(shipper, caplog, lambda: len(receiver.spans()) == 10 and buffer.pending() == 0)
    assert receiver.statuses == [200, 200, 200]
    assert shipper.stats.requests_failed == 2 and shipper.stats.exported["spans"] == 10
    (warning,) = _shipper_warnings(caplog)  # once per distinct answer
    assert "HTTP 200 from /v1/traces" in warning and "not an OTLP response" in warning and "text/html" in warning


def test_a_2xx_with_a_short_non_otlp_body_is_taken_as_accepted_never_resent(buffer, receiver, caplog):
    # Retried, a receiver that took the records but answered "OK" (text/plain) got the same batch 20 times in
    # 3 s, and nothing after it was ever sent. Only an HTML page (a proxy's) means the records were not taken.
    receiver.respond_next(200, count=1, body=b"OK", content_type="text/plain")
    _queue_spans(buffer, 10)
    shipper = _shipper(buffer, receiver.endpoint)
    _ship_until(shipper, caplog, lambda: buffer.pending() == 0)
    assert receiver.statuses == [200] and shipper.stats.requests_failed == 0
    assert shipper.stats.exported["spans"] == 10
    (warning,) = _shipper_warnings(caplog)
    assert "not an OTLP response" in warning and "taken as accepted" in warning


# --- 4. a refusal's google.rpc.Status ----------------------------------------------------------------------

def test_a_400_dead_letter_carries_the_collectors_message_and_is_logged_once(buffer, receiver, caplog):
    status = Status(code=3, message=f"invalid trace id length in span 3, token={SECRET}")
    receiver.respond_next(400, count=2, body=status.SerializeToString())
    receiver.respond_next(400, body=b"<p>bad   request:\n" + b"x" * 400 + b"</p>", content_type="text/plain")
    for i in range(15):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    buffer.flush()
    shipper = _shipper(buffer, receiver.endpoint, batch_max=5, eager=True)
    _ship_until(shipper, caplog, lambda: buffer.pending() == 0 and shipper.stats.dead_lettered == 15)
    reasons = [reason for _, _, reason, _ in buffer.dead_letters()]
    assert reasons[:2] == ["HTTP 400 from /v1/traces: invalid trace id length in span 3, token=[REDACTED]"] * 2
    assert reasons[2].startswith("HTTP 400 from /v1/traces: <p>bad request: xxx")  # the text, on one line
    assert len(reasons[2]) < len("HTTP 400 from /v1/traces: ") + 201
    warnings = _shipper_warnings(caplog)
    assert len(warnings) == 2  # one per distinct reason
    assert "5 spans dead-lettered" in warnings[0] and "invalid trace id length" in warnings[0]
    assert not any(SECRET in w for w in warnings)


# --- 2. non-str keys --------------------------------------------------------------------------------------

def test_non_str_keys_are_redacted_and_encoded_as_their_text():
    assert redact_fields({200: 3, "by_status": {200: 3, 500: {404: "x"}}, ("a", 1): 1}) == \
        {"200": 3, "by_status": {"200": 3, "500": {"404": "x"}}, "('a', 1)": 1}
    record = list(_span(1))
    record[7] = {404: "nf", "n": {7: 1}}  # span attributes as a caller set them, not redacted
    span = Span.FromString(encode_span(tuple(record)))
    assert attributes(span.attributes) == {"404": "nf", "n": {"7": 1}}


def test_non_str_keys_in_log_fields_events_and_span_attributes_reach_the_collector(tmp_path, receiver):
    cfg = TelemetryConfig(otlp_endpoint=receiver.endpoint, export={"interval": 0.1},
                          sampling={"spans_per_second": 10000})
    stream = io.StringIO()
    t = setup(cfg, machine_id="m", worker_id="m-worker-0", service_type="sim", buffer_path=tmp_path / "b.db",
              stream=stream)
    try:
        t.logger("x").info("counts", extra={"fields": {200: 3, "by_status": {500: 1}}})
        t.events.emit("job.custom", counts={200: 3})
        with t.tracer.start_as_current_span("poison") as span:
            span.set_attribute(404, "status code as key")
            span.set_attribute("by_status", {200: 3})
        assert receiver.wait_for(lambda r: any(s.name == "poison" for s in r.spans()) and
                                 {"counts", "job.custom"} <= {log.body.string_value for log in r.logs()}, 15)
    finally:
        t.shutdown(2)
    (poison,) = [s for s in receiver.spans() if s.name == "poison"]
    got = attributes(poison.attributes)
    assert got["404"] == "status code as key" and got["by_status"] == {"200": 3}
    logs = {log.body.string_value: attributes(log.attributes) for log in receiver.logs()}
    assert logs["counts"]["200"] == 3 and logs["counts"]["by_status"] == {"500": 1}
    assert logs["job.custom"]["counts"] == {"200": 3}
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any(line.get("200") == 3 and line.get("by_status") == {"500": 1} for line in lines)


# --- 5. ints past int64 ---------------------------------------------------------------------------------

def test_ints_past_int64_are_sent_as_their_digits_not_zero():
    big = {"seed": 2**64 - 1, "neg": -2**70, "ok": 2**62, "low": -2**63}
    span = Span.FromString(encode_span(_span(1, **big)))
    values = {kv.key: kv.value for kv in span.attributes}
    assert values["seed"].string_value == "18446744073709551615"
    assert values["neg"].string_value == str(-2**70)
    assert values["ok"].WhichOneof("value") == "int_value" and values["ok"].int_value == 2**62
    assert values["low"].int_value == -2**63
    record = LogRecord.FromString(encode_log((time.time_ns(), 9, "INFO", 2**64, {"seed": 2**64 - 1}, 0, 0, "")))
    assert record.body.string_value == str(2**64)
    assert attributes(record.attributes)["seed"] == "18446744073709551615"


# --- 6. telemetry.sdk.* ---------------------------------------------------------------------------------

def test_every_resource_carries_the_telemetry_sdk_attributes(buffer, receiver):
    from importlib.metadata import version

    for i in range(2):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    buffer.flush()
    shipper = _shipper(buffer, receiver.endpoint, eager=True).start()
    try:
        assert receiver.wait_for(lambda r: len(r.spans()) == 2, 10)
    finally:
        shipper.stop()
    resource = receiver.resources()[0]
    assert resource["service.name"] == "test"
    assert resource["telemetry.sdk.name"] == "opentelemetry"
    assert resource["telemetry.sdk.language"] == "python"
    assert resource["telemetry.sdk.version"] == version("opentelemetry-sdk")
    # a resource's own value wins; another resource (an earlier owner's records) gets them too
    other = Encoder({"service.name": "a"}).for_resource({"service.name": "b", "telemetry.sdk.name": "custom"})
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    request = ExportTraceServiceRequest.FromString(other.traces([encode_span(_span(1))]))
    got = attributes(request.resource_spans[0].resource.attributes)
    assert got["telemetry.sdk.name"] == "custom" and got["telemetry.sdk.language"] == "python"


# --- 3. units -------------------------------------------------------------------------------------------

def _prometheus_otlp_name(name: str, unit: str, kind: str, monotonic: bool) -> str:
    """prometheus/otlptranslator's normalizeName for the units we use (suffixes on, the default)."""
    tokens = name.split("_")
    suffix = {"s": "seconds", "By": "bytes", "%": "percent"}.get(unit, "")
    if suffix and suffix not in tokens:
        tokens.append(suffix)
    if kind == "sum" and monotonic:
        tokens = [t for t in tokens if t != "total"] + ["total"]
    if unit == "1" and kind == "gauge":
        tokens = [t for t in tokens if t != "ratio"] + ["ratio"]
    return "_".join(tokens)


def test_count_gauges_keep_their_names_through_prometheus_otlp_translation(tmp_path):
    t = setup(TelemetryConfig(), machine_id="m", worker_id=None, service_type="machine",
              buffer_path=tmp_path / "b.db", stream=io.StringIO(), system_metrics=False)
    try:
        t.metrics.workers_active.set(1, {"service": "sim"})
        t.metrics.workers_total.set(2, {"service": "sim"})
        snapshot = t.meter.snapshot()
    finally:
        t.shutdown(1)
    units = {name: unit for name, _, unit, *_ in snapshot}
    assert units["workers_active"] == units["workers_total"] == "{worker}"
    assert units["telemetry_records_buffered"] == units["telemetry_dead_letter_records"] == "{record}"
    ratios = {"telemetry_sampling_rate", "telemetry_cpu_ratio"}  # true ratios keep "1"
    renamed = {name for name, _, unit, kind, monotonic, _ in snapshot
               if _prometheus_otlp_name(name, unit, kind, monotonic) != name}
    assert renamed <= {"telemetry_sampling_rate"}, renamed
    assert all(units[name] == "1" for name in ratios)
    # /metrics names come from the instruments' names, whatever their units
    families = {line.split()[2] for line in render_prometheus(snapshot).splitlines() if line.startswith("# TYPE")}
    assert {"workers_active", "workers_total", "telemetry_records_buffered", "telemetry_dead_letter_records",
            "telemetry_sampling_rate"} <= families
    assert StandardMetrics(Meter("x")).workers_active.unit == "{worker}"

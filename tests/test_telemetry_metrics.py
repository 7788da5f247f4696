"""Metrics (Prometheus text and OTLP), events, the connector job-lifecycle logger, and drop reporting."""

from __future__ import annotations

import io
import json

from prometheus_client.parser import text_string_to_metric_families

from emp_machine.telemetry import TelemetryConfig, setup
from emp_machine.telemetry.metrics import Meter
from otlp_receiver import OtlpReceiver, attributes, wait_until


def test_instruments_and_prometheus_text():
    meter = Meter()
    jobs = meter.create_counter("jobs_processed_total", "1", "jobs")
    done = jobs.bind(type="sim", status="completed")
    for _ in range(3):
        done.add(1)
    jobs.add(2, {"status": "failed", "type": "sim"})
    jobs.add(-5, {"status": "failed", "type": "sim"})  # ignored: counters only go up
    duration = meter.create_histogram("job_duration_seconds", "s")
    for value in (0.003, 0.2, 0.2, 700):
        duration.record(value, {"type": "sim"})
    meter.create_gauge("workers_active").set(2, {"service": "comfyui"})
    families = {f.name: f for f in text_string_to_metric_families(meter.render_prometheus())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("jobs_processed_total", (("status", "completed"), ("type", "sim")))] == 3
    assert samples[("jobs_processed_total", (("status", "failed"), ("type", "sim")))] == 2
    assert samples[("job_duration_seconds_bucket", (("le", "0.005"), ("type", "sim")))] == 1
    assert samples[("job_duration_seconds_bucket", (("le", "0.25"), ("type", "sim")))] == 3
    assert samples[("job_duration_seconds_bucket", (("le", "+Inf"), ("type", "sim")))] == 4
    assert samples[("job_duration_seconds_count", (("type", "sim"),))] == 4
    assert samples[("workers_active", (("service", "comfyui"),))] == 2
    assert families["job_duration_seconds"].type == "histogram"


def test_connector_logger_events_metrics_and_otlp(tmp_path):
    receiver = OtlpReceiver().start()
    stream = io.StringIO()
    config = TelemetryConfig(otlp_endpoint=receiver.endpoint, export={"interval": "0.1s"})
    telemetry = setup(config, machine_id="m1", worker_id="m1-worker-1", service_type="openai",
                      buffer_path=tmp_path / "t.db", stream=stream)
    try:
        log = telemetry.connector_logger("openai-0", "openai")
        log.received("job-1", model="gpt-4o", api_key="sk-abcdefghijklmnop")
        log.started("job-1")
        log.completed("job-1", 1500, usage={"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
                      request_id="req-x")
        log.failed("job-2", TimeoutError("upstream timed out"), duration_ms=100, can_retry=True)
        log.health_check(False, status_code=503)
        a1111 = telemetry.connector_logger("a1111-0", "a1111")
        a1111.started("job-3", sampler="Euler a", steps=20, size=(512, 768))
        telemetry.events.emit("machine.started", boot_ms=1234)
        prom = telemetry.render_prometheus()
    finally:
        telemetry.shutdown()
        receiver.stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_event = {line["event_type"]: line for line in lines}
    assert by_event["job.received"]["api_key"] == "[REDACTED]" and by_event["job.received"]["model"] == "gpt-4o"
    completed = by_event["job.completed"]
    assert (completed["prompt_tokens"], completed["total_tokens"], completed["connector_id"]) == (10, 30, "openai-0")
    failed = by_event["job.failed"]
    assert failed["level"] == "error" and failed["error.type"] == "TimeoutError" and failed["can_retry"] is True
    assert by_event["service.health_check"]["level"] == "warning"
    started = by_event["job.started"]  # the last one: a1111's
    assert (started["sampler"], started["steps"], started["width"], started["height"]) == ("Euler a", 20, 512, 768)
    assert by_event["machine.started"]["boot_ms"] == 1234
    assert 'jobs_processed_total{status="failed",type="openai"} 1' in prom
    assert 'worker_errors_total{kind="job_failed",worker_id="m1-worker-1"} 1' in prom
    events = {r.event_name for r in receiver.logs()}
    assert {"job.received", "job.completed", "job.failed", "machine.started"} <= events
    names = {m.name for m in receiver.metrics()}
    assert {"jobs_processed_total", "job_duration_seconds", "telemetry_sampling_rate"} <= names
    assert all("sk-abcdefghijklmnop" not in str(r) for r in receiver.logs())


def test_drops_are_reported_as_events_and_metrics(tmp_path):
    stream = io.StringIO()
    config = TelemetryConfig(buffer={"max_size": 30_000, "segment_size": 20_000})
    telemetry = setup(config, machine_id="m1", service_type="machine", buffer_path=tmp_path / "t.db",
                      stream=stream, system_metrics=True)
    try:
        log = telemetry.logger("test.drops")
        for i in range(3000):
            log.info("noise %d %s", i, "x" * (i % 97))
        telemetry.buffer.flush()
        assert wait_until(lambda: "telemetry.records_dropped" in stream.getvalue(), timeout=5)
        prom = telemetry.render_prometheus()
    finally:
        telemetry.shutdown()
    drop_lines = [json.loads(line) for line in stream.getvalue().splitlines() if "records_dropped" in line]
    assert drop_lines[0]["reason"] == "buffer_full" and drop_lines[0]["count"] > 0
    assert 'telemetry_records_dropped_total{reason="buffer_full"}' in prom
    assert "machine_memory_usage_bytes" in prom and "machine_uptime_seconds" in prom
    assert "machine_gpu_usage_percent" not in prom or "gpu=" in prom


def test_receiver_resource_has_the_documented_attributes(tmp_path):
    receiver = OtlpReceiver().start()
    config = TelemetryConfig(otlp_endpoint=receiver.endpoint, service_version="1.2.3", environment="prod",
                             export={"interval": "0.1s"})
    telemetry = setup(config, machine_id="gpu-m1", worker_id="gpu-m1-worker-0", service_type="comfyui",
                      region="eu-west", buffer_path=tmp_path / "t.db", stream=io.StringIO())
    with telemetry.tracer.start_as_current_span("x"):
        pass
    telemetry.shutdown()
    receiver.stop()
    resource = receiver.resources()[0]
    assert resource == {**resource, "service.name": "emp-machine", "service.version": "1.2.3",
                        "service.instance.id": "gpu-m1-worker-0", "deployment.environment": "prod",
                        "machine.id": "gpu-m1", "worker.id": "gpu-m1-worker-0", "service.type": "comfyui",
                        "cloud.region": "eu-west"}
    assert attributes(receiver.spans()[0].attributes)["service.type"] == "comfyui"


def test_other_libraries_log_through_the_root_handler(tmp_path):
    import logging

    stream = io.StringIO()
    telemetry = setup(TelemetryConfig(log_level="WARNING"), machine_id="m1", service_type="machine",
                      buffer_path=tmp_path / "t.db", stream=stream)
    try:
        telemetry.install_logging()
        library = logging.getLogger("some.library")
        library.info("below the level")
        library.warning("disk at %d%% with password=%s", 91, "hunter22")
        telemetry.events.emit("job.progress", level=logging.INFO)  # below the level too
    finally:
        telemetry.shutdown()
    assert logging.getLogger().handlers.count(telemetry.log_handler) == 0  # removed at shutdown
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["message"] == "disk at 91% with password=[REDACTED]"
    assert (line["logger"], line["level"], line["machine_id"]) == ("some.library", "warning", "m1")

"""The telemetry config: defaults, validation, and the standard OTEL_* variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from emp_machine.telemetry.config import TelemetryConfig, apply_otel_env


def test_defaults_are_the_budgets():
    config = TelemetryConfig()
    assert (config.buffer.max_size, config.buffer.segment_size, config.buffer.retention) == (10**8, 5 * 10**7, 3600)
    assert (config.export.batch_min, config.export.batch_max, config.export.max_request_size) == (100, 1000, 10**6)
    assert config.buffer.flush_interval <= 0.1


def test_unknown_keys_and_contradictions_are_rejected():
    with pytest.raises(ValidationError):
        TelemetryConfig(sampling={"spans_per_sec": 5})
    with pytest.raises(ValidationError):
        TelemetryConfig(buffer={"max_size": "10MB", "segment_size": "20MB"})
    with pytest.raises(ValidationError):
        TelemetryConfig(export={"batch_min": 500, "batch_max": 100})


def test_otel_environment_is_applied_over_the_manifest():
    config = TelemetryConfig(otlp_headers={"a": "1"})
    applied = apply_otel_env(config, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20x,b=2",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=gpu,service.name=ignored",
        "OTEL_SERVICE_NAME": "emp-worker",
    })
    assert applied.otlp_endpoint == "http://collector:4318"
    assert applied.otlp_headers == {"a": "1", "Authorization": "Bearer x", "b": "2"}
    assert (applied.export.compression, applied.export.timeout) == ("none", 2.5)
    assert (applied.service_name, applied.environment) == ("emp-worker", "prod")
    assert applied.resource_attributes == {"team": "gpu"}
    assert apply_otel_env(config, {}) is config


def test_each_process_buffer_gets_its_share_of_the_machines_limits(tmp_path):
    # The manifest's buffer limits are the machine's, split like the span and CPU budgets: a machine of
    # three workers and its own process stays within 100 MB in all, not 4 x 100 MB.
    from emp_machine.telemetry import setup

    config = TelemetryConfig(buffer={"max_size": "100MB", "segment_size": "40MB"},
                             sampling={"spans_per_second": 100}, overhead={"cpu_percent": 2})
    telemetry = setup(config, machine_id="m1", worker_id="m1-worker-0", service_type="sim",
                      buffer_path=tmp_path / "w0.db", process_share=0.25, stream=open("/dev/null", "w"),
                      start_shipper=False)
    try:
        assert (telemetry.buffer.max_size, telemetry.buffer.segment_size) == (25 * 10**6, 10 * 10**6)
        # and the span and CPU budgets (mutation audit M3: no test held them to the share)
        assert telemetry.sampler.target == pytest.approx(25.0)
        assert telemetry.sampler.cpu_budget == pytest.approx(0.005)
    finally:
        telemetry.shutdown(timeout=2)


def test_a_machine_splits_the_span_budget_across_its_processes(machine_factory):
    # The manifest's budget is the machine's: with two workers, the machine process and each worker get a
    # third of it (said at start: machine.started, worker.spawned). A worker that took the whole budget, or
    # the machine counting its workers wrong, let a machine of N workers export N+1 times its budget.
    import json

    from harness import wait_for

    machine = machine_factory("""
    telemetry:
      sampling: {spans_per_second: 90}
    workers:
      sim:
        connector: simulation
        count: 2
    """)
    machine.wait_ready(60)
    assert machine.wait_event("machine.started")["spans_per_second"] == pytest.approx(30.0)
    for i in range(2):
        spawned = wait_for(lambda: [json.loads(line) for line in machine.log_of(f"worker-{i}").splitlines()
                                    if '"worker.spawned"' in line], timeout=30, message=f"worker-{i} spawned")
        assert spawned[0]["spans_per_second"] == pytest.approx(30.0), spawned


@pytest.mark.parametrize("env, variable", [
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "-5"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "0"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "inf"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "nan"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "10s"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ({"OTEL_EXPORTER_OTLP_COMPRESSION": "deflate"}, "OTEL_EXPORTER_OTLP_COMPRESSION"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret%0D%0AX-Evil: 1"}, "OTEL_EXPORTER_OTLP_HEADERS"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "ok=1,my%20header=s3cret"}, "OTEL_EXPORTER_OTLP_HEADERS"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "s3cret"}, "OTEL_EXPORTER_OTLP_HEADERS"),  # the key without its name
    ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "api-key=s3cret%0A"}, "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
    ({"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "grpc://u:s3cret@collector:4317"}, "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"),
    ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "500"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),  # one shipper, one timeout
])
def test_otel_values_that_cannot_work_are_refused_by_name_without_quoting_secrets(env, variable):
    # These were accepted: nothing shipped (timeout <= 0), shutdown raised (inf, nan), deflate became none,
    # a CR/LF or a name with a space made every request fail, grpc and the per-signal variables were ignored.
    with pytest.raises(ValueError) as refused:
        apply_otel_env(TelemetryConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", **env})
    assert variable in str(refused.value) and "s3cret" not in str(refused.value)


def test_per_signal_otel_variables_and_their_precedence():
    config = TelemetryConfig(otlp_endpoint="http://manifest:4318", otlp_headers={"Authorization": "m", "a": "1"},
                             otlp_metrics={"endpoint": "http://manifest-metrics:4318/m", "headers": {"k": "m"}})
    applied = apply_otel_env(config, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=env",  # replaces the manifest's in any case
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/v1/traces?tenant=7",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-api-key=t%3D1,",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "k2=e",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "gzip",  # agrees with the generic one: accepted
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "2500",
    })
    assert applied.otlp_endpoint == "http://collector:4318" and applied.export.timeout == 2.5
    assert applied.otlp_headers == {"a": "1", "authorization": "env"}
    assert applied.otlp_signals() == {
        "traces": ("https://traces.example/v1/traces?tenant=7", {"x-api-key": "t=1"}),
        "metrics": ("http://manifest-metrics:4318/m", {"k": "m", "k2": "e"}),  # the manifest's, env merged in
    }
    assert applied.ships and not TelemetryConfig().ships
    assert TelemetryConfig(otlp_logs={"endpoint": "http://logs:4318/v1/logs"}).ships


def test_the_manifest_refuses_headers_and_timeouts_that_cannot_work_without_quoting_them():
    for kwargs in ({"otlp_headers": {"authorization": "Bearer s3cret\r\nX-Evil: 1"}},
                   {"otlp_headers": {"api key": "s3cret"}},
                   {"otlp_traces": {"headers": {"k": "s3cret\n"}}},
                   {"otlp_logs": {"endpoint": "ftp://u:s3cret@collector"}},
                   {"export": {"timeout": "1e300"}}):  # a socket timeout overflows
        with pytest.raises(ValidationError) as refused:
            TelemetryConfig(**kwargs)
        assert "s3cret" not in str(refused.value)

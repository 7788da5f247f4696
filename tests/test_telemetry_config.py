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

    config = TelemetryConfig(buffer={"max_size": "100MB", "segment_size": "40MB"})
    telemetry = setup(config, machine_id="m1", worker_id="m1-worker-0", service_type="sim",
                      buffer_path=tmp_path / "w0.db", process_share=0.25, stream=open("/dev/null", "w"),
                      start_shipper=False)
    try:
        assert (telemetry.buffer.max_size, telemetry.buffer.segment_size) == (25 * 10**6, 10 * 10**6)
    finally:
        telemetry.shutdown(timeout=2)

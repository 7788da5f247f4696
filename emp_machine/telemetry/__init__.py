"""Telemetry for emp-machine: correlation, one adaptive-sampling tracer per process, metrics, events, logs,
a durable SQLite buffer and OTLP/HTTP shipping. See docs/telemetry.md.

Depends on nothing else of ours except `emp_machine.units` and `emp_machine.errors`.
"""

from emp_machine.telemetry.context import (
    Incoming,
    bind,
    current_fields,
    extract_http,
    extract_job_context,
    http_headers,
    inject_job_fields,
    new_job_id,
    new_request_id,
    new_span_id,
    new_trace_id,
    worker_id_for,
)
from emp_machine.telemetry.core import Telemetry, setup
from emp_machine.telemetry.joblog import ConnectorLogger
from emp_machine.telemetry.redact import redact_fields, redact_text
from emp_machine.telemetry.tailer import ServiceOutputTailer, TailSource

__all__ = [
    "ConnectorLogger", "Incoming", "Telemetry", "TelemetryConfig", "apply_otel_env", "bind", "current_fields",
    "extract_http", "extract_job_context", "http_headers", "inject_job_fields", "new_job_id", "new_request_id",
    "new_span_id", "new_trace_id", "redact_fields", "redact_text", "ServiceOutputTailer", "setup", "TailSource",
    "worker_id_for",
]


def __getattr__(name: str):
    # The config model imports pydantic: loaded only when asked for, so that a process which receives an
    # already-validated config (the machine) does not pay for pydantic.
    if name in ("TelemetryConfig", "apply_otel_env"):
        from emp_machine.telemetry import config

        return getattr(config, name)
    raise AttributeError(name)

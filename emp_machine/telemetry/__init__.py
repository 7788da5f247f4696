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
from emp_machine.telemetry.redact import redact_fields, redact_text

__all__ = [
    "ConnectorLogger", "Incoming", "Telemetry", "TelemetryConfig", "apply_otel_env", "bind", "current_fields",
    "extract_http", "extract_job_context", "http_headers", "inject_job_fields", "new_job_id", "new_request_id",
    "new_span_id", "new_trace_id", "redact_fields", "redact_text", "ServiceOutputTailer", "setup", "TailSource",
    "worker_id_for",
]


# Loaded when first asked for: the config model imports pydantic, which a process that receives an
# already-validated config (the machine) does not pay for; the pipeline (core: the OTel SDK's encoders, the
# buffer, the shipper) is not needed by the CLI commands that only read a manifest (~60 ms a call).
_LAZY = {"TelemetryConfig": "config", "apply_otel_env": "config", "Telemetry": "core", "setup": "core",
         "ConnectorLogger": "joblog", "ServiceOutputTailer": "tailer", "TailSource": "tailer"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"emp_machine.telemetry.{module}"), name)

"""The manifest's `telemetry:` section. The machine validates and carries it; the telemetry package uses it.

Defaults are the budgets of ARCHITECTURE.md and the EMP observability design.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from emp_machine.telemetry.urls import http_url_problem
from emp_machine.units import ByteSize, Duration


class _Strict(BaseModel):
    # Inputs stay out of the error text: an endpoint or a header can carry credentials.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class SamplingConfig(_Strict):
    spans_per_second: float = Field(100.0, gt=0, description="sampled spans per second for the whole machine")
    slow_job: Duration = Field(30.0, description="a job slower than this keeps its whole trace")
    stacks_per_second: float = Field(
        2.0, ge=0, description="exceptions recorded with their full stack per second; others keep type and message"
    )


class OverheadBudget(_Strict):
    """Per-operation budgets (microseconds) and telemetry's CPU share; the sampler backs off past them."""

    cpu_percent: float = Field(1.0, gt=0, le=100)
    span_us: float = Field(100.0, gt=0)
    metric_us: float = Field(50.0, gt=0)
    log_us: float = Field(500.0, gt=0)
    event_us: float = Field(100.0, gt=0)
    propagation_us: float = Field(10.0, gt=0)


class BufferConfig(_Strict):
    max_size: ByteSize = Field(100 * 10**6, description="compressed bytes kept before the least valuable are dropped")
    segment_size: ByteSize = Field(
        50 * 10**6, description="after this many bytes written, the WAL is checkpointed and freed pages released"
    )
    retention: Duration = Field(3600.0, description="records older than this are dropped (reason `expired`)")
    flush_interval: Duration = Field(
        0.09, gt=0, le=0.1,
        description="records are durable when appended (a mapped stage file); where no stage file can be made "
                    "(disk full), how often they are committed instead: then the most a SIGKILL can lose",
    )

    @model_validator(mode="after")
    def _segment_within_max(self) -> "BufferConfig":
        if self.segment_size > self.max_size:
            raise ValueError("buffer.segment_size cannot exceed buffer.max_size")
        return self


class ExportConfig(_Strict):
    batch_min: int = Field(100, ge=1)
    batch_max: int = Field(1000, ge=1)
    max_request_size: ByteSize = Field(10**6)
    interval: Duration = Field(5.0)
    timeout: Duration = Field(10.0, gt=0, description="per-request timeout")
    compression: Literal["gzip", "none"] = "gzip"
    max_backoff: Duration = Field(10.0, gt=0, description="longest wait between retries (Retry-After may ask more)")
    metrics_interval: Duration = Field(10.0, gt=0, description="how often metric points are recorded")

    @model_validator(mode="after")
    def _batch_bounds(self) -> "ExportConfig":
        if self.batch_min > self.batch_max:
            raise ValueError("export.batch_min cannot exceed export.batch_max")
        return self


class TelemetryConfig(_Strict):
    service_name: str = "emp-machine"
    service_version: str = ""
    environment: str = "development"
    otlp_endpoint: str = Field("", description="OTLP/HTTP base URL; empty keeps records in the local buffer only")

    otlp_headers: dict[str, str] = Field(default_factory=dict)
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    log_level: str = Field("INFO", description="level below which log records are neither printed nor buffered")
    log_stdout: bool = Field(True, description="also write each log record as a JSON line to stdout")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    overhead: OverheadBudget = Field(default_factory=OverheadBudget)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value and (problem := http_url_problem(value)) is not None:
            raise ValueError(f"the OTLP endpoint {problem} (e.g. http://collector:4318)")
        return value


def _parse_pairs(text: str) -> dict[str, str]:
    """`k1=v1,k2=v2` as the OTel spec writes headers and resource attributes (values percent-encoded)."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def apply_otel_env(config: TelemetryConfig, environ: Mapping[str, str]) -> TelemetryConfig:
    """`config` with the standard `OTEL_*` variables in `environ` applied over it (ValueError for an endpoint
    that is not an http(s) URL).

    Called once where the manifest reads the environment (STYLE.md section 4); this package never reads
    `os.environ` itself. Honoured: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS,
    OTEL_EXPORTER_OTLP_COMPRESSION, OTEL_EXPORTER_OTLP_TIMEOUT (ms), OTEL_SERVICE_NAME,
    OTEL_RESOURCE_ATTRIBUTES (service.name, service.version and deployment.environment in it fill those fields).
    """
    update: dict[str, object] = {}
    export: dict[str, object] = {}
    if endpoint := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        if (problem := http_url_problem(endpoint)) is not None:
            raise ValueError(f"OTEL_EXPORTER_OTLP_ENDPOINT {problem} (e.g. http://collector:4318)")
        update["otlp_endpoint"] = endpoint
    if headers := environ.get("OTEL_EXPORTER_OTLP_HEADERS", "").strip():
        update["otlp_headers"] = {**config.otlp_headers, **_parse_pairs(headers)}
    if compression := environ.get("OTEL_EXPORTER_OTLP_COMPRESSION", "").strip().lower():
        export["compression"] = "gzip" if compression == "gzip" else "none"
    if timeout := environ.get("OTEL_EXPORTER_OTLP_TIMEOUT", "").strip():
        try:
            export["timeout"] = float(timeout) / 1000.0
        except ValueError:
            pass
    if attributes := environ.get("OTEL_RESOURCE_ATTRIBUTES", "").strip():
        extra = _parse_pairs(attributes)
        if name := extra.pop("service.name", ""):
            update["service_name"] = name
        if version := extra.pop("service.version", ""):
            update["service_version"] = version
        if env := extra.pop("deployment.environment", ""):
            update["environment"] = env
        update["resource_attributes"] = {**config.resource_attributes, **extra}
    if name := environ.get("OTEL_SERVICE_NAME", "").strip():
        update["service_name"] = name  # the spec: OTEL_SERVICE_NAME wins over OTEL_RESOURCE_ATTRIBUTES
    if export:
        update["export"] = config.export.model_copy(update=export)
    # values are parsed above, so a copy (which skips validation) keeps the model's invariants
    return config.model_copy(update=update) if update else config

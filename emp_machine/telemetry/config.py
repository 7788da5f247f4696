"""The manifest's `telemetry:` section. The machine validates and carries it; the telemetry package uses it.

Defaults are the budgets of ARCHITECTURE.md and the EMP observability design.
"""

from __future__ import annotations

import math
import re
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


MAX_TIMEOUT_S = 3600.0  # past this a socket timeout overflows (1e10 s) long before it means anything

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP token (RFC 9110)
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than tab: CR/LF would split the header


def header_problem(name: str, value: str) -> str | None:
    """Why (`name`, `value`) cannot be sent as an HTTP header, or None. Neither is quoted: a header often
    carries an API key, and a malformed entry may be one."""
    if not _HEADER_NAME.fullmatch(name):
        return "has a name that is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only, no spaces)"
    if _BAD_VALUE.search(value):
        return f"({name}) has a value with a control character (a line break?)"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return f"({name}) has a value with characters outside Latin-1 (HTTP cannot send them)"
    return None


def _check_headers(headers: Mapping[str, str], where: str) -> None:
    for position, (name, value) in enumerate(headers.items(), 1):
        if (problem := header_problem(name, value)) is not None:
            raise ValueError(f"{where}: header {position} {problem}")


class ExportConfig(_Strict):
    batch_min: int = Field(100, ge=1)
    batch_max: int = Field(1000, ge=1)
    max_request_size: ByteSize = Field(10**6)
    interval: Duration = Field(5.0)
    timeout: Duration = Field(10.0, gt=0, le=MAX_TIMEOUT_S, description="per-request timeout")
    compression: Literal["gzip", "none"] = "gzip"
    max_backoff: Duration = Field(10.0, gt=0, description="longest wait between retries (Retry-After may ask more)")
    metrics_interval: Duration = Field(10.0, gt=0, description="how often metric points are recorded")

    @model_validator(mode="after")
    def _batch_bounds(self) -> "ExportConfig":
        if self.batch_min > self.batch_max:
            raise ValueError("export.batch_min cannot exceed export.batch_max")
        return self


class OtlpSignalConfig(_Strict):
    """One signal's own destination, as the OTLP exporter spec's OTEL_EXPORTER_OTLP_{SIGNAL}_ENDPOINT/_HEADERS."""

    endpoint: str = Field("", description="full URL, used as given (nothing appended); empty: otlp_endpoint "
                                          "with /v1/traces, /v1/logs or /v1/metrics appended")
    headers: dict[str, str] = Field(default_factory=dict, description="sent instead of otlp_headers when not empty")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value and (problem := http_url_problem(value)) is not None:
            raise ValueError(f"the endpoint {problem} (e.g. http://collector:4318/v1/traces)")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        _check_headers(value, "headers")
        return value


class TelemetryConfig(_Strict):
    service_name: str = "emp-machine"
    service_version: str = ""
    environment: str = "development"
    otlp_endpoint: str = Field("", description="OTLP/HTTP base URL; empty keeps records in the local buffer only")

    otlp_headers: dict[str, str] = Field(default_factory=dict)
    otlp_traces: OtlpSignalConfig = Field(default_factory=OtlpSignalConfig)
    otlp_logs: OtlpSignalConfig = Field(default_factory=OtlpSignalConfig)
    otlp_metrics: OtlpSignalConfig = Field(default_factory=OtlpSignalConfig)
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

    @field_validator("otlp_headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        _check_headers(value, "otlp_headers")
        return value

    # The rules live beside the shipper (shipper.otlp_signals, shipper.ships), which the machine also applies
    # to its resolved view of this model without importing pydantic.
    @property
    def ships(self) -> bool:
        from emp_machine.telemetry.shipper import ships

        return ships(self)

    def otlp_signals(self) -> dict[str, tuple[str, dict[str, str]]]:
        from emp_machine.telemetry.shipper import otlp_signals

        return otlp_signals(self)


class OtelEnvError(ValueError):
    """An `OTEL_*` variable whose value cannot work. `field` is the manifest setting it stands in for, so the
    manifest's error can name that path (the message names the variable, never quoting its value)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _env_field(variable: str) -> str:
    """The manifest field an OTEL_EXPORTER_OTLP_* variable overrides (the protocol goes with the endpoint)."""
    rest = variable.removeprefix("OTEL_EXPORTER_OTLP_")
    signal, _, setting = rest.partition("_")
    if signal.lower() not in _SIGNALS:
        signal, setting = "", rest
    setting = setting.lower()
    if setting in ("compression", "timeout"):
        return f"telemetry.export.{setting}"
    if setting == "protocol":
        setting = "endpoint"
    return f"telemetry.otlp_{signal.lower()}.{setting}" if signal else f"telemetry.otlp_{setting}"


def _parse_pairs(text: str) -> dict[str, str]:
    """`k1=v1,k2=v2` as the OTel spec writes headers and resource attributes (values percent-encoded)."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def _parse_headers(text: str, variable: str) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_*HEADERS: `k1=v1,k2=v2`, values percent-encoded. Strict, unlike `_parse_pairs`: a
    header lost or mangled means every request is refused (401) and dead-lettered, or never sent."""
    headers: dict[str, str] = {}
    for position, item in enumerate(text.split(","), 1):
        if not item.strip():
            continue  # a trailing comma
        key, sep, value = item.partition("=")
        if not sep:
            raise OtelEnvError(f"{variable}: entry {position} has no '=' (expected name=value,name=value, "
                               "values percent-encoded)", _env_field(variable))
        name, value = unquote(key.strip()), unquote(value.strip())
        if (problem := header_problem(name, value)) is not None:
            raise OtelEnvError(f"{variable}: header {position} {problem}", _env_field(variable))
        headers[name] = value
    return headers


def _merge_headers(base: Mapping[str, str], over: Mapping[str, str]) -> dict[str, str]:
    """`over` replacing `base`'s headers of the same name in any case (both would be sent otherwise)."""
    names = {name.lower() for name in over}
    return {**{k: v for k, v in base.items() if k.lower() not in names}, **over}


def _parse_compression(text: str, variable: str) -> str:
    if text not in ("gzip", "none"):
        raise OtelEnvError(f"{variable} must be gzip or none, not {text[:20]!r}", _env_field(variable))
    return text


def _parse_timeout(text: str, variable: str) -> float:
    """Milliseconds, as the spec says, to seconds."""
    try:
        millis = float(text)
    except ValueError:
        millis = math.nan
    if not (0 < millis <= MAX_TIMEOUT_S * 1000):  # also refuses nan and inf
        raise OtelEnvError(f"{variable} must be a number of milliseconds above 0 and at most "
                           f"{MAX_TIMEOUT_S * 1000:.0f} (e.g. 10000 for 10 s), not {text[:20]!r}",
                           _env_field(variable))
    return millis / 1000.0


_SIGNALS = ("traces", "logs", "metrics")


def apply_otel_env(config: TelemetryConfig, environ: Mapping[str, str]) -> TelemetryConfig:
    """`config` with the standard `OTEL_*` variables in `environ` applied over it; ValueError, naming the
    variable but never quoting a header or an endpoint (they carry API keys), for a value that cannot work.

    Called once where the manifest reads the environment (STYLE.md section 4); this package never reads
    `os.environ` itself. Honoured: OTEL_EXPORTER_OTLP_ENDPOINT (`/v1/<signal>` appended) and _HEADERS (merged
    over `otlp_headers`); OTEL_EXPORTER_OTLP_{TRACES,LOGS,METRICS}_ENDPOINT (used as given) and _HEADERS
    (merged over that signal's own, and sent instead of the generic ones); OTEL_EXPORTER_OTLP_COMPRESSION
    (gzip, none), OTEL_EXPORTER_OTLP_TIMEOUT (ms), OTEL_EXPORTER_OTLP_PROTOCOL (http/protobuf only: grpc and
    http/json are refused); the per-signal _COMPRESSION, _TIMEOUT and _PROTOCOL only where they agree with
    the generic ones (one shipper sends every signal); OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    (service.name, service.version and deployment.environment in it fill those fields).
    """
    update: dict[str, object] = {}
    export: dict[str, object] = {}
    for prefix in ("OTEL_EXPORTER_OTLP_", *(f"OTEL_EXPORTER_OTLP_{s.upper()}_" for s in _SIGNALS)):
        if (protocol := environ.get(f"{prefix}PROTOCOL", "").strip().lower()) not in ("", "http/protobuf"):
            raise OtelEnvError(f"{prefix}PROTOCOL={protocol[:20]!r} is not supported: emp-machine sends "
                               "OTLP/HTTP protobuf only; set it to http/protobuf (and an http(s) endpoint, usually "
                               "port 4318) or unset it", _env_field(f"{prefix}PROTOCOL"))
    if endpoint := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        if (problem := http_url_problem(endpoint)) is not None:
            raise OtelEnvError(f"OTEL_EXPORTER_OTLP_ENDPOINT {problem} (e.g. http://collector:4318)",
                               "telemetry.otlp_endpoint")
        update["otlp_endpoint"] = endpoint
    if headers := environ.get("OTEL_EXPORTER_OTLP_HEADERS", "").strip():
        update["otlp_headers"] = _merge_headers(config.otlp_headers,
                                                _parse_headers(headers, "OTEL_EXPORTER_OTLP_HEADERS"))
    for signal in _SIGNALS:
        own = getattr(config, f"otlp_{signal}")
        signal_update: dict[str, object] = {}
        variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
        if endpoint := environ.get(variable, "").strip():
            if (problem := http_url_problem(endpoint)) is not None:
                raise OtelEnvError(f"{variable} {problem} (e.g. http://collector:4318/v1/{signal})",
                                   _env_field(variable))
            signal_update["endpoint"] = endpoint
        variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS"
        if headers := environ.get(variable, "").strip():
            signal_update["headers"] = _merge_headers(own.headers, _parse_headers(headers, variable))
        if signal_update:
            update[f"otlp_{signal}"] = own.model_copy(update=signal_update)
    if compression := environ.get("OTEL_EXPORTER_OTLP_COMPRESSION", "").strip().lower():
        export["compression"] = _parse_compression(compression, "OTEL_EXPORTER_OTLP_COMPRESSION")
    if timeout := environ.get("OTEL_EXPORTER_OTLP_TIMEOUT", "").strip():
        export["timeout"] = _parse_timeout(timeout, "OTEL_EXPORTER_OTLP_TIMEOUT")
    for signal in _SIGNALS:
        for setting, parse in (("compression", _parse_compression), ("timeout", _parse_timeout)):
            variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_{setting.upper()}"
            if value := environ.get(variable, "").strip().lower():
                wanted = export.get(setting, getattr(config.export, setting))
                if parse(value, variable) != wanted:
                    raise OtelEnvError(f"{variable} differs from the {setting} of the other signals, and one "
                                       f"shipper sends them all: set OTEL_EXPORTER_OTLP_{setting.upper()} (or "
                                       f"telemetry.export.{setting}) instead", _env_field(variable))
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

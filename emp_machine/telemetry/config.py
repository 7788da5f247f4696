"""The manifest's `telemetry:` section. The machine validates and carries it; the telemetry package uses it.

Defaults are the budgets of ARCHITECTURE.md and the EMP observability design.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from emp_machine.units import ByteSize, Duration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingConfig(_Strict):
    spans_per_second: float = Field(100.0, gt=0, description="sampled spans per second for the whole machine")
    slow_job: Duration = Field(30.0, description="a job slower than this keeps its whole trace")


class OverheadBudget(_Strict):
    """Per-operation budgets (microseconds) and telemetry's CPU share; the sampler backs off past them."""

    cpu_percent: float = Field(1.0, gt=0, le=100)
    span_us: float = Field(100.0, gt=0)
    metric_us: float = Field(50.0, gt=0)
    log_us: float = Field(500.0, gt=0)
    event_us: float = Field(100.0, gt=0)
    propagation_us: float = Field(10.0, gt=0)


class BufferConfig(_Strict):
    max_size: ByteSize = Field(100 * 10**6)
    segment_size: ByteSize = Field(50 * 10**6)
    retention: Duration = Field(3600.0)


class ExportConfig(_Strict):
    batch_min: int = Field(100, ge=1)
    batch_max: int = Field(1000, ge=1)
    max_request_size: ByteSize = Field(10**6)
    interval: Duration = Field(5.0)


class TelemetryConfig(_Strict):
    service_name: str = "emp-machine"
    environment: str = "development"
    otlp_endpoint: str = Field("", description="OTLP/HTTP base URL; empty keeps records in the local buffer only")
    otlp_headers: dict[str, str] = Field(default_factory=dict)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    overhead: OverheadBudget = Field(default_factory=OverheadBudget)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

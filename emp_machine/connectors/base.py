"""The connector interface: one job in, calls to one kind of service, progress out, a result back.

A connector never touches Redis: the worker claims the job, hands it over as a `ConnectorJob`, forwards
progress and records the `JobResult` or the classified error. Connectors are async, constructed once per
worker from their validated manifest settings and a `ConnectorContext`, and reused for every job.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from emp_machine.telemetry.joblog import ConnectorLogger
from emp_machine.telemetry.urls import http_url_problem

# Awaited with (percent 0-100, message). It may raise JobCancelled when the job was cancelled meanwhile:
# a connector lets that propagate (after stopping its service-side work) rather than catching it.
ProgressFn = Callable[[float, str], Awaitable[None]]


def _http_url(value: str) -> str:
    problem = http_url_problem(value)
    if problem is not None:  # (the URL is not quoted: it may carry credentials)
        raise ValueError(f"the URL {problem}")
    return value


# A settings field holding the http(s) URL of a service (a connector's base_url): checked when the manifest is,
# where a base_url of ftp://, '' or a bare word went through, the machine was healthy, and every job failed.
HttpUrl = Annotated[str, AfterValidator(_http_url)]


class ConnectorSettings(BaseModel):
    """Base of every connector's settings model: unknown keys are manifest errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_STRICT: dict[type, type] = {}


def validate_settings(model: type[BaseModel], raw: Mapping[str, Any]) -> BaseModel:
    """`raw` validated by a connector's Settings. Unknown keys are errors for any pydantic model that does not
    say otherwise: a plain BaseModel (pydantic's default drops them) took a misspelt key in silence, and the
    connector ran on its default. A model whose config names `extra` ("allow", "ignore") is taken at its word."""
    if "extra" not in model.model_config:
        strict = _STRICT.get(model)
        if strict is None:  # the model with extra="forbid", for the check only: the connector gets `model`'s own
            strict = _STRICT[model] = type(model.__name__, (model,), {
                "__module__": model.__module__, "model_config": ConfigDict(**model.model_config, extra="forbid")})
        strict.model_validate(raw)
    return model.model_validate(raw)


@dataclass(frozen=True)
class ConnectorContext:
    """What a connector shares with its worker: identity, where outputs go, and the telemetry handles.

    `tracer` is an OpenTelemetry-API tracer or None (no spans); `logger` defaults to stdlib logging so a
    connector runs (for example under `emp-machine try`) without the telemetry package set up. `joblog` is
    the telemetry ConnectorLogger the worker gives (its lifecycle records are events with the service's
    fields as attributes); None: one over `logger` (`Connector.joblog`)."""

    machine_id: str
    worker_id: str
    output_dir: Path
    service_type: str = ""
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("emp_machine.connectors"))
    tracer: Any = None
    joblog: ConnectorLogger | None = None

    def job_dir(self, job_id: str) -> Path:
        """The folder for one job's output files: under `output_dir` whatever the id holds (a producer's
        `../../x` included: `output_dir / job.id` would write outside it, beyond output retention). Not
        created: the connector makes it when it writes."""
        from emp_machine.connectors._http import job_dir

        return job_dir(self.output_dir, job_id)


@dataclass(frozen=True)
class ConnectorJob:
    """One job as a connector sees it: no Redis fields beyond what it needs.

    `headers` go on every request to the service (`_http.service_headers` reads them): the worker makes them
    with telemetry's `http_headers` inside the job's `service.call` span, so the service's work is a child of
    that span: `traceparent`, `tracestate` (the producer's members kept, ours `emp=` first), `x-job-id`,
    and an `x-request-id` that `service_headers` makes anew for each request. `traceparent` repeats that header
    for connectors that read only it. A job built outside a worker may leave `headers` empty: then x-job-id,
    a new x-request-id and the trace fields given are sent."""

    id: str
    service_required: str
    payload: Any
    attempt: int = 1
    traceparent: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class OutputFile:
    """A file a job produced, stored under the machine's output directory and passed by reference."""

    path: str
    mime_type: str
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "mime_type": self.mime_type, "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class JobResult:
    """What a successful job returns: small data, output file references, and the service's metadata."""

    data: Any = None
    outputs: list[OutputFile] = field(default_factory=list)
    service_metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The `result` of complete_job / jobs:completed: references, never inline blobs."""
        return {"data": self.data, "outputs": [o.to_json() for o in self.outputs],
                "service_metadata": dict(self.service_metadata)}


@dataclass(frozen=True)
class Health:
    healthy: bool
    reason: str = ""


class Connector(abc.ABC):
    """Base of every connector. Subclasses set `name` and `Settings` and implement `run`.

    `run` returns a JobResult or raises RetryableJobError / FatalJobError (emp_machine.errors) with the
    service's own message; JobCancelled when `cancel` stopped it. Any other exception is treated by the
    worker as a failure of that job alone (errors.can_retry decides), never of the worker."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type[ConnectorSettings]] = ConnectorSettings

    def __init__(self, settings: ConnectorSettings, context: ConnectorContext):
        self.settings = settings
        self.context = context
        self.log = context.logger
        # Job lifecycle records (received, started, progress, completed, failed, ...) with the service's fields
        self.joblog = context.joblog or ConnectorLogger.for_logger(
            context.logger, connector_id=self.name or type(self).__name__,
            service_type=context.service_type or self.name)

    @classmethod
    def from_settings(cls, raw: Mapping[str, Any], context: ConnectorContext) -> Connector:
        """Validate raw manifest settings (pydantic ValidationError names the field) and construct."""
        return cls(validate_settings(cls.Settings, dict(raw)), context)

    async def health(self) -> Health:
        """Cheap enough to call every few seconds. The default says healthy; services override it."""
        return Health(True)

    @abc.abstractmethod
    async def run(self, job: ConnectorJob, progress: ProgressFn) -> JobResult:
        """Run one job to the end, reporting progress."""

    async def cancel(self, job_id: str) -> None:
        """Stop job `job_id` if it is running here; its `run` then raises JobCancelled. Idempotent."""

    async def close(self) -> None:
        """Release connections and sessions; called once when the worker stops."""

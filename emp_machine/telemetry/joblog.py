"""Job lifecycle logging for connectors, in the spirit of the EMP design's ConnectorLogger.

    log = telemetry.connector_logger("comfyui-0", "comfyui")
    log.received(job_id, prompt_id=...); log.started(job_id); log.progress(job_id, 45, node="KSampler")
    log.completed(job_id, duration_ms=1250); log.failed(job_id, error, can_retry=True); log.health_check(True)

Each call is one event (`job.received`, `job.started`, `job.progress`, `job.completed`, `job.failed`,
`service.health_check`, or any name through `event`) with connector_id, service_type, job_id and the
service's own fields as record attributes, redacted like every record. `completed`/`failed` also count
`jobs_processed_total` and `job_duration_seconds` (and `failed` `worker_errors_total`), unless built without
metrics: the worker counts those itself from a job's final outcome (a failure the worker retries is counted
once), so the ConnectorLogger it hands its connector has none.
`ConnectorLogger.for_logger` serves a connector run without telemetry (`emp-machine try`, tests): the same
events as stdlib records with the fields in `extra["fields"]`, which telemetry's handler reads as attributes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from emp_machine.telemetry.context import _SPAN_KEY, _fields, _get_current
from emp_machine.telemetry.logs import Events
from emp_machine.telemetry.standard import StandardMetrics
from emp_machine.telemetry.tracing import LightSpan

_time_ns = time.time_ns

# The fields each service's records carry (others passed in are kept too; these are flattened and named
# consistently so dashboards can rely on them).
SERVICE_FIELDS: dict[str, tuple[str, ...]] = {
    "comfyui": ("prompt_id", "client_id", "node"),
    "openai": ("model", "request_id", "prompt_tokens", "completion_tokens", "total_tokens"),
    "a1111": ("sampler", "steps", "width", "height"),
    "simulation": ("steps",),
    "rest": ("method", "endpoint", "status_code"),
}


def _service_fields(fields: dict) -> dict:
    # Flattened whatever the service type is called: a worker's service_type is its manifest service's name
    # (`llm`, `comfyui-gpu0`), not necessarily the connector's.
    usage = fields.get("usage")
    if usage is not None and isinstance(usage, Mapping):
        del fields["usage"]
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if key in usage:
                fields[key] = usage[key]
    size = fields.get("size")
    if size is not None and isinstance(size, (tuple, list)) and len(size) == 2:
        fields["width"], fields["height"] = fields.pop("size")
    return {k: v for k, v in fields.items() if v is not None}


class LoggingEvents:
    """The part of `Events` a ConnectorLogger uses, over a stdlib logger: one record per event, named by its
    message and `event_type`, the fields in `extra["fields"]` (what TelemetryLogger and the telemetry log
    handler turn into record attributes)."""

    min_level = logging.NOTSET

    def __init__(self, logger: logging.Logger):
        self._logger = logger

    def emit_fields(self, name: str, level: int, fields: dict) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, name, extra={"fields": fields, "event_type": name})


class ConnectorLogger:
    def __init__(self, events: Events | LoggingEvents, metrics: StandardMetrics | None, *, connector_id: str,
                 service_type: str, worker_id: str | None = None, job_type: str | None = None):
        self._events = events
        self._metrics = metrics  # None: the host counts jobs and errors (the worker does)
        self._holds = type(events) is Events  # an unsampled job's records are held only by telemetry's Events
        self.connector_id = connector_id
        self.service_type = service_type
        self.worker_id = worker_id
        self.job_type = job_type or service_type

    @classmethod
    def for_logger(cls, logger: logging.Logger, *, connector_id: str, service_type: str) -> ConnectorLogger:
        """Lifecycle records through a stdlib logger, counting nothing: a connector without telemetry."""
        return cls(LoggingEvents(logger), None, connector_id=connector_id, service_type=service_type)

    def _emit(self, name: str, job_id: str | None, level: int, fields: dict) -> None:
        if level < logging.WARNING and self._holds:
            span = _get_current().get(_SPAN_KEY)
            if type(span) is LightSpan:
                job = span._job
                if job is not None and not job.sampled:
                    if level < self._events.min_level:
                        return
                    if job.lean:  # over the CPU budget: not held at all (counted)
                        self._events.shed()
                        return
                    # An unsampled job's event is held raw, with when and where it happened; the record is
                    # built only if the job is kept (failed or slow): ~1 us here instead of ~3.5.
                    job.hold(self._emit_held, (name, job_id, level, fields, _time_ns(), _fields.get(),
                                               span._trace_id, span._span_id))
                    self._events.held()
                    return
        self._events.emit_fields(name, level, self._fields(job_id, fields))

    def _emit_held(self, name: str, job_id: str | None, level: int, fields: dict, time_ns: int,
                   bound: Mapping[str, object], trace_id: int, span_id: int) -> None:
        self._events.emit_captured(name, level, self._fields(job_id, fields), time_ns, bound, trace_id, span_id)

    def _fields(self, job_id: str | None, fields: dict) -> dict:
        fields = _service_fields(fields)
        fields["connector_id"] = self.connector_id
        fields["service_type"] = self.service_type
        if job_id is not None:
            fields["job_id"] = job_id
        return fields

    def received(self, job_id: str, **fields: object) -> None:
        self._emit("job.received", job_id, logging.INFO, fields)

    def started(self, job_id: str, **fields: object) -> None:
        self._emit("job.started", job_id, logging.INFO, fields)

    def progress(self, job_id: str, progress: float, message: str = "", **fields: object) -> None:
        self._emit("job.progress", job_id, logging.DEBUG, {"progress": progress, "message": message or None,
                                                          **fields})

    def completed(self, job_id: str, duration_ms: float | None = None, **fields: object) -> None:
        self._emit("job.completed", job_id, logging.INFO, {"duration_ms": duration_ms, **fields})
        if self._metrics is None:
            return
        self._metrics.job_finished(self.job_type, "completed", None if duration_ms is None else duration_ms / 1000,
                                   self.worker_id)

    def failed(self, job_id: str, error: BaseException | str, duration_ms: float | None = None,
               can_retry: bool | None = None, **fields: object) -> None:
        error_fields = {"error.type": type(error).__name__, "error.message": str(error)} \
            if isinstance(error, BaseException) else {"error.message": str(error)}
        self._emit("job.failed", job_id, logging.ERROR,
                   {"duration_ms": duration_ms, "can_retry": can_retry, **error_fields, **fields})
        if self._metrics is None:
            return
        self._metrics.job_finished(self.job_type, "failed", None if duration_ms is None else duration_ms / 1000,
                                   self.worker_id)
        if self.worker_id:
            self._metrics.worker_errors_total.add(1, {"worker_id": self.worker_id, "kind": "job_failed"})

    def health_check(self, healthy: bool, **fields: object) -> None:
        self._emit("service.health_check", None, logging.INFO if healthy else logging.WARNING,
                   {"healthy": healthy, **fields})

    def event(self, name: str, job_id: str | None, level: int = logging.INFO, **fields: object) -> None:
        """Any other record of a job's life (cancelled, a retried call, a dropped socket), with the same fields."""
        self._emit(name, job_id, level, fields)

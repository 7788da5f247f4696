"""The benchmark job of issue 3, shared by bench/telemetry.py and bench/instructions.py: 4 spans (the job span
and three steps), 10 log lines, 5 metric updates (the gauges here, the job counters in `completed`) and 3
events (started, received, completed; progress is DEBUG, below the default level)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def make_job(telemetry: Any, logger_name: str = "bench.job") -> Callable[[int], None]:
    tracer, log = telemetry.tracer, telemetry.logger(logger_name)
    clog = telemetry.connector_logger("sim-0", "simulation")
    workers = telemetry.metrics.workers_active.bind(service="simulation")
    memory = telemetry.metrics.worker_memory_usage_bytes.bind(worker_id=telemetry.worker_id or "bench")

    def job(i: int) -> None:
        job_id = f"job-{i}"
        with telemetry.job_span(job_id, job_hash={"traceparent": ""}, job_type="simulation"):
            clog.started(job_id)
            workers.set(1)
            for step in ("task.preprocessing", "service.call", "result.postprocessing"):
                with tracer.start_as_current_span(step):
                    log.info("step %s of %s", step, job_id)
                    log.info("detail for %s", job_id)
                    log.info("more detail")
            log.info("finishing %s", job_id)
            clog.received(job_id)
            memory.set(123456)
            workers.set(0)
            clog.completed(job_id, 5.0)  # + jobs_processed_total, job_duration_seconds, worker_job_...

    return job


class NoSdk:
    """The same job's telemetry calls with no SDK behind them, as an application instrumented with the
    OpenTelemetry API runs when no SDK is installed: OTel's NoOpTracer, a logger below its level, metric
    instruments and a connector logger that do nothing. What the benchmark job costs on this object is the
    job's own code and its instrumentation's call sites, which no telemetry pipeline can take away (the way
    OpenTelemetry measures an SDK's overhead: against the API alone)."""

    worker_id = "bench"

    def __init__(self) -> None:
        import logging

        from opentelemetry.metrics import NoOpMeter
        from opentelemetry.trace import NoOpTracer

        self.tracer = NoOpTracer()
        meter = NoOpMeter("bench")

        class _Bound:
            def __init__(self, name: str, attributes: dict) -> None:
                self._gauge, self._attributes = meter.create_gauge(name), attributes

            def set(self, value: float) -> None:
                self._gauge.set(value, self._attributes)

        class _Metrics:
            class workers_active:  # noqa: N801 (StandardMetrics' attribute names)
                bind = staticmethod(lambda **a: _Bound("workers_active", a))

            class worker_memory_usage_bytes:  # noqa: N801
                bind = staticmethod(lambda **a: _Bound("worker_memory_usage_bytes", a))

        self.metrics = _Metrics()
        self._logger = logging.getLogger("bench.no_sdk")
        self._logger.setLevel(logging.WARNING)
        self._logger.propagate = False

    def logger(self, name: str) -> Any:
        return self._logger

    def connector_logger(self, connector_id: str, service_type: str) -> Any:
        class _Nothing:
            def started(self, job_id: str) -> None: ...
            def received(self, job_id: str) -> None: ...
            def completed(self, job_id: str, duration: float) -> None: ...
        return _Nothing()

    def job_span(self, job_id: str, *, job_hash: Any = None, job_type: str | None = None) -> Any:
        return self.tracer.start_as_current_span("job.execution", attributes={"job.id": job_id})

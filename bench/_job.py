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

"""The named metrics of the EMP observability design, on the process's meter."""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry.metrics import Observation

from emp_machine.telemetry.metrics import Meter


class StandardMetrics:
    """Instruments every process has; `system=True` adds the machine_* gauges (the machine process only)."""

    def __init__(self, meter: Meter, *, system: bool = False, started_at: float | None = None):
        m = meter
        self.workers_active = m.create_gauge("workers_active", "1", "workers busy with a job, by service")
        self.workers_total = m.create_gauge("workers_total", "1", "workers running, by service")
        self.jobs_processed_total = m.create_counter("jobs_processed_total", "1", "jobs finished, by type and status")
        self.job_duration_seconds = m.create_histogram("job_duration_seconds", "s", "job run time, by type")
        self.worker_job_duration_seconds = m.create_histogram(
            "worker_job_duration_seconds", "s", "job run time, by worker")
        self.worker_memory_usage_bytes = m.create_gauge("worker_memory_usage_bytes", "By", "worker RSS, by worker")
        self.worker_errors_total = m.create_counter("worker_errors_total", "1", "worker errors, by worker and kind")
        self._finished: dict[tuple, tuple] = {}
        if system:
            self._system(m, started_at or time.time())

    def job_finished(self, job_type: str, status: str, duration_s: float | None, worker_id: str | None = None) -> None:
        # The bound cells per (type, status, worker): every job of a worker uses the same few, and a bound
        # update costs ~0.4 us against ~1.2 us resolving an attribute dict each time.
        key = (job_type, status, worker_id)
        cells = self._finished.get(key)
        if cells is None:
            if len(self._finished) >= 256:
                self._finished.clear()
            cells = self._finished[key] = (
                self.jobs_processed_total.bind(type=job_type, status=status),
                self.job_duration_seconds.bind(type=job_type),
                self.worker_job_duration_seconds.bind(worker_id=worker_id) if worker_id else None)
        cells[0].add(1)
        if duration_s is not None:
            cells[1].record(duration_s)
            if cells[2] is not None:
                cells[2].record(duration_s)

    def _system(self, m: Meter, started_at: float) -> None:
        import psutil

        psutil.cpu_percent(None)  # the first call only starts the measurement
        m.create_observable_gauge("machine_uptime_seconds", [lambda _: [Observation(time.time() - started_at)]], "s")
        m.create_observable_gauge("machine_cpu_usage_percent", [lambda _: [Observation(psutil.cpu_percent(None))]],
                                  "%")
        m.create_observable_gauge("machine_memory_usage_bytes",
                                  [lambda _: [Observation(psutil.virtual_memory().used)]], "By")
        gpu = _gpu_callback()
        if gpu is not None:
            m.create_observable_gauge("machine_gpu_usage_percent", [gpu], "%", "GPU utilisation, by gpu")


def _gpu_callback() -> Callable | None:
    """A callback reading GPU utilisation through NVML, or None where there is no NVIDIA GPU or driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:
        return None
    if not count:
        return None
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def read(_options) -> list[Observation]:
        return [Observation(pynvml.nvmlDeviceGetUtilizationRates(h).gpu, {"gpu": str(i)})
                for i, h in enumerate(handles)]

    return read

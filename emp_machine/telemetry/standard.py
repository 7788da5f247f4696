"""The named metrics of the EMP observability design, on the process's meter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from opentelemetry.metrics import Observation

from emp_machine.telemetry.metrics import Meter

_monotonic = time.monotonic  # the uptime's clock (a module attribute: a test steps it)


class StandardMetrics:
    """Instruments every process has; `system=True` adds the machine_* gauges (the machine process only).
    `started_at`: when the machine started, a time.monotonic() reading (default: now)."""

    def __init__(self, meter: Meter, *, system: bool = False, started_at: float | None = None):
        m = meter
        self.workers_active = m.create_gauge("workers_active", "{worker}", "workers busy with a job, by service")
        self.workers_total = m.create_gauge("workers_total", "{worker}", "workers running, by service")
        self.jobs_processed_total = m.create_counter("jobs_processed_total", "1", "jobs finished, by type and status")
        self.job_duration_seconds = m.create_histogram("job_duration_seconds", "s", "job run time, by type")
        self.worker_job_duration_seconds = m.create_histogram(
            "worker_job_duration_seconds", "s", "job run time, by worker")
        self.worker_memory_usage_bytes = m.create_gauge("worker_memory_usage_bytes", "By", "worker RSS, by worker")
        self.worker_errors_total = m.create_counter("worker_errors_total", "1", "worker errors, by worker and kind")
        self._finished: dict[tuple, tuple] = {}
        if system:
            self._system(m, _monotonic() if started_at is None else started_at)

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

        cpu = CpuShare()
        # By the monotonic clock (`started_at` is a time.monotonic() reading): a wall-clock step (an NTP
        # correction) must not make the uptime jump, nor go negative.
        m.create_observable_gauge("machine_uptime_seconds",
                                  [lambda _: [Observation(max(0.0, _monotonic() - started_at))]], "s")
        m.create_observable_gauge("machine_cpu_usage_percent", [lambda _: [Observation(cpu.read())]], "%")
        m.create_observable_gauge("machine_memory_usage_bytes",
                                  [lambda _: [Observation(psutil.virtual_memory().used)]], "By")
        gpu = _gpu_callback()
        if gpu is not None:
            m.create_observable_gauge("machine_gpu_usage_percent", [gpu], "%", "GPU utilisation, by gpu")


class CpuShare:
    """The machine's busy CPU share (%), from a baseline of its own (psutil.cpu_times()).

    psutil.cpu_percent(None) keeps one baseline for the whole process, so each reader (a /metrics scrape, an
    OTLP collection, anything else calling it) read only the time since the previous reader: back-to-back
    readers saw 0 or 100. Here the baseline moves at most once per `period` seconds and every read within it
    returns the same value, so any number of readers see the same share of the last interval. The first read
    covers the time since construction."""

    def __init__(self, period: float = 1.0):
        import psutil

        self._cpu_times = psutil.cpu_times
        self._period = period
        self._lock = threading.Lock()
        self._times = self._cpu_times()
        self._at = time.monotonic()
        self._value: float | None = None

    def read(self) -> float:
        with self._lock:
            now = time.monotonic()
            if self._value is not None and now - self._at < self._period:
                return self._value
            times = self._cpu_times()
            self._value = _busy_percent(self._times, times)
            self._times, self._at = times, now
            return self._value


def _busy_percent(before, after) -> float:
    """Busy share between two psutil.cpu_times() readings, as psutil.cpu_percent computes it."""
    def split(t) -> tuple[float, float]:
        # Linux counts guest time inside user/nice already; idle and iowait are the not-busy time
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total - t.idle - getattr(t, "iowait", 0.0), total
    busy0, total0 = split(before)
    busy1, total1 = split(after)
    if total1 - total0 <= 0:
        return 0.0
    return round(min(100.0, max(0.0, (busy1 - busy0) / (total1 - total0) * 100.0)), 1)


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
    errors = getattr(pynvml, "NVMLError", Exception)
    handles = []
    for i in range(count):
        try:
            handles.append((i, pynvml.nvmlDeviceGetHandleByIndex(i)))
        except errors:  # a GPU NVML cannot open is left out; the others are still read
            continue

    def read(_options) -> list[Observation]:
        # per GPU: one that cannot answer (NotSupported on a MIG-enabled GPU, a lost GPU) loses only its point
        out = []
        for i, h in handles:
            try:
                out.append(Observation(pynvml.nvmlDeviceGetUtilizationRates(h).gpu, {"gpu": str(i)}))
            except errors:
                continue
        return out

    return read

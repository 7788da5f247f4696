"""`setup()` and the `Telemetry` object: one per process, handed to everything that records telemetry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from opentelemetry.trace import SpanKind

from emp_machine.telemetry import context as ctx
from emp_machine.telemetry.buffer import DROP_REASONS, Buffer, Kind, Value
from emp_machine.telemetry.encode import Encoder
from emp_machine.telemetry.joblog import ConnectorLogger
from emp_machine.telemetry.logs import Events, RecordWriter, TelemetryLogger, TelemetryLogHandler
from emp_machine.telemetry.metrics import SNAPSHOT_INTERVAL, Meter, write_snapshot
from emp_machine.telemetry.orphans import OrphanAdopter
from emp_machine.telemetry.sampling import AdaptiveSampler, OverheadMeter
from emp_machine.telemetry.shipper import Shipper, otlp_signals, ships
from emp_machine.telemetry.standard import StandardMetrics
from emp_machine.telemetry.tailer import ServiceOutputTailer
from emp_machine.telemetry.tracing import JOB_ROOT, LightSpan, Tracer, TracerProvider

_perf_ns = time.perf_counter_ns

try:
    from importlib.metadata import version as _dist_version

    _VERSION = _dist_version("emp-machine")
except Exception:  # running from a source tree without an install
    _VERSION = "0.0.0"


if TYPE_CHECKING:  # the config model is pydantic; the running machine passes a plain view of it
    from emp_machine.telemetry.config import TelemetryConfig


def resource_attributes(config: TelemetryConfig, *, machine_id: str, worker_id: str | None, service_type: str,
                        region: str | None) -> dict[str, str]:
    attributes = {
        **config.resource_attributes,
        "service.name": config.service_name,
        "service.version": config.service_version or _VERSION,
        "service.instance.id": worker_id or machine_id,
        "deployment.environment": config.environment,
        "machine.id": machine_id,
        "service.type": service_type,
    }
    if worker_id:
        attributes["worker.id"] = worker_id
    if region:
        attributes["cloud.region"] = region
    return attributes


class _JobSpan:
    """`Telemetry.job_span`'s context manager: job_id bound, the span current. (A class: nesting two
    @contextmanager generators cost ~3 us a job.)"""

    __slots__ = ("_job_id", "_scope", "_token")

    def __init__(self, job_id: str, scope: Any):
        self._job_id = job_id
        self._scope = scope
        self._token = None

    def __enter__(self) -> LightSpan:
        scope = self._scope
        if scope._t0:  # a timed root: binding the job's id is telemetry's cost too (see job_span)
            t = _perf_ns()
            self._token = ctx.push_fields(job_id=self._job_id)
            scope._t0 += _perf_ns() - t
        else:
            self._token = ctx.push_fields(job_id=self._job_id)
        return scope.__enter__()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._scope.__exit__(exc_type, exc, tb)
        finally:
            ctx.pop_fields(self._token)


class Telemetry:
    """The process's telemetry. Build it with `setup()`; pass it (or its parts) down, never make another."""

    def __init__(self, config: TelemetryConfig, *, machine_id: str, worker_id: str | None, service_type: str,
                 region: str | None, buffer_path: Path, process_share: float, stream: IO[str] | None,
                 system_metrics: bool, snapshot_path: Path | None = None,
                 snapshot_interval: float = SNAPSHOT_INTERVAL):
        self.config = config
        self.machine_id, self.worker_id, self.service_type = machine_id, worker_id, service_type
        self.resource = resource_attributes(config, machine_id=machine_id, worker_id=worker_id,
                                            service_type=service_type, region=region)
        buffer_config = config.buffer
        self._drops_lock = threading.Lock()
        self._drops_unreported: dict[str, int] = {}
        # The manifest's limits are the machine's: each process's buffer gets its share, as the span and CPU
        # budgets do (a machine of 8 workers used to be allowed 9 x 100 MB).
        self.buffer = Buffer(buffer_path, max_size=int(buffer_config.max_size * process_share),
                             segment_size=int(buffer_config.segment_size * process_share),
                             retention=buffer_config.retention, flush_interval=buffer_config.flush_interval,
                             on_drop=self._on_drop, resource=self.resource)
        self.shipper: Shipper | None = None
        self.adopter: OrphanAdopter | None = None
        self.overhead = OverheadMeter(self._background_cpu)
        self.sampler = AdaptiveSampler(
            config.sampling.spans_per_second * process_share,
            cpu_budget=config.overhead.cpu_percent / 100 * process_share,
            span_budget_us=config.overhead.span_us, meter=self.overhead)
        emit = self.buffer.append_record
        self.tracer = Tracer(self.sampler, emit, slow_job_s=config.sampling.slow_job,
                             stacks_per_second=config.sampling.stacks_per_second,
                             base_attributes={"service.type": service_type})
        self.tracer_provider = TracerProvider(self.tracer)
        static = {"machine_id": machine_id, "worker_id": worker_id, "service_type": service_type}
        out = stream if stream is not None else (sys.stdout if config.log_stdout else None)
        self.writer = RecordWriter(emit, static, stream=out, meter=self.overhead, emit_line=self.buffer.append_line)
        level = logging.getLevelName(config.log_level.upper())
        if not isinstance(level, int):
            raise ValueError(f"telemetry.log_level: unknown level {config.log_level!r}")
        self.events = Events(self.writer, level)
        self.log_handler = TelemetryLogHandler(self.writer, level)
        self.meter = Meter("emp_machine")
        self.metrics = StandardMetrics(self.meter, system=system_metrics)
        self._own_metrics()
        self.snapshot_path, self.snapshot_interval = snapshot_path, snapshot_interval
        self._snapshot_failing = False
        self._process: Any = None  # psutil.Process of this worker, for worker_memory_usage_bytes
        if snapshot_path is not None:
            try:
                snapshot_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass  # reported by the first publish_snapshot()
        self._tailers: list[ServiceOutputTailer] = []
        self._loggers: dict[str, TelemetryLogger] = {}
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(target=self._housekeep, name="telemetry-metrics", daemon=True)
        self._housekeeper.start()
        self._closed = False

    # --- recording helpers ---------------------------------------------------------------------------

    def logger(self, name: str) -> logging.Logger:
        """A logger for our own code, writing through this telemetry (JSON line + buffer). It is a stdlib
        `logging.Logger` subclass not registered with `logging.getLogger` (see `TelemetryLogger`)."""
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = TelemetryLogger(name, self.writer, self.log_handler.level)
        return logger

    def install_logging(self) -> None:
        """Route the root logger (so every library's records) through this telemetry."""
        root = logging.getLogger()
        if self.log_handler not in root.handlers:
            root.addHandler(self.log_handler)
        root.setLevel(self.log_handler.level)

    def connector_logger(self, connector_id: str, service_type: str, job_type: str | None = None, *,
                         counts: bool = True) -> ConnectorLogger:
        """`counts=False`: its completed/failed count no jobs or errors, for a host that counts them itself
        from each job's final outcome (the worker, which hands this logger to its connector)."""
        return ConnectorLogger(self.events, self.metrics if counts else None, connector_id=connector_id,
                               service_type=service_type, worker_id=self.worker_id, job_type=job_type)

    def job_span(self, job_id: str, *, job_hash: Mapping | None = None, job_type: str | None = None,
                 attributes: Mapping | None = None) -> _JobSpan:
        """`job.execution` for one job on this machine: child of the producer's context from `job_hash` when
        it has one, with `job_id` bound for every log and event in the block. Kept when sampled, failed (an
        exception or an error status) or slower than `sampling.slow_job`."""
        started = _perf_ns()
        incoming = ctx.extract_job_context(job_hash) if job_hash is not None else None
        span_attributes = {"job.id": job_id, "service.type": self.service_type}
        if self.worker_id:
            span_attributes["worker.id"] = self.worker_id
        if job_type:
            span_attributes["job.type"] = job_type
        if incoming is not None and incoming.workflow_trace_id:
            span_attributes["workflow.trace_id"] = incoming.workflow_trace_id
        if attributes:
            span_attributes.update(attributes)
        span = self.tracer.start_as_current_span(JOB_ROOT, incoming.context if incoming else None, SpanKind.CONSUMER,
                                                 span_attributes)
        if span._t0:  # timed: its sample covers this set-up too (the producer's context read, the attributes), a
            span._t0 = _perf_ns() - started  # job's dearest telemetry step after an idle wait, counted nowhere
        return _JobSpan(job_id, span)

    def tail_service_output(self, sources: list, *, poll: float = 0.25) -> ServiceOutputTailer:
        """Start tailing supervisor log files: `sources` are (path, process name, service_type[, worker_id]).
        Stopped (after a last pass) by `shutdown()`."""
        tailer = ServiceOutputTailer(self.buffer, sources, machine_id=self.machine_id, poll=poll).start()
        self._tailers.append(tailer)
        return tailer

    def http_headers(self, job_id: str | None = None, request_id: str | None = None) -> dict[str, str]:
        return ctx.http_headers(job_id, request_id, machine_id=self.machine_id, worker_id=self.worker_id)

    def inject_job_fields(self, job_fields: dict) -> dict:
        return ctx.inject_job_fields(job_fields, machine_id=self.machine_id, worker_id=self.worker_id)

    # --- reading -------------------------------------------------------------------------------------

    def metrics_snapshot(self) -> list[tuple]:
        """Current values of every instrument: [(name, description, unit, kind, monotonic, points)]."""
        return self.meter.snapshot()

    def render_prometheus(self) -> str:
        return self.meter.render_prometheus()

    def publish_snapshot(self) -> bool:
        """Write this process's metric snapshot to `snapshot_path` (atomically), where the machine's health
        server reads it for /metrics. Called every `snapshot_interval` by the housekeeping thread and at
        shutdown; a failure is reported once per failing spell, never raised."""
        if self.snapshot_path is None:
            return False
        try:
            if self.worker_id:
                if self._process is None:
                    import psutil

                    self._process = psutil.Process()
                self.metrics.worker_memory_usage_bytes.set(self._process.memory_info().rss,
                                                           {"worker_id": self.worker_id})
            write_snapshot(self.snapshot_path, self.meter.snapshot(), worker_id=self.worker_id or self.machine_id,
                           start_ns=self.meter.start_ns)
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the worker or its telemetry
            if not self._snapshot_failing:
                self._snapshot_failing = True
                self.events.emit("telemetry.snapshot_failed", level=logging.WARNING, path=str(self.snapshot_path),
                                 error=f"{type(exc).__name__}: {exc}")
            return False
        self._snapshot_failing = False
        return True

    # --- lifecycle -----------------------------------------------------------------------------------

    def start_shipper(self) -> Shipper | None:
        """Start shipping to `otlp_endpoint` and the per-signal endpoints in a background thread (None when no
        endpoint is configured: records then stay in the bounded local buffer)."""
        if self.shipper is not None or not ships(self.config):
            return self.shipper
        self.shipper = self._new_shipper(self.buffer, self.resource).start()
        return self.shipper

    def _new_shipper(self, buffer: Buffer, resource: dict[str, str], eager: bool = False) -> Shipper:
        export = self.config.export
        return Shipper(
            buffer, Encoder(resource, "emp_machine.telemetry", _VERSION), self.config.otlp_endpoint,
            headers=self.config.otlp_headers, batch_min=export.batch_min, batch_max=export.batch_max,
            max_request_size=export.max_request_size, interval=export.interval, timeout=export.timeout,
            compression=export.compression, max_backoff=export.max_backoff,
            signals=otlp_signals(self.config), eager=eager)

    def adopt_orphan_buffers(self, keep: Iterable[str]) -> OrphanAdopter:
        """Start adopting, in the background, the buffer files beside this process's own that belong to no
        process named in `keep` (the ids of the current plan's processes: `<id>.db`; this process's own file is
        always kept) and that no live process holds: shipped with the resource recorded in each (when an
        endpoint is configured), the retention applied, removed once empty (see `orphans.py`). The machine
        process calls this once at boot; `shutdown()` stops it. Its CPU counts in this process's budget."""
        if self.adopter is not None:
            return self.adopter
        path = self.buffer.path
        buffer_config = self.config.buffer

        def make_buffer(orphan: Path) -> Buffer:
            # The machine's whole size limit: the file was written within a process's share of it.
            return Buffer(orphan, max_size=buffer_config.max_size, segment_size=buffer_config.segment_size,
                          retention=buffer_config.retention, flush_interval=buffer_config.flush_interval,
                          on_drop=self.buffer.count_drop)  # counted in our own file (the orphan's goes)

        def make_shipper(buffer: Buffer, orphan: Path) -> Shipper:
            # For chunks written before buffers recorded their resource: ours, named after the file.
            resource = {key: value for key, value in self.resource.items() if key != "worker.id"}
            resource["service.instance.id"] = orphan.stem
            if orphan.stem.startswith(f"{self.machine_id}-worker-"):
                resource["worker.id"] = orphan.stem
            return self._new_shipper(buffer, resource, eager=True)

        self.adopter = OrphanAdopter(
            path.parent, {*keep, path.stem}, make_buffer=make_buffer,
            make_shipper=make_shipper if ships(self.config) else None,
            emit=lambda name, level, fields: self.events.emit_fields(name, level, fields)).start()
        return self.adopter

    def flush(self, timeout: float = 10.0) -> bool:
        """Write a metric point and commit everything recorded so far to the buffer."""
        self.buffer.append(Kind.METRIC, Value.NORMAL, self.meter.record())
        return self.buffer.flush(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Flush, try to ship what is buffered (within `timeout`), stop the threads, close the buffer."""
        if self._closed:
            return
        self._closed = True
        # One deadline for the steps below (each used to get the whole timeout, so a collector that never
        # answers made a worker's exit overrun its budget); the buffer's own close, local, gets at least 1 s.
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())
        if self.adopter is not None:  # bounded: what is left of an orphan file stays there for the next boot
            self.adopter.stop(min(2.0, timeout / 2))
        self._stop.set()
        self._housekeeper.join(left())
        for tailer in self._tailers:
            tailer.stop()
        root = logging.getLogger()
        if self.log_handler in root.handlers:
            root.removeHandler(self.log_handler)
        # Before the last metric point: it also reads the worker's RSS, which a worker stopped within its
        # first snapshot interval would otherwise never record. The values stay readable for /metrics until
        # the machine counts the worker as gone.
        self.publish_snapshot()
        self.flush(max(left(), 1.0))
        if self.shipper is not None:
            self.shipper.stop(drain_timeout=left())
        self.buffer.close(max(left(), 1.0))

    # --- internals -----------------------------------------------------------------------------------

    def _background_cpu(self) -> float:
        return self.buffer.writer_cpu + (self.shipper.stats.cpu_seconds if self.shipper else 0.0) + \
            (self.adopter.cpu_seconds if self.adopter else 0.0)

    def _on_drop(self, reason: str, count: int) -> None:
        with self._drops_lock:
            self._drops_unreported[reason] = self._drops_unreported.get(reason, 0) + count

    def _housekeep(self) -> None:
        interval = self.config.export.metrics_interval
        next_metrics = time.monotonic() + interval
        next_snapshot = time.monotonic()
        while not self._stop.wait(min(1.0, interval, self.snapshot_interval)):
            self.sampler.maybe_adjust()  # also when no span ends for a while
            with self._drops_lock:
                drops, self._drops_unreported = self._drops_unreported, {}
            for reason, count in drops.items():  # reported, never silent (and counted in the metrics)
                self.events.emit("telemetry.records_dropped", level=logging.WARNING, reason=reason, count=count)
            if time.monotonic() >= next_metrics:
                next_metrics += interval
                self.buffer.append(Kind.METRIC, Value.NORMAL, self.meter.record())
            if self.snapshot_path is not None and time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + self.snapshot_interval
                self.publish_snapshot()

    def _own_metrics(self) -> None:
        from opentelemetry.metrics import Observation

        m, buffer, tracer, sampler = self.meter, self.buffer, self.tracer, self.sampler
        # Counts of things: an annotation unit. "1" is for ratios: Prometheus' OTLP translation names a gauge of
        # unit "1" with a `_ratio` suffix (telemetry_records_buffered_ratio).
        m.create_observable_gauge("telemetry_records_buffered", [
            lambda _: [Observation(buffer.stats().stored_records + buffer.stats().queued)]], "{record}")
        m.create_observable_counter("telemetry_records_exported_total", [
            lambda _: [Observation(v, {"signal": k}) for k, v in
                       (self.shipper.stats.exported.items() if self.shipper else ())]], "1")
        # Drops since this process opened its buffer: the buffer keeps earlier runs' counts too (`emp-machine
        # telemetry` shows them), but a point's start time is this process's, so counting them again at each
        # restart made every earlier drop count anew wherever cumulative points are turned into deltas.
        # Every known reason from the start, at 0 until one drops: absent, a query or alert on drops found no data
        # rather than none.
        before = buffer.dropped_before_open

        def dropped(_):
            counts = buffer.stats().dropped
            return [Observation(max(0, counts.get(k, 0) - before.get(k, 0)), {"reason": k})
                    for k in sorted(set(DROP_REASONS) | set(counts))]

        m.create_observable_counter("telemetry_records_dropped_total", [dropped], "1")
        m.create_observable_gauge("telemetry_dead_letter_records", [
            lambda _: [Observation(buffer.stats().dead_letter_records)]], "{record}")
        m.create_observable_gauge("telemetry_sampling_rate", [lambda _: [Observation(sampler.rate)]], "1")
        m.create_observable_counter("telemetry_spans_kept_total", [lambda _: [Observation(tracer.kept_spans)]], "1")
        m.create_observable_counter("telemetry_spans_sampled_out_total", [
            lambda _: [Observation(sampler.dropped_total)]], "1")
        m.create_observable_gauge("telemetry_cpu_ratio", [lambda _: [Observation(sampler.cpu_share)]], "1")
        m.create_observable_counter("telemetry_logs_shed_total", [lambda _: [Observation(self.writer.shed)]], "1",
                                    "DEBUG/INFO records of unsampled jobs not recorded while over the CPU budget")
        m.create_observable_counter("telemetry_logs_sampled_out_total", [
            lambda _: [Observation(tracer.dropped_logs)]], "1",
            "DEBUG/INFO records and events of unsampled jobs, held and discarded when the job ended well")


def setup(config: TelemetryConfig, *, machine_id: str, worker_id: str | None = None, service_type: str,
          region: str | None = None, buffer_path: Path, process_share: float = 1.0, stream: IO[str] | None = None,
          system_metrics: bool | None = None, start_shipper: bool = True, snapshot_path: Path | None = None,
          snapshot_interval: float = SNAPSHOT_INTERVAL) -> Telemetry:
    """Telemetry for this process.

    `buffer_path` must be this process's own file (e.g. `state/telemetry/{worker_id}.db`); after a restart the
    same path resumes shipping what was left. `process_share` is this process's part of the machine's span and
    CPU budgets. `stream` replaces stdout for JSON lines. `system_metrics` (default: when `worker_id` is None,
    i.e. the machine process) adds machine_* gauges. With an `otlp_endpoint` the shipper starts at once unless
    `start_shipper=False` (then call `start_shipper()`). With `snapshot_path` (a worker's
    `state/metrics/{worker_id}.json`) the meter's snapshot is written there every `snapshot_interval` and at
    shutdown, for the machine's /metrics. A buffer file that cannot be opened (a full disk) does not raise:
    telemetry starts with records held in memory, opens the file when it can, and says so once
    (`telemetry.buffer_unavailable`).
    """
    if not 0 < process_share <= 1:
        raise ValueError(f"process_share must be in (0, 1], got {process_share}")
    if not snapshot_interval > 0:
        raise ValueError(f"snapshot_interval must be positive, got {snapshot_interval}")
    telemetry = Telemetry(config, machine_id=machine_id, worker_id=worker_id, service_type=service_type,
                          region=region, buffer_path=Path(buffer_path), process_share=process_share, stream=stream,
                          system_metrics=worker_id is None if system_metrics is None else system_metrics,
                          snapshot_path=Path(snapshot_path) if snapshot_path is not None else None,
                          snapshot_interval=snapshot_interval)
    if telemetry.buffer.open_error is not None:
        # Never raised: a worker restarted on a full disk used to crash-loop, running no job. The buffer holds
        # records in memory (bounded) and opens its file when it can; said once, here and on stderr.
        telemetry.events.emit("telemetry.buffer_unavailable", level=logging.WARNING, path=str(buffer_path),
                              error=telemetry.buffer.open_error,
                              detail="records wait in memory (bounded) until the buffer file can be opened; "
                                     "opening it is tried again every few seconds")
    if start_shipper:
        telemetry.start_shipper()
    return telemetry

"""The shipper against a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import random
import time

import pytest
from aiohttp import web
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from emp_machine.telemetry import TelemetryConfig
from emp_machine.telemetry.buffer import Buffer, Kind, Value
from emp_machine.telemetry.shipper import MAX_RETRY_AFTER_S, Shipper, _retry_after
from otlp_receiver import OtlpReceiver, attributes, fast_shipper, free_port, wait_until


def _span(i: int, **attrs) -> tuple:
    now = time.time_ns()
    return (0xABC0000 + i, 0x100 + i, 0x99, "service.call", 3, now, now + 1000, {"i": i, **attrs}, 0, "", None, "",
            0x100)


def _shipper(buffer: Buffer, endpoint: str, **kw) -> Shipper:
    return fast_shipper(buffer, endpoint, {"service.name": "test", "machine.id": "m1"}, **kw)


def test_spans_and_logs_arrive_once_with_resource(buffer, receiver):
    for i in range(1500):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i, job_id=f"job-{i % 7}"))
    buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 17, "ERROR", "boom", {"job_id": "j"}, 5, 6, "job.failed"))
    shipper = _shipper(buffer, receiver.endpoint).start()
    try:
        assert receiver.wait_for(lambda r: len(r.spans()) >= 1500 and r.logs(), timeout=15)
        shipper.stop(drain_timeout=5)
    finally:
        shipper.stop()
    spans = receiver.spans()
    assert sorted(attributes(s.attributes)["i"] for s in spans) == list(range(1500))
    assert spans[0].kind == Span.SPAN_KIND_CLIENT and spans[0].parent_span_id == (0x99).to_bytes(8, "big")
    assert all(r.headers.get("Content-Encoding") == "gzip" for r in receiver.requests)
    assert all(len(s.scope_spans[0].spans) <= 1000 for r in receiver.requests if r.path == "/v1/traces"
               for s in r.request.resource_spans)
    assert receiver.resources()[0]["machine.id"] == "m1"
    (log,) = receiver.logs()
    assert (log.body.string_value, log.event_name, log.severity_text) == ("boom", "job.failed", "ERROR")
    assert buffer.pending() == 0 and shipper.stats.exported == {"spans": 1500, "logs": 1, "metrics": 0}


def test_retryable_statuses_honour_retry_after_and_lose_nothing(buffer, receiver):
    receiver.respond_next(503, count=2, headers={"Retry-After": "0.3"})
    receiver.respond_next(429)
    for i in range(50):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    start = time.monotonic()
    shipper = _shipper(buffer, receiver.endpoint).start()
    try:
        assert receiver.wait_for(lambda r: len(r.spans()) >= 50, timeout=10)
    finally:
        shipper.stop()
    assert receiver.statuses[:4] == [503, 503, 429, 200]
    assert time.monotonic() - start >= 0.6  # two Retry-After waits of 0.3 s
    assert len({attributes(s.attributes)["i"] for s in receiver.spans()}) == len(receiver.spans()) == 50


@pytest.mark.parametrize("header, expected", [
    ("12", 12.0), ("0.25", 0.25), ("-5", 0.0), ("", None), (None, None),
    ("inf", MAX_RETRY_AFTER_S), ("1e400", MAX_RETRY_AFTER_S), ("999999", MAX_RETRY_AFTER_S),
    ("nan", None), ("soon", None), ("Mon, 99 Foo 2026 99:99:99 GMT", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: at once
    ("Fri, 01 Jan 9999 00:00:00 GMT", MAX_RETRY_AFTER_S),
])
def test_retry_after_is_read_within_bounds_and_never_raises(header, expected):
    assert _retry_after(header) == expected


@pytest.mark.parametrize("header", ["soon", "inf"])
def test_a_junk_or_endless_retry_after_neither_stops_nor_stalls_the_shipper(buffer, receiver, header):
    # "inf" used to raise OverflowError in the thread's wait, killing the shipper; "soon" raised ValueError
    # before the failure was counted. Now junk is ignored (the backoff decides) and a huge value is capped.
    receiver.respond_next(503, headers={"Retry-After": header})
    for i in range(20):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    shipper = _shipper(buffer, receiver.endpoint, max_retry_after=0.2).start()
    try:
        assert receiver.wait_for(lambda r: len(r.spans()) >= 20, timeout=10)
        assert shipper._thread.is_alive()
    finally:
        shipper.stop()
    assert receiver.statuses[:2] == [503, 200]
    assert shipper.stats.requests_failed == 1 and "503" in shipper.stats.last_error
    assert sorted(attributes(s.attributes)["i"] for s in receiver.spans()) == list(range(20))


def test_a_rejected_batch_goes_to_dead_letters_and_later_ones_flow(buffer, receiver):
    receiver.respond_next(400)
    for i in range(5):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    buffer.flush()
    shipper = _shipper(buffer, receiver.endpoint).start()
    try:
        assert receiver.wait_for(lambda r: r.statuses == [400], timeout=5)
        for i in range(5, 8):
            buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
        assert receiver.wait_for(lambda r: len(r.spans()) == 3, timeout=5)
    finally:
        shipper.stop()
    assert sorted(attributes(s.attributes)["i"] for s in receiver.spans()) == [5, 6, 7]
    (dead,) = buffer.dead_letters()
    assert dead[:3] == (Kind.SPAN, 5, "HTTP 400 from /v1/traces")
    assert buffer.stats().dead_letter_records == 5 and shipper.stats.dead_lettered == 5


def test_requests_stay_under_the_size_limit(buffer, receiver):
    for i in range(600):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i, blob="x" * 200))
    shipper = _shipper(buffer, receiver.endpoint, max_request_size=40_000).start()
    try:
        assert receiver.wait_for(lambda r: len(r.spans()) >= 600, timeout=10)
    finally:
        shipper.stop()
    traces = [r for r in receiver.requests if r.path == "/v1/traces"]
    assert len(traces) > 3
    assert all(r.request.ByteSize() <= 40_000 for r in traces)
    assert len({attributes(s.attributes)["i"] for s in receiver.spans()}) == len(receiver.spans()) == 600


def test_breaker_opens_and_a_probe_precedes_full_batches(buffer):
    receiver = OtlpReceiver(free_port())  # not started yet: connections are refused
    for i in range(300):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    shipper = _shipper(buffer, receiver.endpoint, breaker_threshold=3, probe_records=10).start()
    try:
        assert wait_until(lambda: shipper.stats.breaker_open, timeout=10)
        assert shipper.stats.requests_failed >= 3 and buffer.pending() == 300
        receiver.start()
        assert receiver.wait_for(lambda r: len(r.spans()) >= 300, timeout=10)
    finally:
        shipper.stop()
        receiver.stop()
    sizes = [len(r.request.resource_spans[0].scope_spans[0].spans) for r in receiver.requests]
    assert sizes[0] == 10 and sizes[1] == 290
    assert not shipper.stats.breaker_open and shipper.stats.consecutive_failures == 0


def test_status_error_spans_encode_status(buffer, receiver):
    now = time.time_ns()
    buffer.append(Kind.SPAN, Value.ERROR, (1, 2, 0, "job.execution", 1, now, now, {}, 2, "boom",
                                            ((now, "exception", {"exception.type": "ValueError"}),), "", 0))
    shipper = _shipper(buffer, receiver.endpoint).start()
    try:
        assert receiver.wait_for(lambda r: r.spans(), timeout=5)
    finally:
        shipper.stop()
    (span,) = receiver.spans()
    assert span.status.code == Status.STATUS_CODE_ERROR and span.status.message == "boom"
    assert span.events[0].name == "exception"


def test_the_shipper_sleeps_until_a_signal_falls_due(buffer, receiver):
    """Between sends the thread waits for the first signal with records to fall due (batch_min records:
    one interval after its last send; fewer: two), and at most an interval, for records committed
    meanwhile: an idle process's shipper is not woken every `poll` for nothing, nor is one whose records
    are not due yet. Driven with a fake clock, one pass at a time."""
    clock = [1000.0]
    shipper = _shipper(buffer, receiver.endpoint, interval=5.0, poll=1.0, batch_min=100, clock=lambda: clock[0])
    assert shipper.ship_once() is False and shipper._next_due == 1005.0  # nothing buffered: an interval
    for i in range(10):
        buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 9, "INFO", f"line {i}", {}, 0, 0, ""))
    buffer.flush()
    clock[0] = 1001.0
    assert shipper.ship_once() is False and shipper._next_due == 1006.0  # 10 logs are due at 1010
    for i in range(150):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    buffer.flush()
    clock[0] = 1002.0
    assert shipper.ship_once() is False and shipper._next_due == 1005.0  # 150 spans are due at 1005
    assert receiver.requests == []
    clock[0] = 1005.0
    assert shipper.ship_once() is True  # the spans go; the logs wait for their second interval
    assert len(receiver.spans()) == 150 and receiver.logs() == []
    assert shipper._next_due == 1010.0
    clock[0] = 1006.0
    assert shipper.ship_once() is False and shipper._next_due == 1010.0  # when the logs fall due, not 1011
    clock[0] = 1010.0
    assert shipper.ship_once() is True and len(receiver.logs()) == 10
    assert shipper.ship_once() is False and shipper._next_due == 1015.0


def test_an_endpoint_that_is_not_http_is_refused_without_quoting_it(buffer):
    for endpoint in ("ftp://user:hunter2@collector:4318", "https://user:hunter2@collector:notaport"):
        with pytest.raises(ValueError) as refused:
            _shipper(buffer, endpoint)
        assert "telemetry.otlp_endpoint" in str(refused.value) and "hunter2" not in str(refused.value)
    with pytest.raises(ValueError) as refused:
        TelemetryConfig(otlp_endpoint="ftp://user:hunter2@collector:4318")
    assert "must start with http:// or https://" in str(refused.value) and "hunter2" not in str(refused.value)


def _thread_cpu(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process, read by another thread."""
    import os

    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_shipper_waits_its_interval_after_a_failure(buffer, receiver):
    # One 503 set the backoff time, which only a 2xx cleared; a 401 then (a wrong API key) dead-lettered the
    # batch, and once that time had passed every pass with nothing to send looped at once: a whole core.
    receiver.respond_next(503)
    receiver.respond_next(401, count=100)
    for i in range(150):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    shipper = _shipper(buffer, receiver.endpoint, interval=0.5).start()
    try:
        assert wait_until(lambda: buffer.stats().dead_letter_records == 150, timeout=10)
        assert receiver.statuses == [503, 401]
        cpu0, wall0 = _thread_cpu(shipper._thread.native_id), time.monotonic()
        time.sleep(1.5)  # the measuring window (nothing to wait for: the shipper has nothing left to do)
        cpu = _thread_cpu(shipper._thread.native_id) - cpu0
        wall = time.monotonic() - wall0
    finally:
        shipper.stop()
    assert cpu < 0.1 * wall, f"the idle shipper thread used {cpu:.2f} s of CPU in {wall:.2f} s"
    assert receiver.statuses == [503, 401]


def _metric_record(series: int, points: int) -> tuple:
    now = time.time_ns()
    return (now, now - 10**9, [(f"m_{s}", "a metric", "1", "sum", True,
                                [({"type": f"type-{p}", "status": "completed"}, p) for p in range(points)])
                               for s in range(series)])


def test_metric_requests_stay_under_the_size_limit(buffer, receiver):
    # Metric requests were cut at 50 records whatever their size: 40 job types made 1.1 MB.
    for i in range(30):
        buffer.append(Kind.METRIC, Value.NORMAL, _metric_record(4, 40))  # ~7 KB each encoded
    buffer.flush()
    shipper = _shipper(buffer, receiver.endpoint, max_request_size=40_000).start()
    try:
        assert receiver.wait_for(lambda r: len(r.metrics()) >= 120, timeout=10)
        assert wait_until(lambda: buffer.pending() == 0, timeout=5)
    finally:
        shipper.stop()
    requests = [r for r in receiver.requests if r.path == "/v1/metrics"]
    assert len(requests) >= 5
    assert all(r.request.ByteSize() <= 40_000 for r in requests)
    assert len(receiver.metrics()) == 120 and buffer.stats().dead_letter_records == 0


def test_a_redirect_is_retried_and_reported_not_dead_lettered(buffer, receiver, caplog):
    # A 308 (http -> https at a proxy) sent every batch to the dead letters: the URL is wrong, not the records.
    location = "https://collector.example:4318/v1/traces?api_key=s3cret"
    receiver.respond_next(308, count=2, headers={"Location": location})
    for i in range(20):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    with caplog.at_level("WARNING", logger="emp_machine.telemetry.shipper"):
        shipper = _shipper(buffer, receiver.endpoint).start()
        try:
            assert receiver.wait_for(lambda r: len(r.spans()) >= 20, timeout=10)
        finally:
            shipper.stop()
    assert receiver.statuses[:3] == [308, 308, 200]
    assert buffer.stats().dead_letter_records == 0 and shipper.stats.dead_lettered == 0
    assert shipper.stats.redirects == 2 and shipper.stats.requests_failed == 2
    assert sorted(attributes(s.attributes)["i"] for s in receiver.spans()) == list(range(20))
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "emp_machine.telemetry.shipper"]
    assert "HTTP 308" in warning and "https://collector.example:4318" in warning and "endpoint" in warning
    assert "s3cret" not in warning


def test_shutdown_stays_within_its_timeout_against_a_collector_that_never_answers(tmp_path):
    # A collector that accepts and never answers held shutdown(timeout=5) for 9.2 s: the drain, then the
    # request's own timeout. Now the request is cut at the deadline and its records stay buffered.
    import io
    import socket
    import threading

    from emp_machine.telemetry import setup

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    config = TelemetryConfig(otlp_endpoint=f"http://127.0.0.1:{server.getsockname()[1]}",
                             export={"interval": "0.05s", "timeout": "5s"})
    telemetry = setup(config, machine_id="m1", worker_id="m1-worker-0", service_type="sim",
                      buffer_path=tmp_path / "b.db", stream=io.StringIO())
    try:
        for i in range(50):
            with telemetry.tracer.start_as_current_span("x", attributes={"i": i}):
                pass
        telemetry.buffer.flush()
        assert wait_until(lambda: accepted, timeout=10)  # a request is waiting for its answer
        thread = telemetry.shipper._thread
        start = time.monotonic()
        telemetry.shutdown(timeout=1.5)
        elapsed = time.monotonic() - start
        assert not thread.is_alive()  # its request was cut off, not left running past the buffer's close
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    assert elapsed < 1.5 + 0.4, f"shutdown(timeout=1.5) took {elapsed:.2f} s"  # + the buffer closing
    reopened = Buffer(tmp_path / "b.db")
    try:
        assert reopened.pending(Kind.SPAN) == 50
    finally:
        reopened.close()


def test_per_signal_endpoints_are_used_as_given_with_their_own_headers(buffer, receiver):
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT and _HEADERS (TelemetryConfig.otlp_traces): the URL as given (no
    # /v1/traces appended), its headers instead of the generic ones (which may be another vendor's key).
    traces = OtlpReceiver().start()
    try:
        for i in range(5):
            buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
        buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 9, "INFO", "hello", {}, 0, 0, ""))
        shipper = _shipper(buffer, receiver.endpoint, headers={"x-generic-key": "g"},
                           signals={"traces": (f"{traces.endpoint}/v1/traces", {"x-traces-key": "t"})}).start()
        try:
            assert traces.wait_for(lambda r: len(r.spans()) == 5, timeout=10)
            assert receiver.wait_for(lambda r: len(r.logs()) == 1, timeout=10)
        finally:
            shipper.stop()
        assert receiver.spans() == [] and traces.logs() == []
        (span_request,) = traces.requests
        assert span_request.headers.get("x-traces-key") == "t" and "x-generic-key" not in span_request.headers
        (log_request,) = receiver.requests
        assert log_request.headers.get("x-generic-key") == "g" and "x-traces-key" not in log_request.headers
    finally:
        traces.stop()


def test_a_signal_without_an_endpoint_stays_buffered(buffer, receiver):
    buffer.append(Kind.SPAN, Value.ROUTINE, _span(1))
    buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 9, "INFO", "hello", {}, 0, 0, ""))
    shipper = _shipper(buffer, "", signals={"logs": (f"{receiver.endpoint}/v1/logs", None)}).start()
    try:
        assert receiver.wait_for(lambda r: len(r.logs()) == 1, timeout=10)
        start = time.monotonic()
        shipper.stop(drain_timeout=5)  # nothing it can send is left: no waiting for the span
        assert time.monotonic() - start < 1.0
    finally:
        shipper.stop()
    assert receiver.spans() == [] and buffer.pending(Kind.SPAN) == 1
    with pytest.raises(ValueError) as refused:
        _shipper(buffer, "", signals={"traces": ("ftp://u:hunter2@collector/v1/traces", None)})
    assert "telemetry.otlp_traces.endpoint" in str(refused.value) and "hunter2" not in str(refused.value)


def test_setup_ships_to_a_per_signal_endpoint_alone(tmp_path, receiver):
    # Only OTEL_EXPORTER_OTLP_TRACES_ENDPOINT-style config, no generic endpoint: setup() must still start the
    # shipper and send the traces there (the wiring in Telemetry.start_shipper).
    import io

    from emp_machine.telemetry import TelemetryConfig, setup

    config = TelemetryConfig(otlp_traces={"endpoint": receiver.endpoint.rstrip("/") + "/v1/traces"},
                             export={"interval": "0.1s"})
    telemetry = setup(config, machine_id="m1", service_type="machine", buffer_path=tmp_path / "t.db",
                      stream=io.StringIO())
    assert telemetry.shipper is not None
    with telemetry.tracer.start_as_current_span("job.execution", attributes={"job.id": "j"}):
        pass
    telemetry.tracer.sampler.threshold = 1 << 56
    with telemetry.tracer.start_as_current_span("kept"):
        pass
    telemetry.shutdown()
    assert "kept" in [s.name for s in receiver.spans()]


class _PipelineDown(OtlpReceiver):
    """A collector whose pipeline for one path answers 503 (the others are healthy) while `failing` is it."""

    def __init__(self, failing: str | None, port: int | None = None):
        super().__init__(port)
        self.failing = failing
        self.refused: list[str] = []

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path == self.failing:
            await request.read()
            with self._lock:
                self.refused.append(request.path)
                self.statuses.append(503)
            return web.Response(status=503)
        return await super()._handle(request)


@pytest.mark.parametrize("down", ["its pipeline answers 503", "its own endpoint is down"])
def test_a_failing_signal_does_not_hold_back_the_others(buffer, down):
    # Spans went first and a retryable failure backed off the whole shipper: while /v1/traces failed, logs
    # and metrics were never tried, even on a healthy collector, and expired after the buffer's retention.
    receiver = _PipelineDown("/v1/traces" if down == "its pipeline answers 503" else None).start()
    signals = None if down == "its pipeline answers 503" else {
        "traces": (f"http://127.0.0.1:{free_port()}/v1/traces", None)}  # nothing listens there
    try:
        for i in range(50):
            buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
        for i in range(20):
            buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 17, "ERROR", f"boom {i}", {}, 0, 0, ""))
        for i in range(3):
            buffer.append(Kind.METRIC, Value.NORMAL, _metric_record(1, 1))
        buffer.flush()
        shipper = _shipper(buffer, receiver.endpoint, signals=signals, breaker_threshold=2).start()
        try:
            assert receiver.wait_for(lambda r: len(r.logs()) == 20 and len(r.metrics()) == 3, timeout=10)
            assert wait_until(lambda: shipper.stats.signals["traces"].breaker_open, timeout=10)
            # Traces backing off, nothing else to send: the thread sleeps (its backoff, its interval).
            cpu0, wall0 = _thread_cpu(shipper._thread.native_id), time.monotonic()
            time.sleep(1.0)  # the measuring window
            cpu = _thread_cpu(shipper._thread.native_id) - cpu0
            assert cpu < 0.1 * (time.monotonic() - wall0), f"the shipper thread used {cpu:.2f} s of CPU"
            start = time.monotonic()
            shipper.stop(drain_timeout=5)  # the only records left are behind an open circuit: no waiting
            assert time.monotonic() - start < 3.0  # well under the drain timeout, with room for a loaded CI
        finally:
            shipper.stop()
    finally:
        receiver.stop()
    assert receiver.spans() == [] and buffer.pending(Kind.SPAN) == 50
    assert buffer.pending(Kind.LOG) == buffer.pending(Kind.METRIC) == 0
    assert sorted(log.body.string_value for log in receiver.logs()) == sorted(f"boom {i}" for i in range(20))
    stats = shipper.stats
    assert stats.breaker_open and stats.consecutive_failures >= 2  # any signal's circuit, the most failures
    assert stats.signals["logs"].consecutive_failures == stats.signals["metrics"].consecutive_failures == 0
    assert not stats.signals["logs"].breaker_open and not stats.signals["metrics"].breaker_open


def test_each_signal_backs_off_and_probes_on_its_own(buffer):
    # The reverse: every span accepted reset the one shared backoff, so a failing /v1/logs was retried on
    # every pass and its circuit never opened. Driven with a fake clock, one pass at a time.
    receiver = _PipelineDown("/v1/logs").start()
    clock = [1000.0]
    shipper = _shipper(buffer, receiver.endpoint, batch_min=1, batch_max=10, breaker_threshold=2,
                       probe_records=3, rng=random.Random(7), clock=lambda: clock[0])
    try:
        for i in range(100):
            buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
        for i in range(50):
            buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 9, "INFO", f"line {i}", {}, 0, 0, ""))
        buffer.flush()
        assert shipper.ship_once() is True  # a batch of spans; the logs are refused and back off
        assert len(receiver.spans()) == 10 and receiver.refused == ["/v1/logs"]
        assert shipper.ship_once() is True  # the same moment: spans go on, the logs wait out their backoff
        assert len(receiver.spans()) == 20 and len(receiver.refused) == 1
        clock[0] += 1.0  # past max_backoff (0.2 s)
        assert shipper.ship_once() is True
        assert len(receiver.spans()) == 30 and len(receiver.refused) == 2
        logs, traces = shipper.stats.signals["logs"], shipper.stats.signals["traces"]
        assert logs.breaker_open and logs.consecutive_failures == 2 and "503" in logs.last_error
        assert not traces.breaker_open and traces.consecutive_failures == 0
        assert shipper.stats.breaker_open and shipper.stats.consecutive_failures == 2
        assert shipper.ship_once() is True and len(receiver.refused) == 2  # circuit open: logs still wait
        receiver.failing = None  # the logs pipeline is back
        clock[0] += 1.0
        assert shipper.ship_once() is True
        assert len(receiver.logs()) == 3  # a probe first
        assert shipper.ship_once() is True
        assert len(receiver.logs()) == 13  # then full batches
    finally:
        shipper._close()
        receiver.stop()
    assert [len(r.request.resource_spans[0].scope_spans[0].spans) for r in receiver.requests
            if r.path == "/v1/traces"] == [10] * 6  # never a probe: the spans' circuit never opened
    assert not shipper.stats.breaker_open and shipper.stats.consecutive_failures == 0


class _AcceptAndClose:
    """A listening socket that accepts each connection, counts it and closes it at once: for an https://
    endpoint, an origin whose TLS handshake cannot complete (no connection can be opened), counted."""

    def __init__(self):
        import socket
        import threading

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.accepted = 0  # counted before the close the client waits for
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.server.close()


def _all_three_pending(buffer: Buffer, spans: int = 30, logs: int = 20, metrics: int = 3) -> None:
    for i in range(spans):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
    for i in range(logs):
        buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 9, "INFO", f"line {i}", {}, 0, 0, ""))
    for i in range(metrics):
        buffer.append(Kind.METRIC, Value.NORMAL, _metric_record(1, 1))
    buffer.flush()


def test_an_origin_that_cannot_be_connected_to_is_probed_once_per_backoff_not_once_per_signal(buffer):
    # Each signal failed on its own schedule: a collector wholly down got three connection attempts per backoff
    # (one per signal), and three breaker probes. Counted here by a listener that accepts and closes, so no
    # TLS handshake completes: no connection to that origin can be opened. Fake clock, one pass at a time.
    down = _AcceptAndClose()
    clock = [1000.0]
    shipper = _shipper(buffer, f"https://127.0.0.1:{down.port}", batch_min=1, batch_max=10, breaker_threshold=3,
                       probe_records=3, rng=random.Random(3), clock=lambda: clock[0])
    try:
        _all_three_pending(buffer)
        for cycle in range(1, 5):
            clock[0] += 1.0  # past any backoff (max_backoff 0.2 s)
            assert shipper.ship_once() is False
            assert down.accepted == cycle  # one connection for the origin, not one per signal
            assert shipper.ship_once() is False and down.accepted == cycle  # the same moment: all held back
            assert shipper.stats.requests_failed == cycle  # one request tried per cycle, and counted once
            for name in ("traces", "logs", "metrics"):  # yet none of the three could be sent: each failed
                stats = shipper.stats.signals[name]
                assert stats.unreachable and stats.consecutive_failures == cycle and stats.last_error
                assert stats.breaker_open == (cycle >= 3)
        assert shipper.stats.breaker_open and shipper.stats.consecutive_failures == 4
        assert buffer.pending(Kind.SPAN) == 30 and buffer.pending(Kind.LOG) == 20 and buffer.pending(Kind.METRIC) == 3
    finally:
        shipper._close()
        down.close()


def test_an_origin_back_after_an_outage_is_probed_once_and_then_each_signal_goes_on_alone(buffer):
    # The collector is down (a closed port): one connection per backoff for all three signals. When it is
    # back, its traces pipeline answering 503, the logs and metrics go on (their own probe, then batches) while
    # the traces back off alone; when that pipeline is back too, everything arrives, once.
    port = free_port()
    receiver = _PipelineDown("/v1/traces", port)  # not started yet: connections are refused
    clock = [1000.0]
    shipper = _shipper(buffer, receiver.endpoint, batch_min=1, batch_max=10, breaker_threshold=2,
                       probe_records=3, rng=random.Random(5), clock=lambda: clock[0])
    try:
        _all_three_pending(buffer)
        for cycle in (1, 2):
            clock[0] += 1.0
            assert shipper.ship_once() is False
            assert shipper.ship_once() is False
            assert shipper.stats.requests_failed == cycle  # one refused connection a cycle, not three
        stats = shipper.stats.signals
        assert all(stats[name].breaker_open and stats[name].unreachable and stats[name].consecutive_failures == 2
                   and "ConnectionRefused" in stats[name].last_error for name in ("traces", "logs", "metrics"))
        assert shipper.stats.breaker_open and shipper.stats.consecutive_failures == 2
        receiver.start()  # back, but its traces pipeline answers 503
        clock[0] += 1.0
        assert shipper.ship_once() is True
        assert receiver.refused == ["/v1/traces"] and len(receiver.logs()) == 3 and len(receiver.metrics()) == 3
        assert not any(stats[name].unreachable for name in ("traces", "logs", "metrics"))
        assert stats["traces"].consecutive_failures == 3 and "503" in stats["traces"].last_error
        assert stats["logs"].consecutive_failures == 0 and not stats["logs"].breaker_open
        assert shipper.ship_once() is True  # the same moment: the logs go on, the traces wait out their backoff
        assert len(receiver.logs()) == 13 and receiver.refused == ["/v1/traces"]
        receiver.failing = None
        for _ in range(10):  # each pass a second later: past the traces' backoff, every signal due
            clock[0] += 1.0
            shipper.ship_once()
        assert buffer.pending() == 0
    finally:
        shipper._close()
        receiver.stop()
    assert sorted(attributes(s.attributes)["i"] for s in receiver.spans()) == list(range(30))
    assert sorted(log.body.string_value for log in receiver.logs()) == sorted(f"line {i}" for i in range(20))
    assert len(receiver.metrics()) == 3 and buffer.stats().dead_letter_records == 0
    assert [len(r.request.resource_spans[0].scope_spans[0].spans) for r in receiver.requests
            if r.path == "/v1/traces"] == [3, 10, 10, 7]  # a probe first: the traces' own circuit was open
    assert not shipper.stats.breaker_open and shipper.stats.consecutive_failures == 0
    assert shipper.stats.requests_failed == 3  # two refused connections and one 503


class _BasicAuthCollector(OtlpReceiver):
    """A collector behind basic auth (the OTel collector's basicauth extension): 401 for a request whose
    Authorization is not one it accepts. `authorizations`: every request's Authorization values, all of them
    (`Received.headers` is a plain dict: a header sent twice shows once there)."""

    def __init__(self, accepted: set[str], port: int | None = None):
        super().__init__(port)
        self.accepted = accepted
        self.authorizations: list[list[str]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        with self._lock:
            scripted = bool(self._script)  # respond_next() answers first, as a proxy in front would
            self.authorizations.append(request.headers.getall("Authorization", []))
        if not scripted and request.headers.get("Authorization") not in self.accepted:
            await request.read()
            with self._lock:
                self.statuses.append(401)
            return web.Response(status=401)
        return await super()._handle(request)


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_url_credentials_are_sent_as_basic_auth(buffer):
    # http://user:password@collector:4318 passed validation, but the credentials were dropped from the request:
    # a collector behind basic auth answered 401 and every batch was dead-lettered. The stock OTel HTTP
    # exporter (requests) sends them as Basic auth, percent-decoded.
    expected = _basic("al@ice", "p:ss/wörd")
    collector = _BasicAuthCollector({expected}).start()
    try:
        for i in range(5):
            buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
        buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 9, "INFO", "hello", {}, 0, 0, ""))
        endpoint = f"http://al%40ice:p%3Ass%2Fw%C3%B6rd@127.0.0.1:{collector.port}"
        shipper = _shipper(buffer, endpoint).start()
        try:
            assert collector.wait_for(lambda r: len(r.spans()) == 5 and len(r.logs()) == 1, timeout=10)
        finally:
            shipper.stop()
        assert 401 not in collector.statuses and buffer.stats().dead_letter_records == 0
        assert collector.authorizations and all(values == [expected] for values in collector.authorizations)
    finally:
        collector.stop()


def test_a_configured_authorization_header_wins_over_url_credentials(buffer):
    # An explicit authorization header (any case) is sent alone; a signal's own URL brings its own credentials.
    traces = _BasicAuthCollector({_basic("tr", "tr-pass")}).start()
    collector = _BasicAuthCollector({"Bearer header-token"}).start()
    try:
        for i in range(3):
            buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
        buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 9, "INFO", "hello", {}, 0, 0, ""))
        shipper = _shipper(buffer, f"http://alice:url-pass@127.0.0.1:{collector.port}",
                           headers={"authorization": "Bearer header-token"},
                           signals={"traces": (f"http://tr:tr-pass@127.0.0.1:{traces.port}/v1/traces",
                                               {"x-traces-key": "t"})}).start()
        try:
            assert collector.wait_for(lambda r: len(r.logs()) == 1, timeout=10)
            assert traces.wait_for(lambda r: len(r.spans()) == 3, timeout=10)
        finally:
            shipper.stop()
        assert collector.authorizations == [["Bearer header-token"]]  # sent alone, not beside the URL's
        assert traces.authorizations and all(values == [_basic("tr", "tr-pass")] for values in traces.authorizations)
    finally:
        collector.stop()
        traces.stop()


def test_url_credentials_never_reach_stats_logs_or_errors(buffer, caplog):
    # Whatever fails (401 and dead letters, a redirect warning, a collector that is down), the password in the
    # endpoint, and the Basic value made of it, appear in no stat, error, dead letter or log line.
    password = "hunter2-s3cret"
    secrets = (password, _basic("alice", password).split()[1])
    collector = _BasicAuthCollector(set()).start()  # refuses everyone: 401
    collector.respond_next(308, count=1, headers={"Location": f"http://alice:{password}@elsewhere:4318/v1/logs"})
    down = free_port()
    try:
        for i in range(3):
            buffer.append(Kind.SPAN, Value.ROUTINE, _span(i))
        for i in range(2):
            buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 9, "INFO", "hello", {}, 0, 0, ""))
        with caplog.at_level("DEBUG"):
            shipper = _shipper(buffer, f"http://alice:{password}@127.0.0.1:{collector.port}",
                               signals={"traces": (f"http://alice:{password}@127.0.0.1:{down}/v1/traces", None)})
            shipper.start()
            try:
                assert wait_until(lambda: shipper.stats.dead_lettered == 2 and shipper.stats.redirects == 1
                                  and shipper.stats.signals["traces"].unreachable, timeout=10)
            finally:
                shipper.stop(drain_timeout=0.5)
        assert collector.statuses[:2] == [308, 401]
        texts = [repr(shipper.stats), caplog.text, repr(buffer.dead_letters()), repr(shipper._targets)]
        assert [reason for _, _, reason, _ in buffer.dead_letters()] == ["HTTP 401 from /v1/logs"]
        assert "(to http://elsewhere:4318)" in caplog.text  # the reasons are there, the secret not
        assert shipper.stats.signals["traces"].last_error.startswith("ConnectionRefusedError")
        assert not [text for text in texts for secret in secrets if secret in text]
    finally:
        collector.stop()


def test_backoff_grows_exponentially_with_jitter_up_to_its_cap(buffer):
    # Each failure in a row doubles the wait (jittered to 50-100 %), up to max_backoff: a collector answering
    # 503 is asked again after ~1, 2, 4, 8 s, not every second (a fake clock, one pass at a time).
    receiver = _PipelineDown("/v1/logs").start()
    clock = [1000.0]
    shipper = _shipper(buffer, receiver.endpoint, batch_min=1, batch_max=1, base_backoff=1.0, max_backoff=8.0,
                       breaker_threshold=100, rng=random.Random(11), clock=lambda: clock[0])
    waits = []
    try:
        buffer.append(Kind.LOG, Value.NORMAL, (time.time_ns(), 9, "INFO", "line", {}, 0, 0, ""))
        buffer.flush()
        for _ in range(6):
            shipper.ship_once()
            waits.append(shipper._held_until(Kind.LOG) - clock[0])
            clock[0] += waits[-1]  # the moment it may try again
    finally:
        shipper._close()
        receiver.stop()
    assert len(receiver.refused) == 6
    for n, wait in enumerate(waits):
        cap = min(8.0, 2.0 ** n)
        assert cap / 2 <= wait <= cap, (n, waits)
    assert waits[3] > waits[0] * 2  # it grows: 4-8 s after the fourth failure against 0.5-1 s after the first
    # and it is jittered: machines back from one outage do not retry in step (each wait its own fraction)
    assert len({round(wait / min(8.0, 2.0 ** n), 6) for n, wait in enumerate(waits)}) > 1, waits


def test_a_retry_after_longer_than_the_backoff_is_what_the_shipper_waits(buffer, receiver):
    # The collector's Retry-After, not the (shorter) backoff, decides when a signal is tried again (a fake clock:
    # the real-time test above cannot tell the two waits apart).
    receiver.respond_next(503, headers={"Retry-After": "5"})
    clock = [1000.0]
    shipper = _shipper(buffer, receiver.endpoint, batch_min=1, batch_max=1, base_backoff=0.05, max_backoff=0.2,
                       clock=lambda: clock[0])
    try:
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(0))
        buffer.flush()
        shipper.ship_once()
        assert receiver.statuses == [503]
        assert shipper._held_until(Kind.SPAN) - clock[0] == pytest.approx(5.0)
    finally:
        shipper._close()

"""Telemetry benchmark: per-operation CPU cost, telemetry's CPU share at two job rates, SIGKILL loss window,
and a collector outage with a worker restart. One command, about 80 s:

    .venv/bin/python bench/telemetry.py                    # outage of 25 s
    .venv/bin/python bench/telemetry.py --outage-seconds 60  # the issue's full 60 s outage (~2 min)

CPU time, not wall time, is measured (time.thread_time for one thread's operations, time.process_time for
whole-process shares), because the machine is shared. The OTLP receiver runs in a separate process so its
CPU is not counted as telemetry's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context  # noqa: E402

from emp_machine.telemetry import TelemetryConfig, extract_http, setup  # noqa: E402
from emp_machine.telemetry.buffer import Buffer, Kind, Value  # noqa: E402
from emp_machine.telemetry.encode import Encoder, encode_span  # noqa: E402
from emp_machine.telemetry.shipper import _gzip  # noqa: E402
from otlp_receiver import free_port  # noqa: E402

from _job import NoSdk, make_job  # noqa: E402  (bench/, this script's folder)

RECEIVER = textwrap.dedent("""
    import sys, time, signal
    sys.path.insert(0, sys.argv[2])
    from otlp_receiver import OtlpReceiver
    r = OtlpReceiver(int(sys.argv[1])).start()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            spans = r.spans()
            seqs = [a.value.int_value for s in spans for a in s.attributes if a.key == "seq"]
            print(len(seqs), len(set(seqs)), flush=True)
""")

rows: list[tuple[str, str, str, str, str]] = []


def row(name: str, value: float, unit: str, budget: str, target: str, ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("ok" if ok else "MISSED")
    rows.append((name, f"{value:.2f} {unit}", budget, target, verdict))
    print(f"  {name:<44} {value:>9.2f} {unit:<4} budget {budget:<10} target {target:<10} {verdict}", flush=True)


def per_op(fn, n: int) -> float:
    """CPU microseconds per call of `fn` in this thread (best of 3 runs of n)."""
    best = float("inf")
    for _ in range(3):
        start = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time() - start) / n * 1e6)
    return best


def bench_operations(tmp: Path) -> None:
    print("Per-operation CPU cost (this thread; the buffer writer's share is reported separately)")
    devnull = open(os.devnull, "w")
    telemetry = setup(TelemetryConfig(sampling={"spans_per_second": 1e9}), machine_id="bench-m1",
                      worker_id="bench-m1-worker-0", service_type="simulation", buffer_path=tmp / "ops.db",
                      stream=devnull, start_shipper=False)
    tracer = telemetry.tracer
    tracer.sampler.next_adjust = float("inf")  # hold the rate where each case puts it

    def sampled_span():
        with tracer.start_as_current_span("service.call"):
            pass

    sampled = per_op(sampled_span, 20000)
    row("span create+end, sampled", sampled, "us", "< 100 us", "<= 10 us", sampled <= 10)
    with tracer.start_as_current_span("parent"):
        child = per_op(sampled_span, 20000)
    row("child span create+end, sampled", child, "us", "< 100 us", "<= 10 us", child <= 10)
    tracer.sampler.threshold = 0
    unsampled = per_op(sampled_span, 20000)
    row("span create+end, unsampled root", unsampled, "us", "< 100 us", "<= 2 us", unsampled <= 2)
    with tracer.start_as_current_span("parent"):
        unsampled_child = per_op(sampled_span, 20000)
    row("span create+end, unsampled child", unsampled_child, "us", "< 100 us", "<= 2 us", unsampled_child <= 2)

    tracer.sampler.threshold = 1 << 56

    def exception_span():
        try:
            with tracer.start_as_current_span("service.call"):
                raise ValueError("boom")
        except ValueError:
            pass
    exc = per_op(exception_span, 5000)
    row("span recording an exception (2 stacks/s)", exc, "us", "< 100 us", "<= 30 us", exc <= 30)
    telemetry.buffer.flush()

    meter = telemetry.meter
    bound = meter.create_counter("bench_total").bind(kind="a")
    hist = meter.create_histogram("bench_seconds").bind(kind="a")
    counter = meter.create_counter("bench2_total")
    add = per_op(lambda: bound.add(1), 100000)
    row("counter add (bound)", add, "us", "< 50 us", "<= 2 us", add <= 2)
    attrs = {"type": "sim", "status": "completed"}
    row("counter add (attributes dict)", per_op(lambda: counter.add(1, attrs), 100000), "us", "< 50 us", "-")
    rec = per_op(lambda: hist.record(0.42), 100000)
    row("histogram record (bound)", rec, "us", "< 50 us", "<= 4 us", rec <= 4)

    log = telemetry.logger("bench")
    telemetry.buffer.flush()
    line = per_op(lambda: log.info("job %s step %d done", "job-1", 3), 20000)
    row("log line (JSON to stdout + durable enqueue)", line, "us", "< 500 us", "<= 12 us", line <= 12)
    telemetry.buffer.flush()  # the writer's backlog of 60k log records is not the event's to compete with
    event = per_op(lambda: telemetry.events.emit("job.completed", job_id="job-1", duration_ms=12), 20000)
    row("event", event, "us", "< 100 us", "<= 10 us", event <= 10)
    telemetry.buffer.flush()

    parent = set_span_in_context(NonRecordingSpan(SpanContext(0xABC, 0xDEF, False, TraceFlags(1))))
    from emp_machine.telemetry.context import http_headers
    inject = per_op(lambda: http_headers("job-1", "req-1", machine_id="m1", worker_id="w1", context=parent), 50000)
    row("inject (HTTP headers incl. tracestate)", inject, "us", "< 10 us", "<= 2 us", inject <= 2)
    with tracer.start_as_current_span("service.call"):
        inside = per_op(lambda: telemetry.http_headers("job-1", "req-1"), 50000)
    row("inject, current span ours", inside, "us", "< 10 us", "<= 2 us", inside <= 2)
    headers = http_headers("job-1", "req-1", machine_id="m1", worker_id="w1", context=parent)
    extract = per_op(lambda: extract_http(headers), 50000)
    row("extract (incl. tracestate)", extract, "us", "< 10 us", "<= 3 us", extract <= 3)
    telemetry.shutdown()
    devnull.close()

    # Buffer: the caller's append, and the writer's drain rate (its own thread CPU).
    buffer = Buffer(tmp / "buf.db")
    now = time.time_ns()
    record = (0xABC, 0xDEF, 0x123, "service.call", 1, now, now + 1000, {"job.id": "job-1", "service.type": "sim"},
              0, "", None, "", 0x100)
    append = buffer.append_record
    item = (Kind.SPAN, Value.ROUTINE, record)
    n = 200_000
    cpu0 = buffer.writer_cpu
    ap = per_op(lambda: append(item), n // 3)
    buffer.flush(60)
    row("buffer append (caller)", ap, "us", "-", "<= 3 us", ap <= 3)
    cpu0 = buffer.writer_cpu
    for _ in range(n):
        append(item)
    buffer.flush(60)
    writer_us = (buffer.writer_cpu - cpu0) / n * 1e6
    row("buffer write (writer thread, per record)", writer_us, "us", "-", "-")
    drain = 1e6 / writer_us if writer_us else float("inf")
    row("buffer drain rate (writer CPU)", drain / 1000, "k/s", "-", ">= 100 k/s", drain >= 100_000)

    # Export: read from SQLite, encode to OTLP protobuf, gzip level 1, ack; what the shipper thread does.
    encoder = Encoder({"service.name": "bench", "machine.id": "m1"})
    start = time.thread_time()
    exported = 0
    while True:
        chunks = buffer.read(Kind.SPAN, 1000)
        if not chunks or exported >= 100_000:
            break
        spans = [encode_span(r) for c in chunks for r in c.records[c.sent:]]
        _gzip(encoder.traces(spans))
        buffer.ack([(c.id, c.count) for c in chunks])
        exported += len(spans)
    export_us = (time.thread_time() - start) / exported * 1e6
    row("export per span (read+encode+gzip1+ack)", export_us, "us", "-", "<= 20 us", export_us <= 20)
    buffer.close()


def start_receiver(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), str(ROOT / "tests")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def paced(job, rate: float, seconds: float, warmup: float) -> float:
    """Process CPU share (% of one core) while calling job(i) `rate` times a second, after `warmup`."""
    start_wall = time.monotonic()
    i = 0
    cpu_at = wall_at = None
    while True:
        now = time.monotonic()
        if now - start_wall >= seconds:
            break
        if cpu_at is None and now - start_wall >= warmup:
            cpu_at, wall_at = time.process_time(), now
        job(i)
        i += 1
        delay = start_wall + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return (time.process_time() - cpu_at) / (time.monotonic() - wall_at) * 100


def one_share(tmp: Path, endpoint: str, rate: int, seconds: float, warmup: float, tag: str) -> dict:
    """One paced run of the benchmark job with telemetry, minus a baseline run taken just before it."""
    baseline = paced(lambda i: None, rate, 3.0, 0.5)
    telemetry = setup(TelemetryConfig(otlp_endpoint=endpoint), machine_id="m1",
                      worker_id="m1-worker-0", service_type="simulation", buffer_path=tmp / f"share{tag}.db",
                      stream=open(os.devnull, "w"))
    bench_job = make_job(telemetry, f"bench.share{tag}")
    ran = [0]

    def job(i: int) -> None:
        ran[0] += 1
        bench_job(i)

    with_telemetry = paced(job, rate, seconds, warmup)
    result = {"share": with_telemetry - baseline, "process": with_telemetry, "baseline": baseline, "jobs": ran[0],
              "kept": telemetry.tracer.kept_spans, "rate": telemetry.sampler.rate}
    telemetry.shutdown(timeout=5)
    return result


def bench_cpu_share(tmp: Path, endpoint: str, rounds: int = 3) -> None:
    print("Telemetry CPU share of one core: process CPU (process_time, all threads) over wall time, minus the")
    print("same paced loop with an empty job and no telemetry run just before (its sleeps and wake-ups are not")
    print(f"telemetry's); {rounds} rounds per load, the verdict on the median (this VM drifts by tens of percent)")
    for rate, seconds, warmup in ((10, 7.0, 1.0), (100, 8.0, 3.0)):
        runs = [one_share(tmp, endpoint, rate, seconds, warmup, f"{rate}-{r}") for r in range(rounds)]
        shares = sorted(r["share"] for r in runs)
        median = statistics.median(shares)
        # At 10 jobs/s the target also asks for every trace kept (4 spans a job), in every round.
        every_trace = rate > 10 or all(r["kept"] == 4 * r["jobs"] for r in runs)
        row(f"CPU share at {rate} jobs/s" + (", every trace kept" if rate == 10 else "") + " (median)", median, "%",
            "< 1 %", "< 1 %", median < 1 and every_trace)
        for r in runs:
            print(f"    share {r['share']:.2f} % (process {r['process']:.2f} %, baseline {r['baseline']:.2f} %), "
                  f"{r['jobs']} jobs, sampling rate at the end {r['rate']:.2f}, spans kept {r['kept']} of "
                  f"{4 * r['jobs']}")
        if rate == 100:  # the floor under any pipeline: the same job on OTel's API alone (no SDK), paced alike
            no_sdk = make_job(NoSdk())
            floors = sorted(paced(no_sdk, rate, 5.0, 1.0) - paced(lambda i: None, rate, 3.0, 0.5)
                            for _ in range(rounds))
            row(f"  of it, the job on OTel's API with no SDK at {rate} jobs/s (median; information)",
                statistics.median(floors), "%", "-", "-")
            print(f"    rounds {', '.join(f'{f:.2f}' for f in floors)} %: the job's own code and its telemetry call "
                  f"sites; the share above minus this is what the SDK and pipeline cost")


def _lines_run(fn) -> tuple[int, int]:
    """(distinct source lines, lines executed) of Python run by one call of fn (sys.settrace)."""
    seen: set = set()
    count = [0]

    def trace(frame, event, arg):
        if event == "line":
            seen.add((frame.f_code, frame.f_lineno))
            count[0] += 1
        return trace
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return len(seen), count[0]


def bench_footprint(tmp: Path) -> None:
    """How much Python one job's telemetry runs: a count, so it does not drift with the VM as the CPU share does.
    After an idle wait, code costs about what it touches (the caches were taken while the vCPU slept), so this
    is what the share at 100 jobs/s follows (docs/benchmarks.md, 2026-11-25: a held job of ~250 distinct lines
    cost 85-185 us paced at 100/s and 18-23 us warm; a 12-line stand-in of the same shape, 37 us paced). The
    job function's own lines are counted too."""
    print("Footprint of the benchmark job's telemetry (Python lines; one job, traced)")
    for label, overhead in (("held by the sampler (over budget: shed)", 0.01), ("every trace kept", 100)):
        telemetry = setup(TelemetryConfig(sampling={"spans_per_second": 1e9 if overhead == 100 else 100},
                                          overhead={"cpu_percent": overhead}),
                          machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                          buffer_path=tmp / f"footprint{overhead}.db", stream=open(os.devnull, "w"),
                          start_shipper=False)
        job = make_job(telemetry, "bench.footprint")
        for i in range(200):  # paced, so the sampler settles where this load puts it
            job(i)
            time.sleep(0.01)
        distinct, run = _lines_run(lambda: job(10**6))
        row(f"lines, {label}", distinct, "", "-", "-")
        print(f"    {run} lines executed; sampling rate {telemetry.sampler.rate:.3f}, shedding "
              f"{telemetry.sampler.shedding}")
        telemetry.shutdown(timeout=5)


PRODUCER = textwrap.dedent("""
    import io, signal, sys, time
    from pathlib import Path
    from emp_machine.telemetry import TelemetryConfig, setup
    buffer_path, endpoint, start, count, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    # every span kept: a budget no load reaches, and no CPU back-off (this run measures loss, not overhead)
    config = TelemetryConfig(otlp_endpoint=endpoint, sampling={"spans_per_second": 1e9},
                             overhead={"cpu_percent": 100})
    telemetry = setup(config, machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                      buffer_path=Path(buffer_path), stream=io.StringIO())
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("started", flush=True)
    t0 = time.monotonic()
    produced = 0
    for i in range(start, start + count):
        if stop:
            break
        with telemetry.tracer.start_as_current_span("service.call", attributes={"seq": i, "t": time.time_ns()}):
            pass
        produced += 1
        delay = t0 + produced / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    if sys.argv[6] == "drain":
        deadline = time.monotonic() + 60
        while telemetry.buffer.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
    telemetry.shutdown(timeout=5)
    assert telemetry.tracer.kept_spans == produced, (telemetry.tracer.kept_spans, produced)
    print("produced", produced, flush=True)
""")


def _producer(db: Path, endpoint: str, start: int, count: int, rate: float, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, str(db), endpoint, str(start), str(count), str(rate),
                             mode], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "started"
    return proc


def bench_sigkill(tmp: Path) -> None:
    print("SIGKILL loss window (spans recorded before the kill but not yet committed)")
    db = tmp / "kill.db"
    proc = _producer(db, f"http://127.0.0.1:{free_port()}", 0, 10**6, 1000, "none")
    time.sleep(1.537)
    kill_ns = time.time_ns()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    buffer = Buffer(db)
    last = max(r[7]["t"] for c in buffer.read(Kind.SPAN, 10**9) for r in c.records)
    buffer.close()
    lost_ms = (kill_ns - last) / 1e6
    row("records lost to SIGKILL (window at 1000/s)", lost_ms, "ms", "-", "<= 100 ms", lost_ms <= 100)


def bench_outage(tmp: Path, seconds: float) -> None:
    print(f"Collector outage of {seconds:.0f} s at 500 spans/s, worker restarted (SIGTERM) in the middle")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    db = tmp / "outage.db"
    first = _producer(db, endpoint, 0, 10**9, 500, "none")
    time.sleep(seconds / 2)
    first.send_signal(signal.SIGTERM)  # the worker restarts: graceful stop, then a new process
    produced = int(first.stdout.readline().split()[1])
    first.wait(30)
    second = _producer(db, endpoint, produced, int(seconds / 2 * 500), 500, "drain")
    time.sleep(seconds / 2)  # its half, at 500/s, while the collector is still down
    receiver = start_receiver(port)  # the collector comes back; the worker drains its buffer
    started = time.monotonic()
    produced += int(second.stdout.readline().split()[1])
    second.wait(90)
    drain_s = time.monotonic() - started
    receiver.stdin.write("count\n")
    receiver.stdin.flush()
    total, distinct = map(int, receiver.stdout.readline().split())
    receiver.kill()
    lost = produced - distinct
    row("outage: spans lost", lost, "", "0", "0", lost == 0)
    row("outage: duplicates", total - distinct, "", "0", "0", total == distinct)
    print(f"    produced {produced}, received {total} ({distinct} distinct), drained in {drain_s:.1f} s")


def _plain_work(i: int) -> str:
    """A fixed piece of plain Python (no telemetry): dicts, tuples, str and json.dumps."""
    import json

    return json.dumps({f"k{k}": (k, str(i)) for k in range(60)})


def machine_speed() -> None:
    """How fast this machine is right now, without telemetry: a shared VM drifts by tens of percent, and code
    run right after a sleep is slower than in a tight loop. Read the figures below against these."""
    tight = per_op(lambda: _plain_work(1), 2000)
    after_sleep = 0.0
    for i in range(100):
        start = time.thread_time()
        _plain_work(i)
        after_sleep += time.thread_time() - start
        time.sleep(0.01)
    print(f"Machine speed now: a fixed plain-Python step costs {tight:.0f} us in a tight loop and "
          f"{after_sleep / 100 * 1e6:.0f} us right after a 10 ms sleep (about 55 / 130 us in this project's "
          f"calmer runs)")


def stock_reference() -> None:
    """The issue's reference points were measured with the stock OTel SDK 1.45 on another 2-core machine. The
    same operations with the stock SDK here, on this interpreter, now, say how this machine compares: the
    targets below are absolute, so read them against this factor."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    class _Discard(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    sampled_provider = TracerProvider(sampler=ALWAYS_ON)
    sampled_provider.add_span_processor(BatchSpanProcessor(_Discard()))
    sampled, unsampled = sampled_provider.get_tracer("ref"), TracerProvider(sampler=ALWAYS_OFF).get_tracer("ref")

    def span(tracer):
        with tracer.start_as_current_span("service.call"):
            pass
    counter = MeterProvider().get_meter("ref").create_counter("ref_total")
    attrs = {"type": "sim"}
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    extract = TraceContextTextMapPropagator().extract
    cases = [("span create+end, sampled", lambda: span(sampled), 20, 34),
             ("span create+end, unsampled", lambda: span(unsampled), 9, 11),
             ("counter add", lambda: counter.add(1, attrs), 7, 9),
             ("extract (traceparent only)", lambda: extract(carrier), 4, 5)]
    print(f"Stock OTel SDK on this machine now ({sys.executable}, Python {sys.version.split()[0]}), "
          "against the issue's reference machine:")
    ratios = []
    for name, fn, low, high in cases:
        here = per_op(fn, 5000)
        ratios.append(here / ((low + high) / 2))
        print(f"  {name:<44} {here:>9.2f} us   reference {low}-{high} us")
    sampled_provider.shutdown()
    print(f"  -> this machine runs the stock SDK at about {statistics.median(ratios):.2f}x the reference's cost "
          "(median of the four)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outage-seconds", type=float, default=25.0)
    parser.add_argument("--only", choices=["ops", "cpu", "footprint", "durability"], help="run one part")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    t0 = time.monotonic()
    machine_speed()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "ops"):
            stock_reference()
            bench_operations(tmp)
        if args.only in (None, "footprint"):
            bench_footprint(tmp)
        if args.only in (None, "cpu"):
            port = free_port()
            receiver = start_receiver(port)
            try:
                bench_cpu_share(tmp, f"http://127.0.0.1:{port}")
            finally:
                receiver.kill()
        if args.only in (None, "durability"):
            bench_sigkill(tmp)
            bench_outage(tmp, args.outage_seconds)
    print(f"\nDone in {time.monotonic() - t0:.0f} s on {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    missed = [r[0] for r in rows if r[4] == "MISSED"]
    print("Targets missed: " + (", ".join(missed) if missed else "none"))


if __name__ == "__main__":
    main()

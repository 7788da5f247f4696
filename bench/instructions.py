"""Instructions per telemetry operation, counted by `perf stat` (user space, this process's threads).

    .venv/bin/python bench/instructions.py          (about 40 s; needs Linux perf: Debian's linux-perf)

The timing benchmarks read CPU time, and on this shared VM the same code reads 1.5-2x slower in one hour
than in another. Instruction counts do not drift: the same code on the same interpreter gives the same
count to within ~1 %, so they show what a change did, whatever the VM is doing (they are not a speed: a
cache miss costs no instruction). Each operation runs in a child process twice, 0 and N times after the
same set-up and a flush; the difference over N is its count. Records go to the durable buffer as in
production, and the count is of every thread: the caller's work, its copy into the stage file, and the
writer's commit of the records to SQLite (in batches of 1000 here). The shipper does not run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OPS = [  # (name, repetitions)
    ("span create+end, sampled", 20000),
    ("span create+end, unsampled root", 20000),
    ("span create+end, unsampled child", 20000),
    ("log line", 20000),
    ("event", 20000),
    ("inject (HTTP headers incl. tracestate)", 20000),
    ("extract (incl. tracestate)", 20000),
    ("job, sampled (4 spans, 10 log lines, 5 metric updates, 3 events)", 2000),
    ("job, unsampled while over the CPU budget", 5000),
]


def child(name: str, n: int) -> None:
    """Set up telemetry, run `name` n times, exit without tearing down (the same exit for every n)."""
    sys.path.insert(0, str(ROOT))
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

    from emp_machine.telemetry import TelemetryConfig, extract_http, setup
    from emp_machine.telemetry.context import http_headers

    from _job import make_job  # bench/, this script's folder

    tmp = Path(tempfile.mkdtemp(prefix="emp-bench-instr-"))
    telemetry = setup(TelemetryConfig(sampling={"spans_per_second": 1e9}), machine_id="bench-m1",
                      worker_id="bench-m1-worker-0", service_type="simulation", buffer_path=tmp / "b.db",
                      stream=open(os.devnull, "w"), start_shipper=False)
    tracer, log, sampler = telemetry.tracer, telemetry.logger("bench"), telemetry.sampler
    sampler.next_adjust = float("inf")  # hold the rate where the case puts it
    parent = set_span_in_context(NonRecordingSpan(SpanContext(0xABC, 0xDEF, False, TraceFlags(1))))
    headers = http_headers("job-1", "req-1", machine_id="m1", worker_id="w1", context=parent)
    count = [0]

    def span():
        with tracer.start_as_current_span("service.call"):
            pass

    bench_job = make_job(telemetry)

    def job():
        count[0] += 1
        bench_job(count[0])

    fn = {"span create+end, sampled": span,
          "span create+end, unsampled root": span,
          "span create+end, unsampled child": span,
          "log line": lambda: log.info("job %s step %d done", "job-1", 3),
          "event": lambda: telemetry.events.emit("job.completed", job_id="job-1", duration_ms=12),
          "inject (HTTP headers incl. tracestate)":
              lambda: http_headers("job-1", "req-1", machine_id="m1", worker_id="w1", context=parent),
          "extract (incl. tracestate)": lambda: extract_http(headers),
          OPS[7][0]: job, OPS[8][0]: job}[name]
    if "unsampled" in name:
        sampler.threshold = 0
    if name == OPS[8][0]:
        sampler.overhead_factor = 0.5  # over the CPU budget: such jobs shed their INFO records and events
    outer = None
    if name == "span create+end, unsampled child":
        outer = tracer.start_as_current_span("parent")
        outer.__enter__()
    for _ in range(200):  # warm: caches, specialised bytecode
        fn()
    telemetry.flush()
    for _ in range(n):
        fn()
    telemetry.flush()  # the commit of what the N operations appended
    os._exit(0)


def count(name: str, n: int) -> int:
    out = subprocess.run(["perf", "stat", "-x,", "-e", "instructions:u", sys.executable, __file__, "--child", name,
                          str(n)], capture_output=True, text=True, check=True).stderr
    for line in out.splitlines():
        if "instructions" in line:
            return int(line.split(",")[0])
    raise RuntimeError(f"perf printed no instruction count: {out.strip()[-300:]}")


def main() -> int:
    if shutil.which("perf") is None:
        print("perf is not installed (Debian: apt-get install linux-perf); nothing measured")
        return 0  # not a failure of the project: ./dev bench goes on
    probe = subprocess.run(["perf", "stat", "-x,", "-e", "instructions:u", "true"], capture_output=True, text=True)
    if probe.returncode != 0 or "not supported" in probe.stderr or "instructions" not in probe.stderr:
        print("perf cannot count instructions on this machine; nothing measured")
        return 0
    print(f"Instructions per operation (user space, perf stat), {sys.executable}, Python {sys.version.split()[0]}")
    for name, n in OPS:
        base, full = count(name, 0), count(name, n)
        print(f"  {name:<68} {(full - base) / n / 1000:8.1f} k", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())

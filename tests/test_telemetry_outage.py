"""Outage and restart, with real processes: the collector is down while N spans are produced by two
successive processes (the first one SIGKILLed after it produced its share); when the collector comes back,
exactly N distinct spans arrive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from otlp_receiver import OtlpReceiver, attributes, free_port

PRODUCER = textwrap.dedent("""
    import io, sys, time
    from pathlib import Path
    from emp_machine.telemetry import TelemetryConfig, setup
    buffer_path, endpoint, start, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    config = TelemetryConfig(otlp_endpoint=endpoint, sampling={"spans_per_second": 1e9},
                             export={"interval": "0.1s", "max_backoff": "0.3s"})
    telemetry = setup(config, machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                      buffer_path=Path(buffer_path), stream=io.StringIO())
    for i in range(start, start + count):
        with telemetry.tracer.start_as_current_span("service.call", attributes={"seq": i}):
            pass
    telemetry.flush()
    print("produced", flush=True)
    if mode == "crash":
        time.sleep(60)  # waits for the SIGKILL
    deadline = time.monotonic() + 30
    while telemetry.buffer.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("drained" if not telemetry.buffer.pending() else "not drained", flush=True)
    telemetry.shutdown(timeout=2)
""")


def _start(tmp_path: Path, endpoint: str, start: int, count: int, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", PRODUCER, str(tmp_path / "worker.db"), endpoint, str(start),
                             str(count), mode], stdout=subprocess.PIPE, text=True, env=env)


def test_no_span_lost_or_duplicated_across_an_outage_and_a_killed_worker(tmp_path):
    n_first, n_second = 1500, 1500
    receiver = OtlpReceiver(free_port())  # not listening: the collector is down
    first = _start(tmp_path, receiver.endpoint, 0, n_first, "crash")
    try:
        assert first.stdout.readline().strip() == "produced"
        first.send_signal(signal.SIGKILL)  # a crash, after its records were committed
        assert first.wait(10) == -signal.SIGKILL
        second = _start(tmp_path, receiver.endpoint, n_first, n_second, "drain")
        assert second.stdout.readline().strip() == "produced"
        receiver.start()  # the collector comes back
        assert second.stdout.readline().strip() == "drained"
        assert second.wait(20) == 0
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
        receiver.stop()
    seqs = [attributes(span.attributes)["seq"] for span in receiver.spans()]
    assert len(seqs) == n_first + n_second
    assert sorted(seqs) == list(range(n_first + n_second))

"""`emp-machine telemetry`: each process's buffer, read from another process while its owner runs and after,
without taking the owner's lock, writing, or changing what the shipper sends. Real buffers written through
telemetry.setup, a real OTLP receiver, the CLI as a subprocess, and a real machine."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from emp_machine.telemetry import TelemetryConfig, setup
from emp_machine.telemetry.buffer import Kind
from emp_machine.telemetry.encode import Encoder
from emp_machine.telemetry.shipper import Shipper
from harness import wait_for
from otlp_receiver import OtlpReceiver

SECRET = "sk-live0123456789abcdefSECRET"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    return subprocess.run([sys.executable, "-m", "emp_machine", "telemetry", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def _json(*args: str) -> dict:
    out = _cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _machine_telemetry(state: Path):
    """The machine process's telemetry, no endpoint: 3 job spans (the second failed), 3 log lines carrying a
    secret, one event, one metric point. Sampling held at 100 %, no metric points but flush()'s."""
    telemetry = setup(TelemetryConfig(export={"metrics_interval": "1h"}), machine_id="m1", service_type="machine",
                      buffer_path=state / "telemetry" / "machine.db", stream=io.StringIO())
    telemetry.tracer.sampler.threshold = 1 << 56
    telemetry.tracer.sampler.next_adjust = float("inf")
    log = telemetry.logger("test.jobs")
    for i in range(3):
        try:
            with telemetry.job_span(f"job-{i}", job_type="simulation"):
                log.info("working on job-%s with api_key=%s", i, SECRET)
                if i == 1:
                    raise RuntimeError("boom")
        except RuntimeError:
            pass
    telemetry.events.emit("job.completed", job_id="job-2", duration_ms=5)
    assert telemetry.flush()
    return telemetry


def _worker_with_drops_and_a_dead_letter(state: Path):
    """A worker's telemetry: a batch of 3 log records dead-lettered as the shipper does on a 400, then more
    records than max_size holds (the oldest dropped as buffer_full). Shut down; returns its final stats."""
    telemetry = setup(TelemetryConfig(buffer={"max_size": 20_000, "segment_size": 10_000},
                                      export={"metrics_interval": "1h"}),
                      machine_id="m1", worker_id="m1-worker-1", service_type="simulation",
                      buffer_path=state / "telemetry" / "m1-worker-1.db", stream=io.StringIO())
    log = telemetry.logger("test.worker")
    for i in range(3):
        log.warning("rejected record %s", i)
    assert telemetry.buffer.flush()
    (chunk,) = telemetry.buffer.read(Kind.LOG, 1000)
    telemetry.buffer.dead_letter(Kind.LOG, chunk.records, [(chunk.id, chunk.count)], "HTTP 400: bad attribute")
    for batch in range(40):  # incompressible text, committed batch by batch: past max_size
        for i in range(10):
            log.info("filler %s", os.urandom(120).hex())
        assert telemetry.buffer.flush()
    stats = telemetry.buffer.stats()
    assert stats.dropped.get("buffer_full", 0) > 0 and stats.dead_letter_records == 3
    telemetry.shutdown(timeout=5)
    return telemetry.buffer.stats()


def test_buffers_read_while_the_owner_runs_and_after_nothing_consumed(tmp_path):
    state = tmp_path / "state"
    worker = _worker_with_drops_and_a_dead_letter(state)
    machine = _machine_telemetry(state)
    buffer = machine.buffer
    try:
        before = {kind: [(c.id, c.sent, c.records) for c in buffer.read(kind, 10_000)]
                  for kind in (Kind.SPAN, Kind.LOG, Kind.METRIC)}
        assert [len(c) for c in before.values()] and buffer.pending(Kind.SPAN) == 3

        # Owner alive: it still holds its lock, and its buffer reads.
        doc = _json("--state-dir", str(state))
        assert doc["state_dir"] == str(state)
        rows = {b["process"]: b for b in doc["buffers"]}
        assert set(rows) == {"machine", "m1-worker-1"}
        m = rows["machine"]
        assert m["owner_running"] is True
        assert m["pending"] == {"spans": 3, "logs": 4, "metrics": 1}
        assert m["pending"] == {"spans": buffer.pending(Kind.SPAN), "logs": buffer.pending(Kind.LOG),
                                "metrics": buffer.pending(Kind.METRIC)}
        assert m["stored_bytes"] == buffer.stats().stored_bytes > 0
        assert m["dropped"] == {} and m["dead_letter_records"] == 0
        assert 0 <= m["oldest_pending_age_s"] < 60
        assert m["limit_bytes"] == buffer.max_size == 100 * 10**6  # each buffer keeps the limit it was opened with
        w = rows["m1-worker-1"]
        assert w["owner_running"] is False
        assert w["dropped"] == worker.dropped and w["dropped"]["buffer_full"] > 0
        assert w["dead_letter_records"] == 3 and w["stored_bytes"] == worker.stored_bytes
        assert w["limit_bytes"] == 20_000
        assert sum(w["pending"].values()) == worker.stored_records and w["pending"]["logs"] > 0

        # The table, with the owner alive.
        table = _cli("--state-dir", str(state))
        assert table.returncode == 0, table.stderr
        line = next(x for x in table.stdout.splitlines() if x.startswith("machine "))
        assert line.split()[:5] == ["machine", "running", "3", "4", "1"]
        line = next(x for x in table.stdout.splitlines() if x.startswith("m1-worker-1 "))
        assert line.split()[1] == "stopped" and f"buffer_full={worker.dropped['buffer_full']}" in line
        assert line.split()[-2] == "3"  # DEAD

        # The last spans and logs, newest last; the secret was redacted when buffered.
        shown = _cli("--state-dir", str(state), "--spans", "2", "--logs", "3")
        assert shown.returncode == 0, shown.stderr
        assert SECRET not in shown.stdout
        spans_part, logs_part = shown.stdout.split("\n\n")
        span_lines = spans_part.splitlines()[1:]
        assert len(span_lines) == 2
        assert "job.id=job-1" in span_lines[0] and "error (RuntimeError: boom)" in span_lines[0]
        assert "job.id=job-2" in span_lines[1] and " unset " in span_lines[1]
        log_lines = logs_part.splitlines()[1:]
        assert len(log_lines) == 3
        assert "working on job-1 with api_key=[REDACTED]" in log_lines[0] and "job=job-1" in log_lines[0]
        assert "working on job-2" in log_lines[1]
        assert " job.completed " in log_lines[2] and log_lines[2].endswith("job=job-2")

        doc = _json("--state-dir", str(state), "--process", "machine", "--spans", "10", "--logs", "1")
        assert [b["process"] for b in doc["buffers"]] == ["machine"]
        records = [r for _, sent, chunk in before[Kind.SPAN] for r in chunk[sent:]]
        assert [s["trace_id"] for s in doc["spans"]] == [f"{r[0]:032x}" for r in sorted(records, key=lambda r: r[6])]
        span = doc["spans"][1]
        assert set(span) == {"process", "trace_id", "span_id", "parent_span_id", "name", "start", "end",
                             "duration_ms", "status", "status_message", "attributes"}
        assert (span["name"], span["status"]) == ("job.execution", "error")
        assert span["status_message"] == "RuntimeError: boom"
        assert span["attributes"]["job.id"] == "job-1" and span["duration_ms"] >= 0 and len(span["span_id"]) == 16
        (log,) = doc["logs"]
        assert log["event"] == "job.completed" and log["job_id"] == "job-2" and log["level"] == "INFO"
        assert set(log) == {"process", "time", "level", "message", "event", "job_id", "trace_id"}
        # The newest span is job-2's, though the failed job-1's chunk (another value class) has a later id.
        (newest,) = _json("--state-dir", str(state), "--spans", "1")["spans"]
        assert newest["attributes"]["job.id"] == "job-2"

        dead = _json("--state-dir", str(state), "--dead-letters")["dead_letters"]
        assert [(d["process"], d["kind"], d["count"], d["reason"]) for d in dead] == [
            ("m1-worker-1", "logs", 3, "HTTP 400: bad attribute")]
        text = _cli("--state-dir", str(state), "--dead-letters").stdout.splitlines()
        assert text[1].split()[2:] == ["m1-worker-1", "logs", "3", "HTTP", "400:", "bad", "attribute"]

        # Nothing consumed: the owner reads exactly what it had, and ships exactly that.
        assert {kind: [(c.id, c.sent, c.records) for c in buffer.read(kind, 10_000)] for kind in before} == before
        receiver = OtlpReceiver().start()
        try:
            shipper = Shipper(buffer, Encoder({"service.name": "test"}), receiver.endpoint, interval=0.05,
                              poll=0.01, batch_min=1).start()
            try:
                assert receiver.wait_for(lambda r: len(r.spans()) >= 3 and len(r.logs()) >= 4, timeout=15)
                shipper.stop(drain_timeout=5)
            finally:
                shipper.stop()
        finally:
            receiver.stop()
        assert len(receiver.spans()) == 3 and len(receiver.logs()) == 4 and buffer.pending() == 0
    finally:
        machine.shutdown(timeout=5)

    # After close: the lock is free, the counts read, and reading leaves no file behind.
    files = sorted(os.listdir(state / "telemetry"))
    doc = _json("--state-dir", str(state))
    rows = {b["process"]: b for b in doc["buffers"]}
    assert rows["machine"]["owner_running"] is False
    assert rows["machine"]["pending"]["spans"] == 0 and rows["machine"]["pending"]["metrics"] == 1  # shutdown's
    assert rows["m1-worker-1"]["dropped"] == worker.dropped
    assert sorted(os.listdir(state / "telemetry")) == files


def test_records_the_collector_accepted_are_not_shown(tmp_path):
    state = tmp_path / "state"
    machine = _machine_telemetry(state)
    try:
        (chunk,) = [c for c in machine.buffer.read(Kind.SPAN, 1000) if c.count == 2]  # job-0 and job-2
        machine.buffer.ack([(chunk.id, 1)])  # the shipper sent job-0's span, part of its chunk
        doc = _json("--state-dir", str(state), "--spans", "10")
    finally:
        machine.shutdown(timeout=5)
    assert doc["buffers"][0]["pending"]["spans"] == 2
    assert [s["attributes"]["job.id"] for s in doc["spans"]] == ["job-1", "job-2"]


def test_a_corrupt_locked_or_missing_buffer_gets_one_line_and_the_others_still_show(tmp_path):
    state = tmp_path / "state"
    machine = _machine_telemetry(state)
    machine.shutdown(timeout=5)
    folder = state / "telemetry"
    (folder / "junk.db").write_bytes(os.urandom(4096))
    other = sqlite3.connect(folder / "other.db")  # an SQLite file, but no buffer
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    # A buffer held by a process that locks readers out (exclusive locking mode on a WAL file).
    held = setup(TelemetryConfig(), machine_id="m1", worker_id="m1-worker-9", service_type="simulation",
                 buffer_path=folder / "m1-worker-9.db", stream=io.StringIO(), start_shipper=False)
    held.shutdown(timeout=5)
    blocker = sqlite3.connect(folder / "m1-worker-9.db", isolation_level=None)
    blocker.execute("PRAGMA locking_mode=EXCLUSIVE")
    blocker.execute("BEGIN EXCLUSIVE")
    blocker.execute("INSERT INTO counters(name, value) VALUES ('x', 1)")
    try:
        out = _cli("--state-dir", str(state))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    assert set(lines) == {"junk", "machine", "m1-worker-9", "other"}
    assert lines["junk"].endswith(f"{folder / 'junk.db'}: not readable as a telemetry buffer (file is not a database)")
    assert lines["other"].endswith("not readable as a telemetry buffer (no such table: chunks)")
    assert lines["m1-worker-9"].endswith("not readable as a telemetry buffer (database is locked)")
    assert lines["machine"].split()[:5] == ["machine", "stopped", "3", "4", "2"]

    doc = json.loads(_cli("--state-dir", str(state), "--json").stdout)
    assert {b["process"]: set(b) for b in doc["buffers"]}["junk"] == {"process", "path", "error"}

    shown = _cli("--state-dir", str(state), "--logs", "1")
    assert shown.returncode == 1 and "job.completed" in shown.stdout
    assert "emp-machine: " + str(folder / "junk.db") in shown.stderr and "Traceback" not in shown.stderr

    missing = _cli("--state-dir", str(state), "--process", "m1-worker-7")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip().startswith("emp-machine: no telemetry buffer for process 'm1-worker-7' in ")
    assert len(missing.stderr.strip().splitlines()) == 1 and "buffers: junk, m1-worker-9, machine" in missing.stderr
    empty = _cli("--state-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 1 and "no telemetry buffers in" in empty.stderr and "Traceback" not in empty.stderr


MACHINE = """
workers:
  sim:
    connector: simulation
    count: 1
    stop_grace: 2s
telemetry:
  buffer:
    max_size: 20MB
    segment_size: 10MB
"""


def test_a_running_machine_s_buffers_are_found_by_its_manifest_and_read_while_it_runs(machine_factory):
    machine = machine_factory(MACHINE)
    machine.wait_ready()
    wait_for(lambda: '"worker.spawned"' in machine.log_of("worker-0"), timeout=20, message="worker-0 up")

    def buffers():
        out = machine.cli("telemetry", "--json")
        assert out.returncode == 0, out.stderr
        return {b["process"]: b for b in json.loads(out.stdout)["buffers"]}

    rows = wait_for(lambda: (r := buffers()) and len(r) == 2 and all(b["pending"]["logs"] for b in r.values()) and r,
                    timeout=20, message="both buffers with committed log records")
    assert "machine" in rows
    for row in rows.values():  # the machine's 20 MB, shared by its two processes
        assert row["owner_running"] is True and row["limit_bytes"] == 10 * 10**6
    logs = machine.cli("telemetry", "--logs", "50")
    assert logs.returncode == 0 and "worker.spawned" in logs.stdout
    assert machine.process("worker-0").state == "RUNNING"
    assert "held by another process" not in machine.log_of("worker-0") + machine.tail(200)

    machine.signal(signal.SIGTERM)
    assert machine.wait_exit() == 0
    rows = buffers()  # stopped: the manifest's state dir, as `errors` reads a stopped machine's logs
    assert len(rows) == 2 and all(b["owner_running"] is False for b in rows.values())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

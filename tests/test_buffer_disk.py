"""The durable buffer when its disk fails it: a commit that fails (disk full), a file that cannot be opened at
start, a stored chunk whose bytes are damaged. Real SQLite; the disk is made to fail by SQLite itself (a
read-only connection, `max_page_count`) or by the kernel (RLIMIT_FSIZE in a child process)."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys

from emp_machine.telemetry.buffer import Buffer, Kind, Value
from emp_machine.telemetry.encode import Encoder
from emp_machine.telemetry.shipper import Shipper
from harness import wait_for
from otlp_receiver import OtlpReceiver


def _log(i: int, level: str = "INFO", body: str = "") -> tuple:
    severity = {"DEBUG": 5, "INFO": 9, "ERROR": 17}[level]
    return (i, severity, level, body or f"line {i}", {"i": i}, 0, 0, "")


def _logs(buffer: Buffer) -> list[tuple]:
    return [r for chunk in buffer.read(Kind.LOG, 10**9) for r in chunk.records[chunk.sent:]]


def _noisy(rng: random.Random) -> str:
    """300 characters that do not compress: chunks that take pages."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(300))


# -- a commit that fails ----------------------------------------------------------------------------------

FAILED_COMMIT_KILL_CHILD = """
import os, signal, sys
from pathlib import Path
from emp_machine.telemetry.buffer import Buffer, Kind, Value
buffer = Buffer(Path(sys.argv[1]))
buffer._db.execute("PRAGMA query_only = ON")  # SQLite refuses every write, as on a full disk
for i in range(30):
    buffer.append(Kind.LOG, Value.ERROR, (i, 17, "ERROR", f"line {i}", {"i": i}, 0, 0, ""))
print("flushed", buffer.flush(10), buffer.stats().queued, buffer.stats().dropped, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_failed_commit_keeps_its_stage_file_so_a_kill_after_it_loses_nothing(tmp_path):
    # A failed commit zeroed the stage file that still held its records (safe on disk) and counted them as
    # dropped (write_error): 3,000 ERROR records were thrown away on a full disk while older DEBUG ones stayed.
    child = subprocess.run([sys.executable, "-c", FAILED_COMMIT_KILL_CHILD, str(tmp_path / "b.db")],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert child.stdout.split() == ["flushed", "False", "30", "{}"]  # not committed, kept, nothing dropped
    assert "its 30 records are kept" in child.stderr
    buffer = Buffer(tmp_path / "b.db")  # moves in the stage file the failed commit left as it was
    try:
        assert [r[0] for r in _logs(buffer)] == list(range(30)) and buffer.stats().dropped == {}
    finally:
        buffer.close()


def test_a_full_disk_drops_less_valuable_stored_records_to_make_room_never_the_error_records(tmp_path, capfd):
    rng = random.Random(1)
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        for i in range(200):
            buffer.append(Kind.LOG, Value.DEBUG, _log(i, "DEBUG", _noisy(rng)))
            if i % 20 == 19:
                assert buffer.flush(10)  # ten chunks
        pages = buffer._db.execute("PRAGMA page_count").fetchone()[0]
        buffer._db.execute(f"PRAGMA max_page_count = {pages}")  # the file cannot grow: SQLITE_FULL
        for i in range(200, 300):
            buffer.append(Kind.LOG, Value.ERROR, _log(i, "ERROR", _noisy(rng)))
        assert buffer.flush(10)
        logs = _logs(buffer)
        assert sorted(r[0] for r in logs if r[2] == "ERROR") == list(range(200, 300))  # every error record kept
        kept_debug = sorted(r[0] for r in logs if r[2] == "DEBUG")
        dropped = buffer.stats().dropped
        assert set(dropped) == {"disk_full"} and dropped["disk_full"] + len(kept_debug) == 200  # counted exactly
        assert kept_debug == list(range(200 - len(kept_debug), 200))  # the oldest went first
        assert 0 < dropped["disk_full"] < 200 and drops == [("disk_full", dropped["disk_full"])]
        assert "the disk is full" in capfd.readouterr().err
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db")
    try:
        assert reopened.stats().dropped == dropped and reopened.pending() == 300 - dropped["disk_full"]
    finally:
        reopened.close()


def test_past_the_retry_limit_the_least_valuable_go_counted_and_reported_once_saved(tmp_path):
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", retry_limit=100, on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        buffer._db.execute("PRAGMA query_only = ON")
        for i in range(80):
            buffer.append(Kind.LOG, Value.DEBUG, _log(i, "DEBUG"))
        assert not buffer.flush(10)  # 80 kept
        for i in range(80, 160):
            buffer.append(Kind.LOG, Value.ERROR, _log(i, "ERROR"))
        assert not buffer.flush(10)  # 160 waiting, 60 too many: the 60 oldest debug records go
        stats = buffer.stats()
        assert stats.queued == 100 and stats.dropped == {"write_error": 60}
        assert drops == []  # a report now would be a record that cannot be written either: made once saved
        buffer._db.execute("PRAGMA query_only = OFF")
        assert buffer.flush(10)
        logs = _logs(buffer)
        assert sorted(r[0] for r in logs) == list(range(60, 160))  # every error record, the newest debug ones
        assert drops == [("write_error", 60)] and buffer.stats().dropped == {"write_error": 60}
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db")  # the count was saved with the commit
    try:
        assert reopened.stats().dropped == {"write_error": 60} and reopened.pending() == 100
    finally:
        reopened.close()


def test_the_drop_event_reports_the_whole_count_once_writing_works_again(tmp_path):
    import io

    from emp_machine.telemetry import TelemetryConfig, setup

    config = TelemetryConfig().model_copy(update={"log_level": "debug"})
    telemetry = setup(config, machine_id="m1", service_type="machine", buffer_path=tmp_path / "b.db",
                      stream=io.StringIO(), start_shipper=False)
    try:
        buffer = telemetry.buffer
        buffer.retry_limit = 400
        buffer._db.execute("PRAGMA query_only = ON")
        log = telemetry.logger("t")
        for i in range(300):
            log.debug(f"debug {i}")
        for i in range(300):
            log.error(f"error {i}")
        assert not telemetry.flush(10)
        lost = buffer.stats().dropped["write_error"]
        assert 200 <= lost < 300  # debug records only
        buffer._db.execute("PRAGMA query_only = OFF")
        assert telemetry.flush(10)

        def drop_events():
            telemetry.flush(10)
            return [r[4] for r in _logs(buffer) if r[7] == "telemetry.records_dropped"]
        (event,) = wait_for(drop_events, 10, message="the telemetry.records_dropped event")
        assert event["reason"] == "write_error" and event["count"] == lost  # not 1 (the audit's) for 3001
        logs = _logs(buffer)
        assert [r[3] for r in logs if r[3].startswith("error ")] == [f"error {i}" for i in range(300)]
        assert [r[3] for r in logs if r[3].startswith("debug ")] == [f"debug {i}" for i in range(lost, 300)]
    finally:
        telemetry.shutdown(5)


# -- a file that cannot be opened at start ----------------------------------------------------------------

FULL_AT_START_CHILD = """
import io, resource, signal, sys, time
from pathlib import Path
from emp_machine.telemetry import TelemetryConfig, setup
from emp_machine.telemetry.buffer import Kind
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # no file may grow: SQLite cannot even write its header
out = io.StringIO()
telemetry = setup(TelemetryConfig(), machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                  buffer_path=Path(sys.argv[1]), stream=out, start_shipper=False)
print("started", telemetry.buffer.open_error is not None, flush=True)
log = telemetry.logger("t")
for i in range(20):
    log.error(f"line {i}")
print("kept", telemetry.buffer.stats().queued, telemetry.buffer.stats().dropped, flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again
deadline = time.monotonic() + 30
while telemetry.buffer.open_error is not None and time.monotonic() < deadline:
    time.sleep(0.02)  # the writer opens the file by itself, without a flush: polling with a deadline
print("opened", telemetry.buffer.open_error is None, flush=True)
print("flushed", telemetry.flush(10), flush=True)
telemetry.shutdown(5)
print("events", sum('"telemetry.buffer_unavailable"' in line for line in out.getvalue().splitlines()), flush=True)
"""


def test_a_buffer_that_cannot_be_opened_at_start_does_not_stop_the_process_and_opens_later(tmp_path):
    # setup() raised (OperationalError, database or disk is full) on a full disk: a worker restarted then
    # crash-looped and ran no job.
    child = subprocess.run([sys.executable, "-c", FULL_AT_START_CHILD, str(tmp_path / "b.db")],
                           capture_output=True, text=True, timeout=90)
    assert child.returncode == 0, child.stdout + child.stderr
    lines = child.stdout.splitlines()
    assert lines[0] == "started True"
    assert lines[1] == "kept 21 {}"  # 20 lines and the buffer_unavailable event, in memory
    assert lines[2:] == ["opened True", "flushed True", "events 1"]  # said once
    assert child.stderr.count("cannot be opened") == 1
    buffer = Buffer(tmp_path / "b.db")
    try:
        logs = _logs(buffer)
        assert [r[3] for r in logs if r[3].startswith("line ")] == [f"line {i}" for i in range(20)]
        assert [r[7] for r in logs if r[7] == "telemetry.buffer_unavailable"] == ["telemetry.buffer_unavailable"]
    finally:
        buffer.close()


# -- a damaged chunk ----------------------------------------------------------------------------------------

def _three_chunks_the_middle_one_damaged(path) -> None:
    buffer = Buffer(path)
    for batch in range(3):
        for i in range(100):
            buffer.append(Kind.LOG, Value.NORMAL, _log(batch * 100 + i))
        assert buffer.flush(10)
    buffer.close()
    db = sqlite3.connect(path)
    ids = [row[0] for row in db.execute("SELECT id FROM chunks WHERE kind = ? ORDER BY id", (Kind.LOG,))]
    assert len(ids) == 3
    db.execute("UPDATE chunks SET data = zeroblob(40) WHERE id = ?", (ids[1],))  # SQLite has no page checksums
    db.commit()
    db.close()


def test_a_chunk_that_does_not_decode_is_dropped_as_corrupt_and_the_others_are_read(tmp_path, capfd):
    # One damaged chunk made every read of its kind raise (zlib.error): nothing of that signal shipped until
    # the chunk expired, and nothing was counted.
    _three_chunks_the_middle_one_damaged(tmp_path / "b.db")
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        assert [r[0] for r in _logs(buffer)] == list(range(100)) + list(range(200, 300))
        assert buffer.stats().dropped == {"corrupt": 100} and drops == [("corrupt", 100)]
        assert buffer.pending(Kind.LOG) == 200
        assert "do not decode" in capfd.readouterr().err
        assert [r[0] for r in _logs(buffer)] == list(range(100)) + list(range(200, 300))  # and again: gone
        assert buffer.stats().dropped == {"corrupt": 100}
    finally:
        buffer.close()


def test_one_damaged_chunk_does_not_stop_its_signal_from_shipping(tmp_path):
    _three_chunks_the_middle_one_damaged(tmp_path / "b.db")
    buffer = Buffer(tmp_path / "b.db")
    receiver = OtlpReceiver().start()
    shipper = Shipper(buffer, Encoder({"service.name": "test", "machine.id": "m1"}), receiver.endpoint,
                      interval=0.05, poll=0.01, base_backoff=0.05, max_backoff=0.2).start()
    try:
        assert receiver.wait_for(lambda r: len(r.logs()) >= 200, timeout=15)
        shipper.stop(drain_timeout=5)
        assert sorted(int(r.body.string_value.split()[1]) for r in receiver.logs()) == \
            list(range(100)) + list(range(200, 300))
        assert buffer.pending() == 0 and buffer.stats().dropped == {"corrupt": 100}
        assert not shipper.stats.last_error
    finally:
        shipper.stop()
        receiver.stop()
        buffer.close()


def test_a_full_disk_makes_room_from_stored_debug_records_before_stored_error_ones(tmp_path):
    # Stored error chunks first, then debug ones, then the disk fills: the room comes from the debug chunks,
    # whatever their age (mutation audit M5: the order between classes was never exercised, and a query
    # taking the most valuable first passed).
    rng = random.Random(1)
    buffer = Buffer(tmp_path / "b.db")
    try:
        for i in range(300):
            buffer.append(Kind.LOG, Value.ERROR if i < 100 else Value.DEBUG,
                          _log(i, "ERROR" if i < 100 else "DEBUG", _noisy(rng)))
            if i % 20 == 19:
                assert buffer.flush(10)
        pages = buffer._db.execute("PRAGMA page_count").fetchone()[0]
        buffer._db.execute(f"PRAGMA max_page_count = {pages}")  # the file cannot grow: SQLITE_FULL
        for i in range(300, 400):
            buffer.append(Kind.LOG, Value.ERROR, _log(i, "ERROR", _noisy(rng)))
        assert buffer.flush(10)
        errors = sorted(r[0] for r in _logs(buffer) if r[2] == "ERROR")
        assert errors == [*range(100), *range(300, 400)]  # every stored and new error record kept
        assert set(buffer.stats().dropped) == {"disk_full"}
    finally:
        buffer.close()

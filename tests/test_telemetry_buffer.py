"""The durable buffer on real SQLite: persistence, limits and drop order, retention, dead letters, state."""

from __future__ import annotations

import marshal
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib

import pytest

from emp_machine.telemetry.buffer import Buffer, BufferInUse, Chunk, Kind, Value, _read_frames


def _log(i: int, body: str = "") -> tuple:
    return (i, 9, "INFO", body or f"line {i}", {"i": i}, 0, 0, "")


def _all_logs(buffer: Buffer) -> list[tuple]:
    return [r for chunk in buffer.read(Kind.LOG, 10**9) for r in chunk.records[chunk.sent:]]


def _one_chunk_of_ten(buffer: Buffer) -> Chunk:
    """Ten log records appended, committed and read back as the one chunk they make."""
    for i in range(10):
        buffer.append(Kind.LOG, Value.NORMAL, _log(i))
    buffer.flush()
    (chunk,) = buffer.read(Kind.LOG, 100)
    return chunk


def test_records_survive_close_and_reopen(tmp_path):
    buffer = Buffer(tmp_path / "b.db")
    for i in range(2500):
        buffer.append(Kind.LOG, Value.NORMAL, _log(i))
    buffer.close()
    reopened = Buffer(tmp_path / "b.db")
    try:
        assert [r[0] for r in _all_logs(reopened)] == list(range(2500))
        assert reopened.pending() == reopened.pending(Kind.LOG) == 2500
        assert max(c.count for c in reopened.read(Kind.LOG, 10**9)) <= 1000
    finally:
        reopened.close()


def test_a_second_owner_is_refused(tmp_path):
    buffer = Buffer(tmp_path / "b.db")
    try:
        with pytest.raises(BufferInUse):
            Buffer(tmp_path / "b.db")
    finally:
        buffer.close()


def test_partial_ack_then_full_ack(tmp_path):
    buffer = Buffer(tmp_path / "b.db")
    try:
        chunk = _one_chunk_of_ten(buffer)
        buffer.ack([(chunk.id, 4)])
        assert buffer.pending() == 6
        assert [r[0] for r in _all_logs(buffer)] == list(range(4, 10))
        buffer.ack([(chunk.id, 10)])
        assert buffer.pending() == 0 and buffer.read(Kind.LOG, 100) == []
        assert buffer.stats().acked_total == 10
    finally:
        buffer.close()


def test_full_buffer_drops_least_valuable_first_and_counts_it(tmp_path):
    drops: list[tuple[str, int]] = []
    # ~21 KB per compressed chunk of 100 records: three chunks pass the 50 KB cap, two do not
    buffer = Buffer(tmp_path / "b.db", max_size=50_000, segment_size=30_000, on_drop=lambda r, n: drops.append((r, n)))
    rng = random.Random(1)
    noise = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(300))  # noqa: E731
    try:
        for value in (Value.ERROR, Value.NORMAL, Value.DEBUG):
            for i in range(100):
                buffer.append(Kind.LOG, value, _log(int(value) * 1000 + i, noise()))
            buffer.flush()
        # Over the cap now: debug goes first, then normal; errors stay while anything else remains.
        stats = buffer.stats()
        assert stats.stored_bytes <= 50_000
        assert {r[0] // 1000 for r in _all_logs(buffer)} == {Value.NORMAL, Value.ERROR}
        assert stats.dropped["buffer_full"] == sum(n for r, n in drops if r == "buffer_full") > 0
        assert stats.dropped["buffer_full"] + stats.stored_records == 300
        # More errors than fit: the oldest errors go, and only errors are left.
        for _ in range(3):
            for i in range(100):
                buffer.append(Kind.LOG, Value.ERROR, _log(4000 + i, noise()))
            buffer.flush()
        assert {r[0] // 1000 for r in _all_logs(buffer)} == {4}
        assert buffer.stats().stored_bytes <= 50_000
    finally:
        buffer.close()
    # drop counts persist across restarts
    reopened = Buffer(tmp_path / "b.db", max_size=50_000, segment_size=30_000)
    assert reopened.stats().dropped["buffer_full"] == buffer.stats().dropped["buffer_full"]
    reopened.close()


def test_retention_expires_old_chunks_as_counted_drops(tmp_path):
    now = [1000.0]
    buffer = Buffer(tmp_path / "b.db", retention=60, clock=lambda: now[0], monotonic=lambda: now[0])
    try:
        for i in range(5):
            buffer.append(Kind.LOG, Value.ERROR, _log(i))
        buffer.flush()
        now[0] += 61
        for i in range(5, 8):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
        buffer.flush()
        assert [r[0] for r in _all_logs(buffer)] == [5, 6, 7]
        assert buffer.stats().dropped == {"expired": 5}
    finally:
        buffer.close()


def test_dead_letters_are_kept_and_counted(tmp_path):
    buffer = Buffer(tmp_path / "b.db")
    try:
        for i in range(3):
            buffer.append(Kind.SPAN, Value.ROUTINE, (i,))
        buffer.flush()
        (chunk,) = buffer.read(Kind.SPAN, 10)
        buffer.dead_letter(Kind.SPAN, chunk.records, [(chunk.id, chunk.count)], "HTTP 400")
        assert buffer.pending() == 0
        assert buffer.dead_letters() == [(Kind.SPAN, 3, "HTTP 400", [(0,), (1,), (2,)])]
        assert buffer.stats().dead_letter_records == 3
    finally:
        buffer.close()


def test_state_commits_with_its_records(tmp_path):
    buffer = Buffer(tmp_path / "b.db")
    buffer.append_with_state([(Kind.LOG, Value.NORMAL, _log(1)), (Kind.LOG, Value.NORMAL, _log(2))], "off:x", "42")
    buffer.close()
    reopened = Buffer(tmp_path / "b.db")
    try:
        assert reopened.state("off:x") == "42"
        assert [r[0] for r in _all_logs(reopened)] == [1, 2]
    finally:
        reopened.close()


def test_unmarshalable_attributes_are_stored_as_text(tmp_path):
    buffer = Buffer(tmp_path / "b.db")
    try:
        buffer.append(Kind.LOG, Value.NORMAL, (1, 9, "INFO", "x", {"path": tmp_path, "n": 1}, 0, 0, ""))
        buffer.flush()
        (record,) = _all_logs(buffer)
        assert record[4] == {"path": repr(tmp_path), "n": 1}
    finally:
        buffer.close()


def test_file_stays_near_live_data(tmp_path):
    """Segments: after segment_size bytes written the WAL is checkpointed and freed pages released."""
    buffer = Buffer(tmp_path / "b.db", max_size=400_000, segment_size=100_000)
    try:
        for round_ in range(6):
            for i in range(400):
                buffer.append(Kind.LOG, Value.NORMAL, _log(i, os.urandom(200).hex()))
            buffer.flush()
            for chunk in buffer.read(Kind.LOG, 10**9):
                buffer.ack([(chunk.id, chunk.count)])
        for i in range(400):  # one more round, to pass a checkpoint after the deletes
            buffer.append(Kind.LOG, Value.NORMAL, _log(i, os.urandom(200).hex()))
        buffer.flush()
        on_disk = sum(p.stat().st_size for p in tmp_path.iterdir()
                      if p.name.startswith("b.db") and ".stage." not in p.name)
        assert buffer.stats().written_total == 2800
        assert on_disk < 1_500_000  # 6 rounds of ~230 KB each would be ~1.4 MB plus WAL without reuse
        # Stage files are reused, not made anew: the current one and the standby.
        assert len(list(tmp_path.glob("b.db.stage.*"))) == 2
    finally:
        buffer.close()


# -- stage files: every record is durable at append, between SQLite commits ------------------------------

STAGING_CHILD = """
import sys, time
from pathlib import Path
from emp_machine.telemetry.buffer import Buffer, Kind, Value
buffer = Buffer(Path(sys.argv[1]), commit_interval=3600)  # no commit by itself: the records are in the stage file
for i in range(int(sys.argv[2])):
    buffer.append(Kind.LOG, Value.NORMAL, (i, 9, "INFO", f"line {i}", {"i": i}, 0, 0, ""))
buffer.append_with_state([(Kind.LOG, Value.NORMAL, (-1, 9, "INFO", "with state", {}, 0, 0, ""))], "offset", "42")
print("appended", buffer.pending(), buffer.passes, flush=True)  # no writer pass: nothing in SQLite yet
time.sleep(60)
"""


def test_records_appended_before_a_sigkill_are_in_the_buffer_after_it(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", STAGING_CHILD, str(tmp_path / "b.db"), "300"],
                             stdout=subprocess.PIPE, text=True)
    try:
        # Killed right after the last append returned: no writer pass, no commit in between.
        assert child.stdout.readline().split() == ["appended", "0", "0"]
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    assert sorted(p.name for p in tmp_path.glob("b.db.stage.*")) == ["b.db.stage.1", "b.db.stage.2"]  # + standby
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert sorted(r[0] for r in _all_logs(buffer)) == list(range(-1, 300))
        assert buffer.state("offset") == "42"
        assert sorted(p.name for p in tmp_path.glob("b.db.stage.*")) == ["b.db.stage.3", "b.db.stage.4"]  # its own
    finally:
        buffer.close()
    again = Buffer(tmp_path / "b.db")  # moved once: opening again adds nothing
    try:
        assert again.pending() == 301
    finally:
        again.close()


def _frames(data: bytes) -> bytes:
    """The frames of a stage file's bytes, without the zeroed rest."""
    at = 0
    while at + 8 <= len(data) and data[at:at + 8] != bytes(8):
        at += 8 + struct.unpack_from("<I", data, at)[0]
    return data[:at]


def _staged_file(tmp_path, records: range) -> bytes:
    """The frames of a stage file holding `records` (a buffer that never commits by itself)."""
    buffer = Buffer(tmp_path / "src.db", commit_interval=3600)
    try:
        for i in records:
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
        return _frames((tmp_path / "src.db.stage.1").read_bytes())  # durable at append: no wait
    finally:
        buffer.close()


def test_a_stage_file_already_moved_is_not_moved_twice(tmp_path):
    # Killed between the SQLite commit and reusing the stage file: the file's number is in SQLite.
    data = _staged_file(tmp_path, range(50))
    buffer = Buffer(tmp_path / "b.db", commit_interval=3600)
    for i in range(50):
        buffer.append(Kind.LOG, Value.NORMAL, _log(i))
    buffer.close()  # the flush commits stage file 1; close removes the empty current file and the standby
    assert list(tmp_path.glob("b.db.stage.*")) == []
    (tmp_path / "b.db.stage.1").write_bytes(data)  # as if the commit had been the last thing done
    reopened = Buffer(tmp_path / "b.db")
    try:
        assert reopened.pending() == 50
        assert not (tmp_path / "b.db.stage.1").exists()
    finally:
        reopened.close()


def test_a_torn_last_frame_keeps_the_frames_before_it(tmp_path, capfd):
    data = _staged_file(tmp_path, range(70))
    (tmp_path / "b.db.stage.7").write_bytes(data + data[:30])  # a last frame cut short by a kill
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert [r[0] for r in _all_logs(buffer)] == list(range(70))
        assert "torn frame" in capfd.readouterr().err
        buffer.append(Kind.LOG, Value.NORMAL, _log(70))
        buffer.flush()
        assert buffer.pending() == 71
        # Its own stage files are numbered after 7: 8 was committed by the flush and is the standby as 10.
        assert {p.name for p in tmp_path.glob("b.db.stage.*")} == {"b.db.stage.9", "b.db.stage.10"}
    finally:
        buffer.close()


def test_a_stage_file_of_the_earlier_format_is_moved_in(tmp_path):
    # Before records were staged one by one, a writer pass framed a batch: ((kind, value), records) groups
    # and the state values. A process of that version killed with frames staged leaves such a file.
    batch = ([((int(Kind.LOG), int(Value.NORMAL)), [_log(1), _log(2)])], {"offset": "9"})
    payload = marshal.dumps(batch)
    (tmp_path / "b.db.stage.2").write_bytes(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert [r[0] for r in _all_logs(buffer)] == [1, 2] and buffer.state("offset") == "9"
    finally:
        buffer.close()


def test_an_unreadable_stage_file_is_set_aside_and_the_buffer_still_opens(tmp_path, capfd):
    payload = b"not marshal data"  # a frame whose checksum is right but whose content cannot be read
    (tmp_path / "b.db.stage.3").write_bytes(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert buffer.pending() == 0
        assert (tmp_path / "b.db.stage.3.bad").exists() and not (tmp_path / "b.db.stage.3").exists()
        assert "could not be moved in" in capfd.readouterr().err
        buffer.append(Kind.LOG, Value.NORMAL, _log(1))
        buffer.flush()
        assert buffer.pending() == 1
    finally:
        buffer.close()


def _wait_committed(buffer: Buffer, at_least: int, timeout: float = 10) -> int:
    """Committed records once at least `at_least` are (polling under a deadline)."""
    deadline = time.monotonic() + timeout
    while buffer.pending() < at_least and time.monotonic() < deadline:
        time.sleep(0.005)
    return buffer.pending()


def _wait_pending(buffer: Buffer, count: int, timeout: float = 10) -> float:
    """Seconds until `count` records are committed (exactly that many)."""
    start = time.monotonic()
    assert _wait_committed(buffer, count, timeout) == count
    return time.monotonic() - start


def test_half_a_stage_file_is_committed_without_waiting_for_the_interval(tmp_path):
    # The record whose frame passes half the stage file wakes the writer, which commits what is queued when
    # it switches files: that record and those before it at least (records appended meanwhile may join).
    buffer = Buffer(tmp_path / "b.db", commit_interval=3600)
    try:
        body = "x" * 2000  # ~2 KB records: ~550 pass half a stage file (1 MiB), well short of a 1000-record batch
        framed, crossing = 0, None
        for i in range(600):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i, body))
            framed += 8 + len(marshal.dumps((Kind.LOG, Value.NORMAL, _log(i, body)), 4))
            if crossing is None and framed >= 1024 * 1024:
                crossing = i + 1
        assert crossing is not None and crossing < 1000
        assert crossing <= _wait_committed(buffer, crossing) <= 600
    finally:
        buffer.close()


def test_a_batch_of_1000_records_is_committed_without_waiting_for_the_interval(tmp_path):
    buffer = Buffer(tmp_path / "b.db", commit_interval=3600)
    try:
        for i in range(1000):  # small ones: a tenth of a stage file
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
        assert _wait_committed(buffer, 1000) == 1000
    finally:
        buffer.close()


# -- a kill leaves a prefix of what was appended: never a state value ahead of its records ---------------

ORDER_CHILD = """
import os, signal, sys
from pathlib import Path
from emp_machine.telemetry.buffer import Buffer, Kind, Value
buffer = Buffer(Path(sys.argv[1]), commit_interval=3600)  # commits only when the buffer itself must
appended = 0

def append(size):  # like the tailer: records (~10 KB each here) and the offset after them, in one frame
    global appended
    count = max(1, size // 10_000)
    body = "x" * (size // count - 8)  # each record its own text (marshal writes a shared object once)
    buffer.append_with_state([(Kind.LOG, Value.NORMAL, (appended + k, 9, "INFO", f"{appended + k:08d}{body}", {},
                                                        0, 0, "")) for k in range(count)], "offset", str(appended + count))
    appended += count

class AppendThenKill:  # the buffer's own connection, except that a frame comes while its commit runs, then a kill
    def __init__(self, db):
        self.db = db
    def executemany(self, sql, *args):
        if sql.startswith("INSERT INTO chunks"):
            append(1000)  # from another thread it would be the same: the writer holds no producer lock here
            os.kill(os.getpid(), signal.SIGKILL)
        return self.db.executemany(sql, *args)
    def __getattr__(self, name):
        return getattr(self.db, name)

case = sys.argv[2]
if case == "during_commit":
    buffer._db = AppendThenKill(buffer._db)
for size in {"larger_than_a_stage_file": [3 << 20, 1000],
             "past_the_room_left": [100_000] * 9 + [1_300_000, 1000],
             "during_commit": [100_000] * 9 + [1_300_000]}[case]:
    append(size)
if case == "during_commit":
    buffer.flush()
os.kill(os.getpid(), signal.SIGKILL)  # right after the appends returned (the writer may have committed some)
"""


@pytest.mark.parametrize("case", ["larger_than_a_stage_file", "past_the_room_left", "during_commit"])
def test_a_sigkill_after_a_frame_that_did_not_fit_leaves_no_state_ahead_of_its_records(tmp_path, case):
    # A tailer's backlog makes frames of 1 MiB reads, more than the room left in a stage file: such a frame is
    # held in memory. A later, small frame (the offset after it) staged before it is committed, in this
    # stage file or in the next one while the commit runs, made a kill replay the offset without the lines
    # before it: the restarted tailer resumed past them, lost for good.
    child = subprocess.run([sys.executable, "-c", ORDER_CHILD, str(tmp_path / "b.db"), case],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    buffer = Buffer(tmp_path / "b.db")
    try:
        offset = int(buffer.state("offset") or 0)
        assert sorted(r[0] for r in _all_logs(buffer)) == list(range(offset))  # a prefix: records and offset
        if case != "larger_than_a_stage_file":
            assert offset >= 90  # the frames staged before the one that did not fit are all there
    finally:
        buffer.close()


def test_a_frame_that_does_not_fit_is_committed_at_once_and_staging_resumes_after_it(tmp_path):
    buffer = Buffer(tmp_path / "b.db", commit_interval=3600)
    try:
        big = [(Kind.LOG, Value.NORMAL, _log(i, f"{i:08d}" + "x" * 10_000)) for i in range(300)]  # 3 MB, one frame
        buffer.append_with_state(big, "offset", "300")
        assert _wait_committed(buffer, 300) == 300  # in memory only: not left waiting for the interval
        assert buffer.state("offset") == "300"
        buffer.append(Kind.LOG, Value.NORMAL, _log(300))  # durable at append again: in the stage file
        assert _read_frames(buffer._stage_path(buffer._stage_seq))[0] == {(Kind.LOG, Value.NORMAL): [_log(300)]}
        assert buffer.flush(10) and sorted(r[0] for r in _all_logs(buffer)) == list(range(301))
    finally:
        buffer.close()


NO_STAGE_CHILD = """
import resource, signal, sys, time
from pathlib import Path
from emp_machine.telemetry.buffer import Buffer, Kind, Value
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))  # SQLite fits, a 2 MiB stage file does not
buffer = Buffer(Path(sys.argv[1]), commit_interval=3600, flush_interval=0.05)
for i in range(20):
    buffer.append(Kind.LOG, Value.NORMAL, (i, 9, "INFO", f"line {i}", {"i": i}, 0, 0, ""))
deadline = time.monotonic() + 10
while buffer.pending() < 20 and time.monotonic() < deadline:
    time.sleep(0.005)  # committed within flush_interval, though commit_interval is an hour
print("committed", buffer.pending(), flush=True)
buffer.close()
"""


def test_without_a_stage_file_records_are_committed_every_flush_interval(tmp_path):
    done = subprocess.run([sys.executable, "-c", NO_STAGE_CHILD, str(tmp_path / "b.db")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["committed", "20"]
    assert done.stderr.count("no stage file") == 1  # tried again after every commit, reported once
    assert list(tmp_path.glob("b.db.stage.*")) == []


# -- the idle writer: no wake-ups while nothing is queued ------------------------------------------------

def _wait_idle(buffer: Buffer) -> None:
    deadline = time.monotonic() + 10
    while not buffer._sleeping and time.monotonic() < deadline:
        time.sleep(0.005)  # polling the writer's state under a deadline
    assert buffer._sleeping, "the writer never went idle"


def test_an_idle_writer_sleeps_and_the_first_record_wakes_it(tmp_path):
    # idle_check: 30 s. The commit interval is long enough that the frame is read before any commit switches
    # files (the read follows the append by microseconds), short enough to tell it from idle_check.
    buffer = Buffer(tmp_path / "b.db", commit_interval=1.0)
    try:
        buffer.append(Kind.LOG, Value.NORMAL, _log(0))
        assert buffer.flush(5)
        _wait_idle(buffer)
        passes = buffer.passes
        time.sleep(0.3)  # an observation window, not a synchronisation
        assert buffer.passes == passes  # polling would have made passes
        buffer.append(Kind.LOG, Value.NORMAL, _log(1))
        # In the stage file when the append returns (survives a SIGKILL), and committed one interval later,
        # not at idle_check.
        assert _read_frames(buffer._stage_path(buffer._stage_seq))[0] == {(int(Kind.LOG), int(Value.NORMAL)): [_log(1)]}
        assert _wait_pending(buffer, 2) < 5
        assert sorted(r[0] for r in _all_logs(buffer)) == [0, 1]
    finally:
        buffer.close()


def test_a_flush_of_an_idle_writer_does_not_wait_out_the_commit_interval(tmp_path):
    buffer = Buffer(tmp_path / "b.db", commit_interval=30, idle_check=3600)  # a wait of either fails the test
    try:
        assert buffer.flush(5)
        _wait_idle(buffer)
        assert buffer.flush(5)  # an idle writer woken by a flush
        _wait_idle(buffer)
        buffer.append(Kind.LOG, Value.NORMAL, _log(7))  # a record wakes it, then a flush cuts the wait short
        assert buffer.flush(5) and [r[0] for r in _all_logs(buffer)] == [7]
    finally:
        buffer.close()


TELEMETRY_CHILD = """
import io, sys, time
from pathlib import Path
from emp_machine.telemetry import TelemetryConfig, setup
telemetry = setup(TelemetryConfig(), machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                  buffer_path=Path(sys.argv[1]), stream=io.StringIO(), start_shipper=False)
telemetry.buffer.commit_interval = 3600  # nothing reaches SQLite before the kill, however slow this machine is
log = telemetry.logger("emp.test")
with telemetry.tracer.start_as_current_span("service.call", attributes={"job.id": "job-1"}):
    log.info("step %d of \\u00e9t\\u00e9", 3, extra={"fields": {"model": "sdxl", "steps": [1, 2]}})
    telemetry.events.emit("job.completed", job_id="job-1", duration_ms=12)
print("appended", telemetry.buffer.pending(), flush=True)
time.sleep(60)
"""


def test_logs_events_and_spans_appended_before_a_sigkill_read_back_whole(tmp_path):
    # Log lines and events are framed from their JSON line, spans by marshal: both read back as the records.
    child = subprocess.Popen([sys.executable, "-c", TELEMETRY_CHILD, str(tmp_path / "b.db")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["appended", "0"]
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    buffer = Buffer(tmp_path / "b.db")
    try:
        logs = {r[3]: r for r in _all_logs(buffer)}
        spans = [r for c in buffer.read(Kind.SPAN, 100) for r in c.records]
    finally:
        buffer.close()
    (span,) = spans
    assert span[3] == "service.call" and span[7]["job.id"] == "job-1"
    line = logs["step 3 of \u00e9t\u00e9"]
    assert line[1:3] == (9, "INFO") and line[5:7] == (span[0], span[1])  # severity, level; trace and span ids
    assert line[4]["model"] == "sdxl" and line[4]["steps"] == [1, 2] and line[4]["worker_id"] == "m1-worker-0"
    event = logs["job.completed"]
    assert event[7] == "job.completed" and event[4]["duration_ms"] == 12 and event[4]["job_id"] == "job-1"


def test_a_commit_that_fails_keeps_its_records_and_the_flush_returns(tmp_path, capfd):
    # They used to be dropped (write_error), and their stage file zeroed. More in tests/test_buffer_disk.py.
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        buffer._db.execute("PRAGMA query_only = ON")  # SQLite refuses every write, as on a full disk
        for i in range(30):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
        started = time.monotonic()
        assert not buffer.flush(10)  # not committed: said at once, not by the timeout
        assert time.monotonic() - started < 5
        assert buffer.stats().dropped == {} and drops == [] and buffer.stats().queued == 30
        assert "its 30 records are kept" in capfd.readouterr().err
        buffer._db.execute("PRAGMA query_only = OFF")  # the disk has room again: all of them are committed
        for i in range(30, 40):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
        assert buffer.flush(10)
        assert [r[0] for r in _all_logs(buffer)] == list(range(40))
        assert buffer.stats().dropped == {} and buffer.stats().queued == 0
        assert len(list(tmp_path.glob("b.db.stage.*"))) == 2  # the failed commit's stage file is reused now
    finally:
        buffer.close()


def test_threads_appending_while_the_writer_switches_files_lose_and_repeat_nothing(tmp_path):
    import threading

    buffer = Buffer(tmp_path / "b.db", commit_interval=0.005)  # commits, and file switches, all the time
    first_seq = buffer._stage_seq
    appended = [0] * 4

    def produce(thread: int) -> None:
        # Append until the writer has switched stage files 8 times under the four producers.
        i, deadline = 0, time.monotonic() + 20
        while (buffer._stage_seq - first_seq < 8 or i < 500) and time.monotonic() < deadline:
            buffer.append(Kind.LOG, Value.NORMAL, _log(thread * 10**6 + i, "y" * 300 if i % 3 == 0 else ""))
            i += 1
        appended[thread] = i

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert buffer._stage_seq - first_seq >= 8
        assert buffer.flush(30)
        expected = [t * 10**6 + i for t in range(4) for i in range(appended[t])]
        assert sorted(r[0] for r in _all_logs(buffer)) == expected
    finally:
        buffer.close()


def test_a_forked_child_does_not_write_into_the_parents_stage_file(tmp_path):
    buffer = Buffer(tmp_path / "b.db", commit_interval=3600)
    try:
        buffer.append(Kind.LOG, Value.NORMAL, _log(1))
        pid = os.fork()
        if pid == 0:  # the child (multiprocessing's fork start method does this): its records only queue
            try:
                buffer.append(Kind.LOG, Value.NORMAL, _log(2))
                os._exit(0 if buffer._pos == 0 and len(buffer._queue) == 2 else 1)
            except BaseException:
                os._exit(2)
        assert os.waitpid(pid, 0)[1] == 0
        buffer.append(Kind.LOG, Value.NORMAL, _log(3))
        groups, _ = _read_frames(buffer._stage_path(buffer._stage_seq))
        assert [r[0] for r in groups[(Kind.LOG, Value.NORMAL)]] == [1, 3]
    finally:
        buffer.close()


def test_without_posix_fallocate_the_stage_file_is_sparse_and_works(tmp_path, monkeypatch):
    # macOS has no os.posix_fallocate: the stage file is made with ftruncate instead.
    from emp_machine.telemetry import buffer as buffer_module

    monkeypatch.setattr(buffer_module, "_fallocate", None)
    buffer = Buffer(tmp_path / "b.db", commit_interval=3600)
    try:
        buffer.append(Kind.LOG, Value.NORMAL, _log(1))
        assert _read_frames(buffer._stage_path(buffer._stage_seq))[0] == {(Kind.LOG, Value.NORMAL): [_log(1)]}
        assert buffer.flush(5) and [r[0] for r in _all_logs(buffer)] == [1]
    finally:
        buffer.close()


# --- a damaged buffer file or stage file: set aside, counted, and the buffer still works ----------------------


def _damaged_db(tmp_path, damage: str) -> bytes:
    """b.db written by a real buffer (records in it), then damaged as `damage` says; returns its bytes."""
    buffer = Buffer(tmp_path / "b.db")
    for i in range(3000):
        buffer.append(Kind.LOG, Value.NORMAL, _log(i, "x" * (i % 50)))
    buffer.close()
    data = (tmp_path / "b.db").read_bytes()
    assert len(data) > 16 * 4096 and not (tmp_path / "b.db-wal").exists()
    data = {"truncated": data[:len(data) // 2], "zeroed_header": bytes(100) + data[100:],
            "text_file": b"hello, not a database\n" * 40}[damage]
    (tmp_path / "b.db").write_bytes(data)
    return data


@pytest.mark.parametrize("damage", ["truncated", "zeroed_header", "text_file"])
def test_a_corrupt_buffer_file_is_set_aside_and_a_new_one_takes_and_drains_records(tmp_path, capfd, damage):
    data = _damaged_db(tmp_path, damage)
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        (aside,) = tmp_path.glob("b.db.corrupt-*")  # kept for inspection, as it was, with no -wal/-shm made
        assert aside.read_bytes() == data and aside.name.startswith("b.db.corrupt-20")
        err = capfd.readouterr().err
        assert "b.db is corrupt" in err and aside.name in err and "cannot be read" in err
        # How many records it held cannot be read: the drop shows, as one, under its own reason.
        assert buffer.stats().dropped == {"corrupt_buffer": 1} and drops == [("corrupt_buffer", 1)]
        assert buffer.pending() == 0
        for i in range(20):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
        assert buffer.flush(10)
        chunks = buffer.read(Kind.LOG, 100)
        assert [r[0] for c in chunks for r in c.records] == list(range(20))
        buffer.ack([(c.id, c.count) for c in chunks])
        assert buffer.pending() == 0 and buffer.stats().acked_total == 20
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db")  # the new file is a good one; the count was saved in it
    try:
        assert reopened.stats().dropped == {"corrupt_buffer": 1}
        assert len(list(tmp_path.glob("b.db.corrupt-*"))) == 1
    finally:
        reopened.close()


def test_a_corrupt_buffer_file_under_telemetry_reports_a_records_dropped_event(tmp_path, capfd):
    import io

    from emp_machine.telemetry import TelemetryConfig, setup

    (tmp_path / "w.db").write_bytes(b"garbage, not sqlite" * 100)
    telemetry = setup(TelemetryConfig(), machine_id="m1", worker_id="m1-worker-0", service_type="simulation",
                      buffer_path=tmp_path / "w.db", stream=io.StringIO())
    try:
        deadline = time.monotonic() + 15
        events: list = []
        while not events:  # the housekeeping thread reports drops as events, once a second
            assert time.monotonic() < deadline, "no telemetry.records_dropped event"
            assert telemetry.buffer.flush(5)
            events = [r for r in _all_logs(telemetry.buffer) if r[7] == "telemetry.records_dropped"]
        assert events[0][4]["reason"] == "corrupt_buffer" and events[0][4]["count"] == 1
        assert len(list(tmp_path.glob("w.db.corrupt-*"))) == 1
    finally:
        telemetry.shutdown(5)


def _frame_offsets(data: bytes) -> list[int]:
    at, offsets = 0, []
    while at + 8 <= len(data) and data[at:at + 8] != bytes(8):
        offsets.append(at)
        at += 8 + struct.unpack_from("<I", data, at)[0]
    return offsets


def test_a_damaged_payload_in_a_stage_file_loses_only_its_own_record_counted_as_corrupt(tmp_path, capfd):
    data = bytearray(_staged_file(tmp_path, range(100)))
    at = _frame_offsets(bytes(data))[50]
    length = struct.unpack_from("<I", data, at)[0]
    data[at + 8:at + 8 + length] = b"\xff" * length
    (tmp_path / "b.db.stage.5").write_bytes(bytes(data) + bytes(4096))  # and the zeroed rest, as a real one
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        assert [r[0] for r in _all_logs(buffer)] == [i for i in range(100) if i != 50]
        assert buffer.stats().dropped == {"corrupt": 1} and drops == [("corrupt", 1)]
        err = capfd.readouterr().err
        assert f"a damaged payload at byte {at}" in err and "the 99 readable ones were" in err
        assert (tmp_path / "b.db.stage.5.bad").exists() and not (tmp_path / "b.db.stage.5").exists()
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db", on_drop=lambda reason, n: drops.append((reason, n)))
    try:  # counted once, in the transaction that moved the frames in; nothing moved twice
        assert reopened.pending() == 99 and reopened.stats().dropped == {"corrupt": 1}
        assert drops == [("corrupt", 1)]
    finally:
        reopened.close()


@pytest.mark.parametrize("damage", ["tag", "length_past_the_end", "length_short", "zeroed"])
def test_a_damaged_frame_header_in_a_stage_file_is_skipped_and_reading_resumes(tmp_path, capfd, damage):
    data = bytearray(_staged_file(tmp_path, range(100)))
    at = _frame_offsets(bytes(data))[50]
    length, tag = struct.unpack_from("<II", data, at)
    header = {"tag": (length, 0x12345678), "length_past_the_end": (10**8, tag), "length_short": (3, tag),
              "zeroed": (0, 0)}[damage]
    struct.pack_into("<II", data, at, *header)
    (tmp_path / "b.db.stage.5").write_bytes(bytes(data) + bytes(4096))
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert [r[0] for r in _all_logs(buffer)] == [i for i in range(100) if i != 50]
        assert buffer.stats().dropped == {"corrupt": 1}
        assert f"header at byte {at}, read on from byte {at + 8 + length}" in capfd.readouterr().err
        assert (tmp_path / "b.db.stage.5.bad").exists()
    finally:
        buffer.close()


def test_a_torn_last_frame_is_counted_as_corrupt_and_not_kept(tmp_path, capfd):
    data = _staged_file(tmp_path, range(10))
    (tmp_path / "b.db.stage.4").write_bytes(data + data[:30])
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert buffer.pending() == 10 and buffer.stats().dropped == {"corrupt": 1}
        assert "a torn frame at byte" in capfd.readouterr().err
        assert not list(tmp_path.glob("b.db.stage.4*"))  # nothing but a cut-short end to look at
    finally:
        buffer.close()


def test_damaged_stage_files_are_kept_only_for_the_retention_and_a_few_at_most(tmp_path):
    now = time.time()
    for n, age in enumerate([10, 20, 30, 40, 50, 60, 7200]):  # seconds ago; the last one past the retention
        bad = tmp_path / f"b.db.stage.{n + 1}.bad"
        bad.write_bytes(b"damaged")
        os.utime(bad, (now - age, now - age))
    buffer = Buffer(tmp_path / "b.db", retention=3600)
    try:
        assert sorted(p.name for p in tmp_path.glob("b.db.stage.*.bad")) == [
            "b.db.stage.1.bad", "b.db.stage.2.bad", "b.db.stage.3.bad", "b.db.stage.4.bad"]  # the newest 4
    finally:
        buffer.close()


# -- records in flight, transactions that belong together, a failed statement ------------------------------


def _noisy(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(300))


def _span(i: int, noise: str) -> tuple:
    return (1 + i, 1 + i, 0, "s", 1, 0, 1, {"i": i, "n": noise}, 0, "", None, "", 0)


def _over_the_cap_with_a_span_chunk_in_flight(tmp_path, drops: list) -> tuple[Buffer, Chunk, random.Random]:
    """A buffer (50 KB cap, ~21 KB a chunk of 100 records) whose one span chunk (routine) the shipper has read
    and is sending; `_push_errors_over_the_cap` then drops it while its request is in flight."""
    rng = random.Random(1)
    buffer = Buffer(tmp_path / "b.db", max_size=50_000, on_drop=lambda r, n: drops.append((r, n)))
    for i in range(100):
        buffer.append(Kind.SPAN, Value.ROUTINE, _span(i, _noisy(rng)))
    buffer.flush()
    (chunk,) = buffer.read(Kind.SPAN, 1000)  # handed to the shipper: its request is in flight from here
    return buffer, chunk, rng


def _push_errors_over_the_cap(buffer: Buffer, rng: random.Random) -> None:
    for round_ in range(2):
        for i in range(100):
            buffer.append(Kind.LOG, Value.ERROR, (round_ * 100 + i, 17, "ERROR", _noisy(rng), {}, 0, 0, ""))
        buffer.flush()


def _accounted(buffer: Buffer) -> None:
    """Every record written is acked, stored, dropped (counted) or a pending drop (its fate not known yet)."""
    stats = buffer.stats()
    assert stats.written_total == (stats.acked_total + stats.stored_records + sum(stats.dropped.values())
                                   + stats.dropped_pending)


def test_a_chunk_dropped_while_its_request_is_in_flight_is_not_counted_as_lost_when_the_ack_comes(tmp_path):
    # The drop counts are exported as a counter (telemetry_records_dropped_total): they must never go down,
    # which they did when the drop was counted at once and the ack took it back.
    drops: list[tuple[str, int]] = []
    buffer, chunk, rng = _over_the_cap_with_a_span_chunk_in_flight(tmp_path, drops)
    try:
        buffer.ack([(chunk.id, 40)])  # a first request took 40 of its records
        before = buffer.stats().dropped
        _push_errors_over_the_cap(buffer, rng)
        during = buffer.stats()
        assert buffer.pending(Kind.SPAN) == 0 and during.stored_records == 200  # dropped: the space is free...
        assert during.dropped == before == {} and during.dropped_pending == 60  # ... its fate not known yet
        _accounted(buffer)
        buffer.ack([(chunk.id, 100)])  # ... and then the collector accepted the rest of them
        stats = buffer.stats()
        assert stats.dropped == {} and drops == []  # nothing was lost, nothing is reported lost
        assert stats.acked_total == 100 and stats.stored_records == 200 and stats.dropped_pending == 0
        _accounted(buffer)
        buffer.read(Kind.SPAN, 1000)  # the shipper's next batch: nothing left to report of the last one
        assert drops == [] and buffer.stats().dropped == {}
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db", max_size=50_000)  # the ack took them off the saved pending drops
    try:
        assert reopened.stats().dropped == {} and reopened.pending() == 200
    finally:
        reopened.close()


def test_a_chunk_dropped_while_in_flight_counts_what_no_ack_delivered_and_reports_it_at_the_next_read(tmp_path):
    drops: list[tuple[str, int]] = []
    buffer, chunk, rng = _over_the_cap_with_a_span_chunk_in_flight(tmp_path, drops)
    try:
        buffer.ack([(chunk.id, 30)])
        _push_errors_over_the_cap(buffer, rng)
        reads = [buffer.stats().dropped.get("buffer_full", 0)]
        buffer.ack([(chunk.id, 70)])  # a second request accepted; the third failed: 30 never arrived
        reads.append(buffer.stats().dropped.get("buffer_full", 0))
        assert buffer.stats().dropped_pending == 30  # not counted yet: the request's fate was not known yet
        assert drops == []
        buffer.read(Kind.SPAN, 1000)  # the shipper is done with that batch: those 30 are lost
        reads.append(buffer.stats().dropped.get("buffer_full", 0))
        assert reads == [0, 0, 30]  # never down, and in the end the records actually lost
        assert drops == [("buffer_full", 30)] and buffer.stats().dropped_pending == 0
        assert buffer.stats().acked_total == 70
        _accounted(buffer)
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db", max_size=50_000)
    try:
        assert reopened.stats().dropped == {"buffer_full": 30}
    finally:
        reopened.close()


def test_a_chunk_expired_while_in_flight_then_dead_lettered_is_a_dead_letter_not_a_drop(tmp_path):
    now = [1000.0]
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", retention=60, clock=lambda: now[0], monotonic=lambda: now[0],
                    on_drop=lambda r, n: drops.append((r, n)))
    try:
        for i in range(5):
            buffer.append(Kind.SPAN, Value.ERROR, (i,))
        buffer.flush()
        (chunk,) = buffer.read(Kind.SPAN, 10)  # in flight
        now[0] += 61
        buffer.flush()  # the retention pass: expired while its request is in flight
        assert buffer.pending() == 0 and buffer.stats().dropped == {} and buffer.stats().dropped_pending == 5
        buffer.dead_letter(Kind.SPAN, chunk.records, [(chunk.id, chunk.count)], "HTTP 400")  # the collector refused
        stats = buffer.stats()
        assert stats.dead_letter_records == 5 and stats.dropped == {}  # counted once, as what happened to them
        buffer.close()
        assert drops == []
    finally:
        buffer.close()


def test_a_chunk_dropped_while_in_flight_and_given_back_at_close_is_counted_then(tmp_path):
    drops: list[tuple[str, int]] = []
    buffer, chunk, rng = _over_the_cap_with_a_span_chunk_in_flight(tmp_path, drops)
    buffer.ack([(chunk.id, 25)])
    _push_errors_over_the_cap(buffer, rng)
    assert buffer.stats().dropped == {} and buffer.stats().dropped_pending == 75
    buffer.close()  # no ack can come any more: the 75 are lost, counted and reported now
    assert drops == [("buffer_full", 75)] and buffer.stats().dropped == {"buffer_full": 75}
    reopened = Buffer(tmp_path / "b.db", max_size=50_000, on_drop=lambda r, n: drops.append((r, n)))
    try:  # counted once, at that close: nothing left pending, nothing reported again
        assert reopened.stats().dropped == {"buffer_full": 75} and reopened.stats().dropped_pending == 0
        assert reopened.dropped_before_open == {"buffer_full": 75} and drops == [("buffer_full", 75)]
    finally:
        reopened.close()


def test_an_sqlite_error_while_counting_records_lost_in_flight_counts_them_at_the_next_read(tmp_path, capfd):
    drops: list[tuple[str, int]] = []
    buffer, chunk, rng = _over_the_cap_with_a_span_chunk_in_flight(tmp_path, drops)
    try:
        _push_errors_over_the_cap(buffer, rng)
        buffer.ack([(chunk.id, 60)])
        buffer._db = _FailsOnce(buffer._db, "INSERT INTO counters")
        buffer.read(Kind.SPAN, 1000)  # the 40 are lost, but their count cannot be saved: still pending
        assert "could not be counted yet" in capfd.readouterr().err
        assert buffer.stats().dropped == {} and buffer.stats().dropped_pending == 40 and drops == []
        buffer.read(Kind.SPAN, 1000)  # counted at the next settling, once
        assert buffer.stats().dropped == {"buffer_full": 40} and drops == [("buffer_full", 40)]
        assert buffer.stats().dropped_pending == 0
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db", max_size=50_000)
    try:
        assert reopened.stats().dropped == {"buffer_full": 40}
    finally:
        reopened.close()


IN_FLIGHT_KILL_CHILD = """
import os, random, signal, sys
from pathlib import Path
from emp_machine.telemetry.buffer import Buffer, Kind, Value
rng = random.Random(1)
noise = lambda: "".join(rng.choice("abcdefghij0123456789") for _ in range(300))
buffer = Buffer(Path(sys.argv[1]), max_size=50_000)
for i in range(100):
    buffer.append(Kind.SPAN, Value.ROUTINE, (1 + i, 1 + i, 0, "s", 1, 0, 1, {"n": noise()}, 0, "", None, "", 0))
buffer.flush()
(chunk,) = buffer.read(Kind.SPAN, 1000)  # in flight
buffer.ack([(chunk.id, 10)])
for i in range(200):  # over the cap: the span chunk is dropped while its request is in flight
    buffer.append(Kind.LOG, Value.ERROR, (i, 17, "ERROR", noise(), {}, 0, 0, ""))
    if i % 100 == 99:
        buffer.flush()
stats = buffer.stats()
print("pending", stats.dropped_pending, sum(stats.dropped.values()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # before any ack or read settles them
"""


def test_records_dropped_in_flight_by_a_killed_process_are_counted_at_the_next_start(tmp_path):
    child = subprocess.run([sys.executable, "-c", IN_FLIGHT_KILL_CHILD, str(tmp_path / "b.db")],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert child.stdout.split() == ["pending", "90", "0"]  # held as pending drops, not counted, when killed
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", max_size=50_000, on_drop=lambda r, n: drops.append((r, n)))
    try:  # no ack can deliver them now: counted, reported, and as this run's news (the metric counts them)
        assert buffer.stats().dropped == {"buffer_full": 90} and drops == [("buffer_full", 90)]
        assert buffer.dropped_before_open == {} and buffer.stats().dropped_pending == 0
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db", max_size=50_000, on_drop=lambda r, n: drops.append((r, n)))
    try:  # once
        assert reopened.stats().dropped == {"buffer_full": 90} and reopened.dropped_before_open == {"buffer_full": 90}
        assert drops == [("buffer_full", 90)]
    finally:
        reopened.close()


KILL_CHILD = """
import os, random, signal, sys
from pathlib import Path
from emp_machine.telemetry.buffer import Buffer, Kind, Value

class KillBetween:
    '''The buffer's own connection, except that it SIGKILLs this process at the first statement that names
    `then` after one starting with `after` has run: the kill lands exactly between the two.'''
    def __init__(self, db, after, then):
        self.db, self.after, self.then, self.armed = db, after, then, False
    def _run(self, method, sql, args):
        if self.armed and self.then in sql:
            os.kill(os.getpid(), signal.SIGKILL)
        result = getattr(self.db, method)(sql, *args)
        self.armed = self.armed or sql.startswith(self.after)
        return result
    def execute(self, sql, *args): return self._run("execute", sql, args)
    def executemany(self, sql, *args): return self._run("executemany", sql, args)
    def __getattr__(self, name): return getattr(self.db, name)

path, case = Path(sys.argv[1]), sys.argv[2]
if case == "dead_letter":  # between the dead letter's INSERT and the ack of its records
    buffer = Buffer(path)
    for i in range(5):
        buffer.append(Kind.SPAN, Value.ROUTINE, (i,))
    buffer.flush()
    (chunk,) = buffer.read(Kind.SPAN, 10)
    buffer._db = KillBetween(buffer._db, "INSERT INTO dead_letter", "chunks")
    buffer.dead_letter(Kind.SPAN, chunk.records, [(chunk.id, chunk.count)], "HTTP 400")
else:  # between the DELETE of the chunks dropped for the cap and the write of their drop counter
    rng = random.Random(1)
    noise = lambda: "".join(rng.choice("abcdefghij0123456789") for _ in range(300))
    buffer = Buffer(path, max_size=30_000)
    for i in range(100):
        buffer.append(Kind.LOG, Value.DEBUG, (i, 5, "DEBUG", noise(), {}, 0, 0, ""))
    buffer.flush()
    buffer._db = KillBetween(buffer._db, "DELETE FROM chunks", "counters")
    for i in range(100):
        buffer.append(Kind.LOG, Value.ERROR, (100 + i, 17, "ERROR", noise(), {}, 0, 0, ""))
    buffer.flush()
print("not killed", flush=True)
"""


def test_a_sigkill_between_dead_lettering_a_batch_and_acking_it_leaves_it_one_or_the_other(tmp_path):
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(tmp_path / "b.db"), "dead_letter"],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr  # killed at that very point
    buffer = Buffer(tmp_path / "b.db")
    try:
        # Both together (dead letter and still pending) would be sent again, dead-lettered and counted twice.
        assert (buffer.stats().dead_letter_records, buffer.pending(Kind.SPAN)) in ((0, 5), (5, 0))
    finally:
        buffer.close()


def test_a_sigkill_between_dropping_chunks_and_counting_them_loses_nothing_uncounted(tmp_path):
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(tmp_path / "b.db"), "limits"],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    buffer = Buffer(tmp_path / "b.db")  # the default cap: nothing is dropped on opening
    try:
        stats = buffer.stats()
        assert stats.stored_records + sum(stats.dropped.values()) == 200  # every record kept or counted
    finally:
        buffer.close()


class _FailsOnce:
    """The buffer's own connection, except that the first statement containing `at` fails, once, as a
    transient disk I/O error would."""

    def __init__(self, db, at: str):
        self.db, self.at, self.failed = db, at, False

    def _run(self, method: str, sql: str, args: tuple):
        if not self.failed and self.at in sql:
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error")
        return getattr(self.db, method)(sql, *args)

    def execute(self, sql, *args):
        return self._run("execute", sql, args)

    def executemany(self, sql, *args):
        return self._run("executemany", sql, args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def _deny_once(*denied: tuple[int, str]):
    """An SQLite authorizer (the real connection's own hook, no wrapper) that refuses, once each, the first
    statement doing `action` on `arg1` (a table, or "ROLLBACK" for a transaction), as SQLite itself refuses it:
    the statement fails with "not authorized"."""
    left = set(denied)

    def authorize(action, arg1, arg2, db_name, source):
        if (action, arg1) in left:
            left.discard((action, arg1))
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK
    return authorize


def _fail_the_ack(buffer: Buffer) -> None:
    """The ack's UPDATE fails once; its ROLLBACK works."""
    buffer._db = _FailsOnce(buffer._db, "UPDATE chunks SET sent")


def _fail_the_ack_and_its_rollback(buffer: Buffer) -> None:
    """The ack's UPDATE fails (after the dead letter's INSERT, which holds the write lock), then its ROLLBACK.
    A failed ROLLBACK left the connection in its transaction: every later BEGIN failed ("cannot start a
    transaction within a transaction"), every ack failed, and every record was dropped as write_error."""
    buffer._db.set_authorizer(_deny_once((sqlite3.SQLITE_UPDATE, "chunks"),
                                         (sqlite3.SQLITE_TRANSACTION, "ROLLBACK")))


@pytest.mark.parametrize("step", ["ack", "dead_letter"])
@pytest.mark.parametrize("inject, raised, match, reported", [
    pytest.param(_fail_the_ack, sqlite3.OperationalError, None, None, id="sql-error"),
    pytest.param(_fail_the_ack_and_its_rollback, sqlite3.DatabaseError, "not authorized",
                 "a rollback failed (not authorized); the SQLite connection was closed and opened again",
                 id="rollback-fails"),
])
def test_an_sqlite_error_in_an_ack_rolls_it_back_and_the_buffer_goes_on(tmp_path, capfd, step, inject, raised,
                                                                        match, reported):
    # With a failed rollback too, the connection is closed and opened again (see _fail_the_ack_and_its_rollback).
    buffer = Buffer(tmp_path / "b.db")
    try:
        chunk = _one_chunk_of_ten(buffer)
        do = (lambda: buffer.ack([(chunk.id, 4)])) if step == "ack" else (
            lambda: buffer.dead_letter(Kind.LOG, chunk.records[:4], [(chunk.id, 4)], "HTTP 400"))
        inject(buffer)
        with pytest.raises(raised, match=match):
            do()
        if reported is not None:
            err = capfd.readouterr().err
            assert err.count("telemetry buffer") == 1  # reported once
            assert reported in err
        assert buffer.pending() == 10 and buffer.dead_letters() == []  # none of it happened
        do()  # the shipper's next try
        assert buffer.pending() == 6 and len(buffer.dead_letters()) == (step == "dead_letter")
        for i in range(10, 510):  # later records are committed as before, not dropped as write_error
            buffer.append(Kind.LOG, Value.ERROR, _log(i))
        assert buffer.flush()
        assert buffer.stats().dropped == {} and buffer.pending() == 506
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db")  # what is in the file says the same
    try:
        assert reopened.pending() == 506 and len(reopened.dead_letters()) == (step == "dead_letter")
    finally:
        reopened.close()


def test_an_sqlite_error_while_dropping_for_the_cap_drops_nothing_uncounted_and_the_next_pass_drops(tmp_path, capfd):
    rng = random.Random(1)
    buffer = Buffer(tmp_path / "b.db", max_size=30_000)
    try:
        for i in range(100):
            buffer.append(Kind.LOG, Value.DEBUG, _log(i, _noisy(rng)))
        buffer.flush()
        buffer._db = _FailsOnce(buffer._db, "INSERT INTO counters")
        for i in range(100, 200):
            buffer.append(Kind.LOG, Value.ERROR, _log(i, _noisy(rng)))
        buffer.flush()
        assert "disk I/O error" in capfd.readouterr().err  # the pass failed, and said so
        assert buffer.stats().stored_records + sum(buffer.stats().dropped.values()) == 200
        buffer.flush()  # the next pass
        assert buffer.stats().dropped == {"buffer_full": 100} and buffer.stats().stored_bytes <= 30_000
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db")  # what is in the file says the same
    try:
        assert reopened.stats().stored_records == 100 and reopened.stats().dropped == {"buffer_full": 100}
    finally:
        reopened.close()


def test_the_dropped_metric_counts_from_each_process_start(tmp_path):
    # The buffer keeps every run's drop counts, but the metric's points carry this process's start time: a
    # restart that reported the earlier runs' drops again made them count anew wherever cumulative points
    # become deltas. The buffer still shows the whole history.
    import io

    from emp_machine.telemetry import TelemetryConfig, setup

    def run(lines: int) -> tuple[dict, dict, int]:
        telemetry = setup(TelemetryConfig(buffer={"max_size": 30_000, "segment_size": 20_000}), machine_id="m1",
                          service_type="machine", buffer_path=tmp_path / "t.db", stream=io.StringIO(),
                          start_shipper=False)
        try:
            log = telemetry.logger("test.drops")
            for i in range(lines):
                log.info("noise %d %s", i, "x" * (i % 97))
        finally:
            # Read after the shutdown: its last writes (a metrics record, the drop events) can drop a chunk of
            # the full buffer too, a drop of this process's (read before it, the next process's start showed
            # 1,000 more than this one had said: a failure under load)
            telemetry.shutdown()
        points = {name: pts for name, _, _, _, _, pts in telemetry.metrics_snapshot()}
        metric = {attrs["reason"]: value for attrs, value in points.get("telemetry_records_dropped_total", [])}
        return metric, telemetry.buffer.stats().dropped, telemetry.meter.start_ns

    first, kept_first, _ = run(3000)
    assert first["buffer_full"] > 0 and {k: v for k, v in first.items() if v} == kept_first
    # every other reason is there from the start, at 0 (absent, a query on drops found no data)
    from emp_machine.telemetry.buffer import DROP_REASONS

    assert sorted(first) == sorted(DROP_REASONS) and not any(first[k] for k in first if k != "buffer_full")
    second, kept_second, _ = run(0)  # writes nothing but its shutdown's few records
    assert second.get("buffer_full", 0) == kept_second["buffer_full"] - kept_first["buffer_full"] < 1500
    third, kept_third, _ = run(3000)
    assert third["buffer_full"] == kept_third["buffer_full"] - kept_second["buffer_full"] > 0


# -- what mutation audit M5 found unpinned ------------------------------------------------------------------

def test_an_ack_of_all_but_a_chunks_last_record_keeps_that_record(tmp_path):
    # A request boundary one record before a chunk's end (the shipper splits chunks across requests).
    buffer = Buffer(tmp_path / "b.db")
    try:
        chunk = _one_chunk_of_ten(buffer)
        buffer.ack([(chunk.id, 9)])
        assert buffer.pending() == 1 and [r[0] for r in _all_logs(buffer)] == [9]
        assert buffer.stats().dropped == {} and buffer.stats().acked_total == 9
    finally:
        buffer.close()


def test_a_one_record_chunk_dropped_in_flight_is_counted_at_the_next_read(tmp_path):
    # A quiet machine commits one-record chunks: such a chunk expiring while the shipper sends it, with no ack
    # after, is one record lost, counted when its fate is known (the next read), not only at the next start.
    now = [1000.0]
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", retention=60, clock=lambda: now[0], monotonic=lambda: now[0],
                    on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        buffer.append(Kind.SPAN, Value.ROUTINE, (0,))
        buffer.flush()
        (chunk,) = buffer.read(Kind.SPAN, 10)  # in flight
        now[0] += 61
        buffer.flush()  # expired while in flight: a pending drop
        assert buffer.stats().dropped_pending == 1 and buffer.stats().dropped == {}
        buffer.read(Kind.SPAN, 10)  # no ack came
        assert buffer.stats().dropped == {"expired": 1} and drops == [("expired", 1)]
        assert buffer.stats().dropped_pending == 0
    finally:
        buffer.close()


def test_dead_letters_past_their_room_drop_the_oldest_and_the_count_outlives_a_restart(tmp_path):
    # No test held dead_letter_overflow: the count not saved (a counter that goes back after a restart), the
    # newest dropped instead of the oldest, or the overflowed still counted as kept all passed.
    rng = random.Random(7)
    buffer = Buffer(tmp_path / "b.db", max_size=2500)  # dead letters kept within a tenth: one batch of these
    try:
        for n in range(3):
            buffer.append(Kind.SPAN, Value.ROUTINE, (n, "".join(rng.choice("abcdefghij0123456789") for _ in range(200))))
            buffer.flush()
            (chunk,) = buffer.read(Kind.SPAN, 10)
            buffer.dead_letter(Kind.SPAN, chunk.records, [(chunk.id, chunk.count)], f"HTTP 400 #{n}")
        assert [reason for _, _, reason, _ in buffer.dead_letters()] == ["HTTP 400 #2"]  # the oldest went
        assert buffer.stats().dropped == {"dead_letter_overflow": 2}
        assert buffer.stats().dead_letter_records == 1
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db", max_size=2500)
    try:
        assert reopened.stats().dropped == {"dead_letter_overflow": 2}
        assert reopened.stats().dead_letter_records == 1
    finally:
        reopened.close()

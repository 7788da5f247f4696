"""The durable buffer on real SQLite: persistence, limits and drop order, retention, dead letters, state."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from emp_machine.telemetry.buffer import Buffer, BufferInUse, Kind, Value


def _log(i: int, body: str = "") -> tuple:
    return (i, 9, "INFO", body or f"line {i}", {"i": i}, 0, 0, "")


def _all_logs(buffer: Buffer) -> list[tuple]:
    return [r for chunk in buffer.read(Kind.LOG, 10**9) for r in chunk.records[chunk.sent:]]


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
        for i in range(10):
            buffer.append(Kind.LOG, Value.NORMAL, _log(i))
        buffer.flush()
        (chunk,) = buffer.read(Kind.LOG, 100)
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
    buffer = Buffer(tmp_path / "b.db", retention=60, clock=lambda: now[0])
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
        on_disk = sum(p.stat().st_size for p in tmp_path.iterdir() if p.name.startswith("b.db"))
        assert buffer.stats().written_total == 2800
        assert on_disk < 1_500_000  # 6 rounds of ~230 KB each would be ~1.4 MB plus WAL without reuse
    finally:
        buffer.close()


# -- the stage file: frames between SQLite commits -------------------------------------------------------

STAGING_CHILD = """
import sys, time
from pathlib import Path
from emp_machine.telemetry.buffer import Buffer, Kind, Value
buffer = Buffer(Path(sys.argv[1]), flush_interval=0.01, commit_interval=3600)  # frames only, no commit
for i in range(int(sys.argv[2])):
    buffer.append(Kind.LOG, Value.NORMAL, (i, 9, "INFO", f"line {i}", {"i": i}, 0, 0, ""))
buffer.append_with_state([(Kind.LOG, Value.NORMAL, (-1, 9, "INFO", "with state", {}, 0, 0, ""))], "offset", "42")
deadline = time.monotonic() + 30
while (buffer._queue or buffer._staged_records < int(sys.argv[2]) + 1) and time.monotonic() < deadline:
    time.sleep(0.005)
print("staged", buffer.pending(), flush=True)  # nothing in SQLite yet: all of it is in the stage file
time.sleep(60)
"""


def test_records_staged_before_a_sigkill_are_in_the_buffer_after_it(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", STAGING_CHILD, str(tmp_path / "b.db"), "300"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["staged", "0"]
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    assert [p.name for p in tmp_path.glob("b.db.stage.*")] == ["b.db.stage.1"]
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert sorted(r[0] for r in _all_logs(buffer)) == list(range(-1, 300))
        assert buffer.state("offset") == "42"
        assert list(tmp_path.glob("b.db.stage.*")) == []
    finally:
        buffer.close()
    again = Buffer(tmp_path / "b.db")  # moved once: opening again adds nothing
    try:
        assert again.pending() == 301
    finally:
        again.close()


def _staged_file(tmp_path, batches: list[range]) -> bytes:
    """The bytes of a stage file holding one frame per batch (a buffer that never commits by itself)."""
    buffer = Buffer(tmp_path / "src.db", flush_interval=0.01, commit_interval=3600)
    stage = tmp_path / "src.db.stage.1"
    try:
        for batch in batches:
            size = stage.stat().st_size if stage.exists() else 0
            for i in batch:
                buffer.append(Kind.LOG, Value.NORMAL, _log(i))
            deadline = time.monotonic() + 10
            while not (stage.exists() and stage.stat().st_size > size) and time.monotonic() < deadline:
                time.sleep(0.005)  # polling the writer's progress under a deadline
        return stage.read_bytes()
    finally:
        buffer.close()


def test_a_stage_file_already_moved_is_not_moved_twice(tmp_path):
    # Killed between the SQLite commit and removing the stage file: the file's number is in SQLite.
    data = _staged_file(tmp_path, [range(50)])
    buffer = Buffer(tmp_path / "b.db", flush_interval=0.01, commit_interval=3600)
    for i in range(50):
        buffer.append(Kind.LOG, Value.NORMAL, _log(i))
    buffer.close()  # the flush commits stage file 1 and removes it
    (tmp_path / "b.db.stage.1").write_bytes(data)  # as if the removal never happened
    reopened = Buffer(tmp_path / "b.db")
    try:
        assert reopened.pending() == 50
        assert not (tmp_path / "b.db.stage.1").exists()
    finally:
        reopened.close()


def test_a_torn_last_frame_keeps_the_frames_before_it(tmp_path, capfd):
    data = _staged_file(tmp_path, [range(0, 40), range(40, 70)])
    (tmp_path / "b.db.stage.7").write_bytes(data + data[:30])  # a third frame cut short by a kill
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert [r[0] for r in _all_logs(buffer)] == list(range(70))
        assert "torn frame" in capfd.readouterr().err
        buffer.append(Kind.LOG, Value.NORMAL, _log(70))
        buffer.flush()
        assert buffer.pending() == 71
        assert list(tmp_path.glob("b.db.stage.*")) == []  # its own stage files are numbered after 7
    finally:
        buffer.close()


def test_an_unreadable_stage_file_is_set_aside_and_the_buffer_still_opens(tmp_path, capfd):
    import struct
    import zlib

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


# -- the idle writer: no wake-ups while nothing is queued ------------------------------------------------

def _wait_idle(buffer: Buffer) -> None:
    deadline = time.monotonic() + 10
    while not buffer._sleeping and time.monotonic() < deadline:
        time.sleep(0.005)  # polling the writer's state under a deadline
    assert buffer._sleeping, "the writer never went idle"


def test_an_idle_writer_sleeps_and_the_first_record_wakes_it(tmp_path):
    buffer = Buffer(tmp_path / "b.db", flush_interval=0.01, commit_interval=3600)  # idle_check: 30 s
    try:
        buffer.append(Kind.LOG, Value.NORMAL, _log(0))
        assert buffer.flush(5)
        _wait_idle(buffer)
        passes = buffer.passes
        time.sleep(0.3)  # an observation window of 30 flush intervals, not a synchronisation
        assert buffer.passes == passes  # polling would have made ~30 passes
        appended = time.monotonic()
        buffer.append(Kind.LOG, Value.NORMAL, _log(1))
        deadline = appended + 10
        while not list(tmp_path.glob("b.db.stage.*")) and time.monotonic() < deadline:
            time.sleep(0.005)  # polling for the frame under a deadline
        # Framed (in the page cache: survives a SIGKILL) within about one flush interval, not at idle_check.
        assert list(tmp_path.glob("b.db.stage.*")) and time.monotonic() - appended < 5
        assert buffer.flush(5) and sorted(r[0] for r in _all_logs(buffer)) == [0, 1]
    finally:
        buffer.close()


def test_a_flush_of_an_idle_writer_does_not_wait_out_the_flush_interval(tmp_path):
    buffer = Buffer(tmp_path / "b.db", flush_interval=30, idle_check=3600)  # a wait of either fails the test
    try:
        assert buffer.flush(5)
        _wait_idle(buffer)
        assert buffer.flush(5)  # an idle writer woken by a flush
        _wait_idle(buffer)
        buffer.append(Kind.LOG, Value.NORMAL, _log(7))  # a record wakes it, then a flush cuts the batching short
        assert buffer.flush(5) and [r[0] for r in _all_logs(buffer)] == [7]
    finally:
        buffer.close()

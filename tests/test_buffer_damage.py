"""The buffer's files and the tailer's saved offsets damaged as a power loss or a bad disk leaves them: the
process still starts, the damage is set aside, and every record it cost is counted (audit BI)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys

import pytest

from emp_machine.telemetry.buffer import Buffer, BufferInUse, Kind, Value
from emp_machine.telemetry.tailer import ServiceOutputTailer
from harness import wait_for

# A process that appends, commits `batches` times and is killed (SIGKILL) with the commits in its -wal, then
# appends `staged` records more (in its stage file only) and is killed.
KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
from emp_machine.telemetry.buffer import Buffer, Kind, Value
buffer = Buffer(Path(sys.argv[1]), commit_interval=3600, segment_size=10**12)
for batch in range(int(sys.argv[2])):
    for i in range(100):
        buffer.append(Kind.LOG, Value.NORMAL, (batch * 100 + i, 9, "INFO", f"line {i}", {}, 0, 0, ""))
    assert buffer.flush(10)
for i in range(int(sys.argv[3])):
    buffer.append(Kind.LOG, Value.NORMAL, (i, 9, "INFO", "x" * 40, {}, 0, 0, ""))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_child(path, batches: int, staged: int = 0) -> None:
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(path), str(batches), str(staged)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr


def _log(i: int) -> tuple:
    return (i, 9, "INFO", f"line {i}", {"i": i}, 0, 0, "")


def _append_logs(buffer: Buffer, ids) -> None:
    for i in ids:
        buffer.append(Kind.LOG, Value.NORMAL, _log(i))


def _pending_ids(buffer: Buffer) -> list[int]:
    return [r[0] for c in buffer.read(Kind.LOG, 10**9) for r in c.records[c.sent:]]


def _smash_index(path) -> None:
    """Overwrite the header of the `chunks_by_kind` index's root page (the file closed, its WAL folded in)."""
    db = sqlite3.connect(path)
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'chunks_by_kind'").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * 16)


def _bodies(buffer: Buffer) -> list[str]:
    assert buffer.flush()
    return [r[3] for c in buffer.read(Kind.LOG, 10**9) for r in c.records[c.sent:]]


@pytest.mark.parametrize("saved", [
    '{"dev": 1, "inode": 5, "offset": 1[90}',  # one byte flipped: not JSON
    '[1, 2]',  # JSON, not an object
    '{"dev": 1, "offset": 10, "head": ""}',  # a field missing
    '{"dev": 1, "inode": 5, "offset": "10", "head": ""}',  # a field of the wrong type
    '{"dev": 1, "inode": 5, "offset": 10, "head": "zz"}',  # not hex
])
def test_a_damaged_saved_offset_is_reported_once_and_the_file_read_from_its_start(tmp_path, saved):
    log = tmp_path / "svc.log"
    log.write_text("".join(f"line {i}\n" for i in range(5)))
    key = f"tail:{log}"
    buffer = Buffer(tmp_path / "b.db")
    buffer.append_with_state([], key, saved)
    assert buffer.flush()
    buffer.close()

    buffer = Buffer(tmp_path / "b.db")
    try:
        tailer = ServiceOutputTailer(buffer, [(str(log), "svc", "comfyui")], machine_id="m1")  # raised here
        tailer.poll_once()
        bodies = _bodies(buffer)
        warnings = [b for b in bodies if "saved read offset" in b and "unreadable" in b]
        assert len(warnings) == 1 and tailer.lost_gaps == 1
        assert [b for b in bodies if b.startswith("line")] == [f"line {i}" for i in range(5)]
        assert json.loads(buffer.state(key))["offset"] == log.stat().st_size
    finally:
        buffer.close()

    buffer = Buffer(tmp_path / "b.db")  # the bad value was replaced: the next start says nothing more
    try:
        tailer = ServiceOutputTailer(buffer, [(str(log), "svc", "comfyui")], machine_id="m1")
        assert tailer.poll_once() == 0 and tailer.lost_gaps == 0
    finally:
        buffer.close()


# -- 2. a damaged index ---------------------------------------------------------------------------------


def test_a_damaged_index_is_found_at_open_set_aside_and_counted(tmp_path, capfd):
    # It passed the open's reads (tables only): every flush failed after it and every read raised, restarts
    # included, so that nothing shipped again while each start counted the staged records as write_error.
    buffer = Buffer(tmp_path / "b.db")
    _append_logs(buffer, range(3000))
    assert buffer.flush()
    buffer.close()
    _smash_index(tmp_path / "b.db")
    drops: list[tuple[str, int]] = []
    buffer = Buffer(tmp_path / "b.db", on_drop=lambda reason, n: drops.append((reason, n)))
    try:
        assert buffer.open_error is None and buffer.stats().dropped == {"corrupt_buffer": 3000}
        assert drops == [("corrupt_buffer", 3000)]
        assert "is corrupt" in capfd.readouterr().err
        assert len(list(tmp_path.glob("b.db.corrupt-*"))) == 1
        _append_logs(buffer, range(10_000, 10_000 + 50))
        assert buffer.flush(5)
        assert _pending_ids(buffer) == [10_000 + i for i in range(50)]
    finally:
        buffer.close()


def test_an_index_damaged_while_the_buffer_runs_is_set_aside_at_the_first_error(tmp_path, capfd):
    buffer = Buffer(tmp_path / "b.db")
    try:
        _append_logs(buffer, range(3000))
        assert buffer.flush()
        buffer._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the pages in the file, where the disk damages them
        _smash_index(tmp_path / "b.db")
        buffer._db.execute("PRAGMA shrink_memory")  # what SQLite cached of them forgotten, as under memory pressure
        assert buffer.read(Kind.LOG, 100) == []  # raised: "database disk image is malformed"
        assert buffer.stats().dropped == {"corrupt_buffer": 3000} and buffer.pending() == 0
        assert "is corrupt" in capfd.readouterr().err
        assert len([p for p in tmp_path.glob("b.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]) == 1
        _append_logs(buffer, range(10_000, 10_000 + 50))
        assert buffer.flush(5)
        assert _pending_ids(buffer) == [10_000 + i for i in range(50)]
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db")  # the new file is whole: nothing more counted
    try:
        assert reopened.pending() == 50 and reopened.stats().dropped == {"corrupt_buffer": 3000}
    finally:
        reopened.close()


# -- 3. a damaged WAL -----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "flipped", "random"])
def test_commits_a_damaged_wal_lost_are_counted(tmp_path, capfd, damage):
    # SQLite keeps the commits before the first bad WAL frame and drops the rest, silently.
    _killed_child(tmp_path / "b.db", 10)
    wal = tmp_path / "b.db-wal"
    data = bytearray(wal.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    elif damage == "random":  # nothing of it kept: the file alone has no commit (it was never checkpointed)
        data = bytearray(random.Random(3).randbytes(len(data)))
    else:
        data[len(data) // 3] ^= 0x40
    wal.write_bytes(bytes(data))
    buffer = Buffer(tmp_path / "b.db")
    try:
        kept = buffer.pending()
        assert kept < 1000 and kept % 100 == 0
        lost_commits = (1000 - kept) // 100
        assert buffer.stats().dropped == {"corrupt_buffer": lost_commits}  # one per commit lost: a lower bound
        assert f"lacks the last {lost_commits} commit(s)" in capfd.readouterr().err
    finally:
        buffer.close()


def test_no_loss_is_counted_where_the_wal_is_whole(tmp_path):
    # Stage files are numbered on at each open, and a process killed before its first commit leaves them
    # past the last number SQLite has: no gap is seen where none is.
    _killed_child(tmp_path / "b.db", 3, staged=5)
    _killed_child(tmp_path / "b.db", 0)
    _killed_child(tmp_path / "b.db", 0, staged=5)
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert buffer.pending() == 310 and buffer.stats().dropped == {}
    finally:
        buffer.close()


# -- 4. the file removed while in use -------------------------------------------------------------------


def test_a_buffer_file_removed_while_in_use_is_made_again_with_everything_it_held(tmp_path, capfd):
    buffer = Buffer(tmp_path / "b.db")
    try:
        _append_logs(buffer, range(100))
        buffer.append_with_state([], "tail:/var/log/x.log", "offset 1234")
        assert buffer.flush()
        inode = os.stat(tmp_path / "b.db").st_ino
        for suffix in ("", "-wal", "-shm"):
            os.unlink(f"{tmp_path / 'b.db'}{suffix}")
        _append_logs(buffer, range(100, 150))
        assert buffer.flush()  # the pass after this commit sees it
        wait_for(lambda: (tmp_path / "b.db").exists() and os.stat(tmp_path / "b.db").st_ino != inode,
                 message="the buffer file made again")
        assert "was removed or replaced while in use" in capfd.readouterr().err
        _append_logs(buffer, range(150, 160))
        assert buffer.flush()
    finally:
        buffer.close()
    reopened = Buffer(tmp_path / "b.db")
    try:
        assert _pending_ids(reopened) == list(range(160)) and reopened.stats().dropped == {}
        assert reopened.state("tail:/var/log/x.log") == "offset 1234"
    finally:
        reopened.close()


# -- 5. a path that is not a file -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["", "-wal", "-shm"])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_buffer_path_that_is_not_a_file_is_set_aside(tmp_path, capfd, which, kind):
    buffer = Buffer(tmp_path / "b.db")
    _append_logs(buffer, range(20))
    assert buffer.flush()
    buffer.close()  # the WAL folded in: the file alone holds the records
    path = f"{tmp_path / 'b.db'}{which}"
    if os.path.exists(path):
        os.replace(path, f"{path}.moved")
    os.mkdir(path) if kind == "directory" else os.mkfifo(path)
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert buffer.open_error is None
        assert "is not a regular file" in capfd.readouterr().err
        buffer.append(Kind.LOG, Value.NORMAL, _log(100))
        assert buffer.flush(5)
        # a -wal or -shm that is not a file held nothing: the records in the file stay
        assert _pending_ids(buffer) == ([100] if not which else [*range(20), 100])
        assert buffer.stats().dropped == {}
    finally:
        buffer.close()


# -- 6. a stage file with a garbage tail ----------------------------------------------------------------


def test_a_stage_file_overwritten_at_its_end_is_kept_and_its_loss_estimated(tmp_path, capfd):
    # Bytes overwritten (not cut short) at the end were called a torn frame: 1 record counted of 150 lost, and
    # the file removed.
    _killed_child(tmp_path / "b.db", 0, staged=300)
    (stage,) = [p for p in tmp_path.glob("b.db.stage.*") if p.read_bytes().strip(b"\0")]
    data = bytearray(stage.read_bytes())
    used = len(data.rstrip(b"\0"))
    data[used // 2:used] = random.Random(7).randbytes(used - used // 2)
    stage.write_bytes(bytes(data))
    buffer = Buffer(tmp_path / "b.db")
    try:
        kept = buffer.pending()
        lost = buffer.stats().dropped["corrupt"]
        assert 140 <= kept <= 151 and 290 <= kept + lost <= 310  # the estimate: bytes over the average frame
        assert "damaged bytes from byte" in capfd.readouterr().err
        assert (tmp_path / f"{stage.name}.bad").exists()
    finally:
        buffer.close()


# -- 7. the lock file removed ---------------------------------------------------------------------------


def test_a_lock_file_removed_while_held_is_locked_again(tmp_path, capfd):
    # A second process then opened the same buffer and moved in the first one's live stage files: 400 records
    # stored for 200.
    buffer = Buffer(tmp_path / "b.db")
    try:
        lock = tmp_path / "b.db.lock"
        inode = lock.stat().st_ino
        lock.unlink()
        buffer.append(Kind.LOG, Value.NORMAL, _log(1))
        assert buffer.flush()  # the pass after this commit sees it
        wait_for(lambda: lock.exists() and lock.stat().st_ino != inode, message="the lock file made again")
        assert "locked again" in capfd.readouterr().err
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from emp_machine.telemetry.buffer import Buffer; Buffer(sys.argv[1])",
             str(tmp_path / "b.db")], capture_output=True, text=True, timeout=60)
        assert child.returncode != 0 and "BufferInUse" in child.stderr
        with pytest.raises(BufferInUse):
            Buffer(tmp_path / "b.db")
    finally:
        buffer.close()


# -- 8. frames checksummed ------------------------------------------------------------------------------

STATE_CHILD = """
import os, signal, sys
from pathlib import Path
from emp_machine.telemetry.buffer import Buffer, Kind, Value
buffer = Buffer(Path(sys.argv[1]), commit_interval=3600)
for i in range(100):
    buffer.append(Kind.LOG, Value.NORMAL, (i, 9, "INFO", f"line {i}", {}, 0, 0, ""))
buffer.append_with_state([(Kind.LOG, Value.NORMAL, (100, 9, "INFO", "line 100", {}, 0, 0, ""))], "tail:x",
                         '{"offset": 1390}')
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_flipped_byte_that_still_decodes_is_caught_by_the_frame_checksum(tmp_path):
    # The frame decoded: a tailer offset of 9390 for 1390 was moved in as good (the log shipped again).
    child = subprocess.run([sys.executable, "-c", STATE_CHILD, str(tmp_path / "b.db")],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    (stage,) = [p for p in tmp_path.glob("b.db.stage.*") if p.read_bytes().strip(b"\0")]
    data = bytearray(stage.read_bytes())
    at = data.rfind(b'"offset": 1390') + len(b'"offset": ')
    data[at] = ord("9")
    stage.write_bytes(bytes(data))
    buffer = Buffer(tmp_path / "b.db")
    try:
        assert buffer.state("tail:x") is None  # not 9390: the frame (with its line) is dropped, counted
        assert buffer.stats().dropped == {"corrupt": 1} and buffer.pending() == 100
        assert (tmp_path / f"{stage.name}.bad").exists()
    finally:
        buffer.close()


def test_an_ack_of_a_chunk_of_a_file_renewed_since_deletes_nothing_of_the_new_one(tmp_path):
    # The new file numbers its chunks from 1 again: an ack of the old file's chunk 1 (a request in flight while
    # the file was renewed) deleted the new file's chunk 1, never shipped and never counted (review 146).
    buffer = Buffer(tmp_path / "b.db")
    try:
        _append_logs(buffer, range(200))
        assert buffer.flush()
        handed = buffer.read(Kind.LOG, 100)  # the shipper's request in flight
        buffer._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _smash_index(tmp_path / "b.db")
        buffer._db.execute("PRAGMA shrink_memory")
        buffer.read(Kind.SPAN, 100)  # meets the damage: the file is set aside, its 200 records counted
        _append_logs(buffer, range(10_000, 10_000 + 50))
        assert buffer.flush()
        assert buffer.pending() == 50
        buffer.ack([(chunk.id, chunk.count) for chunk in handed])  # the old request's 200 OK
        assert buffer.pending() == 50
        assert sum(chunk.count for chunk in buffer.read(Kind.LOG, 10**9)) == 50
        assert buffer.stats().dropped.get("corrupt_buffer") == 200
    finally:
        buffer.close()

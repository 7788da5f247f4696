"""The durable local buffer: every record goes here first, and leaves only when a collector accepted it.

Hot path: `append_record()` puts a tuple on a deque (well under a microsecond). While records come, a writer
thread wakes every `flush_interval` (90 ms by default) and appends what is queued, grouped by (kind, value
class), as one
checksummed frame to a stage file: one `write`, in the page cache when it returns, so it survives a SIGKILL
of this process (not a power cut). Once a second (`commit_interval`), on `flush()`, on close and once 1000
records wait (a batch that big is committed without a frame), the staged records are cut into chunks,
compressed (marshal + zlib level 1) and inserted into SQLite (WAL, synchronous=NORMAL: the same durability)
in one transaction that also records the stage file's number; then the file is removed. A SQLite commit
costs ~70 us of CPU against ~10 us for a frame, and at 10 jobs/s the writer wakes with records ~11 times a
second. A buffer opened over stage files left by a killed process moves their frames into SQLite first
(each file once), stopping at a torn frame. So a SIGKILL loses at most one flush interval of records; a
graceful `close()` loses none.

A writer whose pass finds nothing queued sleeps instead of polling (each wake-up cost ~0.02 % of a core here,
0.22 % at 11 a second, in every process of a machine): until the staged records' commit is due, or `idle_check`
(30 s) for the retention pass. The first record appended then wakes it, and it frames what has come one flush
interval later, so the SIGKILL window is the same as while polling. The record's append checks one flag for
that; a flush() wakes it at once.

Limits (the manifest's `telemetry.buffer`): when the compressed size passes `max_size`, whole chunks are
dropped, least valuable class first and oldest first within a class (see `Value`); error records go only when
nothing else is left. Chunks older than `retention` are dropped as `expired`. Every dropped record is counted
by reason in `stats().dropped` and reported through `on_drop`, never silently. After `segment_size` bytes
written, the WAL is checkpointed and freed pages are returned to the file system (incremental vacuum), which
keeps the file near the live data.

One process owns one buffer file (an advisory lock enforces it): the shipper of that process reads it.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from emp_machine.errors import EmpError


class BufferInUse(EmpError):
    """Another live process holds this buffer file; give each process its own `buffer_path`."""


class Kind(IntEnum):
    SPAN = 1
    LOG = 2
    METRIC = 3


class Value(IntEnum):
    """How much a record is worth keeping when the buffer is full: the lowest class is dropped first."""

    DEBUG = 0     # debug logs
    ROUTINE = 1   # spans of successful jobs and other sampled spans
    NORMAL = 2    # info/warning logs, events, metric points
    ERROR = 3     # error logs, spans of failed jobs, dead letters' neighbours: dropped only when nothing else is left


@dataclass(slots=True)
class Chunk:
    id: int
    kind: int
    value: int
    count: int
    sent: int
    records: list


@dataclass
class BufferStats:
    queued: int = 0
    stored_records: int = 0
    stored_bytes: int = 0
    written_total: int = 0
    acked_total: int = 0
    dead_letter_records: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    value INTEGER NOT NULL,
    created REAL NOT NULL,
    count INTEGER NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    nbytes INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_kind ON chunks(kind, id);
CREATE INDEX IF NOT EXISTS chunks_by_value ON chunks(value, id);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    created REAL NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_MARSHAL_VERSION = 4
_FRAME = struct.Struct("<II")  # a stage frame's header: payload length, crc32 of the payload
_STAGE_KEY = "emp.buffer.stage_seq"  # state row: the last stage file whose frames are in SQLite
_COMMIT_BATCH = 1000  # records: a batch (or what is staged) this big is committed at once, not framed


def _read_frames(path: Path) -> tuple[dict[tuple[int, int], list], dict[str, str]]:
    """Records (grouped by kind and value) and state values from a stage file's frames, up to the first
    torn or corrupt one (a process killed in the middle of a write leaves at most that one)."""
    groups: dict[tuple[int, int], list] = {}
    states: dict[str, str] = {}
    data = path.read_bytes()
    at = 0
    while at + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, at)
        payload = data[at + _FRAME.size:at + _FRAME.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            _report(f"telemetry buffer: {path.name} ends in a torn frame at byte {at}; the frames before it are kept")
            break
        frame_groups, frame_states = marshal.loads(payload)
        for key, records in frame_groups:
            groups.setdefault(tuple(key), []).extend(records)
        states.update(frame_states)
        at += _FRAME.size + length
    return groups, states


def _rows(groups: dict[tuple[int, int], list], created: float) -> list[tuple]:
    """Chunk rows for the chunks table: each group in chunks of at most one export batch, compressed."""
    rows = []
    for (kind, value), records in groups.items():
        for start in range(0, len(records), 1000):
            part = records[start:start + 1000]
            data = _encode_chunk(part)
            rows.append((kind, value, created, len(part), len(data), data))
    return rows


def _dumps(obj: object) -> bytes:
    try:
        return marshal.dumps(obj, _MARSHAL_VERSION)
    except ValueError:  # a value of a type marshal cannot write: its repr instead (as _encode_chunk does)
        return marshal.dumps(_marshalable(obj), _MARSHAL_VERSION)


def _encode_chunk(records: list) -> bytes:
    raw = _dumps(records)
    # zlib's default state (32 KiB window, memLevel 8) costs ~65 us to set up, more than compressing a small
    # chunk; a 4 KiB window with memLevel 4 costs ~6 us and loses little on chunks this size.
    small = len(raw) < 65536
    compressor = zlib.compressobj(1, zlib.DEFLATED, 12 if small else 15, 4 if small else 8)
    return compressor.compress(raw) + compressor.flush()


def _marshalable(value: object) -> object:
    if value is None or type(value) in (str, int, float, bool, bytes):
        return value
    if isinstance(value, dict):
        return {str(k): _marshalable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_marshalable(v) for v in value) if type(value) in (list, tuple) else [
            _marshalable(v) for v in value]
    return repr(value)


def decode_chunk(data: bytes) -> list:
    return marshal.loads(zlib.decompress(data))


class _Flush:
    """A marker on the queue: set once everything queued before it is committed."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class Buffer:
    """A durable, bounded record buffer in one SQLite file. Thread-safe; one instance per process."""

    def __init__(self, path: Path, *, max_size: int = 100 * 10**6, segment_size: int = 50 * 10**6,
                 retention: float = 3600.0, flush_interval: float = 0.09, commit_interval: float = 1.0,
                 idle_check: float = 30.0,
                 on_drop: Callable[[str, int], None] | None = None, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.max_size = max_size
        self.segment_size = segment_size
        self.retention = retention
        self.flush_interval = flush_interval
        self.commit_interval = commit_interval
        self.idle_check = idle_check
        self.on_drop = on_drop
        self.on_commit: Callable[[int], None] | None = None  # called by the writer with the records stored
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise BufferInUse(f"telemetry buffer {self.path} is held by another process") from None
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file; that is enough
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db_lock = threading.Lock()
        self._queue: deque = deque()
        self._wake = threading.Event()
        # True while the writer sleeps with nothing queued: the first record appended then wakes it (see _run).
        self._sleeping = False
        self._flush_pending = False
        self._records_found = 0  # records the writer's last pass took from the queue (markers aside)
        self._closed = False
        self._written = 0
        self._acked = 0
        self._since_checkpoint = 0
        self._last_retention = 0.0
        # Staged: records (by kind and value) and state values framed into the stage file, not yet in SQLite.
        self._staged: dict[tuple[int, int], list] = {}
        self._staged_states: dict[str, str] = {}
        self._staged_records = 0
        self._staged_since = 0.0
        self._stage_fd: int | None = None
        self._stage_seq = self._recover_stage_files()
        row = self._db.execute("SELECT COALESCE(SUM(nbytes), 0), COALESCE(SUM(count - sent), 0) FROM chunks").fetchone()
        self._stored_bytes, self._stored_records = int(row[0]), int(row[1])
        self._dropped: dict[str, int] = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        self._dead = int(self._db.execute("SELECT COALESCE(SUM(count), 0) FROM dead_letter").fetchone()[0])
        self.writer_cpu = 0.0  # seconds of CPU the writer thread used (for telemetry's own overhead)
        self.passes = 0  # writer wake-ups that did a pass (an idle buffer adds none)
        self._writer = threading.Thread(target=self._run, name="telemetry-buffer-writer", daemon=True)
        self._writer.start()

    # --- producer side -------------------------------------------------------------------------------

    def append_record(self, item: tuple) -> None:
        """Queue one (kind, value, record); never blocks, never raises. The hot path: a deque append and,
        only when the writer sleeps idle, its wake-up (the first record after a quiet spell)."""
        self._queue.append(item)
        if self._sleeping:
            self._sleeping = False
            self._wake.set()

    def append(self, kind: int, value: int, record: tuple) -> None:
        """Queue one record; never blocks, never raises. (Hot callers use `append_record((kind, value, rec))`.)"""
        self.append_record((kind, value, record))

    def append_with_state(self, records: Iterable[tuple[int, int, tuple]], key: str, value: str) -> None:
        """Queue records together with a state value committed in the same transaction (the tailer's file
        offsets: records and the offset after them are durable together or not at all)."""
        self.append_record(("state", list(records), key, value))

    def state(self, key: str) -> str | None:
        with self._db_lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued before this call is committed; False on timeout or when closed."""
        if self._closed:
            return False
        marker = _Flush()
        self._queue.append(marker)
        self._flush_pending = True
        self._wake.set()
        return marker.done.wait(timeout)

    def notify(self) -> None:
        self._wake.set()

    # --- writer thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        start_cpu = time.thread_time()
        idle = False
        while not self._closed:
            if idle:  # the last pass found nothing to write: sleep until a record comes or work is due
                self._sleeping = True
                if not self._queue:  # after raising the flag: a record appended from here on wakes us
                    self._wake.wait(self._idle_timeout())
                by_record = not self._sleeping  # append_record lowered the flag; flush() and close() do not
                self._sleeping = False
                if by_record and not self._flush_pending:
                    # Woken by the first record of a burst: the rest of it comes within the flush interval, so
                    # the first record is framed within one interval, as when polling. A flush() (it raises
                    # _flush_pending before it sets the event) ends the wait at once.
                    self._wake.clear()
                    if not self._flush_pending:
                        self._wake.wait(self.flush_interval)
                self._wake.clear()
            else:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
            self.passes += 1
            self._flush_pending = False  # the markers queued so far are taken in this pass
            markers: list[_Flush] = []
            try:
                markers = self._write_queued()
                if (self._staged or self._staged_states) and \
                        time.monotonic() - self._staged_since >= self.commit_interval:
                    self._commit_staged()
                self._enforce_limits()
            except sqlite3.Error as exc:  # e.g. disk I/O error in the limits pass: report, try again next time
                _report(f"telemetry buffer maintenance failed: {exc}")
            except Exception as exc:  # a bug must not stop the writer: every later record would be lost
                _report(f"telemetry buffer writer error: {exc!r}")
            for marker in markers:  # after the limits pass, so a flushed buffer is also within its limits
                marker.done.set()
            self.writer_cpu = time.thread_time() - start_cpu
            # Polling goes on while passes find records (a steady load keeps its one wake-up per interval);
            # the first pass that finds none puts the writer to sleep.
            idle = not self._records_found and not self._queue

    def _idle_timeout(self) -> float:
        """How long an idle writer may sleep: until the staged records' commit is due, or `idle_check` (the
        retention pass) when nothing is staged."""
        if self._staged or self._staged_states:
            return max(0.0, min(self.idle_check, self._staged_since + self.commit_interval - time.monotonic()))
        return self.idle_check

    def _write_queued(self) -> list[_Flush]:
        queue = self._queue
        if not queue:
            self._records_found = 0
            return []
        groups: dict[tuple[int, int], list] = {}
        states: dict[str, str] = {}
        markers: list[_Flush] = []
        count = 0
        popleft = queue.popleft
        while queue and count < 50_000:
            item = popleft()
            if type(item) is tuple and len(item) == 3:
                groups.setdefault((item[0], item[1]), []).append(item[2])
                count += 1
            elif type(item) is _Flush:
                markers.append(item)
                if count > 20_000:
                    break
            elif type(item) is tuple and item[0] == "state":
                for kind, value, record in item[1]:
                    groups.setdefault((kind, value), []).append(record)
                    count += 1
                states[item[2]] = item[3]
        self._records_found = count
        # A flush, or a batch big enough to pay for its own commit, goes to SQLite now; a small one is framed.
        commit = bool(markers) or count >= _COMMIT_BATCH
        if groups or states:
            groups = {(int(k), int(v)): records for (k, v), records in groups.items()}  # IntEnums: marshal
            if not self._staged and not self._staged_states:
                self._staged_since = time.monotonic()
            if not commit:
                commit = not self._stage_frame(groups, states)  # not written (e.g. disk full): commit now
            staged = self._staged
            for key, records in groups.items():
                staged.setdefault(key, []).extend(records)
            self._staged_states.update(states)
            self._staged_records += count
        if commit or self._staged_records >= _COMMIT_BATCH:
            self._commit_staged()
        if queue:
            self._wake.set()
        return markers

    # --- the stage file ------------------------------------------------------------------------------

    def _stage_path(self, seq: int) -> Path:
        return self.path.with_name(f"{self.path.name}.stage.{seq}")

    def _stage_frame(self, groups: dict[tuple[int, int], list], states: dict[str, str]) -> bool:
        """Append one frame (length, crc32, marshal of the grouped records and states) to the stage file;
        False on an OS error (e.g. disk full), after which the caller commits to SQLite at once."""
        try:
            payload = _dumps((list(groups.items()), states))
            if self._stage_fd is None:
                self._stage_fd = os.open(self._stage_path(self._stage_seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                         0o600)
            os.write(self._stage_fd, _FRAME.pack(len(payload), zlib.crc32(payload)) + payload)
            return True
        except OSError as exc:
            _report(f"telemetry buffer stage file write failed, committing directly: {exc}")
            return False

    def _commit_staged(self) -> None:
        """Encode what is staged into chunks and insert them into SQLite in one transaction, with the stage
        file's sequence number; then remove the stage file. On an SQLite error the staged records are
        dropped and counted (the stage file is kept, and moved in when the buffer is next opened)."""
        groups, states, count = self._staged, self._staged_states, self._staged_records
        self._staged, self._staged_states, self._staged_records = {}, {}, 0
        if not groups and not states:
            return
        seq = self._stage_seq
        rows = _rows(groups, self._clock())
        try:
            self._insert(rows, states, seq)
        except sqlite3.Error as exc:  # disk full or I/O error: these records are lost here, and counted
            _report(f"telemetry buffer write failed, {count} records dropped: {exc}")
            self._count_drop("write_error", count)
            self._close_stage(seq + 1, remove=False)
            return
        self._close_stage(seq + 1, remove=True)
        nbytes = sum(row[4] for row in rows)
        self._written += count
        if self.on_commit is not None:
            self.on_commit(self._stored_records + count)
        self._stored_bytes += nbytes
        self._stored_records += count
        self._since_checkpoint += nbytes

    def _insert(self, rows: list[tuple], states: dict[str, str], seq: int) -> None:
        with self._db_lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO chunks(kind, value, created, count, nbytes, data) VALUES (?, ?, ?, ?, ?, ?)", rows)
                items = [*states.items(), (_STAGE_KEY, str(seq))]
                self._db.executemany("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", items)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _close_stage(self, next_seq: int, *, remove: bool) -> None:
        if self._stage_fd is not None:
            os.close(self._stage_fd)
            self._stage_fd = None
        if remove:
            try:
                os.unlink(self._stage_path(self._stage_seq))
            except FileNotFoundError:  # nothing was framed (a flush right after a commit)
                pass
        self._stage_seq = next_seq

    def _recover_stage_files(self) -> int:
        """Move frames left in stage files (a killed process) into SQLite, oldest file first; returns the
        sequence number for this process's first stage file."""
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (_STAGE_KEY,)).fetchone()
        committed = int(row[0]) if row else 0
        found = []
        prefix = f"{self.path.name}.stage."
        for entry in os.listdir(self.path.parent):
            if entry.startswith(prefix) and entry[len(prefix):].isdigit():
                found.append(int(entry[len(prefix):]))
        for seq in sorted(found):
            path = self._stage_path(seq)
            if seq > committed:
                try:
                    groups, states = _read_frames(path)
                    self._insert(_rows(groups, self._clock()), states, seq)
                except Exception as exc:  # an unreadable file must not stop telemetry from starting
                    _report(f"telemetry buffer: {path.name} could not be moved in ({exc!r}); kept as .bad")
                    os.replace(path, path.with_name(path.name + ".bad"))
                    continue
                committed = seq
            os.unlink(path)  # moved now, or earlier by a process killed before it could remove the file
        return max([committed, *found]) + 1

    def _enforce_limits(self) -> None:
        now = self._clock()
        if now - self._last_retention >= 1.0:
            self._last_retention = now
            with self._db_lock:
                expired = self._db.execute(
                    "SELECT COALESCE(SUM(count - sent), 0), COALESCE(SUM(nbytes), 0), COUNT(*) FROM chunks "
                    "WHERE created < ?", (now - self.retention,)).fetchone()
                if expired[2]:
                    self._db.execute("DELETE FROM chunks WHERE created < ?", (now - self.retention,))
            if expired[2]:
                self._stored_records -= expired[0]
                self._stored_bytes -= expired[1]
                self._count_drop("expired", expired[0])
        while self._stored_bytes > self.max_size:
            with self._db_lock:
                # Least valuable class first, oldest first within it (ERROR only when nothing else remains).
                victims = self._db.execute(
                    "SELECT id, count - sent, nbytes FROM chunks ORDER BY value, id LIMIT 16").fetchall()
                excess = self._stored_bytes - self.max_size
                chosen = []
                for victim in victims:
                    chosen.append(victim)
                    excess -= victim[2]
                    if excess <= 0:
                        break
                if not chosen:
                    break
                self._db.executemany("DELETE FROM chunks WHERE id = ?", [(v[0],) for v in chosen])
            self._stored_records -= sum(v[1] for v in chosen)
            self._stored_bytes -= sum(v[2] for v in chosen)
            self._count_drop("buffer_full", sum(v[1] for v in chosen))
        if self._since_checkpoint >= self.segment_size:
            self._since_checkpoint = 0
            with self._db_lock:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.execute("PRAGMA incremental_vacuum")

    def _count_drop(self, reason: str, count: int) -> None:
        if count <= 0:
            return
        self._dropped[reason] = self._dropped.get(reason, 0) + count
        with self._db_lock:
            self._db.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (reason, count))
        if self.on_drop is not None:
            try:
                self.on_drop(reason, count)
            except Exception:  # a reporting hook must not stop the writer
                pass

    def count_drop(self, reason: str, count: int) -> None:
        """Count records dropped outside the buffer (the shipper's dead letters, sampling is not a drop)."""
        self._count_drop(reason, count)

    # --- consumer side (the shipper) -----------------------------------------------------------------

    def pending(self, kind: int | None = None) -> int:
        """Records committed and not yet acknowledged (of one kind, or all)."""
        if kind is None:
            return self._stored_records
        with self._db_lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(count - sent), 0) FROM chunks WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def read(self, kind: int, max_records: int) -> list[Chunk]:
        """The oldest unacknowledged chunks of `kind`, up to about `max_records` records (at least one chunk)."""
        chunks: list[Chunk] = []
        total = 0
        with self._db_lock:
            cursor = self._db.execute(
                "SELECT id, kind, value, count, sent, data FROM chunks WHERE kind = ? ORDER BY id", (kind,))
            for row in cursor:
                if chunks and total + row[3] - row[4] > max_records:
                    break
                chunks.append(Chunk(row[0], row[1], row[2], row[3], row[4], decode_chunk(row[5])))
                total += row[3] - row[4]
                if total >= max_records:
                    break
            cursor.close()
        return chunks

    def ack(self, progress: Iterable[tuple[int, int]]) -> None:
        """Mark records accepted: `(chunk_id, sent)` pairs with the new number of records sent from each chunk;
        a chunk fully sent is deleted. Committed in one transaction."""
        self._acked += self._advance(progress)

    def _advance(self, progress: Iterable[tuple[int, int]]) -> int:
        with self._db_lock:
            self._db.execute("BEGIN")
            done = 0
            freed_bytes = 0
            for chunk_id, sent in progress:
                row = self._db.execute("SELECT count, sent, nbytes FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
                if row is None or sent <= row[1]:
                    continue
                done += min(sent, row[0]) - row[1]
                if sent >= row[0]:
                    self._db.execute("DELETE FROM chunks WHERE id = ?", (chunk_id,))
                    freed_bytes += row[2]
                else:
                    self._db.execute("UPDATE chunks SET sent = ? WHERE id = ?", (sent, chunk_id))
            self._db.execute("COMMIT")
        self._stored_records -= done
        self._stored_bytes -= freed_bytes
        return done

    def dead_letter(self, kind: int, records: list, progress: Iterable[tuple[int, int]], reason: str) -> None:
        """Move rejected records (a 4xx other than 429) to the dead-letter table, kept and counted."""
        data = _encode_chunk(records)
        with self._db_lock:
            self._db.execute(
                "INSERT INTO dead_letter(kind, created, count, reason, data) VALUES (?, ?, ?, ?, ?)",
                (kind, self._clock(), len(records), reason, data))
            # Dead letters are kept for inspection, within a tenth of the buffer: past it the oldest go.
            overflow = []
            total = 0
            for row_id, count, nbytes in self._db.execute(
                    "SELECT id, count, length(data) FROM dead_letter ORDER BY id DESC").fetchall():
                total += nbytes
                if total > self.max_size // 10:
                    overflow.append((row_id, count))
            if overflow:
                self._db.executemany("DELETE FROM dead_letter WHERE id = ?", [(r,) for r, _ in overflow])
        self._advance(progress)
        self._dead += len(records) - sum(c for _, c in overflow)
        if overflow:
            self._count_drop("dead_letter_overflow", sum(c for _, c in overflow))

    def dead_letters(self) -> list[tuple[int, int, str, list]]:
        """(kind, count, reason, records) for each dead-letter batch, oldest first."""
        with self._db_lock:
            rows = self._db.execute("SELECT kind, count, reason, data FROM dead_letter ORDER BY id").fetchall()
        return [(r[0], r[1], r[2], decode_chunk(r[3])) for r in rows]

    def stats(self) -> BufferStats:
        return BufferStats(  # queued: not in SQLite yet (in the queue, or staged)
            queued=len(self._queue) + self._staged_records, stored_records=self._stored_records,
            stored_bytes=self._stored_bytes,
            written_total=self._written,
            acked_total=self._acked, dead_letter_records=self._dead, dropped=dict(self._dropped))

    def close(self, timeout: float = 10.0) -> None:
        """Commit everything queued, stop the writer and release the file."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._wake.set()
        self._writer.join(timeout)
        if self._stage_fd is not None:  # frames staged after the last flush: moved in at the next open
            os.close(self._stage_fd)
            self._stage_fd = None
        with self._db_lock:
            self._db.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()


def _report(message: str) -> None:
    # The buffer cannot log through itself; stderr ends up in the supervisor's log for this process.
    os.write(2, (message + "\n").encode("utf-8", "replace"))

"""The durable local buffer: every record goes here first, and leaves only when a collector accepted it.

Hot path: `append_record()` marshals the record (`append_line()`, for a log record, takes its JSON line
instead: a fifth of the cost) and copies it, as one frame (length, format, the payload's crc32 and the payload;
the header copied last, in one 8-byte move, so a frame is whole or absent), into a stage file mapped into memory
(`<buffer>.stage.<n>`, 2 MiB, its blocks reserved up front), and queues the tuple for the writer. No system
call and no thread wake-up: the bytes are in the page cache as soon as the copy returns, so they survive a
SIGKILL of this process (not a power cut). A SIGKILL loses nothing that was appended.

A writer thread commits what is queued every 2 s (`commit_interval`, counted from the first record
after a commit), at once on `flush()` and close, and as soon as 1000 records or half a stage file wait: it
switches producers to the standby stage file, groups the records by kind and value class into chunks of at
most 1000, compresses each (marshal + zlib level 1) and inserts them into SQLite (WAL, synchronous=NORMAL:
the same durability) in one transaction that also records the retired stage file's number; then that file
is zeroed and becomes the next standby. Why: the writer used to wake every 90 ms to frame what had come
(each wake ~0.5 ms of CPU on this VM, 0.6 % of a core at 10 jobs/s, because a thread woken from sleep runs
with cold caches); the caller's copy costs ~6k instructions a log record and ~11k a span, with warm caches.

A buffer opened over stage files left by a killed process moves their frames into SQLite first (each file
once), up to the zeroed rest, frame by frame: a damaged frame is skipped and counted as dropped (`corrupt`),
and a file with such damage is kept as `.bad` for the retention (at most `_BAD_KEPT`). A buffer file SQLite
finds corrupt is moved aside (`<name>.corrupt-<time>`, never deleted), counted (`corrupt_buffer`) and replaced
by a new one, so that it cannot stop its process from starting. A writer with nothing queued sleeps until a
record, a flush or close wakes it (the append checks one flag), or `idle_check` (30 s) for the retention
pass.

If a stage file cannot be made (disk full, no mmap), records are only queued, and the writer commits every
`flush_interval` (90 ms) while they come: then a SIGKILL loses at most that long. So do the records of a
burst that fills the stage file before the writer has switched (it is woken at half), until that commit.

A commit that fails (disk full, an I/O error) drops nothing: its records stay, in memory and in the stage files
holding their frames (not reused until committed), and go with the next attempt, after a back-off; on
SQLITE_FULL room is made first by the drop order below (`disk_full`); past `retry_limit` waiting records the
least valuable go (`write_error`, saved and reported once a commit works). A file that cannot be opened at
start (a full disk) does not stop the process: records wait in memory, and the writer opens it when it can.
A stored chunk that does not decode is dropped when read (`corrupt`); the others are read.

What a kill leaves is always a prefix of what was appended, in order (the tailer's offsets ride in frames,
`append_with_state`: a later frame replayed without an earlier one would resume the tailer past lines never
stored). So a frame that does not fit in the stage file (a full file, a frame over 2 MiB: a tailer backlog's
1 MiB read is one frame) is held in memory, bytes and all, and stops staging: every later frame is held
behind it, and the writer is woken to commit at once. The commit takes the held frames with the rest; the
frames appended while it runs are held too (staged in the next file they would be replayed without the
held ones, were the commit killed), and are copied into the stage file, in order, once it is done.

Limits (the manifest's `telemetry.buffer`): when the compressed size passes `max_size`, whole chunks are
dropped, least valuable class first and oldest first within a class (see `Value`); error records go only when
nothing else is left; a record that alone is over `max_size` is dropped on its own first (`oversize`, see `_rows`).
Chunks older than `retention` are dropped as `expired`, by ages no wall-clock step changes (`Buffer._now`: a step
moves the stored chunks' times with it). Every dropped record is counted
by reason in `stats().dropped` and reported through `on_drop`, never silently: the chunks deleted and their
count are one transaction. A chunk dropped while the shipper is sending it (handed out by `read()`, until
the next read of its kind) frees its space at once, but its records are held as pending drops (saved in the
drop's transaction, table `pending_drops`), not counted: an ack that then comes delivers them (never counted),
and those no ack delivered are counted, and `on_drop` hears of them, when their fate is known: at the next
read of that kind, at close, or at the next start after a kill. The counts only ever grow (they are exported
as a counter, where a decrease reads as a reset) and are the records lost. After `segment_size` bytes
written, the WAL is checkpointed and freed pages are returned to the file system (incremental vacuum), which
keeps the file near the live data.

One process owns one buffer file (an advisory lock enforces it): the shipper of that process reads it, or, once
that process is gone for good, the machine process's adopter (orphans.py). Each owner records its OTel resource
attributes in the file when it opens it (table `resources`, by first chunk id): every chunk's records are
shipped with the resource of the process that made them (`resource_of`), whoever ships them.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import marshal
import mmap
import os
import sqlite3
import stat
import struct
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emp_machine.errors import EmpError


class BufferInUse(EmpError):
    """Another live process holds this buffer file; give each process its own `buffer_path`."""


class Kind:
    """Record kinds. Plain ints, as `Value`'s classes: every record is marshalled with them on the hot path,
    and marshal takes only exact ints (an IntEnum member would take the slow conversion)."""

    SPAN = 1
    LOG = 2
    METRIC = 3


class Value:
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
    # Records dropped while the shipper was sending them, whose fate (delivered or lost) is not known yet:
    # counted in `dropped` only if no ack delivers them.
    dropped_pending: int = 0


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
CREATE TABLE IF NOT EXISTS pending_drops (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS resources (first_chunk INTEGER PRIMARY KEY, attributes TEXT NOT NULL);
"""

_MARSHAL_VERSION = 4
_FRAME = struct.Struct("<II")  # a stage frame's header: payload length, payload format (below)
_ITEM = 0x314D5445  # payload: marshal of the appended item
_LINE = 0x314C5445  # payload: a log record's value class, severity and time, then its JSON line (UTF-8)
_LINE_HEAD = struct.Struct("<BBq")
# The formats staged now: the same payloads behind their crc32 (4 bytes): a flipped bit that still decoded was
# moved in as a good record (a tailer offset read 9390 for 1390: the log shipped again, said to be truncated).
_ITEM_CRC = 0x324D5445
_LINE_CRC = 0x324C5445
_OURS = (_ITEM, _LINE, _ITEM_CRC, _LINE_CRC)
_pack_crc = struct.Struct("<I").pack
_crc32 = zlib.crc32
_STAGE_SIZE = 2 * 1024 * 1024  # bytes of one stage file (reserved with fallocate, mapped)
_STAGE_KEY = "emp.buffer.stage_seq"  # state row: the last stage file whose frames are in SQLite
_COMMIT_BATCH = 1000  # records: a batch this big is committed at once
_BAD_KEPT = 4  # damaged stage files (`.stage.<n>.bad`, 2 MiB each) kept for inspection, newest first
# A commit that fails (disk full, an I/O error, the file not open yet) is tried again after this back-off,
# doubling up to _RETRY_MAX; its stage files are kept, up to _RETRY_FILES (2 MiB each), then records wait in memory.
_RETRY_FIRST = 0.5
_RETRY_MAX = 10.0
_RETRY_FILES = 4
_KIND_NAMES = {1: "span", 2: "log", 3: "metric"}
_ADD_COUNTER = ("INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value")
# Every reason a record is dropped for (docs/telemetry.md): the buffer's, and the shipper's records a collector
# rejected (partial success). Exported from the start, each at 0 until it happens.
DROP_REASONS = ("buffer_full", "oversize", "expired", "write_error", "disk_full", "dead_letter_overflow", "corrupt",
                "corrupt_buffer", "rejected_by_collector")

# Records dropped while in flight, by reason, not counted yet (see `Buffer._drop_chunks`).
_ADD_PENDING = ("INSERT INTO pending_drops(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value")
_LOWER_PENDING = "UPDATE pending_drops SET value = value - ? WHERE name = ?"
_CLEAR_PENDING = "DELETE FROM pending_drops WHERE value <= 0"
_marshal = marshal.dumps
_fallocate = getattr(os, "posix_fallocate", None)
_pack_frame = _FRAME.pack
_pack_line = _LINE_HEAD.pack
# Records' ages (`retention`) by a clock no wall-clock step moves: CLOCK_BOOTTIME where there is one (it counts a
# suspend too, as the wall clock does: a record does age while the host sleeps), else time.monotonic.
_CLOCK_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)
_elapsed = (lambda: time.clock_gettime(_CLOCK_BOOTTIME)) if _CLOCK_BOOTTIME is not None else time.monotonic
# A wall clock that moved this much more (or less) than the elapsed clock since the last reading was stepped
# (an NTP correction, a clock set by hand): the stored chunks' times are moved with it (`Buffer._now`). Under
# it: the jitter of two readings (a thread preempted between them), never corrected.
_STEP_MIN = 2.0
# The wall reading is bracketed by two elapsed readings: further apart than this, the thread stalled between them
# (swap, a stopped container, a long GIL hold), and the pair says nothing about a step (`Buffer._now`).
_READ_MAX = 0.05


def _read_frames(path: Path) -> tuple[dict[tuple[int, int], list], dict[str, str]]:
    """Records (grouped by kind and value) and state values from a stage file's frames (see `_scan_frames`)."""
    groups, states, _, _ = _scan_frames(path.read_bytes())
    return groups, states


def _scan_frames(data: bytes) -> tuple[dict[tuple[int, int], list], dict[str, str], int, list[str]]:
    """Records (grouped by kind and value) and state values from a stage file's frames, up to the zeroed rest
    of the file; also the number of records lost in damaged frames, and where they were (for the report).
    Reads the frames of earlier versions too: one per writer pass, each a batch of groups, with the payload's
    crc32 where the format tag is now.

    Frame by frame, so that one damaged frame loses only itself: a payload that does not decode is skipped
    (its header says where the next frame starts); after a damaged header, reading goes on at the next frame
    whose tag is ours and whose payload decodes (the tag is a 4-byte magic, so frames can be found again);
    where none follows, the file ends there: a torn frame where the file is cut short inside a frame of ours or
    only zeros follow its header, else damaged bytes. Each damaged frame counts as one lost record (a frame
    holds one, except the tailer's batches and earlier versions' frames, so this is a lower bound), and damaged
    bytes at the end as many as the frames read before them would fill (at least one)."""
    groups: dict[tuple[int, int], list] = {}
    states: dict[str, str] = {}
    lost = 0
    notes: list[str] = []
    at = frames = 0
    while at + _FRAME.size <= len(data):
        length, tag = _FRAME.unpack_from(data, at)
        end = at + _FRAME.size + length
        if tag in _OURS and end <= len(data):
            item = _decode_frame(tag, data[at + _FRAME.size:end])
            if item is not None:
                _take(item, groups, states)
                at = end
                frames += 1
                continue
            if _header_fits(data, end):  # the payload alone is damaged: the next frame is where it says
                lost += 1
                notes.append(f"a damaged payload at byte {at}")
                at = end
                continue
        elif not length and not tag:  # the zeroed rest of a stage file, unless frames follow this header
            found = _next_frame(data, at + 1)
            if found is None:
                break
            lost += 1
            notes.append(f"a zeroed header at byte {at}, read on from byte {found}")
            at = found
            continue
        elif end <= len(data) and zlib.crc32(data[at + _FRAME.size:end]) == tag:
            try:  # an earlier version's frame: ([((kind, value), records), ...], states)
                frame_groups, frame_states = marshal.loads(data[at + _FRAME.size:end])
                staged = [(tuple(key), list(records)) for key, records in frame_groups]
                frame_states = {str(k): str(v) for k, v in dict(frame_states).items()}
            except Exception:  # anything at all, from bytes that are not what they should be
                lost += 1
                notes.append(f"a damaged payload at byte {at}")
            else:
                for key, records in staged:
                    groups.setdefault(key, []).extend(records)
                states.update(frame_states)
            at = end
            continue
        # A damaged header, or a frame cut short: on at the next frame that can be read, if any.
        found = _next_frame(data, at + 1)
        lost += 1
        if found is None:
            # Torn only where a frame of ours runs past the end of the file or only zeros follow its header (a
            # file cut short, a write the power loss did not finish); bytes overwritten were frames: about as many
            # as their length over the average frame read before them (at least one).
            if (tag in _OURS and end > len(data)) or not data[at + _FRAME.size:].strip(b"\0"):
                notes.append(f"a torn frame at byte {at}, where reading stopped")
            else:
                damaged = len(data[at:].rstrip(b"\0"))
                lost += max(1, damaged * frames // at if frames else 1) - 1
                notes.append(f"{damaged} damaged bytes from byte {at} to the zeroed rest, where reading stopped")
            break
        notes.append(f"a damaged header at byte {at}, read on from byte {found}")
        at = found
    return groups, states, lost, notes


_TAGS = tuple(_FRAME.pack(0, tag)[4:] for tag in _OURS)  # the formats' tags as bytes (a header's 2nd half)


def _decode_frame(tag: int, payload: bytes) -> tuple | None:
    """The item a frame holds, or None when its payload does not decode to one (damaged)."""
    if tag in (_ITEM_CRC, _LINE_CRC):
        if len(payload) < 4 or _pack_crc(_crc32(payload[4:])) != payload[:4]:
            return None
        payload, tag = payload[4:], _ITEM if tag == _ITEM_CRC else _LINE
    try:
        item = marshal.loads(payload) if tag == _ITEM else _line_item(payload)
    except Exception:  # anything at all, from bytes that are not what they should be
        return None
    return item if _is_item(item) else None


def _is_item(item: object) -> bool:
    """Whether `item` has the shape `_take` reads: (kind, value, record) or ("state", records, key, value)."""
    if type(item) is not tuple:
        return False
    if len(item) == 3:
        return type(item[0]) is int and type(item[1]) is int and isinstance(item[2], (tuple, list))
    return len(item) == 4 and item[0] == "state" and isinstance(item[1], list) and \
        isinstance(item[2], str) and isinstance(item[3], str) and \
        all(isinstance(r, (tuple, list)) and len(r) == 3 and _is_item(tuple(r)) for r in item[1])


def _header_fits(data: bytes, at: int) -> bool:
    """Whether a frame header can start at `at`: the end of the data, the zeroed rest, or one of our tags."""
    if at + _FRAME.size > len(data):
        return at == len(data)
    length, tag = _FRAME.unpack_from(data, at)
    return (not length and not tag) or tag in _OURS


def _next_frame(data: bytes, start: int) -> int | None:
    """The offset, at or after `start`, of the next frame whose tag is ours and whose payload decodes."""
    while True:
        hits = [hit for hit in (data.find(tag, start + 4) for tag in _TAGS) if hit >= 0]
        if not hits:
            return None
        at = min(hits) - 4
        length, tag = _FRAME.unpack_from(data, at)
        end = at + _FRAME.size + length
        if end <= len(data) and _decode_frame(tag, data[at + _FRAME.size:end]) is not None:
            return at
        start = at + 1


def _line_payload(item: tuple, line: str) -> bytes:
    """The frame payload of a log record (Kind.LOG, value, record) from its JSON line (`append_line`)."""
    record = item[2]
    return _pack_line(item[1], record[1], record[0]) + line.encode("utf-8", "surrogatepass")


def _line_item(payload: bytes) -> tuple:
    """The (kind, value, record) of a log record framed from its JSON line by `append_line`: the record as
    logs.RecordWriter makes it, (time_ns, severity, LEVEL, message, line, trace_id, span_id, event_name)."""
    value, severity, time_ns = _LINE_HEAD.unpack_from(payload)
    line = json.loads(payload[_LINE_HEAD.size:].decode("utf-8", "surrogatepass"))
    trace = line.get("trace_id")
    return (Kind.LOG, value, (time_ns, severity, str(line.get("level", "info")).upper(), line.get("message", ""),
                              line, int(trace, 16) if trace else 0, int(line["span_id"], 16) if trace else 0,
                              line.get("event.name", "")))


def _take(item: tuple, groups: dict[tuple[int, int], list], states: dict[str, str]) -> int:
    """Add one appended item, (kind, value, record) or ("state", records, key, value), to `groups` and
    `states`; returns the number of records in it."""
    if len(item) == 3:
        groups.setdefault((int(item[0]), int(item[1])), []).append(item[2])
        return 1
    for kind, value, record in item[1]:
        groups.setdefault((int(kind), int(value)), []).append(record)
    states[item[2]] = item[3]
    return len(item[1])


def _rows(groups: dict[tuple[int, int], list], created: float, max_size: int = 0) -> tuple[list[tuple], int]:
    """Chunk rows for the chunks table: each group in chunks of at most one export batch, compressed; and the
    number of records dropped as `oversize`. A chunk over `max_size` (the whole buffer's size) is split in
    halves until each fits, and a record that alone does not is dropped: stored, it would only have made the size
    cap drop every other record, error ones included, and then itself (600 error records went for one 3 MB log
    record over a 1 MB buffer)."""
    rows: list[tuple] = []
    oversize = 0
    for (kind, value), records in groups.items():
        for start in range(0, len(records), 1000):
            part = records[start:start + 1000]
            data = _encode_chunk(part)
            if max_size and len(data) > max_size:
                oversize += _split_rows(kind, value, created, part, max_size, rows)
            else:
                rows.append((kind, value, created, len(part), len(data), data))
    return rows, oversize


def _split_rows(kind: int, value: int, created: float, part: list, max_size: int, rows: list[tuple]) -> int:
    """Rows for `part`, whose chunk is over `max_size`, in order: its halves, each split again while over it;
    a single record over it is dropped. Returns the records dropped. (The rare path: only a chunk that big.)"""
    if len(part) == 1:
        return 1
    dropped = 0
    middle = len(part) // 2
    for half in (part[:middle], part[middle:]):
        data = _encode_chunk(half)
        if len(data) > max_size:
            dropped += _split_rows(kind, value, created, half, max_size, rows)
        else:
            rows.append((kind, value, created, len(half), len(data), data))
    return dropped


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
    if isinstance(value, (int, float)):  # IntEnum members and the like: marshal takes only the exact types
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, dict):
        return {str(k): _marshalable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_marshalable(v) for v in value) if type(value) in (list, tuple) else [
            _marshalable(v) for v in value]
    return repr(value)


def decode_chunk(data: bytes) -> list:
    return marshal.loads(zlib.decompress(data))


_OPEN_READS = (  # what the buffer reads of its file when it opens: each table once, so that damage shows here
    "SELECT key, value FROM state",
    "SELECT COALESCE(SUM(nbytes), 0), COALESCE(SUM(count - sent), 0) FROM chunks",
    "SELECT name, value FROM counters",
    "SELECT name, value FROM pending_drops",
    "SELECT COALESCE(SUM(count), 0) FROM dead_letter",
    "SELECT first_chunk, attributes FROM resources",
)


class _Corrupt(sqlite3.DatabaseError):
    """What `PRAGMA quick_check` found wrong: damage as SQLite's own SQLITE_CORRUPT is (see `_damaged`)."""

    sqlite_errorname = "SQLITE_CORRUPT"


def _connect(path: Path) -> sqlite3.Connection:
    """The buffer's SQLite file opened, its schema made, its tables read once and its b-trees checked (a damaged
    file fails here, where it can still be set aside, not halfway through opening). The check (`quick_check`):
    a damaged index passed the reads, then failed every commit and read after them, restarts included; it
    costs about 0.03 s for a 70 MB file in the page cache, 0.16 s from disk."""
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file; that is enough
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        for query in _OPEN_READS:
            db.execute(query).fetchall()
        problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            raise _Corrupt(f"database disk image is malformed ({problem})")
    except BaseException:
        db.close()
        raise
    return db


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file itself is bad (corrupt, not a database, tables not a buffer's) rather than
    that it cannot get at it now (disk full, I/O error, permissions, locked): only a bad file is set aside."""
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or name == "SQLITE_ERROR"


def _corrupt(exc: BaseException) -> bool:
    """Whether an error met while the file is in use says that the file is damaged (not that it cannot be
    written now: a full disk, an I/O error)."""
    return getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path` now; None where there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _not_a_file(path: str) -> bool:
    """Whether `path` is there and not a regular file (a directory, a FIFO): SQLite can never use it."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # not there (or not to be looked at: SQLite says what it makes of it)
        return False


def _set_aside(path: Path, suffixes: tuple[str, ...] = ("", "-wal", "-shm")) -> Path:
    """Move a damaged buffer file, with its -wal and -shm, to `<name>.corrupt-<UTC time>`; returns that path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while aside.exists():  # damaged twice within a second: never over an earlier one
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    for suffix in suffixes:
        try:
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        except FileNotFoundError:
            pass
    return aside


def _connect_ro(path: Path, immutable: bool, **kwargs: float) -> sqlite3.Connection:
    """A buffer file opened read-only; `immutable`: the file alone, as it is on disk (no -wal/-shm files made
    beside it, no WAL shared with a running owner)."""
    return sqlite3.connect(path.absolute().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro"),
                           uri=True, isolation_level=None, **kwargs)


def _pending_in(path: Path) -> int | None:
    """The records a set-aside buffer file held pending, where it can still tell (None where it cannot)."""
    # Immutable where it has no WAL: a read-only WAL reader would leave new -wal/-shm files beside it.
    immutable = not path.with_name(path.name + "-wal").exists()
    try:
        db = _connect_ro(path, immutable)
    except sqlite3.Error:
        return None
    try:
        return int(db.execute("SELECT COALESCE(SUM(count - sent), 0) FROM chunks").fetchone()[0])
    except (sqlite3.Error, TypeError, ValueError):
        return None
    finally:
        db.close()


class _Flush:
    """A marker on the queue: set once everything queued before it is committed (`ok`), or the commit failed."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = True


class Buffer:
    """A durable, bounded record buffer in one SQLite file. Thread-safe; one instance per process."""

    def __init__(self, path: Path, *, max_size: int = 100 * 10**6, segment_size: int = 50 * 10**6,
                 retention: float = 3600.0, flush_interval: float = 0.09, commit_interval: float = 2.0,
                 idle_check: float = 30.0, retry_limit: int = 20_000,
                 on_drop: Callable[[str, int], None] | None = None, clock: Callable[[], float] = time.time,
                 resource: dict[str, object] | None = None, monotonic: Callable[[], float] = _elapsed):
        self.path = Path(path)
        # The OTel resource attributes of the process writing the records (its owner), recorded in the file at
        # each open (`_register_resource`); None for a reader that adds no records (an adopted orphan buffer).
        self._resource = json.dumps(resource, sort_keys=True, default=str) if resource is not None else None
        # (first chunk id, resource attributes as JSON), ascending: which process made which chunks.
        self._resources: list[tuple[int, str]] = []
        self._resource_unsaved = False  # its entry could not be written at open: written with the first commit
        self.max_size = max_size
        self.segment_size = segment_size
        self.retention = retention
        self.flush_interval = flush_interval
        self.commit_interval = commit_interval
        self.idle_check = idle_check
        self.on_drop = on_drop
        self.on_commit: Callable[[int], None] | None = None  # called by the writer with the records stored
        self._clock = clock  # wall time: chunks' `created`, dead letters' times
        self._elapsed = monotonic  # steps of `clock` are measured against it (`_now`); the retention pass's rhythm
        # (wall, elapsed) when the stored chunks' `created` last agreed with the wall clock (None: not read yet).
        self._clock_ref: tuple[float, float] | None = None
        self.clock_steps = 0  # wall-clock steps seen (and corrected for) by this buffer
        # Records a failing commit may keep (in memory and stage files) before the least valuable are dropped.
        self.retry_limit = retry_limit
        self._lock_file = None  # the advisory lock's file, once taken (`_open_file`)
        self._lock_clash: tuple[int, int] | None = None  # a new lock file another process holds (`_check_lock`)
        # Drops found while opening (a corrupt file set aside, damaged stage frames), reported once the counters
        # are read: (reason, count, already in the counters table).
        self._startup_drops: list[tuple[str, int, bool]] = []
        # None until the file is open: a start on a full disk opens it later (`_open_file`, from the writer).
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        # Producers: under _lock, an item goes on _queue and its frame into the current stage file at _pos.
        self._lock = threading.Lock()
        self._queue: deque = deque()
        self._markers: list[_Flush] = []
        self._wake = threading.Event()
        # True while the writer sleeps with nothing queued: the first record appended then wakes it (see _run).
        self._sleeping = False
        self._kicked = False  # a producer has woken the writer for a full batch (cleared when it is taken)
        self._closed = False
        self._written = 0
        self._acked = 0
        # Under _db_lock: the chunks the last read() of each kind handed out, id -> kind (the shipper's requests
        # for them may be in flight), and those of them dropped since: id -> [reason, count, records sent or
        # delivered since] (the rest are pending drops); and records of them known lost, by reason, whose count
        # could not be saved yet (an SQLite error; tried again at the next settling, else the next start).
        self._handed: dict[int, int] = {}
        self._renewals = 0  # files set aside while running (`_renew`): a commit's count goes to the file it is in
        self._inserted_in = 0
        self._dropped_handed: dict[int, list] = {}
        self._settled: dict[str, int] = {}
        self._db_broken = False  # the connection was closed after a failed ROLLBACK and not opened again yet
        # (device, inode) of the file the connection has open, to see it removed or replaced (`_check_file`).
        self._file: tuple[int, int] | None = None
        self._wal_at_open = 0  # bytes of the -wal before SQLite opened the file
        self._since_checkpoint = 0
        self._last_retention = 0.0
        # Writer thread: what commits that failed (disk full, an I/O error, the file not open) keep, to be committed
        # with the next attempt (`_commit`): records by (kind, value) and state values, the stage files holding
        # their frames (map, bytes used, number: not reused until committed), how many records, whether staging is
        # stopped behind them (`_commit_failed`), when the next attempt is due (monotonic; 0: none is), its delay.
        self._retry_groups: dict[tuple[int, int], list] = {}
        self._retry_states: dict[str, str] = {}
        self._retry_files: list[tuple[mmap.mmap, int, int]] = []
        self._retry_count = 0
        self._retry_blocked = False
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._retry_error: str | None = None  # the failing spell's error (reported once), None while commits work
        self._retry_shed = 0  # records dropped past retry_limit in this failing spell
        self._freeing_futile = False  # room was made on a full disk in this spell, and the commit failed all the same
        # Under _db_lock: drop counts not saved yet (the file failing or not open), saved with the next commit that
        # works and reported (on_drop) then: a report made while nothing could be written was lost with it.
        self._unsaved: dict[str, int] = {}
        self.open_error: str | None = None  # why the file could not be opened, while it is not open
        self._stage_seq = 0
        self._stage_failing = False  # the last attempt to make a stage file failed (reported once)
        self._stage: mmap.mmap | None = None
        self._standby: mmap.mmap | None = None
        self._pos = 0
        # Bytes usable in the current stage file: 0 without one (records only queued), -1 while frames are held
        # (nothing is staged after a frame that is not: see `_hold`).
        self._limit = 0
        self._wake_at = 1 << 62   # a producer whose frame ends past this wakes the writer (half the file)
        # Frames not in any stage file, (tag, payload), oldest first: the last items of _queue, appended after
        # every frame staged (None: no writer any more, closed or a forked child, so none is kept).
        self._held: list[tuple[int, bytes]] | None = []
        self._stored_bytes = self._stored_records = 0
        self._dropped: dict[str, int] = {}
        # What earlier runs dropped, from the file once it is open (updated in place: the metric holds this dict).
        self.dropped_before_open: dict[str, int] = {}
        self._dead = 0
        try:
            self._open_file()
        except BufferInUse:
            raise
        except (sqlite3.Error, OSError) as exc:  # a full disk, an I/O error: the process starts all the same
            self._not_open(exc)
        else:
            self._use_stage(self._open_stage(self._stage_seq), self._open_stage(self._stage_seq + 1))
        # A process forked from this one (multiprocessing) shares the mapped stage files: it must not write
        # frames into them. Its records only queue, as they always did there (no writer thread runs in it).
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (buffer := ref()) is not None and buffer._forked())
        self.writer_cpu = 0.0  # seconds of CPU the writer thread used (for telemetry's own overhead)
        self.passes = 0  # writer wake-ups that did a pass (an idle buffer adds none)
        self._writer = threading.Thread(target=self._run, name="telemetry-buffer-writer", daemon=True)
        self._writer.start()

    # --- producer side -------------------------------------------------------------------------------

    def append_record(self, item: tuple) -> None:
        """Queue one (kind, value, record) and copy its frame into the stage file; never blocks on I/O, never
        raises. The hot path: marshal, a copy into mapped memory under a lock, and only when the writer
        sleeps idle or has a batch to commit, its wake-up."""
        try:
            data = _marshal(item, _MARSHAL_VERSION)
        except ValueError:  # a value marshal cannot write (an object, an int subclass): converted as _dumps does
            data = _dumps(item)
        self._stage_frame(item, _ITEM_CRC, _pack_crc(_crc32(data)) + data)

    def append_line(self, item: tuple, line: str) -> None:
        """`append_record` for a log record (Kind.LOG, value, record) whose JSON line is made already
        (logs.RecordWriter): the frame is that text, which costs a fifth of marshalling the record."""
        data = _line_payload(item, line)
        self._stage_frame(item, _LINE_CRC, _pack_crc(_crc32(data)) + data)

    def _stage_frame(self, item: tuple, tag: int, data: bytes) -> None:
        with self._lock:
            queue = self._queue
            queue.append(item)
            pos = self._pos
            end = pos + 8 + len(data)
            if end <= self._limit:
                stage = self._stage
                stage[pos + 8:end] = data
                # The header last, in one 8-byte copy: a killed process leaves either the whole frame or none.
                stage[pos:pos + 8] = _pack_frame(len(data), tag)
                self._pos = end
            else:  # no room, or frames are held already: held in memory, behind them
                self._hold(tag, data)
        if self._sleeping:
            self._sleeping = False
            self._wake.set()
        elif (end >= self._wake_at or len(queue) >= _COMMIT_BATCH) and not self._kicked:
            self._kicked = True  # once until the writer takes the batch: Event.set() costs ~3k instructions
            self._wake.set()

    def _hold(self, tag: int, data: bytes) -> None:
        """Keep a frame that is not staged in memory (under _lock), and stage nothing after it until it is
        committed or staged itself: a kill must leave a prefix of what was appended, never a later frame (a
        tailer's offset) without an earlier one (the lines before it). With a stage file, the writer is woken
        to commit at once (its wait ends at `_wake_at` 0)."""
        held = self._held
        if held is None:  # no writer (closed, a forked child): records only queue, as they always did there
            return
        held.append((tag, data))
        self._block()

    def _block(self) -> None:
        """No frame fits in the stage file until `_restage` (under _lock); the writer commits without waiting."""
        if self._stage is not None:
            self._limit, self._wake_at = -1, 0

    def _restage(self) -> None:
        """Copy the held frames into the stage file, oldest first, as far as they fit (under _lock); when all
        are in, producers stage again. Those that do not fit stay held, for the writer's next commit."""
        held = self._held
        if not held and self._limit >= 0 and not self._retry_blocked:
            return
        stage, pos, done = self._stage, self._pos, 0
        if stage is not None and not self._retry_blocked:  # (stopped behind records a failed commit holds)
            for tag, data in held or ():
                end = pos + 8 + len(data)
                if end > _STAGE_SIZE:
                    break
                stage[pos + 8:end] = data
                stage[pos:pos + 8] = _pack_frame(len(data), tag)  # the header last, as a producer writes it
                pos, done = end, done + 1
            self._pos = pos
        if held:
            del held[:done]
        if held or self._retry_blocked:
            self._block()
        elif stage is not None:
            self._limit, self._wake_at = _STAGE_SIZE, _STAGE_SIZE // 2
            self._kicked = False  # a kick while blocked may not have been for a full batch: the next one wakes

    def append(self, kind: int, value: int, record: tuple) -> None:
        """Queue one record; never blocks, never raises. (Hot callers use `append_record((kind, value, rec))`.)"""
        self.append_record((kind, value, record))

    def append_with_state(self, records: Iterable[tuple[int, int, tuple]], key: str, value: str) -> None:
        """Queue records together with a state value committed in the same transaction (the tailer's file
        offsets: records and the offset after them are durable together or not at all)."""
        self.append_record(("state", list(records), key, value))

    def state(self, key: str) -> str | None:
        with self._db_lock:
            if self._db is not None:
                row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
                return row[0] if row else None
        return _read_state(self.path, key)  # not open for writing (a full disk): read-only, where it can be

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued before this call is committed; False on timeout, when closed, or when the
        commit failed (a full disk: the records are kept and committed later, see `_commit`)."""
        if self._closed:
            return False
        marker = _Flush()
        with self._lock:
            self._markers.append(marker)
        self._wake.set()
        return marker.done.wait(timeout) and marker.ok

    def _forked(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork
        self._held = None
        self._use_stage(None, None)

    # --- writer thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        start_cpu = time.thread_time()
        due = 0.0  # when what is queued is to be committed (0: nothing queued at the last look)
        while True:
            closing = self._closed
            if self._retry_at and not closing and not self._markers:
                # A commit failed: the next attempt waits out its back-off, while records queue (a flush or close
                # tries at once).
                now = time.monotonic()
                if now < self._retry_at:
                    self._wake.wait(self._retry_at - now)
                    self._wake.clear()
                    continue
            elif not closing and not self._queue and not self._markers:
                # Nothing to commit: sleep until a record, a flush or close comes, or the retention pass is due.
                self._sleeping = True
                if not self._queue and not self._markers and not self._closed:  # after raising the flag
                    self._wake.wait(self.idle_check)
                self._sleeping = False
                self._wake.clear()
                due = 0.0
                if self._queue or self._markers or self._closed:
                    continue
            elif not closing and not self._markers and len(self._queue) < _COMMIT_BATCH and \
                    (self._pos < self._wake_at or not self._limit):
                # Records are queued (and in the stage file: durable): commit them one interval after the first.
                now = time.monotonic()
                if not due:
                    due = now + (self.commit_interval if self._limit else self.flush_interval)
                if now < due:
                    self._wake.wait(due - now)
                    self._wake.clear()
                    continue
            due = 0.0
            self.passes += 1
            markers: list[_Flush] = []
            db = self._db
            try:
                markers = self._commit()
                db = self._db
                self._enforce_limits()
                self._check_file()
            except sqlite3.Error as exc:  # e.g. disk I/O error in the limits pass: report, try again next time
                _report(f"telemetry buffer maintenance failed: {exc}")
                if _corrupt(exc):
                    self._start_anew(db, exc)
            except Exception as exc:  # a bug must not stop the writer: every later record would be lost
                _report(f"telemetry buffer writer error: {exc!r}")
            for marker in markers:  # after the limits pass, so a flushed buffer is also within its limits
                marker.done.set()
            self.writer_cpu = time.thread_time() - start_cpu
            if closing:
                return

    def _commit(self) -> list[_Flush]:
        """Take what is queued (switching producers to the standby stage file when the current one holds
        frames), encode it into chunks and insert them into SQLite in one transaction that records the retired
        stage file's number; then the retired file, zeroed, is reused. A commit that fails (disk full, an I/O
        error, the file not open yet) loses nothing: its records are kept, in memory and in the stage files
        holding their frames (not reused until they are committed), and are committed with the next attempt,
        after a back-off (`_commit_failed`); past `retry_limit` records the least valuable go (`_shed`). On a
        full disk room is made first (`_store`). Returns the flush markers taken: a flush waiting on a failed
        commit returns (False), it does not wait out its timeout."""
        with self._lock:
            items, self._queue = self._queue, deque()
            markers, self._markers = self._markers, []
            self._kicked = False
            held = self._held  # the last of `items`: in no stage file
            if held:
                self._held = []
            retired, used = (self._stage, self._pos) if self._pos else (None, 0)
            if retired is not None:  # without a standby, records are only queued until a file is ready again
                self._use_stage(self._standby, None)
                self._stage_seq += 1
                # (with the number, under the lock: `_renew` reads both, to tell which files SQLite holds)
                self._retry_files.append((retired, used, self._stage_seq - 1))
            if held:  # nothing is staged until this commit is done: a kill would replay it without `held`
                self._block()
        groups, states = self._retry_groups, self._retry_states  # with what failed attempts kept, if any
        count = 0
        for item in items:
            count += _take(item, groups, states)
        self._retry_count += count
        if not (groups or states or self._retry_files or self._unsaved) and self._db is not None:
            return markers
        rows: list[tuple] = []
        saved: dict[str, int] = {}
        oversize = 0
        try:
            if self._db is None:
                self._open_file()
            if groups or states or self._retry_files or self._unsaved:
                # (a record over the whole buffer's size is left out, and counted with this commit: once)
                rows, oversize = _rows(groups, self._now(), self.max_size)
                extra = {"oversize": oversize} if oversize else None
                db = self._db
                try:
                    saved = self._store(rows, states, self._stage_seq - 1, extra)
                except sqlite3.DatabaseError as exc:  # the file found damaged: this commit goes into a new one
                    if not _corrupt(exc) or not self._start_anew(db, exc):
                        raise
                    saved = self._store(rows, states, self._stage_seq - 1, extra)
        except (sqlite3.Error, OSError, BufferInUse) as exc:  # disk full, an I/O error: kept, tried again
            self._commit_failed(exc, bool(held))
            for marker in markers:
                marker.ok = False
            return markers
        except Exception as exc:  # a bug: trying again would fail again, so these records are lost here, counted
            count, files = self._retry_done(committed=False)
            _report(f"telemetry buffer write failed, {count} records dropped: {exc!r}")
            self._restock(files)
            with self._lock:
                self._restage()
            self._count_drop("write_error", count)
            for marker in markers:
                marker.ok = False
            return markers
        count, files = self._retry_done(committed=True)
        self._restock(files)  # their frames are in SQLite now: zeroed, reused
        with self._lock:  # the frames held during the commit go into the stage file now, in order
            self._restage()
        for reason, dropped in saved.items():  # counted while nothing could be written: reported now
            self._notify_drop(reason, dropped)
        if oversize:
            count -= oversize
            self._dropped["oversize"] = self._dropped.get("oversize", 0) + oversize
            _report(f"telemetry buffer: {oversize} record(s) larger than the whole buffer (telemetry.buffer.max_size, "
                    f"{self.max_size} bytes compressed) dropped (counted as dropped, reason oversize)")
            self._notify_drop("oversize", oversize)
        nbytes = sum(row[4] for row in rows)
        self._written += count
        if self.on_commit is not None:
            self.on_commit(self._stored_records + count)
        with self._db_lock:  # (a renewal holds it: counted in the file they are in, or with the one set aside)
            renewed = self._inserted_in != self._renewals
            if not renewed:
                self._stored_bytes += nbytes
                self._stored_records += count
        if renewed:  # committed into a file set aside since (the shipper's read or ack met its damage): lost
            self._dropped["corrupt_buffer"] = self._dropped.get("corrupt_buffer", 0) + count
            self._notify_drop("corrupt_buffer", count)
        self._since_checkpoint += nbytes
        return markers

    def _retry_done(self, committed: bool) -> tuple[int, list[tuple[mmap.mmap, int, int]]]:
        """End what failed commits kept (committed now, or lost to a bug); returns the records and stage files."""
        count, files = self._retry_count, self._retry_files
        self._retry_groups, self._retry_states, self._retry_files, self._retry_count = {}, {}, [], 0
        self._retry_blocked = False
        self._retry_at = self._retry_delay = 0.0
        self._freeing_futile = False
        if self._retry_error is not None and committed:
            shed = f"; {self._retry_shed} were dropped past the limit (write_error)" if self._retry_shed else ""
            _report(f"telemetry buffer: writing works again; the {count} records kept while it failed are "
                    f"committed{shed}")
        self._retry_error, self._retry_shed = None, 0
        return count, files

    def _commit_failed(self, exc: BaseException, unstaged: bool) -> None:
        """After a failed commit: its records stay (see `_commit`) for the next attempt, after a back-off that
        doubles up to `_RETRY_MAX`. Held frames (records in no stage file: `unstaged`) make staging stop until
        they are committed, since a kill must leave a prefix of what was appended (a later tailer offset staged
        without its lines resumed the tailer past them); so do `_RETRY_FILES` stage files kept, which bounds
        the disk they take. Reported once per failing spell."""
        if unstaged or len(self._retry_files) >= _RETRY_FILES:
            self._retry_blocked = True
        if self._db is not None:  # a current and a standby stage file, where they can be made
            self._restock([])
        with self._lock:  # the frames held during the commit: staged behind the others, or held while stopped
            self._restage()
        self._retry_delay = min(_RETRY_MAX, 2 * self._retry_delay) if self._retry_delay else _RETRY_FIRST
        self._retry_at = time.monotonic() + self._retry_delay
        problem = " ".join(str(exc).split()) or type(exc).__name__
        if self._retry_error is None:
            _report(f"telemetry buffer: a commit failed ({problem}); its {self._retry_count} records are kept (the "
                    f"stage files holding them are not reused) and committed with the next attempt, every "
                    f"{_RETRY_MAX:g} s at most; past {self.retry_limit} records waiting, the least valuable are "
                    f"dropped (counted as write_error)")
        self._retry_error = problem
        if self._retry_count > self.retry_limit:
            self._shed()

    def _shed(self) -> None:
        """More than `retry_limit` records wait for a commit that fails: the least valuable go, lowest class first
        and oldest first within it (error records only when nothing else is left), counted as write_error. The
        count is saved with the next commit that works, and reported then (`_unsaved`)."""
        excess, shed = self._retry_count - self.retry_limit, 0
        for key in sorted(self._retry_groups, key=lambda key: key[1]):
            records = self._retry_groups[key]
            n = min(excess - shed, len(records))
            del records[:n]
            if not records:
                del self._retry_groups[key]
            shed += n
            if shed >= excess:
                break
        if not shed:
            return
        self._retry_count -= shed
        if not self._retry_shed:
            _report(f"telemetry buffer: more than {self.retry_limit} records wait for a commit that fails; the least "
                    f"valuable are dropped (counted as write_error)")
        self._retry_shed += shed
        self._dropped["write_error"] = self._dropped.get("write_error", 0) + shed
        with self._db_lock:
            self._unsaved["write_error"] = self._unsaved.get("write_error", 0) + shed

    def _store(self, rows: list[tuple], states: dict[str, str], seq: int,
               extra: dict[str, int] | None = None) -> dict[str, int]:
        """`_insert`, with the drop counts not saved yet (`_unsaved`): returns those it saved. On a full disk
        (SQLITE_FULL) room is made (`_free_space`) and the insert tried again, up to three times, each making
        room for twice as much; when that did not help (the disk is too full for SQLite's journal, say), not
        again until a commit works: it would only drop more. `extra`: drop counts of this commit's own (saved
        in its transaction, not returned)."""
        rounds = 0
        while True:
            with self._db_lock:
                unsaved = dict(self._unsaved)
            drops = dict(unsaved)
            for reason, count in (extra or {}).items():
                drops[reason] = drops.get(reason, 0) + count
            try:
                self._insert(rows, states, seq, drops)
                break
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorname", "") != "SQLITE_FULL" or self._freeing_futile or rounds == 3 \
                        or not self._free_space(rows, 1 << rounds):
                    self._freeing_futile = self._freeing_futile or rounds > 0
                    raise
                rounds += 1
        self._freeing_futile = False
        with self._db_lock:
            for reason, count in unsaved.items():  # those added meanwhile stay
                left = self._unsaved.get(reason, 0) - count
                if left > 0:
                    self._unsaved[reason] = left
                else:
                    self._unsaved.pop(reason, None)
        return unsaved

    def _free_space(self, rows: list[tuple], factor: int) -> bool:
        """Room for `rows` (chunk rows) on a full disk: stored chunks dropped as the size cap drops them, least
        valuable class first and oldest first within it, each only for records of its class or above (an error
        record never goes for a debug one), `factor` times the bytes those take, counted as disk_full; then a
        WAL checkpoint, so that the next transaction reuses the WAL's space. Whether any chunk was dropped."""
        if not rows:
            return False
        room = {value: factor * sum(row[4] for row in rows if row[1] >= value) for value in range(Value.ERROR + 1)}
        chosen: list[tuple[int, int, int, int]] = []
        freed = 0
        with self._db_lock:
            cursor = self._db.execute(
                "SELECT id, count, sent, nbytes, value FROM chunks WHERE value <= ? ORDER BY value, id",
                (max(row[1] for row in rows),))
            for chunk_id, count, sent, nbytes, value in cursor:
                if freed >= room.get(value, 0):
                    break
                chosen.append((chunk_id, count, sent, nbytes))
                freed += nbytes
            cursor.close()
            if not chosen:
                return False
            try:
                lost = self._drop_chunks("disk_full", chosen)
            except sqlite3.Error:
                return False
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        _report(f"telemetry buffer: the disk is full; {sum(c[1] - c[2] for c in chosen)} of the least valuable stored "
                f"records were dropped to make room (counted as dropped, reason disk_full)")
        self._notify_drop("disk_full", lost)
        return True

    def _insert(self, rows: list[tuple], states: dict[str, str], seq: int, drops: dict[str, int] | None = None) -> None:
        """One transaction: the chunks, the state values, the stage file's number and, for a stage file moved
        in, the drop counts of its damaged frames (counted exactly once, with the frames that were kept)."""
        resource = self._resource_unsaved and bool(rows)
        with self._db_lock, self._transaction():
            self._inserted_in = self._renewals  # the file these rows went into (`_commit` counts them in it)
            if resource:  # not recorded at open (a full disk): before this owner's first records
                self._record_resource()
            self._db.executemany(
                "INSERT INTO chunks(kind, value, created, count, nbytes, data) VALUES (?, ?, ?, ?, ?, ?)", rows)
            items = [*states.items(), (_STAGE_KEY, str(seq))]
            self._db.executemany("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", items)
            if drops:
                self._db.executemany(_ADD_COUNTER, list(drops.items()))
        if resource:
            self._resource_unsaved = False
            self._load_resources()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT (the caller holds _db_lock); on any error, ROLLBACK and raise. Every transaction of
        the buffer goes through here: one left open (an ack that failed on a transient I/O error) made every
        later BEGIN fail, "cannot start a transaction within a transaction", and every record after it was
        dropped as write_error until the process restarted. A ROLLBACK that fails too leaves a connection in
        an unknown state (a transaction perhaps still open): it is closed (which ends that transaction) and
        the file opened again (`_reopen_db`)."""
        if self._db_broken:  # closed after a failed ROLLBACK, and opening it again failed: try again now
            self._reopen_db()
        self._db.execute("BEGIN")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            try:
                if self._db.in_transaction:  # a failed COMMIT may have ended it already
                    self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                self._reopen_db(f"a rollback failed ({' '.join(str(exc).split()) or type(exc).__name__})")
            raise

    def _reopen_db(self, why: str | None = None) -> None:
        """Close the connection and open the file again as the buffer opens it (`_connect`); the caller holds
        _db_lock. Closing ends whatever transaction the connection still had (SQLite rolls it back), and
        releases its locks: a new connection opened beside it waited for its write lock and failed. Reported
        once per failure (`why`); when opening fails, the next transaction tries again (raising until then)."""
        try:
            self._db.close()
        except sqlite3.Error:
            pass  # closed all the same, or unusable anyway: the new connection replaces it
        try:
            self._db = _connect(self.path)
            self._file = _file_id(self.path)
        except sqlite3.Error as exc:
            self._db_broken = True
            if why is not None:
                _report(f"telemetry buffer: {why}; the SQLite connection was closed and could not be opened "
                        f"again ({' '.join(str(exc).split()) or type(exc).__name__}); tried again at the next write")
                return
            raise
        self._db_broken = False
        if why is not None:
            _report(f"telemetry buffer: {why}; the SQLite connection was closed and opened again")

    def _check_file(self) -> None:
        """Whether the file the connection has open is still the one at the path (the writer, at each pass: one
        stat): one deleted (or replaced) while the process ran went unnoticed, its records lost uncounted at
        close and the tailer's offsets with them (it shipped everything again after the restart). So for the
        lock file: one removed let a second process own the buffer (and move in this one's live stage files)."""
        self._check_lock()
        db = self._db
        if db is None or self._db_broken or self._file is None or _file_id(self.path) == self._file:
            return
        self._start_anew(db, None)

    def _check_lock(self) -> None:
        """The advisory lock's file removed (or replaced) while held: a lock is taken on a new one at the path, so
        that a process opening the buffer after this pass finds it held (`BufferInUse`). Should another have
        taken it meanwhile, two own the buffer: reported, the old lock kept."""
        held, path = self._lock_file, self.path.with_name(self.path.name + ".lock")
        if held is None:
            return
        st = os.fstat(held.fileno())
        now = _file_id(path)
        if now == (st.st_dev, st.st_ino) or (now is not None and now == self._lock_clash):
            return
        try:
            lock_file = open(path, "a+")
        except OSError as exc:
            _report(f"telemetry buffer: {path.name} was removed while held and cannot be made again ({exc})")
            return
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            self._lock_clash = now  # (said once)
            _report(f"telemetry buffer: {path.name} was removed while held, and another process has locked the "
                    f"new one: two processes use {self.path.name} (records may be shipped twice)")
            return
        held.close()
        self._lock_file = lock_file
        _report(f"telemetry buffer: {path.name} was removed while held; locked again")

    def _start_anew(self, db: sqlite3.Connection | None, exc: BaseException | None) -> bool:
        """`_renew` from the writer thread (it holds no lock), the drops counted then reported. Whether a new
        file is open now (also when the shipper renewed it first)."""
        with self._db_lock:
            renewed = self._renew(db, exc) if db is not None else {}
            ok = self._db is not None and not self._db_broken
        for reason, count in renewed.items():
            self._notify_drop(reason, count)
        return ok

    def _renew(self, db: sqlite3.Connection, exc: BaseException | None) -> dict[str, int]:
        """Carry on in a new file while the process runs (the caller holds _db_lock; nothing when `db`, the
        connection that failed, is no longer the current one: renewed already). `exc`: SQLite found the file
        damaged (SQLITE_CORRUPT from a commit, a read, an ack): a damaged index used to fail every commit and
        read after it, restarts included, so that nothing shipped again. It is set aside as at open
        (`<name>.corrupt-<time>`) and its pending records counted as dropped (`corrupt_buffer`). None: the file
        was deleted or replaced under the process (`_check_file`): what it holds, still readable through the
        open connection, is copied into a new file at the path, nothing lost (should the copy fail, counted as
        for a damaged file). The state values (the tailer's offsets) and the drop counts go into the new file.
        Returns the drops counted and saved, to be reported (`on_drop`)."""
        if self._db is not db or (self._db_broken and not (exc is not None and _corrupt(exc))):
            return {}  # (broken and damaged: reopening it fails at its check every time, so it is set aside)
        problem = (" ".join(str(exc).split()) or type(exc).__name__) if exc is not None else ""
        states: dict[str, str] = {}
        with contextlib.suppress(sqlite3.Error):
            states = dict(db.execute("SELECT key, value FROM state").fetchall())
        present = [suffix for suffix in ("", "-wal", "-shm") if os.path.lexists(f"{self.path}{suffix}")]
        aside = None
        if exc is None and "" not in present:  # removed: its -wal and -shm (copied below, with it) are no use alone
            for suffix in present:
                _unlink(Path(f"{self.path}{suffix}"))
        elif exc is None:  # another file put in its place: kept for inspection, alone (the -wal and -shm at the
            aside = _set_aside(self.path, ("",))  # path are ours, closed below; beside it they spoil that file)
        elif present:  # damaged: kept for inspection
            aside = _set_aside(self.path)
        copied = False
        if exc is None:
            fresh = self.path.with_name(self.path.name + ".new")
            _unlink(fresh)
            try:
                target = sqlite3.connect(str(fresh))
                try:
                    db.backup(target)
                finally:
                    target.close()
                copied = True
            except sqlite3.Error as error:
                problem = f"removed, and its copy failed ({' '.join(str(error).split()) or type(error).__name__})"
                _unlink(fresh)
        with contextlib.suppress(sqlite3.Error):
            db.close()  # before a file is opened at the path: closing, SQLite removes the -wal by its name
        if copied:
            os.replace(fresh, self.path)
        drops: dict[str, int] = {}
        pending = self._stored_records
        if not copied:  # its records are not shipped; those dropped while in flight can be delivered no more
            self._renewals += 1
            drops["corrupt_buffer"] = self._stored_records
            for reason, count, delivered in self._dropped_handed.values():
                drops[reason] = drops.get(reason, 0) + count - delivered
            drops = {reason: count for reason, count in drops.items() if count > 0}
            self._stored_records = self._stored_bytes = 0
            self._handed.clear()
            self._dropped_handed.clear()
            for reason, count in drops.items():
                self._dropped[reason] = self._dropped.get(reason, 0) + count
        try:
            self._db = _connect(self.path)
            self._file = _file_id(self.path)
            if not copied:
                # The last stage file in SQLite (the old one's, else the file before those not committed yet), so
                # that a restart sees no gap: never a later one, whose frames would not be moved in.
                with self._lock:
                    first = min([seq for _, _, seq in self._retry_files] + [self._stage_seq])
                states.setdefault(_STAGE_KEY, str(first - 1))
                states["buffer.max_size"] = str(self.max_size)
                counters = [(reason, count - self._unsaved.get(reason, 0)) for reason, count in self._dropped.items()]
                with self._transaction():
                    self._db.executemany("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", list(states.items()))
                    self._db.executemany(_ADD_COUNTER, [row for row in counters if row[1] > 0])
                    self._record_resource()
                self._resources = [(int(first), str(attributes)) for first, attributes in self._db.execute(
                    "SELECT first_chunk, attributes FROM resources ORDER BY first_chunk").fetchall()]
        except sqlite3.Error as error:  # counted all the same: saved with the next commit that works
            if self._db is db:
                self._db_broken = True  # (closed) opened again by the next transaction (`_reopen_db`)
            for reason, count in drops.items():
                self._unsaved[reason] = self._unsaved.get(reason, 0) + count
            drops = {}
            why = " ".join(str(error).split()) or type(error).__name__
            problem += f"; the new file could not be set up yet ({why})"
        what = ("its content was copied into a new file there, nothing lost" if copied else
                f"a new buffer started; its {pending} pending records will not be shipped (counted as dropped, "
                f"reason corrupt_buffer)")
        _report(f"telemetry buffer: {self.path.name} " + (f"is corrupt ({problem})" if exc is not None else
                f"was removed or replaced while in use{f' ({problem})' if problem else ''}")
                + (f"; moved aside as {aside.name} (kept for inspection)" if aside is not None else "") + f"; {what}")
        return drops

    # --- the SQLite file ----------------------------------------------------------------------------

    def _open_file(self) -> None:
        """Take the advisory lock, open the SQLite file (`_open_db`), move in the stage files a killed process
        left and read the counts. At start; after a start where that failed (a full disk), by the writer at each
        commit attempt until it works. A failure leaves the file closed; what was done stays done (a stage file
        moved in is not moved again, a corrupt file set aside is counted once)."""
        if self._lock_file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+")
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock_file.close()
                raise BufferInUse(f"telemetry buffer {self.path} is held by another process") from None
            self._lock_file = lock_file
        db = self._open_db()
        with self._db_lock:
            self._db = db
            self._file = _file_id(self.path)
        try:
            self._resource_unsaved = False  # (set by _register_resource: stage files moved in are an earlier owner's)
            seq = self._recover_stage_files()
            self._register_resource()
            # Its own limit (the process's share of the machine's), for readers such as `emp-machine telemetry`.
            with contextlib.suppress(sqlite3.Error):  # only for them: a full disk must not stop the open here
                db.execute("INSERT OR REPLACE INTO state(key, value) VALUES ('buffer.max_size', ?)",
                           (str(self.max_size),))
            stored = db.execute(
                "SELECT COALESCE(SUM(nbytes), 0), COALESCE(SUM(count - sent), 0) FROM chunks").fetchone()
            self._count_left_in_flight()
            counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
            dead = int(db.execute("SELECT COALESCE(SUM(count), 0) FROM dead_letter").fetchone()[0])
        except BaseException:
            with self._db_lock:
                self._db = None
            db.close()
            raise
        self._stage_seq = seq
        self._stored_bytes, self._stored_records = int(stored[0]), int(stored[1])
        # What earlier runs dropped (the damage found while opening is this run's news): a process's metrics
        # count from here, since their start time is the process's (from 0 at each start, as OTel expects).
        before = dict(counters)
        for reason, count, saved in self._startup_drops:
            if saved:
                before[reason] = before.get(reason, 0) - count
        self.dropped_before_open.update((reason, count) for reason, count in before.items() if count > 0)
        for reason, count in counters.items():  # on top of what this run counted while the file was not open
            self._dropped[reason] = self._dropped.get(reason, 0) + int(count)
        self._dead = dead
        startup, self._startup_drops = self._startup_drops, []
        for reason, count, saved in startup:  # counted and reported like any drop, never silent
            if saved:  # saved with the frames moved in, so in the counters read just above
                self._notify_drop(reason, count)
            else:
                self._count_drop(reason, count)
        self.open_error = None

    def _register_resource(self) -> None:
        """Record in the file that the chunks from the next id on are the owner's (its resource attributes,
        table `resources`), unless the last entry says so already, and forget entries no pending chunk needs any
        more; then keep the entries in memory for `resource_of`. After the stage files of a killed earlier
        owner were moved in (theirs stay under its entry). Should that fail (a full disk), the open goes on:
        the entry is written in the transaction of the first records committed (`_insert`)."""
        try:
            with self._db_lock, self._transaction():
                self._record_resource()
                # The entry of the oldest pending chunk and those after it are needed (with no chunk, the last).
                self._db.execute(
                    "DELETE FROM resources WHERE first_chunk < COALESCE((SELECT MAX(first_chunk) FROM resources "
                    "WHERE first_chunk <= COALESCE((SELECT MIN(id) FROM chunks), 9223372036854775807)), 0)")
        except sqlite3.Error as exc:
            self._resource_unsaved = self._resource is not None
            _report(f"telemetry buffer: {self.path.name}: this process's resource could not be recorded yet "
                    f"({' '.join(str(exc).split()) or type(exc).__name__}); it is, with the first records committed")
        self._load_resources()

    def _record_resource(self) -> None:
        """The owner's entry in `resources`, where the last one is not it already (the caller holds _db_lock, in
        a transaction). AUTOINCREMENT: chunk ids are never reused, so every later chunk is the owner's."""
        if self._resource is None:
            return
        last = self._db.execute("SELECT attributes FROM resources ORDER BY first_chunk DESC LIMIT 1").fetchone()
        if last is None or last[0] != self._resource:
            seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
            self._db.execute("INSERT OR REPLACE INTO resources(first_chunk, attributes) VALUES (?, ?)",
                             ((int(seq[0]) if seq else 0) + 1, self._resource))

    def _load_resources(self) -> None:
        with self._db_lock:
            try:
                rows = self._db.execute("SELECT first_chunk, attributes FROM resources ORDER BY first_chunk").fetchall()
            except (sqlite3.Error, AttributeError):  # not open (AttributeError: closed and not reopened yet)
                return
        self._resources = [(int(first), str(attributes)) for first, attributes in rows]

    def resource_of(self, chunk_id: int) -> str | None:
        """The resource attributes (JSON) of the process that made chunk `chunk_id`, as recorded in the file;
        None for chunks written before buffers recorded it (or while the file is not open)."""
        entries = self._resources
        index = bisect.bisect_right(entries, (chunk_id, "\U0010ffff")) - 1
        return entries[index][1] if index >= 0 else None

    def _not_open(self, exc: BaseException) -> None:
        """A start where the file cannot be opened (disk full, an I/O error, permissions): the process starts all
        the same (a worker restarted on a full disk used to crash-loop, running no job). Records wait in memory (no
        stage files: they need the disk), within `retry_limit`, and the writer tries to open the file at each
        commit attempt, backing off up to `_RETRY_MAX` (`_commit`). Reported once."""
        problem = " ".join(str(exc).split()) or type(exc).__name__
        self.open_error = self._retry_error = problem
        self._retry_delay = _RETRY_FIRST
        self._retry_at = time.monotonic() + _RETRY_FIRST
        _report(f"telemetry buffer: {self.path} cannot be opened ({problem}); records wait in memory (at most "
                f"{self.retry_limit}, beyond that the least valuable are dropped, counted as write_error) and opening "
                f"it is tried again every {_RETRY_MAX:g} s at most")

    def _open_db(self) -> sqlite3.Connection:
        """The SQLite file, ready. One that SQLite finds corrupt, or that is not a buffer, is moved aside with
        its -wal and -shm (kept for inspection, never deleted), reported and counted, and a new one is made: a
        damaged file used to stop its process at every start (a worker crash-looped until it was deleted by
        hand). Errors that say nothing against the file (disk full, I/O, permissions, locked) are raised (to
        `_open_file`: the buffer then starts without its file and opens it later). A path (or its -wal, -shm)
        that is not a regular file (a directory, a FIFO) is moved aside the same way: SQLite failed on it at
        every attempt, and the buffer ran from memory for good; a -wal or -shm alone goes alone (it held no
        records: a WAL that is not a file was never written)."""
        for suffix in ("-wal", "-shm"):
            if _not_a_file(f"{self.path}{suffix}"):
                aside = _set_aside(Path(f"{self.path}{suffix}"), ("",))
                _report(f"telemetry buffer: {self.path.name}{suffix} is not a regular file; moved aside as "
                        f"{aside.name}")
        wal = f"{self.path}-wal"
        self._wal_at_open = os.path.getsize(wal) if os.path.isfile(wal) else 0  # (see `_recover_stage_files`)
        if _not_a_file(str(self.path)):
            aside = _set_aside(self.path)
            _report(f"telemetry buffer: {self.path.name} is not a regular file (it holds no records); moved aside "
                    f"as {aside.name} and a new buffer started")
        try:
            return _connect(self.path)
        except sqlite3.DatabaseError as exc:
            if not _damaged(exc):
                raise
            problem = " ".join(str(exc).split()) or type(exc).__name__
        aside = _set_aside(self.path)
        lost = _pending_in(aside)
        db = _connect(self.path)
        if lost is None:  # how many cannot be told: counted as one, so that the drop shows at all
            self._startup_drops.append(("corrupt_buffer", 1, False))
            what = ("the records in it cannot be read and will not be shipped; how many is unknown "
                    "(counted as 1 dropped, reason corrupt_buffer)")
        else:
            self._startup_drops.append(("corrupt_buffer", lost, False))
            what = f"its {lost} pending records will not be shipped (counted as dropped, reason corrupt_buffer)"
        _report(f"telemetry buffer: {self.path.name} is corrupt ({problem}); moved aside as {aside.name} "
                f"(kept for inspection) and a new buffer started; {what}")
        return db

    # --- stage files ---------------------------------------------------------------------------------

    def _stage_path(self, seq: int) -> Path:
        return self.path.with_name(f"{self.path.name}.stage.{seq}")

    def _open_stage(self, seq: int) -> mmap.mmap | None:
        """A new stage file, its blocks reserved (a full disk fails here, not as a SIGBUS when a producer writes
        into the mapping) and mapped; None, reported, when that cannot be done."""
        path = self._stage_path(seq)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if _fallocate is not None:
                    _fallocate(fd, 0, _STAGE_SIZE)
                else:  # macOS has no posix_fallocate: a sparse file (a full disk could then fail a copy)
                    os.ftruncate(fd, _STAGE_SIZE)
                stage = mmap.mmap(fd, _STAGE_SIZE)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            if not self._stage_failing:  # once per failing spell: it is tried again after each commit
                _report(f"telemetry buffer: no stage file ({exc}); records wait in memory until each commit")
            self._stage_failing = True
            _unlink(path)
            return None
        self._stage_failing = False
        return stage

    def _use_stage(self, stage: mmap.mmap | None, standby: mmap.mmap | None) -> None:
        """Make `stage` the file producers write to (called under _lock, or before the writer starts); frames
        held in memory go into it first, in order (`_restage`)."""
        self._stage, self._standby, self._pos = stage, standby, 0
        self._limit = _STAGE_SIZE if stage is not None else 0
        self._wake_at = _STAGE_SIZE // 2 if stage is not None else 1 << 62
        if self._held or self._retry_blocked:
            self._restage()

    def _restock(self, retired: list[tuple[mmap.mmap, int, int]]) -> None:
        """After a commit: the retired stage files (map, bytes used, number; their frames now in SQLite), zeroed
        where they were written, become the file producers write to when they have none, then the standby; any
        others are removed. A new file is made where none is left."""
        spare: list[tuple[mmap.mmap, int]] = []
        for stage, used, seq in retired:
            try:
                stage[:used] = bytes(used)
            except (OSError, ValueError) as exc:
                _report(f"telemetry buffer: stage file not reused ({exc})")
                stage.close()
                _unlink(self._stage_path(seq))
            else:
                spare.append((stage, seq))

        def reuse(seq: int) -> mmap.mmap | None:
            while spare:
                stage, was = spare.pop(0)
                try:
                    os.replace(self._stage_path(was), self._stage_path(seq))
                    return stage
                except OSError as exc:
                    _report(f"telemetry buffer: stage file not reused ({exc})")
                    stage.close()
                    _unlink(self._stage_path(was))
            return self._open_stage(seq)

        if self._stage is None:
            stage = reuse(self._stage_seq)
            if stage is not None:
                with self._lock:
                    self._use_stage(stage, None)
        if self._standby is None and self._stage is not None:
            standby = reuse(self._stage_seq + 1)
            with self._lock:
                self._standby = standby
        for stage, seq in spare:  # more than two were kept while commits failed
            stage.close()
            _unlink(self._stage_path(seq))

    def _recover_stage_files(self) -> int:
        """Move frames left in stage files (a killed process) into SQLite, oldest file first; returns the
        sequence number for this process's first stage file."""
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (_STAGE_KEY,)).fetchone()
        committed = recorded = int(row[0]) if row else 0
        found = []
        prefix = f"{self.path.name}.stage."
        for entry in os.listdir(self.path.parent):
            if entry.startswith(prefix) and entry[len(prefix):].isdigit():
                found.append(int(entry[len(prefix):]))
        later = [seq for seq in found if seq > committed]
        # Not for a file set aside just now, nor one with no number and no WAL (new, or made by an earlier
        # version): theirs is no gap.
        renewed = any(reason == "corrupt_buffer" for reason, _, _ in self._startup_drops)
        if later and min(later) > committed + 1 and not renewed and (row is not None or self._wal_at_open):
            # Each stage file retired was committed with its number, and the files are numbered on from the
            # last one at open (recorded below): files past the next one mean commits SQLite no longer has, a
            # damaged -wal (it keeps the commits before the first bad frame, silently). How many records they
            # held is not known: one per commit lost, a lower bound, so that the loss shows at all.
            gap = min(later) - committed - 1
            self._startup_drops.append(("corrupt_buffer", gap, False))
            _report(f"telemetry buffer: {self.path.name} lacks the last {gap} commit(s) its stage files say were made "
                    f"(after stage file {committed}: a damaged -wal?); their records are lost (counted as {gap} "
                    f"dropped, one per commit, reason corrupt_buffer)")
        for seq in sorted(found):
            path = self._stage_path(seq)
            if seq > committed:
                read: tuple[int, int] | None = None  # (records readable, records lost in damaged frames)
                try:
                    groups, states, lost, notes = _scan_frames(path.read_bytes())
                    read = (sum(len(records) for records in groups.values()), lost)
                    oversize = 0
                    if groups or states or lost:
                        rows, oversize = _rows(groups, self._now(), self.max_size)
                        drops = {reason: n for reason, n in (("corrupt", lost), ("oversize", oversize)) if n}
                        self._insert(rows, states, seq, drops or None)
                        recorded = seq
                except sqlite3.OperationalError:  # SQLite cannot write now (disk full, I/O): nothing against the file,
                    raise  # which stays as it is; the open fails and is tried again (`_open_file`)
                except Exception as exc:  # an unreadable file must not stop telemetry from starting
                    # read, but SQLite refused the records (not for want of room): dropped, counted
                    if read is not None:
                        self._startup_drops += [("write_error", read[0], False), ("corrupt", read[1], False)]
                    _report(f"telemetry buffer: {path.name} could not be moved in ({exc!r}); "
                            + (f"its {read[0]} records are counted as dropped; " if read is not None else "")
                            + "kept as .bad")
                    self._keep_bad(path)
                    continue
                committed = seq
                if oversize:
                    self._startup_drops.append(("oversize", oversize, True))
                if lost:
                    self._startup_drops.append(("corrupt", lost, True))
                    # A torn end is what a cut-short file leaves; damage before the end is kept for inspection.
                    keep = any(not note.startswith("a torn frame") for note in notes)
                    _report(f"telemetry buffer: {path.name}: {lost} record(s) in damaged frames could not be moved "
                            f"in and are counted as dropped (corrupt); the {read[0]} readable ones were "
                            f"({'; '.join(notes[:5])}{'; ...' if len(notes) > 5 else ''})"
                            + (f"; the file is kept as {path.name}.bad" if keep else ""))
                    if keep:
                        self._keep_bad(path)
                        continue
            os.unlink(path)  # moved now, or earlier by a process killed before it could remove the file
        self._sweep_bad()
        last = max([committed, *found])
        if last > recorded:  # files with nothing to move in: numbered past, so that no gap shows at the next open
            with contextlib.suppress(sqlite3.Error):  # (only that: a full disk must not stop the open here)
                self._db.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", (_STAGE_KEY, str(last)))
        return last + 1

    def _keep_bad(self, path: Path) -> None:
        """Set a damaged stage file aside as `.bad`, dated now (it is kept for the buffer's retention)."""
        bad = path.with_name(path.name + ".bad")
        try:
            os.replace(path, bad)
            os.utime(bad)
        except OSError as exc:  # moved in already or not, the next start sees it again
            _report(f"telemetry buffer: {path.name} not set aside ({exc})")

    def _sweep_bad(self) -> None:
        """Damaged stage files set aside are kept as long as the buffer's retention, and at most `_BAD_KEPT`
        of them (newest first): for inspection, never a growing pile."""
        prefix = f"{self.path.name}.stage."
        kept = []
        for entry in os.listdir(self.path.parent):
            if entry.startswith(prefix) and entry.endswith(".bad"):
                try:
                    kept.append((os.stat(self.path.parent / entry).st_mtime, entry))
                except OSError:
                    pass
        kept.sort(reverse=True)
        oldest = time.time() - self.retention
        for index, (mtime, entry) in enumerate(kept):
            if index >= _BAD_KEPT or mtime < oldest:
                _unlink(self.path.parent / entry)

    def _count_left_in_flight(self) -> None:
        """Pending drops an earlier run left (records dropped while in flight, then killed before their fate was
        known): no ack can deliver them any more, so they are lost. Counted as this run's news (a drop found
        while opening), in one transaction; left pending for the next start if that fails."""
        left = [(str(name), int(value)) for name, value in
                self._db.execute("SELECT name, value FROM pending_drops").fetchall() if int(value) > 0]
        if not left:
            return
        try:
            with self._db_lock, self._transaction():
                self._db.executemany(_ADD_COUNTER, left)
                self._db.execute("DELETE FROM pending_drops")
        except sqlite3.Error as exc:
            _report(f"telemetry buffer: {sum(n for _, n in left)} records lost in flight by an earlier run could "
                    f"not be counted ({exc}); tried again at the next start")
            return
        self._startup_drops += [(name, value, True) for name, value in left]

    def _enforce_limits(self) -> None:
        if self._db is None:  # not open yet (a start on a full disk)
            return
        elapsed = self._elapsed()
        if elapsed - self._last_retention >= 1.0 or not self._last_retention:
            self._last_retention = elapsed
            now = self._now()  # after a wall-clock step, the chunks' times are moved with it first
            report = 0
            with self._db_lock:
                expired = self._db.execute(
                    "SELECT id, count, sent, nbytes FROM chunks WHERE created < ?", (now - self.retention,)).fetchall()
                if expired:
                    report = self._drop_chunks("expired", expired)
            self._notify_drop("expired", report)
        if self._stored_bytes > self.max_size:
            # A chunk larger than the whole buffer alone (stored before the cap was lowered, say) goes first, on
            # its own (`oversize`): choosing victims for it dropped every other chunk, error ones too, then it.
            with self._db_lock:
                big = self._db.execute(
                    "SELECT id, count, sent, nbytes FROM chunks WHERE nbytes > ?", (self.max_size,)).fetchall()
                report = self._drop_chunks("oversize", big) if big else 0
            self._notify_drop("oversize", report)
        while self._stored_bytes > self.max_size:
            with self._db_lock:
                # Least valuable class first, oldest first within it (ERROR only when nothing else remains).
                victims = self._db.execute(
                    "SELECT id, count, sent, nbytes FROM chunks ORDER BY value, id LIMIT 16").fetchall()
                excess = self._stored_bytes - self.max_size
                chosen = []
                for victim in victims:
                    chosen.append(victim)
                    excess -= victim[3]
                    if excess <= 0:
                        break
                if not chosen:
                    break
                report = self._drop_chunks("buffer_full", chosen)
            self._notify_drop("buffer_full", report)
        if self._since_checkpoint >= self.segment_size:
            self._since_checkpoint = 0
            with self._db_lock:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.execute("PRAGMA incremental_vacuum")

    def _now(self) -> float:
        """The wall time, to stamp chunks with (`created`) and to expire them by, once the stored chunks' times
        agree with it: a wall clock that moved, since the last reading, more or less than the elapsed clock did
        (by `_STEP_MIN` or more) was stepped, and every stored chunk's `created` is moved by the step, in one
        transaction, before anything is stamped or expired by the new time. So a record's age is the time it
        really spent here: a step forward of an hour (a host booted with its clock unset, then corrected by NTP)
        no longer expires every record not shipped yet, nor does a step back keep them an hour too long; and
        `created` stays true wall time for readers (`emp-machine telemetry`'s ages, an adopter). Only the writer
        thread (and the open, before it starts) calls this: it alone stamps chunks, so none stamped after a step
        is moved by it. A step while no process holds the file is not seen: the records stored before it have
        only their wall time, and age by the wall clock (a step forward of `retention` or more expires them at
        the next start; a step back keeps them longer).
        The wall reading is taken between two elapsed ones, up to 3 times: a stall of seconds between the two
        clocks' readings (swap, a stopped container) read as a step, moved every chunk by it, and the next clean
        reading moved them back. When no bracket is within `_READ_MAX`, no step is measured, the reference stays,
        and the time returned is the reference's (its wall time plus the elapsed time since): a step hidden in
        such a reading is then seen at the next clean one and moves a chunk stamped meanwhile with the others."""
        for _ in range(3):
            before = self._elapsed()
            wall = self._clock()
            after = self._elapsed()
            if after - before <= _READ_MAX:
                break
        else:
            ref = self._clock_ref
            return wall if ref is None else ref[0] + (after - ref[1])
        elapsed = (before + after) / 2
        ref = self._clock_ref
        if ref is None:
            self._clock_ref = (wall, elapsed)
            return wall
        step = (wall - ref[0]) - (elapsed - ref[1])
        if abs(step) < _STEP_MIN:
            return wall  # the reference stays: no drift accumulates unseen
        if self._db is None:  # not open (a full disk): its chunks are moved once it is
            return wall
        with self._db_lock, self._transaction():  # an error: raised, the reference kept, moved at the next try
            moved = self._db.execute("UPDATE chunks SET created = created + ?", (step,)).rowcount
        self._clock_ref = (wall, elapsed)
        self.clock_steps += 1
        _report(f"telemetry buffer {self.path.name}: the wall clock was stepped by {step:+.1f} s; the times of the "
                f"{moved} stored chunk(s) were moved with it, so their records keep their real age")
        return wall

    def _drop_chunks(self, reason: str, rows: list[tuple[int, int, int, int]]) -> int:
        """Delete dropped chunks, rows (id, count, sent, nbytes), and add their unsent records to the `reason`
        counter in one transaction (committed apart, a kill between them lost records uncounted); the caller
        holds _db_lock. The records of a chunk handed out to the shipper are not counted: an ack may still
        deliver them (see `_advance`). They are pending drops, saved in the same transaction, counted only when
        no ack delivered them (`_settle_handed`, `_count_left_in_flight`): counted at once and taken back off
        at the ack, the count went down, which a counter must never do. Returns the records counted now."""
        held = [row for row in rows if row[0] in self._handed]
        pending = sum(count - sent for _, count, sent, _ in held)
        lost = sum(count - sent for _, count, sent, _ in rows) - pending
        with self._transaction():
            self._db.executemany("DELETE FROM chunks WHERE id = ?", [(row[0],) for row in rows])
            if lost:
                self._db.execute(_ADD_COUNTER, (reason, lost))
            if pending:
                self._db.execute(_ADD_PENDING, (reason, pending))
        self._stored_records -= lost + pending
        self._stored_bytes -= sum(row[3] for row in rows)
        if lost:
            self._dropped[reason] = self._dropped.get(reason, 0) + lost
        for chunk_id, count, sent, _ in held:
            self._dropped_handed[chunk_id] = [reason, count, sent]
        return lost

    def _count_drop(self, reason: str, count: int) -> None:
        """Count records dropped with nothing else to commit (startup, the shipper's, a bug in a commit). A count
        that cannot be saved now (the file failing, or not open) is saved with the next commit that works and
        reported then (`_unsaved`): a report made while nothing can be written would be lost with it."""
        if count <= 0:
            return
        self._dropped[reason] = self._dropped.get(reason, 0) + count
        with self._db_lock:
            try:
                if self._db is None:
                    raise sqlite3.OperationalError(f"the buffer file is not open ({self.open_error})")
                self._db.execute(_ADD_COUNTER, (reason, count))
            except sqlite3.Error as exc:
                self._unsaved[reason] = self._unsaved.get(reason, 0) + count
                problem = " ".join(str(exc).split()) or type(exc).__name__
                _report(f"telemetry buffer: {count} records dropped ({reason}); the count could not be saved yet "
                        f"({problem}): it is saved with the next commit")
                return
        self._notify_drop(reason, count)

    def _notify_drop(self, reason: str, count: int) -> None:
        if self.on_drop is not None and count > 0:
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
            if self._db is None:
                return 0
            row = self._db.execute(
                "SELECT COALESCE(SUM(count - sent), 0) FROM chunks WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def read(self, kind: int, max_records: int) -> list[Chunk]:
        """The oldest unacknowledged chunks of `kind`, up to about `max_records` records (at least one chunk).
        They count as handed out (their request in flight) until the next read of `kind`: the shipper is done
        with one batch of a signal before it reads the next.

        Each chunk is decoded on its own: one whose bytes do not decode (SQLite has no page checksums, so damage
        shows only here) is dropped, counted as `corrupt`, and the others are read; it used to fail every read of
        its kind, so that nothing of that signal shipped until it expired, uncounted."""
        chunks: list[Chunk] = []
        bad: list[tuple[int, int, int, int]] = []
        problem = ""
        total = 0
        renewed: dict[str, int] = {}
        with self._db_lock:
            if self._db is None:  # not open yet (a start on a full disk): nothing committed to read
                return []
            try:
                cursor = self._db.execute(
                    "SELECT id, kind, value, count, sent, data, nbytes FROM chunks WHERE kind = ? ORDER BY id", (kind,))
                for row in cursor:
                    if chunks and total + row[3] - row[4] > max_records:
                        break
                    try:
                        records = decode_chunk(row[5])
                        if type(records) is not list or len(records) != row[3]:
                            raise ValueError(f"{len(records) if type(records) is list else type(records).__name__} "
                                             f"records where {row[3]} were stored")
                    except Exception as exc:  # anything at all, from bytes that are not what they were
                        bad.append((row[0], row[3], row[4], row[6]))
                        problem = problem or (" ".join(str(exc).split()) or type(exc).__name__)
                        continue
                    chunks.append(Chunk(row[0], row[1], row[2], row[3], row[4], records))
                    total += row[3] - row[4]
                    if total >= max_records:
                        break
                cursor.close()
            except sqlite3.DatabaseError as exc:
                if not _corrupt(exc):
                    raise
                # The file itself is damaged (an index, a page of the table): it used to fail every read, restarts
                # included, so that nothing shipped again. Set aside and replaced, its records counted (`_renew`).
                renewed, chunks, bad = self._renew(self._db, exc), [], []
            corrupt = self._drop_corrupt(kind, bad, problem) if bad else 0
            lost = self._settle_handed(kind)
            self._handed.update((chunk.id, kind) for chunk in chunks)
        self._notify_drop("corrupt", corrupt)
        for reason, count in [*renewed.items(), *lost.items()]:
            self._notify_drop(reason, count)
        return chunks

    def _drop_corrupt(self, kind: int, bad: list[tuple[int, int, int, int]], problem: str) -> int:
        """Drop stored chunks that do not decode, rows (id, count, sent, nbytes), counted as `corrupt` (the caller
        holds _db_lock); returns the records counted. Should that fail, the next read tries again."""
        records = sum(count - sent for _, count, sent, _ in bad)
        try:
            counted = self._drop_chunks("corrupt", bad)
        except sqlite3.Error as exc:
            _report(f"telemetry buffer: {len(bad)} stored {_KIND_NAMES.get(kind, kind)} chunk(s) do not decode "
                    f"({problem}) and could not be dropped yet ({exc}); the other chunks are read")
            return 0
        _report(f"telemetry buffer: {len(bad)} stored {_KIND_NAMES.get(kind, kind)} chunk(s) (ids "
                f"{', '.join(str(row[0]) for row in bad[:10])}{', ...' if len(bad) > 10 else ''}) do not decode "
                f"({problem}): their {records} records are dropped (counted, reason corrupt); the others ship")
        return counted

    def _settle_handed(self, kind: int | None) -> dict[str, int]:
        """End the hand-out of `kind` (None: every kind; the caller holds _db_lock): no ack comes for it any
        more, so what no ack delivered of its chunks dropped meanwhile is lost. Counted now: added to the drop
        counters and taken off the pending drops in one transaction. Returns those records by reason, to be
        reported now. If that transaction fails they stay pending, in memory (counted at the next settling)
        and in the file (counted at the next start, should this process not get that far): never twice."""
        for chunk_id, handed_kind in list(self._handed.items()):
            if kind is None or handed_kind == kind:
                del self._handed[chunk_id]
                entry = self._dropped_handed.pop(chunk_id, None)
                if entry is not None and entry[1] > entry[2]:
                    self._settled[entry[0]] = self._settled.get(entry[0], 0) + entry[1] - entry[2]
        lost = self._settled
        if not lost:
            return {}
        try:
            with self._transaction():
                self._db.executemany(_ADD_COUNTER, list(lost.items()))
                self._db.executemany(_LOWER_PENDING, [(count, reason) for reason, count in lost.items()])
                self._db.execute(_CLEAR_PENDING)
        except sqlite3.Error as exc:
            _report(f"telemetry buffer: {sum(lost.values())} records lost in flight could not be counted yet "
                    f"({exc}); tried again later")
            return {}
        self._settled = {}
        for reason, count in lost.items():
            self._dropped[reason] = self._dropped.get(reason, 0) + count
        return lost

    def ack(self, progress: Iterable[tuple[int, int]]) -> None:
        """Mark records accepted: `(chunk_id, sent)` pairs with the new number of records sent from each chunk;
        a chunk fully sent is deleted. Committed in one transaction. Records of a chunk dropped (full, expired)
        while its request was in flight reached the collector all the same: they are taken off the pending
        drops (the chunk is gone, so the ack would otherwise find nothing), and never counted as dropped."""
        with self._db_lock:
            try:
                with self._transaction():
                    advanced = self._advance(progress)
            except sqlite3.DatabaseError as exc:
                if not _corrupt(exc):
                    raise
                # The file itself is damaged: replaced (`_renew`), its records counted, these among them (an
                # overcount of one batch: the collector has them).
                renewed = self._renew(self._db, exc)
            else:
                self._acked += self._advanced(*advanced)
                return
        for reason, count in renewed.items():
            self._notify_drop(reason, count)

    def _advance(self, progress: Iterable[tuple[int, int]]) -> tuple[int, int, list[tuple[int, str, int]]]:
        """The statements of an ack, in the caller's transaction (it holds _db_lock). Returns the records acked
        from stored chunks, the bytes freed, and (chunk id, reason, records) delivered from chunks dropped while
        handed out, taken off the pending drops here (in the same transaction as the rest of the ack)."""
        done = 0
        freed_bytes = 0
        late: dict[int, int] = {}
        for chunk_id, sent in progress:
            if chunk_id not in self._handed and chunk_id not in self._dropped_handed:
                # handed out from a file since renewed (`_renew`): the new file numbers its chunks from 1 again,
                # and an ack of the old file's chunk 1 deleted the new one's, never shipped, uncounted
                continue
            row = self._db.execute("SELECT count, sent, nbytes FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
            if row is None:
                if chunk_id in self._dropped_handed:
                    late[chunk_id] = max(sent, late.get(chunk_id, 0))
                continue
            if sent <= row[1]:
                continue
            done += min(sent, row[0]) - row[1]
            if sent >= row[0]:
                self._db.execute("DELETE FROM chunks WHERE id = ?", (chunk_id,))
                freed_bytes += row[2]
            else:
                self._db.execute("UPDATE chunks SET sent = ? WHERE id = ?", (sent, chunk_id))
        delivered = []
        for chunk_id, sent in late.items():
            reason, count, accounted = self._dropped_handed[chunk_id]
            if min(sent, count) > accounted:
                delivered.append((chunk_id, reason, min(sent, count) - accounted))
        for _, reason, count in delivered:
            self._db.execute(_LOWER_PENDING, (count, reason))
        if delivered:
            self._db.execute(_CLEAR_PENDING)
        return done, freed_bytes, delivered

    def _advanced(self, done: int, freed_bytes: int, delivered: list[tuple[int, str, int]]) -> int:
        """After `_advance` committed (the caller holds _db_lock): the counts in memory. Returns the records
        delivered from chunks dropped while handed out."""
        self._stored_records -= done
        self._stored_bytes -= freed_bytes
        for chunk_id, _, count in delivered:  # pending drops no more: the drop counts stay as they are
            entry = self._dropped_handed[chunk_id]
            entry[2] += count
            if entry[2] >= entry[1]:
                del self._dropped_handed[chunk_id]
        return done + sum(count for _, _, count in delivered)

    def dead_letter(self, kind: int, records: list, progress: Iterable[tuple[int, int]], reason: str) -> None:
        """Move rejected records (a 4xx other than 429) to the dead-letter table, kept and counted. The dead
        letter and the ack of its records are one transaction: committed apart, a kill between them left the
        batch both a dead letter and pending (sent again, dead-lettered and counted twice)."""
        data = _encode_chunk(records)
        with self._db_lock:
            with self._transaction():
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
                lost = sum(c for _, c in overflow)
                if overflow:
                    self._db.executemany("DELETE FROM dead_letter WHERE id = ?", [(r,) for r, _ in overflow])
                    self._db.execute(_ADD_COUNTER, ("dead_letter_overflow", lost))
                advanced = self._advance(progress)
            self._advanced(*advanced)  # not acked: records dropped while in flight are dead letters now
            self._dead += len(records) - lost
            if lost:
                self._dropped["dead_letter_overflow"] = self._dropped.get("dead_letter_overflow", 0) + lost
        self._notify_drop("dead_letter_overflow", lost)

    def dead_letters(self) -> list[tuple[int, int, str, list]]:
        """(kind, count, reason, records) for each dead-letter batch, oldest first."""
        with self._db_lock:
            if self._db is None:
                return []
            rows = self._db.execute("SELECT kind, count, reason, data FROM dead_letter ORDER BY id").fetchall()
        return [(r[0], r[1], r[2], decode_chunk(r[3])) for r in rows]

    def stats(self) -> BufferStats:
        return BufferStats(  # queued: not in SQLite yet (with what failed commits keep)
            queued=len(self._queue) + self._retry_count, stored_records=self._stored_records,
            stored_bytes=self._stored_bytes,
            written_total=self._written,
            acked_total=self._acked, dead_letter_records=self._dead, dropped=dict(self._dropped),
            dropped_pending=sum(entry[1] - entry[2] for entry in list(self._dropped_handed.values()))
            + sum(list(self._settled.values())))

    def close(self, timeout: float = 10.0) -> None:
        """Commit everything queued, stop the writer and release the file."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._wake.set()
        self._writer.join(timeout)
        with self._db_lock:  # no ack comes any more for what the shipper was sending
            lost = self._settle_handed(None) if self._db is not None else {}
        for reason, count in lost.items():
            self._notify_drop(reason, count)
        with self._lock:  # producers from here on only queue (nothing commits it any more)
            stage, standby, used = self._stage, self._standby, self._pos
            self._held = None
            self._use_stage(None, None)
        if stage is not None:
            stage.close()
            if not used:  # frames appended after the last commit stay: moved in at the next open
                _unlink(self._stage_path(self._stage_seq))
        if standby is not None:
            standby.close()
            _unlink(self._stage_path(self._stage_seq + 1))
        if self._retry_count or self._retry_files:
            self._give_up()
        with self._db_lock:
            if self._db is not None:
                self._db.close()
            unsaved = dict(self._unsaved)
        if unsaved:
            _report(f"telemetry buffer: closed with drop counts that could not be saved (the file failing or not "
                    f"open): {unsaved}")
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def _give_up(self) -> None:
        """At close, with a commit still failing (after the close's own attempts): the stage files holding its
        records stay, moved in at the next start; the records held only in memory are lost, counted (about:
        those dropped past `retry_limit` may have been in stage files) and reported."""
        in_files = 0
        for stage, used, _ in self._retry_files:
            with contextlib.suppress(Exception):
                in_files += sum(len(records) for records in _scan_frames(stage[:used])[0].values())
            stage.close()
        names = ", ".join(self._stage_path(seq).name for _, _, seq in self._retry_files)
        lost = max(0, self._retry_count - in_files)
        _report(f"telemetry buffer: closed while commits fail ({self._retry_error}): "
                + (f"the {in_files} records in {names} are moved in at the next start" if names else "")
                + ("; " if names and lost else "")
                + (f"{lost} records held only in memory are lost (counted as write_error)" if lost else ""))
        self._retry_groups, self._retry_states, self._retry_files, self._retry_count = {}, {}, [], 0
        if not lost:
            return
        self._dropped["write_error"] = self._dropped.get("write_error", 0) + lost
        with self._db_lock:
            try:
                if self._db is None:
                    raise sqlite3.OperationalError("not open")
                self._db.execute(_ADD_COUNTER, ("write_error", lost))
            except sqlite3.Error:  # reported with the others just below
                self._unsaved["write_error"] = self._unsaved.get("write_error", 0) + lost
        self._notify_drop("write_error", lost)


# --- inspection from another process (`emp-machine telemetry`) --------------------------------------------


class BufferUnreadable(EmpError):
    """A buffer file that cannot be inspected (missing, not a buffer, corrupt, locked against readers)."""


@dataclass
class BufferReport:
    """What `inspect_buffer()` read from one buffer file. `spans` and `logs` are pending records as the buffer
    keeps them (encode.py's layouts), oldest first; `dead_letters` is (kind, count, reason, created) per batch."""

    path: Path
    owner_running: bool | None  # the advisory lock is held (None: cannot be told on this system)
    pending: dict[int, int]  # records committed and not acknowledged, by Kind
    stored_bytes: int
    oldest_created: float | None  # when the oldest pending chunk was committed
    dropped: dict[str, int]
    dead_letter_records: int
    spans: list = field(default_factory=list)
    logs: list = field(default_factory=list)
    dead_letters: list[tuple[int, int, str, float]] = field(default_factory=list)
    max_size: int | None = None  # the limit its owner last opened it with (None: written before it was kept)


def inspect_buffer(path: Path, *, spans: int = 0, logs: int = 0, dead_letters: bool = False) -> BufferReport:
    """Read one buffer file without disturbing its owner, which may be running: SQLite opened read-only (a WAL
    reader never blocks the writer), the advisory lock never taken (whether it is held is read from
    /proc/locks), nothing written or acknowledged. Records still in stage files (up to `commit_interval` old)
    are not seen. Raises BufferUnreadable, one line saying why."""
    path = Path(path)
    if not path.is_file():
        raise BufferUnreadable(f"{path}: no buffer file there")
    owner = _lock_held(path.with_name(path.name + ".lock"))
    # An owner gone, its WAL folded in at close: the file alone is the data, opened immutable so that reading
    # it leaves no -wal/-shm files behind. Otherwise a read-only WAL reader (it shares the owner's -shm).
    immutable = owner is False and not path.with_name(path.name + "-wal").exists()
    db = None
    try:
        db = _connect_ro(path, immutable, timeout=2.0)
        db.execute("BEGIN")  # one snapshot for every query below
        pending = {int(k): int(n) for k, n in db.execute(
            "SELECT kind, SUM(count - sent) FROM chunks GROUP BY kind").fetchall()}
        stored_bytes, oldest = db.execute("SELECT COALESCE(SUM(nbytes), 0), MIN(created) FROM chunks").fetchone()
        dropped = {str(name): int(value) for name, value in db.execute("SELECT name, value FROM counters")}
        dead = int(db.execute("SELECT COALESCE(SUM(count), 0) FROM dead_letter").fetchone()[0])
        report = BufferReport(path, owner, pending, int(stored_bytes), oldest, dropped, dead)
        limit = db.execute("SELECT value FROM state WHERE key = 'buffer.max_size'").fetchone()
        report.max_size = int(limit[0]) if limit and str(limit[0]).isdigit() else None
        report.spans = _last_pending(db, Kind.SPAN, spans, 6)  # a span's end time
        report.logs = _last_pending(db, Kind.LOG, logs, 0)  # a log record's time
        if dead_letters:
            report.dead_letters = [(int(r[0]), int(r[1]), str(r[2]), float(r[3])) for r in db.execute(
                "SELECT kind, count, reason, created FROM dead_letter ORDER BY id")]
        return report
    except (sqlite3.Error, zlib.error, ValueError, EOFError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BufferUnreadable(f"{path}: not readable as a telemetry buffer ({reason})") from None
    finally:
        if db is not None:
            db.close()


def _last_pending(db: sqlite3.Connection, kind: int, count: int, time_field: int) -> list:
    """The last `count` pending records of `kind` by their time field, oldest first. Chunks are read newest
    first up to `count` records, then the rest of that commit (its chunks share `created`: one per value
    class, so their records interleave in time)."""
    if count <= 0:
        return []
    chosen: list[int] = []
    total, boundary = 0, None
    cursor = db.execute("SELECT id, created, count - sent FROM chunks WHERE kind = ? ORDER BY id DESC", (kind,))
    for chunk_id, created, left in cursor:
        if boundary is not None and created < boundary:
            break
        chosen.append(chunk_id)
        total += left
        if boundary is None and total >= count:
            boundary = created
    cursor.close()
    records: list = []
    for chunk_id in chosen:
        sent, data = db.execute("SELECT sent, data FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
        records.extend(decode_chunk(data)[sent:])
    records.sort(key=lambda record: record[time_field])
    return records[-count:]


def _lock_held(lock_path: Path) -> bool | None:
    """Whether a process holds the flock on `lock_path`, from /proc/locks (Linux): trying the lock would hold
    it for a moment, and an owner starting then would fail with BufferInUse. None where it cannot be told."""
    try:
        st = os.stat(lock_path)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    same_inode = False
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 4321 fd:00:1234567 0 EOF" (a waiter's has "->")
        fields = line.split()
        if "FLOCK" not in fields:
            continue
        if key in fields:
            return True
        same_inode = same_inode or any(f.endswith(f":{st.st_ino}") for f in fields)
    # The inode is locked on a device numbered otherwise (an overlay file system reports another st_dev).
    return None if same_inode else False


def _read_state(path: Path, key: str) -> str | None:
    """A state value from a buffer file its owner could not open for writing (a start on a full disk), so that
    the tailer resumes where it was rather than from the start of each file: read-only, through the WAL where
    SQLite can share it, else the file alone (immutable: perhaps a little behind). None where neither works."""
    for immutable in (False, True):
        try:
            db = _connect_ro(path, immutable)
        except sqlite3.Error:
            continue
        try:
            row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return row[0] if row else None
        except sqlite3.Error:
            continue
        finally:
            db.close()
    return None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _report(message: str) -> None:
    # The buffer cannot log through itself; stderr ends up in the supervisor's log for this process.
    os.write(2, (message + "\n").encode("utf-8", "replace"))

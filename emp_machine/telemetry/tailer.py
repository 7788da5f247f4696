"""Service output: tail the supervisor's log files of services (ComfyUI, ...) into buffered log records.

Each source is (log file, process name, service_type[, worker_id]). Lines are parsed (level; Python tracebacks,
chained ones, exception groups and messages of several lines included (see `_Fold`), folded into one ERROR
record with error.type and error.message; tqdm-style progress lines turned into `service.progress` records, at
most one per source per chunk read), enriched with machine_id, worker_id, service_type, process and source, and
appended to the durable buffer. `source` is stdout or stderr when the file name says so, else "output":
supervisord runs our programs with redirect_stderr, one merged file.

No line lost, none shipped twice: the file's identity (device, inode, first bytes) and offset are committed in
the same SQLite transaction as the records read up to it (`Buffer.append_with_state`), and only whole records
advance it (a partial line or an unfinished traceback is read again next time). Files are read in 1 MiB chunks,
at most `_PASS_BYTES` per file per poll; the rest comes next poll, never dropped. supervisord rotates by
renaming (`name.log` -> `name.log.1` -> `name.log.2` ..., the oldest deleted): a file that is no longer the
live one is read to its end, then its successor (the file one step newer in that chain, noted when the
rotation was seen) and so on up to the live file. After a restart the saved file is looked for in the chain
and the same walk follows. A file that left the chain before it was finished (rotated past the kept backups)
is reported as a `service.output_lost` warning record and counted in `lost_gaps`; reading goes on from the
oldest file kept. On the very first start the live file is read from its beginning. An unfinished traceback or
partial line is emitted after `fold_timeout` without growth (cut at a character boundary, never inside one). At
the end of a rotated file it is not: supervisord writes each pipe read as it comes and rotates after any write past
maxbytes, so a line or a traceback is often split between `name.log.1` and the new `name.log`; the rotated file's
unfinished end (at most `_CARRY_MAX`) is carried into its successor's first parse, saved in the tailer's state in
the same commit that switches files. A file truncated in place (its size below the offset, or its first bytes
changed: copytruncate) is read again from its start and the output it may have lost reported.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from emp_machine.telemetry.buffer import Buffer, Kind, Value
from emp_machine.telemetry.redact import redact_text

_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL|Error|Warning)\b")
_SEVERITY = {"DEBUG": 5, "INFO": 9, "WARNING": 13, "WARN": 13, "Warning": 13, "ERROR": 17, "Error": 17,
             "CRITICAL": 21, "FATAL": 21}
_PROGRESS = re.compile(r"(\d{1,3})%\|[^|]*\|\s*(\d+)/(\d+)")
_TB_START = "Traceback (most recent call last):"
_TB_CHAIN = ("During handling of the above exception", "The above exception was the direct cause")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")
_MAX_READ = 1 << 20      # one chunk
_PASS_BYTES = 4 << 20    # per file per poll: bounds one poll's work; the rest is read next poll
_HEAD = 64               # bytes of a file's beginning that identify it beside its inode (inodes get reused)
_CARRY_MAX = 64 << 10    # a rotated file's unfinished end carried into its successor; longer: emitted as it is


_GROUP_START = re.compile(r"^( *)\+ Exception Group Traceback \(most recent call last\):")
_GROUP_LINE = re.compile(r"^ +[|+]")       # an exception group's frame: `  | ...`, `  +-+---- 1 ----`, `    +----`
_GROUP_TEXT = re.compile(r"^ +\| \S")      # a group's line of text (its exception lines among them), not a frame
# What starts a log record rather than continuing a message: a timestamp, a level, a JSON line.
_RECORD_START = re.compile(r"^\s*(\[?\d{4}[-/]\d\d[-/]\d\d|\[?\d\d:\d\d:\d\d|\[?(DEBUG|INFO|WARNING|WARN|ERROR|"
                           r"CRITICAL|FATAL)\b|\{\")")
_MAX_MESSAGE_LINES = 20  # lines that may continue an exception's message; the rest are records of their own


class _Fold:
    """A traceback being folded into one record, and what the next line may be.

    Before the exception line: indented frames, then the unindented `Type: message` line; a chain marker and a
    new `Traceback` after it continue the chain. An exception group (`  + Exception Group Traceback`) is its `|`
    and `+` frames; its own exception line is the first text at its outer margin. After an exception line (or a
    group's line of text), the lines that directly follow continue its message (Python prints a message's later
    lines unindented, inside groups too), at most `_MAX_MESSAGE_LINES`, unless they look like a record of their
    own: blank before them, a timestamp or level, a JSON line, a progress bar, a traceback, or written later (the
    exception line ended an earlier read at the file's end). A group's closing frame ends its message lines."""

    __slots__ = ("lines", "end", "exception", "message", "group", "open", "in_message", "joined", "chained")

    def __init__(self, text: str, end: int):
        self.lines, self.end = [text], end
        self._restart(text)

    def _restart(self, text: str) -> None:
        group = _GROUP_START.match(text)
        self.group = group.group(1) + "| " if group else None  # the group's outer margin
        self.exception, self.message, self.joined = "", [], 0
        self.open = self.in_message = self.chained = False

    def take(self, text: str, end: int, seen: int) -> bool:
        """Append `text` if it belongs to this traceback. `seen`: bytes of the data an earlier read had."""
        if not text.strip():
            self.open = self.in_message = False  # a chain marker may follow, a message line not
        elif self.chained and (text.startswith(_TB_START) or _GROUP_START.match(text)):
            self._restart(text)
        elif text.startswith(_TB_CHAIN):
            self.open = self.in_message = False
            self.chained = True
        elif self.group is not None and _GROUP_LINE.match(text):
            if not self.exception and text.startswith(self.group) and text[len(self.group):][:1].strip():
                self.exception, self.in_message = text[len(self.group):], True
            else:
                self.in_message = False
            self.open = bool(_GROUP_TEXT.match(text))
        elif not self.exception and self.group is None and _TB_START not in text:
            if not text[0].isspace():  # else a frame
                self.exception, self.open, self.in_message = text, True, True
        elif (self.open and self.joined < _MAX_MESSAGE_LINES and not _RECORD_START.match(text)
              and not _PROGRESS.search(text) and _TB_START not in text and not self.end <= seen < end):
            self.joined += 1
            if self.in_message:
                self.message.append(text)
        else:
            return False
        if text.strip() and not text.startswith(_TB_CHAIN):
            self.chained = False  # a new traceback continues the chain only after its marker
        self.lines.append(text)
        self.end = end
        return True


_Identity = tuple[int | None, int, bytes]  # (st_dev, st_ino, first bytes): which file, wherever it was renamed to


def _chain(path: Path) -> list[Path]:
    """The live file, then supervisor's backups newest first (`name.1`, `name.2`, ...): the rotation chain."""
    backups = [p for p in path.parent.glob(path.name + ".*") if p.name[len(path.name) + 1:].isdigit()]
    backups.sort(key=lambda p: int(p.name[len(path.name) + 1:]))
    return ([path] if path.exists() else []) + backups


def _char_end(data: bytes, start: int) -> int:
    """The end of `data` backed up to a UTF-8 character boundary (not before `start`): a partial line emitted
    while its writer is mid-character leaves the character's first bytes for the record they belong to."""
    end = len(data)
    for i in range(end - 1, max(start, end - 4) - 1, -1):
        byte = data[i]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
            size = 2 if byte >= 0xC0 else 1
            size = 3 if byte >= 0xE0 else size
            size = 4 if byte >= 0xF0 else size
            return i if i + size > end and byte < 0xF8 else end
    return end


def _parse_saved(saved: str) -> tuple[dict, _Identity, bytes]:
    """A file's saved state (`ServiceOutputTailer._commit`): the values, the file's identity and the carry.
    Raises ValueError (or KeyError, TypeError) when it is not what `_commit` writes."""
    data = json.loads(saved)
    if type(data) is not dict:
        raise ValueError(f"a {type(data).__name__} where an object was saved")
    for name in ("inode", "offset"):
        if type(data[name]) is not int or data[name] < 0:
            raise ValueError(f"{name} {data[name]!r}")
    dev = data.get("dev")
    if dev is not None and type(dev) is not int:
        raise ValueError(f"dev {dev!r}")
    return data, (dev, data["inode"], bytes.fromhex(data.get("head", ""))), bytes.fromhex(data.get("carry", ""))


def _same(dev: int, inode: int, head: bytes, identity: _Identity) -> bool:
    known_dev, known_inode, known_head = identity
    return inode == known_inode and known_dev in (None, dev) and head[:len(known_head)] == known_head


def _identify(path: Path) -> _Identity | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino, os.pread(fd, _HEAD, 0)
    finally:
        os.close(fd)


def _matches(path: Path, identity: _Identity | None) -> bool:
    """Whether `path` is now the file `identity` names (same inode and device, same first bytes)."""
    if identity is None:
        return False
    try:
        if path.stat().st_ino != identity[1]:
            return False  # the cheap check first: most candidates differ in inode
    except FileNotFoundError:
        return False
    found = _identify(path)
    return found is not None and _same(*found, identity)


@dataclass(frozen=True)
class TailSource:
    path: Path
    process: str
    service_type: str
    worker_id: str | None = None

    @property
    def stream(self) -> str:
        """stdout/stderr when the file name says so; "output" for a merged file (supervisor's redirect_stderr)."""
        name = self.path.name
        return "stderr" if "stderr" in name else "stdout" if "stdout" in name else "output"


class _FileState:
    __slots__ = ("source", "key", "fd", "dev", "inode", "head", "offset", "successor", "last_growth", "size_seen",
                 "read_end", "carry", "rest")

    def __init__(self, source: TailSource):
        self.source = source
        self.key = f"tail:{source.path}"
        self.fd: int | None = None
        self.dev: int | None = None  # None: a state saved before devices were recorded matches any
        self.inode = 0
        self.head = b""
        self.offset = 0
        self.successor: _Identity | None = None  # the next newer file, once this one is seen rotated
        self.last_growth = time.monotonic()
        self.size_seen = -1
        self.read_end = 0  # where the file ended when a read last reached its end: later bytes came later
        # The unfinished end (a partial line, an open traceback) of the file this one succeeded, read ahead of this
        # file's bytes: a write that rotation split goes on here. Non-empty only while `offset` is 0.
        self.carry = b""
        self.rest = b""  # a rotated file read to its end: what is still unconsumed there, for its successor


class ServiceOutputTailer:
    def __init__(self, buffer: Buffer, sources: list, *, machine_id: str, poll: float = 0.25,
                 fold_timeout: float = 1.0, clock=time.monotonic):
        self.buffer = buffer
        self.machine_id = machine_id
        self.poll = poll
        self.fold_timeout = fold_timeout
        self._clock = clock
        self._files = [_FileState(s if isinstance(s, TailSource) else TailSource(Path(s[0]), *s[1:]))
                       for s in sources]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.records_total = 0
        self.lost_gaps = 0  # times a file left the rotation chain before it was read to its end
        for state in self._files:
            self._restore(state)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> "ServiceOutputTailer":
        self._thread = threading.Thread(target=self._run, name="telemetry-tailer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after a last pass; unfinished records stay unread (their offset is not committed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.poll_once()
        for state in self._files:
            if state.fd is not None:
                os.close(state.fd)
                state.fd = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.poll_once()

    def poll_once(self) -> int:
        """Read what is new in every file; returns the number of records appended."""
        with self._lock:
            count = 0
            for state in self._files:
                try:
                    count += self._poll(state)
                except OSError:
                    continue  # a file that vanished between stat and read: next poll
            self.records_total += count
            return count

    # --- one file ------------------------------------------------------------------------------------

    def _restore(self, state: _FileState) -> None:
        saved = self.buffer.state(state.key)
        if not saved:
            return
        try:
            data, wanted, carry = _parse_saved(saved)
        except (ValueError, KeyError, TypeError) as exc:
            # Damaged (a torn or flipped frame, a bad disk): raised here, it stopped the machine's boot at every
            # start, the value being in SQLite. Read as a file never seen: from the live file's start (lines may
            # ship twice), reported, and the bad value replaced in the same commit, so this is said once.
            problem = " ".join(str(exc).split()) or type(exc).__name__
            record = self._lost(state, f"the saved read offset of {state.source.path} is unreadable ({problem}); "
                                       "reading starts again at the beginning of the live file: output written "
                                       "while the machine was down may be lost, lines read before may be sent twice")
            self.buffer.append_with_state([record], state.key, "")
            self.lost_gaps += 1
            return
        chain = _chain(state.source.path)
        for candidate in chain:  # the live file, or where rotations moved it while we were down
            if _matches(candidate, wanted) and self._open(state, candidate, wanted):
                state.offset, state.carry = data["offset"], carry
                return
        # Gone: rotated past the kept backups while not tailed. Everything still kept is newer than it.
        state.inode, state.offset = data["inode"], data["offset"]
        self._skip_lost(state, chain, f"{state.source.path} (inode {data['inode']}) was rotated past the kept "
                                      "backups while the machine was down", carry)

    def _poll(self, state: _FileState) -> int:
        path = state.source.path
        budget = _PASS_BYTES
        count = 0
        for _ in range(64):  # one step per file in the chain; bounded should files be shuffled by hand
            try:
                live = path.stat()
            except FileNotFoundError:
                live = None
            if state.fd is None:
                if live is None or not self._open(state, path, None):
                    return count
                self._commit(state, [])
                continue
            if live is not None and (live.st_dev, live.st_ino) == (state.dev, state.inode):
                if live.st_size < state.offset or os.pread(state.fd, len(state.head), 0) != state.head:
                    self._truncated(state)  # in place (copytruncate), perhaps already written past the offset
                return count + self._drain(state, False, budget)[0]
            # No longer the live file (rotated, or the live one is being replaced): note which file comes next
            # while both are still in the chain, read this one to its end, then go on with that one.
            if state.successor is None:
                self._locate(state)
            records, used, done = self._drain(state, True, budget)
            count += records
            budget -= used
            if not done or not self._advance(state) or budget <= 0:
                return count
        return count

    def _advance(self, state: _FileState) -> bool:
        """Switch from a finished rotated file to its successor; False to wait (the next one is not there yet).
        The rotated file's unfinished end (`rest`) goes on in the successor: supervisord writes a pipe read as it
        comes and rotates after any write past maxbytes, so a line or a traceback is often split between them."""
        chain = _chain(state.source.path)
        if state.successor is None:
            if self._locate(state):
                if state.successor is None:
                    return False  # mid-rotation: the new live file is not created yet
            else:
                return self._skip_lost(state, chain, f"{state.source.path}: a rotated file (inode {state.inode}) "
                                                     "left the kept backups; files rotated after it may have gone too",
                                       state.rest)
        for candidate in chain:
            if _matches(candidate, state.successor):
                return self._switch(state, candidate, state.successor, [], state.rest)
        return self._skip_lost(state, chain, f"{state.source.path}: the file rotated after inode {state.inode} left "
                                             "the kept backups before it was read", state.rest)

    def _skip_lost(self, state: _FileState, chain: list[Path], message: str, pending: bytes = b"") -> bool:
        """Report output that left the chain unread and go on with the oldest file kept (or the next live one).
        `pending`: the unfinished end of the output before the gap, emitted as it is (nothing continues it)."""
        records = self._parse(state.source, pending, flush=True)[0] if pending else []
        records.append(self._lost(state, message))
        if chain:
            if not self._switch(state, chain[-1], None, records):
                return False  # it went meanwhile: all again next poll, reported once
        else:
            if state.fd is not None:
                os.close(state.fd)
                state.fd = None
            self.buffer.append_with_state(records, state.key, "")  # no file at all: the next one from its start
        self.lost_gaps += 1
        return state.fd is not None

    def _locate(self, state: _FileState) -> bool:
        """Find the current file in the chain and note its successor; False when it is no longer there."""
        for _ in range(5):
            chain = _chain(state.source.path)
            mine = (state.dev, state.inode, state.head)
            index = next((i for i, candidate in enumerate(chain) if _matches(candidate, mine)), None)
            if index is None:
                return False
            if index == 0:
                return True
            successor = _identify(chain[index - 1])
            if _matches(chain[index], mine):  # not moved while we looked at the newer one: a consistent pair
                state.successor = successor
                return True
        return True  # rotating under our feet: try again next poll

    def _switch(self, state: _FileState, path: Path, expected: _Identity | None, records: list,
                carry: bytes = b"") -> bool:
        """Make `path` the current file, `carry` read ahead of it, committed with `records` in one transaction."""
        previous = state.fd
        if not self._open(state, path, expected):
            return False
        if previous is not None:
            os.close(previous)
        state.carry = carry
        self._commit(state, records)
        return True

    def _truncated(self, state: _FileState) -> None:
        """The file was truncated in place (logrotate's copytruncate): read it again from its start. What was
        written after the offset before the truncation cannot be read any more: reported, like other gaps."""
        records = []
        if state.head:  # it had output: what came after the offset (all of it when 0) may be gone unread
            records.append(self._lost(state, f"{state.source.path} was truncated in place (copytruncate?): output "
                                             f"written after byte {state.offset} before the truncation is gone"))
            self.lost_gaps += 1
        state.offset = state.read_end = 0
        state.size_seen, state.head = -1, b""
        self._commit(state, records)

    def _open(self, state: _FileState, path: Path, expected: _Identity | None) -> bool:
        """Make `path` the current file at offset 0 (False if it is gone or is not the `expected` file)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        head = os.pread(fd, _HEAD, 0)
        if expected is not None and not _same(st.st_dev, st.st_ino, head, expected):
            os.close(fd)
            return False
        state.fd, state.dev, state.inode, state.head = fd, st.st_dev, st.st_ino, head
        state.offset, state.successor, state.size_seen, state.read_end = 0, None, -1, 0
        state.carry = state.rest = b""
        return True

    def _drain(self, state: _FileState, final: bool, budget: int) -> tuple[int, int, bool]:
        """Read whole records from the offset in chunks, up to `budget` bytes: (records, bytes read, at end).
        `final`: the file is rotated: its unfinished end is left in `state.rest` for its successor (emitted as it
        is when longer than `_CARRY_MAX`). The carry from the previous file is read ahead of the file's bytes."""
        count = used = 0
        while True:
            chunk = os.pread(state.fd, _MAX_READ, state.offset)
            used += len(chunk)
            at_end = len(chunk) < _MAX_READ
            carry = state.carry
            data = carry + chunk if carry else chunk
            # this much of `data` was there at an earlier read
            seen = len(carry) + max(0, state.read_end - state.offset)
            if at_end:
                state.read_end = state.offset + len(chunk)
            flush = False
            if at_end and not final:
                now = self._clock()
                if len(data) != state.size_seen:
                    state.size_seen, state.last_growth = len(data), now
                flush = now - state.last_growth >= self.fold_timeout
            if not data:
                state.rest = b""
                return count, used, True
            records, consumed = self._parse(state.source, data, flush=flush, seen=seen)
            if (consumed == 0 and not at_end) or (final and at_end and len(data) - consumed > _CARRY_MAX):
                # one record longer than a chunk, or too long to carry: cut it here rather than stall
                records, consumed = self._parse(state.source, data, flush=True, seen=seen)
            if consumed:
                if consumed < len(carry):
                    state.carry = carry[consumed:]
                else:
                    state.offset += consumed - len(carry)
                    state.carry = b""
                state.size_seen = -1
                self._commit(state, records)
                count += len(records)
            if at_end and final:
                state.rest = data[consumed:]
            if at_end or used >= budget:
                return count, used, at_end

    def _commit(self, state: _FileState, records: list) -> None:
        if len(state.head) < _HEAD:  # bytes once written never change: a longer head identifies better
            state.head = os.pread(state.fd, _HEAD, 0)
        saved = {"dev": state.dev, "inode": state.inode, "offset": state.offset, "head": state.head.hex()}
        if state.carry:
            saved["carry"] = state.carry.hex()
        self.buffer.append_with_state(records, state.key, json.dumps(saved))

    def _lost(self, state: _FileState, message: str) -> tuple[int, int, tuple]:
        """A warning record for output that cannot be read any more: reported, never silent."""
        attributes = {**self._attributes(state.source), "lost.after_offset": state.offset}
        return (Kind.LOG, Value.ERROR, (time.time_ns(), 13, "WARNING", f"service output lost: {message}",
                                        attributes, 0, 0, "service.output_lost"))

    # --- parsing -------------------------------------------------------------------------------------

    def _parse(self, source: TailSource, data: bytes, flush: bool, seen: int = 0) -> tuple[list, int]:
        """Records from `data` and how many bytes they consumed (whole records only, unless `flush`).
        `seen`: how much of `data` an earlier read already had (lines past it were written later)."""
        lines: list[tuple[str, int]] = []  # (text, end offset within data)
        start = 0
        for match in re.finditer(rb"\r\n|\n|\r", data):
            lines.append((data[start:match.start()].decode("utf-8", "replace"), match.end()))
            start = match.end()
        if flush and start < len(data):
            cut = _char_end(data, start)  # never inside a character: its rest comes with the next bytes
            if cut > start:
                lines.append((data[start:cut].decode("utf-8", "replace"), cut))
        records: list[tuple[int, int, tuple]] = []
        consumed = 0
        progress: tuple | None = None
        progress_end = 0
        fold: _Fold | None = None
        for text, end in lines:
            if fold is not None:
                if fold.take(text, end, seen):
                    continue
                records.append(self._traceback(source, fold))
                consumed = fold.end
                fold = None
            if _TB_START in text:
                fold = _Fold(text, end)
                continue
            consumed = end
            if not text.strip():
                continue
            match = _PROGRESS.search(text)
            if match:  # tqdm redraws with \r: keep the latest state per poll
                progress = (int(match.group(1)), int(match.group(2)), int(match.group(3)), text.strip())
                progress_end = end
                continue
            records.append(self._line(source, text))
        if fold is not None and flush:
            records.append(self._traceback(source, fold))
            consumed = fold.end
        if progress is not None and progress_end <= consumed:  # else it is read again next time
            records.append(self._progress(source, progress))
        return records, consumed

    def _attributes(self, source: TailSource) -> dict:
        attributes = {"machine_id": self.machine_id, "service_type": source.service_type, "process": source.process,
                      "source": source.stream, "log.file.path": str(source.path)}
        if source.worker_id:
            attributes["worker_id"] = source.worker_id
        return attributes

    def _line(self, source: TailSource, text: str) -> tuple[int, int, tuple]:
        match = _LEVEL.search(text, 0, 80)
        severity = _SEVERITY[match.group(1)] if match else 9
        value = Value.ERROR if severity >= 17 else Value.DEBUG if severity < 9 else Value.NORMAL
        level = {5: "DEBUG", 9: "INFO", 13: "WARNING", 17: "ERROR", 21: "CRITICAL"}[severity]
        return (Kind.LOG, value, (time.time_ns(), severity, level, redact_text(text), self._attributes(source),
                                  0, 0, ""))

    def _traceback(self, source: TailSource, fold: _Fold) -> tuple[int, int, tuple]:
        attributes = self._attributes(source)
        match = _EXC_LINE.match(fold.exception.strip()) if fold.exception else None
        if match:
            attributes["error.type"] = match.group(1)
            attributes["error.message"] = redact_text("\n".join([match.group(2) or "", *fold.message]))
        body = redact_text("\n".join(fold.lines).rstrip())
        return (Kind.LOG, Value.ERROR, (time.time_ns(), 17, "ERROR", body, attributes, 0, 0, ""))

    def _progress(self, source: TailSource, progress: tuple) -> tuple[int, int, tuple]:
        percent, step, total, text = progress
        attributes = {**self._attributes(source), "progress": percent, "step": step, "total": total}
        return (Kind.LOG, Value.DEBUG, (time.time_ns(), 9, "INFO", text, attributes, 0, 0, "service.progress"))

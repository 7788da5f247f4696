"""Service output: tail the supervisor's log files of services (ComfyUI, ...) into buffered log records.

Each source is (log file, process name, service_type[, worker_id]). Lines are parsed (level; Python tracebacks,
chained ones included, folded into one ERROR record with error.type and error.message; tqdm-style progress
lines turned into `service.progress` records, at most one per source per poll), enriched with machine_id,
worker_id, service_type, process and source (stdout/stderr), and appended to the durable buffer.

No line lost, none shipped twice: the file's (inode, offset) is committed in the same SQLite transaction as the
records read up to it (`Buffer.append_with_state`), and only whole records advance it (a partial line or an
unfinished traceback is read again next time). On rotation (a new inode at the path) the old file is read to
its end through the descriptor still open; after a restart, a saved inode that moved is looked for among
`<name>.*` siblings (supervisor's `name.log.1`) and finished first. On the very first start a file is read
from its beginning. An unfinished traceback or partial line is emitted after `fold_timeout` without growth.
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
_MAX_READ = 1 << 20


def _is_exception_line(text: str) -> bool:
    return bool(text) and not text[0].isspace() and not text.startswith(_TB_CHAIN)


def _continues(text: str, exception_line: str) -> bool:
    """Whether `text` still belongs to the traceback being folded."""
    if not text.strip() or text.startswith(_TB_START) or text.startswith(_TB_CHAIN):
        return True
    # Before the exception line: indented frames, then the unindented exception line itself. After it only
    # blank lines and a chain marker continue; anything else (tqdm's indented bars too) is new output.
    return not exception_line


@dataclass(frozen=True)
class TailSource:
    path: Path
    process: str
    service_type: str
    worker_id: str | None = None

    @property
    def stream(self) -> str:
        return "stderr" if "stderr" in self.path.name else "stdout"


class _FileState:
    __slots__ = ("source", "key", "fd", "inode", "offset", "last_growth", "size_seen")

    def __init__(self, source: TailSource):
        self.source = source
        self.key = f"tail:{source.path}"
        self.fd: int | None = None
        self.inode = 0
        self.offset = 0
        self.last_growth = time.monotonic()
        self.size_seen = -1


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
        data = json.loads(saved)
        state.inode, state.offset = data["inode"], data["offset"]
        path = state.source.path
        try:
            if path.stat().st_ino == state.inode:
                return
        except FileNotFoundError:
            pass
        for sibling in sorted(path.parent.glob(path.name + ".*")):  # rotated while we were down
            try:
                if sibling.stat().st_ino == state.inode:
                    state.fd = os.open(sibling, os.O_RDONLY)
                    return
            except OSError:
                continue
        state.inode, state.offset = 0, 0  # the old file is gone: start the current one from its beginning

    def _poll(self, state: _FileState) -> int:
        path = state.source.path
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        count = 0
        if state.fd is not None and (st is None or st.st_ino != state.inode):
            # Rotated: finish the old file through the descriptor we still hold, then switch.
            count += self._read(state, final=True)
            os.close(state.fd)
            state.fd = None
            state.inode, state.offset = (st.st_ino if st else 0), 0
            self.buffer.append_with_state([], state.key, json.dumps({"inode": state.inode, "offset": 0}))
        if st is None:
            return count
        if state.fd is None:
            state.fd = os.open(path, os.O_RDONLY)
            if st.st_ino != state.inode:
                state.inode, state.offset = st.st_ino, 0
        if st.st_size < state.offset:  # truncated in place (copytruncate)
            state.offset = 0
        count += self._read(state, final=False)
        return count

    def _read(self, state: _FileState, final: bool) -> int:
        data = os.pread(state.fd, _MAX_READ, state.offset)
        now = self._clock()
        if len(data) != state.size_seen:
            state.size_seen = len(data)
            state.last_growth = now
        if not data:
            return 0
        idle = final or now - state.last_growth >= self.fold_timeout
        records, consumed = self._parse(state.source, data, flush=idle)
        if consumed == 0:
            return 0
        state.offset += consumed
        state.size_seen = -1
        self.buffer.append_with_state(records, state.key, json.dumps({"inode": state.inode, "offset": state.offset}))
        return len(records)

    # --- parsing -------------------------------------------------------------------------------------

    def _parse(self, source: TailSource, data: bytes, flush: bool) -> tuple[list, int]:
        """Records from `data` and how many bytes they consumed (whole records only, unless `flush`)."""
        lines: list[tuple[str, int]] = []  # (text, end offset within data)
        start = 0
        for match in re.finditer(rb"\r\n|\n|\r", data):
            lines.append((data[start:match.start()].decode("utf-8", "replace"), match.end()))
            start = match.end()
        if flush and start < len(data):
            lines.append((data[start:].decode("utf-8", "replace"), len(data)))
        records: list[tuple[int, int, tuple]] = []
        consumed = 0
        progress: tuple | None = None
        progress_end = 0
        block: list[str] | None = None
        block_end = 0
        exception_line = ""
        for text, end in lines:
            if block is not None:
                if _continues(text, exception_line):
                    block.append(text)
                    block_end = end
                    if text.startswith(_TB_START):
                        exception_line = ""
                    elif _is_exception_line(text):
                        exception_line = text
                    continue
                records.append(self._traceback(source, block, exception_line))
                consumed = block_end
                block, exception_line = None, ""
            if _TB_START in text:
                block, block_end = [text], end
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
        if block is not None and flush:
            records.append(self._traceback(source, block, exception_line))
            consumed = block_end
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

    def _traceback(self, source: TailSource, block: list[str], exception_line: str) -> tuple[int, int, tuple]:
        attributes = self._attributes(source)
        match = _EXC_LINE.match(exception_line.strip()) if exception_line else None
        if match:
            attributes["error.type"] = match.group(1)
            attributes["error.message"] = redact_text(match.group(2) or "")
        body = redact_text("\n".join(block).rstrip())
        return (Kind.LOG, Value.ERROR, (time.time_ns(), 17, "ERROR", body, attributes, 0, 0, ""))

    def _progress(self, source: TailSource, progress: tuple) -> tuple[int, int, tuple]:
        percent, step, total, text = progress
        attributes = {**self._attributes(source), "progress": percent, "step": step, "total": total}
        return (Kind.LOG, Value.DEBUG, (time.time_ns(), 9, "INFO", text, attributes, 0, 0, "service.progress"))

"""The machine process's own log file: its JSON lines go to stdout (the container's log) and to
`logs/machine.log`, rotated by size like the supervised processes' logs, so `emp-machine errors` and
`emp-machine logs machine` read the same lines on the host."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import IO


REOPEN_INTERVAL_S = 10.0  # after a failed write, how often the log file is tried again


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class RotatingTee:
    """A text stream writing each line to `primary` and to a size-rotated file (`name.log.1`, ...)."""

    def __init__(self, path: Path, max_bytes: int, backups: int, primary: IO[str] | None = None):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.primary = primary if primary is not None else sys.stdout
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered
        self._size = self._file.tell()
        self._failed_at = 0.0  # when writing the file last failed (monotonic)
        self._failing = False

    def write(self, text: str) -> int:
        self.primary.write(text)
        with self._lock:
            if self._file is None and not self._reopen():
                return len(text)
            try:
                if self._size + len(text) > self.max_bytes and self._size:
                    self._rotate()
                self._file.write(text)
                self._size += len(text)
            except (OSError, ValueError) as exc:  # a full disk, the folder gone: never raised into the machine
                self._fail(exc)
        return len(text)

    def flush(self) -> None:
        self.primary.flush()
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.flush()
            except (OSError, ValueError) as exc:
                self._fail(exc)

    def close(self) -> None:
        """At the end of the machine: a file that cannot take its last buffered line (a full disk) loses it,
        said in one line on stderr, never a traceback after a clean stop."""
        with self._lock:
            file, self._file = self._file, None
            self._failed_at = float("inf")  # closed: never reopened by a late write
            if file is None:
                return
            try:
                file.close()
            except (OSError, ValueError) as exc:
                _say(f"emp-machine: the end of {self.path} could not be written ({_why(exc)})")

    def _fail(self, exc: BaseException) -> None:
        """Writing the file failed: the lines go on to stdout only, the file is tried again every
        REOPEN_INTERVAL_S. Said once on stderr (the logging module would print a traceback per line)."""
        file, self._file = self._file, None
        self._failed_at = time.monotonic()
        if file is not None:
            try:
                file.close()
            except (OSError, ValueError):
                pass  # its buffered lines are lost with the write that failed
        if not self._failing:
            self._failing = True
            _say(f"emp-machine: cannot write {self.path} ({_why(exc)}); the machine's log goes to stdout only "
                 f"and the file is tried again every {REOPEN_INTERVAL_S:g} s")

    def _reopen(self) -> bool:
        if time.monotonic() - self._failed_at < REOPEN_INTERVAL_S:
            return False
        try:
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)
            self._size = self._file.tell()
        except (OSError, ValueError):
            self._file = None
            self._failed_at = time.monotonic()
            return False
        if self._failing:
            self._failing = False
            _say(f"emp-machine: writing {self.path} again")
        return True

    def _rotate(self) -> None:
        self._file.close()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered: readable at once
        self._size = 0

"""The machine process's own log file: its JSON lines go to stdout (the container's log) and to
`logs/machine.log`, rotated by size like the supervised processes' logs, so `emp-machine errors` and
`emp-machine logs machine` read the same lines on the host."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import IO


class RotatingTee:
    """A text stream writing each line to `primary` and to a size-rotated file (`name.log.1`, ...)."""

    def __init__(self, path: Path, max_bytes: int, backups: int, primary: IO[str] | None = None):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.primary = primary if primary is not None else sys.stdout
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered: readable at once
        self._size = self._file.tell()

    def write(self, text: str) -> int:
        self.primary.write(text)
        with self._lock:
            if self._size + len(text) > self.max_bytes and self._size:
                self._rotate()
            self._file.write(text)
            self._size += len(text)
        return len(text)

    def flush(self) -> None:
        self.primary.flush()
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

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

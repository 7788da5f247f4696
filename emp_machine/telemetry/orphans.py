"""Orphan buffers: the files of processes that no longer exist, adopted by the machine process at boot.

Each process has its own buffer, `<state_dir>/telemetry/<process id>.db`. A worker group scaled down (4 workers,
then 2) leaves `...-worker-2.db` and `...-worker-3.db`; a machine booted again under another id on the same state
dir (the Docker image's default: a persistent volume, the id from the host name) leaves every worker file of
the old id. Nothing opened them again: their records were never shipped, counted or expired.

`OrphanAdopter` (started by `Telemetry.adopt_orphan_buffers`) takes every `*.db` in the directory that belongs
to no process of the current plan and whose advisory lock is free (a live process holds its own), one file at a
time, in a background thread:

- it opens the file as a `Buffer` (taking the lock), which moves in stage files a killed owner left and applies
  the retention (expired records are dropped, counted);
- with somewhere to ship (an otlp endpoint), a `Shipper` sends its records, each with the resource recorded in
  the file for it (`Buffer.resource_of`: the process that made them, not this one), at once rather than
  waiting for batches to fill;
- once nothing is pending in it and it holds no dead letters, the file is closed and removed, with its -wal,
  -shm, stage and lock files (under the lock, taken again). Otherwise (no endpoint for some signal, dead
  letters kept, the collector down: nothing shipped for ORPHAN_STALL_S) it is closed and left for the next
  boot, and the next file is taken.

Drops found while adopting are counted in the adopting process's own buffer (reason as usual) and reported
like any drop. One `telemetry.orphan_buffers` event names the files found and their pending records; one
`telemetry.orphan_buffer_adopted` event per file says what became of it. `stop()` (from `Telemetry.shutdown`)
ends the adoption within its timeout: what is left stays in the file for the next boot.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from emp_machine.telemetry.buffer import Buffer, BufferInUse, BufferUnreadable, _lock_held, inspect_buffer
from emp_machine.telemetry.shipper import SIGNALS, Shipper

ORPHAN_STALL_S = 60.0  # an orphan whose records stopped shipping for this long is left for the next boot

_KINDS = {name: kind for kind, name in SIGNALS.items()}  # "traces" -> Kind.SPAN ...


def find_orphans(directory: Path, keep: Iterable[str]) -> tuple[list[Path], list[Path]]:
    """The buffer files in `directory` whose process id (file stem) is not in `keep`: (orphans, oldest first;
    those a live process holds locked, left alone)."""
    keep = set(keep)
    found = []
    try:
        entries = list(Path(directory).glob("*.db"))
    except OSError:
        return [], []
    for path in entries:
        if path.stem in keep or not path.is_file():
            continue
        try:
            found.append((path.stat().st_mtime, path))
        except OSError:
            continue
    orphans, in_use = [], []
    for _, path in sorted(found):
        # Read from /proc/locks, not by trying the lock: that would hold it for a moment, and its owner starting
        # then would fail. (Where it cannot be told, opening the buffer tries the lock: BufferInUse.)
        (in_use if _lock_held(path.with_name(path.name + ".lock")) else orphans).append(path)
    return orphans, in_use


def remove_buffer_files(path: Path) -> bool:
    """Remove a buffer file that nothing holds, with its -wal, -shm, stage and lock files, under its lock (taken
    again: a process that took it meanwhile keeps it, and the files stay). True when removed."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_file = open(lock_path, "a+")
    except OSError:
        return False
    try:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        names = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        prefix = f"{path.name}.stage."
        try:
            names += [path.parent / entry for entry in os.listdir(path.parent) if entry.startswith(prefix)]
        except OSError:
            pass
        for name in names:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
            except OSError:
                return False
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        return True
    finally:
        lock_file.close()  # releases the lock


class OrphanAdopter:
    """Adopts orphan buffer files in a background thread (see the module's docstring).

    `make_buffer(path)` opens one (its `on_drop` counting the drops); `make_shipper(buffer, path)` makes an
    unstarted eager shipper for it, or is None where nothing ships (no endpoint): then only the retention is
    applied. `emit(name, level, fields)` writes an event; `count_drop(reason, count)` counts a drop in the
    adopting process's own buffer."""

    def __init__(self, directory: Path, keep: Iterable[str], *, make_buffer: Callable[[Path], Buffer],
                 make_shipper: Callable[[Buffer, Path], Shipper] | None,
                 emit: Callable[[str, int, dict], None], poll: float = 0.2):
        self.directory = Path(directory)
        self.keep = set(keep)
        self._make_buffer, self._make_shipper, self._emit = make_buffer, make_shipper, emit
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: tuple[Buffer, Shipper | None] | None = None
        self._cpu_done = 0.0  # CPU seconds of the buffers and shippers of files done with
        self._cpu_thread = 0.0
        self.adopted: list[dict[str, Any]] = []  # one summary per file handled, as in its event
        self.done = threading.Event()

    @property
    def cpu_seconds(self) -> float:
        """CPU used by the adoption (its thread, the buffers' writers, the shippers), for the overhead budget."""
        current = self._current
        live = 0.0
        if current is not None:
            buffer, shipper = current
            live = buffer.writer_cpu + (shipper.stats.cpu_seconds if shipper is not None else 0.0)
        return self._cpu_done + self._cpu_thread + live

    def start(self) -> "OrphanAdopter":
        self._thread = threading.Thread(target=self._run, name="telemetry-orphans", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop adopting within `timeout`: the file being shipped is closed with what is left in it (for the
        next boot)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        start_cpu = time.thread_time()
        try:
            orphans, in_use = find_orphans(self.directory, self.keep)
            if not orphans and not in_use:
                return
            files = []
            for path in orphans:
                entry: dict[str, Any] = {"file": path.name}
                try:
                    report = inspect_buffer(path)
                    entry.update(pending=sum(report.pending.values()), dead_letters=report.dead_letter_records)
                except BufferUnreadable as exc:  # opening it moves it aside, counted (a corrupt file)
                    entry["error"] = str(exc)
                files.append(entry)
            files += [{"file": path.name, "in_use": True} for path in in_use]
            action = ("shipped with their own resource, then removed" if self._make_shipper is not None else
                      "kept (no otlp endpoint): expired records are dropped, counted; empty files are removed")
            self._emit("telemetry.orphan_buffers", logging.WARNING if self._make_shipper is None else logging.INFO,
                       {"directory": str(self.directory), "files": files, "action": action,
                        "detail": "buffer files of processes not in this machine's plan (a worker group scaled "
                                  "down, another machine id on this state dir); files a live process holds "
                                  "are left alone"})
            for path in orphans:
                if self._stop.is_set():
                    return
                self._adopt(path)
                self._cpu_thread = time.thread_time() - start_cpu
        except Exception as exc:  # noqa: BLE001 - adoption must never take the machine down
            self._emit("telemetry.orphan_buffers_failed", logging.ERROR,
                       {"directory": str(self.directory), "error": f"{type(exc).__name__}: {exc}"})
        finally:
            self._cpu_thread = time.thread_time() - start_cpu
            self.done.set()

    def _adopt(self, path: Path) -> None:
        summary: dict[str, Any] = {"file": path.name}
        try:
            buffer = self._make_buffer(path)
        except BufferInUse:  # taken by a process that started meanwhile: it is its
            return
        if buffer.open_error is not None:  # cannot be opened now (disk full, permissions): the next boot tries
            buffer.close(1.0)
            summary.update(removed=False, error=buffer.open_error)
            self._finish(summary, logging.WARNING)
            return
        shipper = self._make_shipper(buffer, path) if self._make_shipper is not None else None
        self._current = (buffer, shipper)
        try:
            buffer.flush(10.0)  # a pass of the writer: the retention applies now
            if shipper is not None:
                kinds = [_KINDS[name] for name in shipper.stats.signals]
                shipper.start()
                # Until what can be shipped is (records of a signal with no endpoint stay) or we are stopped, or
                # nothing has shipped for ORPHAN_STALL_S (the collector down): the file waits for the next boot
                # and the next file gets its retention and its turn (one file held every other before).
                last, since = None, time.monotonic()
                while left := sum(buffer.pending(kind) for kind in kinds):
                    if last is None or left < last:
                        last, since = left, time.monotonic()
                    elif time.monotonic() - since >= ORPHAN_STALL_S:
                        summary["stalled_s"] = ORPHAN_STALL_S
                        break
                    if self._stop.wait(self.poll):
                        break
        finally:
            if shipper is not None:
                shipper.stop(drain_timeout=0.5)
                summary["shipped"] = dict(shipper.stats.exported)
                if shipper.stats.last_error:
                    summary["last_error"] = shipper.stats.last_error
            pending, stats = buffer.pending(), buffer.stats()
            buffer.close(2.0)
            self._current = None
            self._cpu_done += buffer.writer_cpu + (shipper.stats.cpu_seconds if shipper is not None else 0.0)
        before = buffer.dropped_before_open
        dropped = {reason: count - before.get(reason, 0) for reason, count in stats.dropped.items()
                   if count > before.get(reason, 0)}
        summary.update(pending=pending, dead_letters=stats.dead_letter_records)
        if dropped:  # each counted in this process's own buffer and reported already (on_drop)
            summary["dropped"] = dropped
        summary["removed"] = not pending and not stats.dead_letter_records and remove_buffer_files(path)
        self._finish(summary, logging.INFO if summary["removed"] else logging.WARNING)

    def _finish(self, summary: dict[str, Any], level: int) -> None:
        self.adopted.append(summary)
        self._emit("telemetry.orphan_buffer_adopted", level, dict(summary))


__all__ = ["OrphanAdopter", "find_orphans", "remove_buffer_files"]

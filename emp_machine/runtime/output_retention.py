"""Bounds on the job outputs a machine keeps (`outputs.retention`, `outputs.max_size` in the manifest).

Workers write each job's files under `<state_dir>/outputs/<worker id>/<job folder>/` (connectors/_http.job_dir)
and pass them by reference; nothing else ever deleted them, so a machine that ran for days filled its disk and
then failed every job ("cannot store the job's outputs"). The machine prunes now and then, in a thread: a job
folder older than the retention goes, then, while the whole tree is over `max_size`, the oldest folders first.
A folder's age is its newest file's time, so one a running job still writes to is never the oldest. Standard
library only: the machine process runs it (it does not import pydantic or the connectors).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PRUNE_INTERVAL_S = 300.0  # the machine looks this often (and once a minute after boot)


@dataclass(frozen=True)
class Pruned:
    folders: int
    bytes: int


def _folder(path: Path) -> tuple[float, int]:
    """(newest mtime of the folder and its files, total bytes) of one job's folder."""
    newest, size = path.stat().st_mtime, 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name), follow_symlinks=False)
            except OSError:
                continue
            newest, size = max(newest, st.st_mtime), size + st.st_size
    return newest, size


def prune(root: Path, retention_s: float, max_bytes: int, now: float) -> Pruned:
    """Remove job folders under `root` (`<worker id>/<job folder>`) older than `retention_s` (0: no age bound),
    then the oldest while the rest exceed `max_bytes` (0: no size bound). A folder that cannot be read or
    removed is left and skipped; never raises for one."""
    folders: list[tuple[float, int, Path]] = []
    try:
        workers = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return Pruned(0, 0)
    for worker in workers:
        try:
            jobs = [p for p in worker.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            continue
        for job in jobs:
            try:
                newest, size = _folder(job)
            except OSError:
                continue
            folders.append((newest, size, job))
    folders.sort()
    total = sum(size for _, size, _ in folders)
    removed = freed = 0
    for newest, size, job in folders:
        expired = retention_s > 0 and now - newest > retention_s
        over = max_bytes > 0 and total > max_bytes
        if not (expired or over):
            break  # oldest first: the rest are newer and the tree fits
        shutil.rmtree(job, ignore_errors=True)
        if not job.exists():
            removed, freed, total = removed + 1, freed + size, total - size
    return Pruned(removed, freed)

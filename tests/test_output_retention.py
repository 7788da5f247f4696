"""Job outputs are pruned by age and by total size (runtime/output_retention.py): a machine that ran for days
used to keep every job's files until its disk was full, and then failed every job."""

from __future__ import annotations

import os
from pathlib import Path

from emp_machine.runtime import manifest as mf
from emp_machine.runtime.output_retention import prune

NOW = 1_800_000_000.0


def job_folder(root: Path, worker: str, job: str, age_s: float, size: int = 100) -> Path:
    folder = root / worker / job
    folder.mkdir(parents=True)
    (folder / "image.png").write_bytes(b"x" * size)
    for path in (folder / "image.png", folder):
        os.utime(path, (NOW - age_s, NOW - age_s))
    return folder


def test_folders_past_the_retention_go_and_newer_ones_stay(tmp_path):
    old = job_folder(tmp_path, "m1-worker-0", "job-old", age_s=2 * 86400)
    older = job_folder(tmp_path, "m1-worker-1", "job-older", age_s=3 * 86400)
    fresh = job_folder(tmp_path, "m1-worker-0", "job-fresh", age_s=60)
    pruned = prune(tmp_path, retention_s=86400, max_bytes=0, now=NOW)
    assert (pruned.folders, pruned.bytes) == (2, 200)
    assert not old.exists() and not older.exists() and fresh.exists()


def test_a_folder_a_running_job_still_writes_to_is_as_new_as_its_newest_file(tmp_path):
    folder = job_folder(tmp_path, "m1-worker-0", "job-long", age_s=2 * 86400)
    (folder / "frame-9.png").write_bytes(b"y")  # written now
    os.utime(folder / "frame-9.png", (NOW - 5, NOW - 5))
    os.utime(folder, (NOW - 2 * 86400, NOW - 2 * 86400))
    assert prune(tmp_path, retention_s=86400, max_bytes=0, now=NOW).folders == 0 and folder.exists()


def test_over_the_size_bound_the_oldest_go_first_until_the_rest_fit(tmp_path):
    folders = [job_folder(tmp_path, "w", f"job-{i}", age_s=600 - i * 60, size=1000) for i in range(5)]
    pruned = prune(tmp_path, retention_s=0, max_bytes=2500, now=NOW)  # 5000 bytes: the 3 oldest go
    assert (pruned.folders, pruned.bytes) == (3, 3000)
    assert [f.exists() for f in folders] == [False, False, False, True, True]


def test_nothing_to_prune_and_unreadable_trees_are_no_error(tmp_path):
    assert prune(tmp_path / "missing", 86400, 10, NOW).folders == 0
    (tmp_path / "stray-file").write_text("not a worker folder")
    job_folder(tmp_path, "w", "job-1", age_s=10)
    assert prune(tmp_path, retention_s=0, max_bytes=0, now=NOW).folders == 0


def test_the_manifest_bounds_outputs_by_default_and_takes_units():
    manifest = mf.loads("workers:\n  sim: {connector: simulation}\n", file="m.yaml", environ={"HOME": "/home/op"})
    assert manifest.outputs.retention == 86400 and manifest.outputs.max_size == 10 * 2**30
    custom = mf.loads("outputs: {retention: 2h, max_size: 500MB}\nworkers:\n  sim: {connector: simulation}\n",
                      file="m.yaml", environ={"HOME": "/home/op"})
    assert custom.outputs.retention == 7200 and custom.outputs.max_size == 500 * 10**6

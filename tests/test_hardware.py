"""What a worker may use, not what the host has: CPU affinity (taskset, a container's cpuset) and the cgroup's
CPU quota and memory limit. The cgroup files are written to a temporary folder passed as the root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from emp_machine.runtime import hardware as hw

GiB = 2**30


def cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup text and a cgroup mount holding `files` (path under the mount -> content)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc_cgroup").write_text(proc)
    root = tmp_path / "sys_fs_cgroup"
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content + "\n")
    root.mkdir(exist_ok=True)
    return tmp_path / "proc_cgroup", root


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"),
                    reason="needs taskset and CPU affinity (Linux)")
def test_a_worker_pinned_to_one_cpu_publishes_one_core():
    code = ("from emp_machine.runtime import hardware, worker; "
            "print(worker.probed_hardware(hardware.probe())['cpu_cores'])")
    out = subprocess.run(["taskset", "-c", str(min(os.sched_getaffinity(0))), sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_cgroup_v2_quota_and_memory_limit(tmp_path):
    proc, root = cgroup(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/pod1/ctr/cpu.max": "150000 100000",  # 1.5 CPUs: 2 may be busy at once
        "kubepods/pod1/ctr/memory.max": str(3 * GiB),
    })
    assert hw.cgroup_limits(proc, root) == (2, 3 * GiB)


def test_cgroup_v2_an_ancestors_limit_binds_and_max_means_none(tmp_path):
    proc, root = cgroup(tmp_path, "0::/railway/svc/ctr\n", {
        "railway/svc/ctr/cpu.max": "max 100000",
        "railway/svc/ctr/memory.max": "max",
        "railway/svc/memory.max": str(2 * GiB),
        "railway/cpu.max": "400000 100000",
    })
    assert hw.cgroup_limits(proc, root) == (4, 2 * GiB)
    proc, root = cgroup(tmp_path / "none", "0::/a\n", {"a/cpu.max": "max 100000", "a/memory.max": "max"})
    assert hw.cgroup_limits(proc, root) == (None, None)


def test_cgroup_v2_in_a_container_namespace_and_on_a_hybrid_host(tmp_path):
    # cgroup namespace: the path reads "/" and the container's own cgroup is the mount
    proc, root = cgroup(tmp_path / "ns", "0::/\n", {"cpu.max": "100000 100000", "memory.max": str(GiB)})
    assert hw.cgroup_limits(proc, root) == (1, GiB)
    # hybrid hierarchy: v2 mounted at <root>/unified
    proc, root = cgroup(tmp_path / "hybrid", "1:name=systemd:/\n0::/w\n", {"unified/w/cpu.max": "250000 100000"})
    assert hw.cgroup_limits(proc, root) == (3, None)


def test_cgroup_v1_quota_and_memory_limit(tmp_path):
    proc = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n"
    proc, root = cgroup(tmp_path, proc, {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        "memory/docker/abc/memory.limit_in_bytes": str(5 * GiB),
    })
    assert hw.cgroup_limits(proc, root) == (2, 5 * GiB)
    # no quota (-1), no memory limit (v1 writes a huge number), the host's path seen from inside a container
    proc, root = cgroup(tmp_path / "none", "4:memory:/host/path\n2:cpu:/host/path\n", {
        "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
        "memory/memory.limit_in_bytes": "9223372036854771712",
    })
    assert hw.cgroup_limits(proc, root) == (None, None)


@pytest.mark.parametrize("proc,files", [
    (None, {}),  # no /proc/self/cgroup (macOS)
    ("", {}),
    ("garbage without colons\n::\n0::\n", {"cpu.max": "lots 100000", "memory.max": "-5"}),
    ("0::/a\n", {"a/cpu.max": "100000 0", "a/memory.max": "12abc"}),
    ("0::/a\n0::/b\n", {"a/cpu.max": "inf 100000", "b/cpu.max": "nan 100000", "a/memory.max": "0"}),
    ("0::/../../etc\n", {}),
])
def test_unreadable_cgroup_files_mean_no_limit_and_never_raise(tmp_path, proc, files):
    proc_path, root = cgroup(tmp_path, proc or "", files)
    if proc is None:
        proc_path.unlink()
    assert hw.cgroup_limits(proc_path, root) == (None, None)
    assert hw.cgroup_limits(tmp_path, tmp_path / "missing") == (None, None)  # a folder where a file should be


def test_probe_caps_cpus_and_memory_by_the_cgroup(tmp_path):
    proc, root = cgroup(tmp_path, "0::/w\n", {"w/cpu.max": "50000 100000", "w/memory.max": str(GiB)})
    probe = hw.probe(proc, root)
    assert (probe.cpu_count, probe.memory_total_bytes) == (1, min(GiB, psutil.virtual_memory().total))
    # a quota above the CPUs the process may use, or no limits at all: the affinity and the host's memory
    proc, root = cgroup(tmp_path / "wide", "0::/w\n", {"w/cpu.max": f"{1000 * 100000} 100000"})
    assert hw.usable_cpus(proc, root) == len(os.sched_getaffinity(0))
    assert hw.usable_memory(proc, root) == psutil.virtual_memory().total


def test_probe_reads_the_cgroup_files_once_for_cpus_and_memory(tmp_path, monkeypatch):
    proc, root = cgroup(tmp_path, "0::/w\n", {"w/cpu.max": "50000 100000", "w/memory.max": str(GiB)})
    calls = []
    real = hw.cgroup_limits
    monkeypatch.setattr(hw, "cgroup_limits", lambda *a: calls.append(a) or real(*a))  # a spy, the real read
    probe = hw.probe(proc, root)
    assert calls == [(proc, root)]
    assert (probe.cpu_count, probe.memory_total_bytes) == (1, min(GiB, psutil.virtual_memory().total))
    # limits already read are used as given: the cgroup files are not read again
    assert hw.usable_cpus(limits=(1, None)) == 1 and hw.usable_memory(limits=(None, GiB)) == min(
        GiB, psutil.virtual_memory().total)
    assert len(calls) == 1

"""Hardware readings: psutil for CPU, memory and disk; pynvml (nvidia-ml-py) for GPUs.

No GPU is the normal case on most machines: a missing driver, library or device reads as an empty GPU
list with the reason kept for display, never as an error.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

MAX_GPUS = 64  # GPUs a machine may have: machine.gpus at most, and plan.build refuses a larger --gpus


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: float
    temperature_c: float | None


@dataclass(frozen=True)
class Hardware:
    cpu_count: int
    memory_total_bytes: int
    gpus: tuple[GpuReading, ...] = ()
    gpu_note: str = ""  # why there are no GPU readings, e.g. "no NVIDIA driver"

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def gpu_memory_gb(self) -> float:
        return max((g.memory_total_bytes for g in self.gpus), default=0) / 2**30

    @property
    def gpu_model(self) -> str:
        return self.gpus[0].name if self.gpus else ""


_nvml_lock = threading.Lock()
_nvml_state: dict = {"initialised": False, "error": ""}


def _nvml():
    """The pynvml module once nvmlInit succeeded, else None (the reason is kept in _nvml_state)."""
    with _nvml_lock:
        if _nvml_state["initialised"]:
            import pynvml

            return pynvml
        if _nvml_state["error"]:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except ImportError:
            _nvml_state["error"] = "nvidia-ml-py is not installed"
            return None
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: all mean "no GPU here"
            _nvml_state["error"] = f"no NVIDIA driver ({exc.__class__.__name__})"
            return None
        _nvml_state["initialised"] = True
        return pynvml


def _memory_info(nvml, handle):
    """Memory as nvidia-smi shows it. The v2 call counts the driver's reserved memory apart from "used"; the
    v1 call counts it as used (about 480 MiB on an idle H100, which nvidia-smi shows as 0 MiB used). Drivers
    before R510 have only v1."""
    try:
        return nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    except (nvml.NVMLError, AttributeError, TypeError):
        return nvml.nvmlDeviceGetMemoryInfo(handle)


def read_gpus() -> tuple[tuple[GpuReading, ...], str]:
    nvml = _nvml()
    if nvml is None:
        return (), _nvml_state["error"]
    readings = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            memory = _memory_info(nvml, handle)
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:
                util = 0.0
            try:
                temp = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            except nvml.NVMLError:
                temp = None
            readings.append(GpuReading(
                index=index, name=name.decode() if isinstance(name, bytes) else str(name),
                memory_total_bytes=int(memory.total), memory_used_bytes=int(memory.used),
                utilization_percent=util, temperature_c=temp,
            ))
    except nvml.NVMLError as exc:
        return tuple(readings), f"NVML error: {exc}"
    return tuple(readings), "" if readings else "no NVIDIA GPU found"


PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
_NO_MEMORY_LIMIT = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except (OSError, ValueError):
        return None


def _dirs(mount: Path, cgroup_path: str) -> list[Path]:
    """The cgroup's folder under `mount` and its ancestors up to the mount (a parent's limit binds too).
    In a container the listed path may be the host's and the mount the container's own cgroup: the folders
    that do not exist just read as nothing, and the mount itself is always looked at."""
    parts = [p for p in cgroup_path.split("/") if p and p not in (".", "..")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _cpus(quota: str | None, period: str | None) -> int | None:
    try:
        q, p = float(quota), float(period)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # absent, or "max": no quota
    return max(1, math.ceil(q / p)) if 0 < q < math.inf and 0 < p < math.inf else None


def _bytes(text: str | None) -> int | None:
    try:
        value = int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # absent, or "max": no limit
    return value if 0 < value < _NO_MEMORY_LIMIT else None


def cgroup_limits(proc_cgroup: str | os.PathLike = PROC_CGROUP,
                  root: str | os.PathLike = CGROUP_ROOT) -> tuple[int | None, int | None]:
    """(CPUs, memory bytes) this process's cgroup allows, None where there is no limit or it cannot be read.

    CPUs are ceil(quota / period) of cgroup v2 `cpu.max` (v1: cpu.cfs_quota_us / cpu.cfs_period_us), memory
    is v2 `memory.max` (v1: memory.limit_in_bytes); the cgroup's own path comes from /proc/self/cgroup, the
    v2 hierarchy is mounted at `root` or, on hybrid hosts, at `root`/unified. The smallest limit of the
    cgroup and its ancestors wins. Never raises: no cgroup files (macOS, a bare host) means no limits.
    """
    cpus: list[int] = []
    memory: list[int] = []
    root = Path(root)
    text = _read(Path(proc_cgroup)) or ""
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, sep, path = rest.partition(":")
        if not sep:
            continue
        if hierarchy == "0" and controllers == "":
            for mount in (root, root / "unified"):
                for folder in _dirs(mount, path):
                    quota, _, period = (_read(folder / "cpu.max") or "").partition(" ")
                    cpus.append(_cpus(quota, period or "100000"))
                    memory.append(_bytes(_read(folder / "memory.max")))
            continue
        names = controllers.split(",")
        mounts = [root / controllers, *(root / n for n in names)]
        if "cpu" in names:
            for folder in (f for mount in mounts for f in _dirs(mount, path)):
                cpus.append(_cpus(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")))
        if "memory" in names:
            for folder in (f for mount in mounts for f in _dirs(mount, path)):
                memory.append(_bytes(_read(folder / "memory.limit_in_bytes")))
    found_cpus = [c for c in cpus if c is not None]
    found_memory = [m for m in memory if m is not None]
    return (min(found_cpus) if found_cpus else None, min(found_memory) if found_memory else None)


def usable_cpus(proc_cgroup: str | os.PathLike = PROC_CGROUP, root: str | os.PathLike = CGROUP_ROOT,
                limits: tuple[int | None, int | None] | None = None) -> int:
    """The CPUs this process may run on: its affinity (taskset, a container's cpuset), capped by the
    cgroup's CPU quota; not the host's count, which over-claims in a container. `limits`: cgroup_limits()
    already read (the cgroup files are then not read again)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call (macOS)
        count = psutil.cpu_count() or 1
    cap, _ = limits if limits is not None else cgroup_limits(proc_cgroup, root)
    return max(1, min(count, cap) if cap else count)


def usable_memory(proc_cgroup: str | os.PathLike = PROC_CGROUP, root: str | os.PathLike = CGROUP_ROOT,
                  limits: tuple[int | None, int | None] | None = None) -> int:
    """The memory this process may use: the host's, capped by the cgroup's memory limit (a Railway container's
    plan, say). `limits`: as for usable_cpus."""
    total = psutil.virtual_memory().total
    _, cap = limits if limits is not None else cgroup_limits(proc_cgroup, root)
    return min(total, cap) if cap else total


def probe(proc_cgroup: str | os.PathLike = PROC_CGROUP, cgroup_root: str | os.PathLike = CGROUP_ROOT) -> Hardware:
    """What this process may use: usable CPUs and memory (see usable_cpus, usable_memory) and the GPUs."""
    gpus, note = read_gpus()
    limits = cgroup_limits(proc_cgroup, cgroup_root)  # read once for both
    return Hardware(cpu_count=usable_cpus(limits=limits), memory_total_bytes=usable_memory(limits=limits),
                    gpus=gpus, gpu_note=note)


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (0 when it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total

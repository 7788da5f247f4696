"""Hardware readings: psutil for CPU, memory and disk; pynvml (nvidia-ml-py) for GPUs.

No GPU is the normal case on most machines: a missing driver, library or device reads as an empty GPU
list with the reason kept for display, never as an error.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil


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


def probe() -> Hardware:
    gpus, note = read_gpus()
    return Hardware(cpu_count=psutil.cpu_count() or 1, memory_total_bytes=psutil.virtual_memory().total,
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

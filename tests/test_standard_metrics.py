"""The machine_* gauges of StandardMetrics: the CPU share every reader agrees on, and GPU readings that lose
only the GPU NVML cannot read."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import types

import psutil

from emp_machine.telemetry.metrics import Meter
from emp_machine.telemetry.standard import StandardMetrics
from harness import wait_for

BURN_S = 60  # the burner's own deadline: it ends even if the test dies before killing it


def _from_prometheus(meter: Meter) -> float:
    return float(re.search(r"^machine_cpu_usage_percent (\S+)$", meter.render_prometheus(), re.M).group(1))


def _from_snapshot(meter: Meter) -> float:
    (points,) = [f[5] for f in meter.snapshot() if f[0] == "machine_cpu_usage_percent"]
    return points[0][1]


def test_cpu_usage_is_the_same_share_for_every_reader():
    meter = Meter()
    StandardMetrics(meter, system=True)
    cpus = psutil.cpu_count() or 1
    floor = 100.0 / cpus * 0.6  # one busy core of `cpus`, with room for the scheduler
    burner = subprocess.Popen([sys.executable, "-c",
                               f"import time\nd = time.monotonic() + {BURN_S}\nwhile time.monotonic() < d: pass"])
    try:
        wait_for(lambda: _from_prometheus(meter) >= floor, timeout=20,
                 message=f"machine_cpu_usage_percent to show the busy core (>= {floor:.0f})")
        readings = []
        started = time.monotonic()
        for n in range(40):  # back to back, by every kind of reader, with psutil's global baseline moved between
            readings.append(_from_prometheus(meter) if n % 2 else _from_snapshot(meter))
            psutil.cpu_percent(None)
        took = time.monotonic() - started
        changes = sum(1 for a, b in zip(readings, readings[1:]) if a != b)
        # the value moves at most once a second: one step in a burst under a second (a slow machine: one more
        # per second the burst took)
        assert changes <= 1 + int(took), (took, readings)
        assert all(floor <= r <= 100.0 for r in readings), readings
        assert readings[0] == readings[1] or readings[-2] == readings[-1], readings
    finally:
        burner.kill()
        burner.wait()


def _fake_nvml(fail: dict[int, Exception], unopenable: set[int]) -> types.ModuleType:
    """A stand-in for pynvml (no GPU here): four GPUs; `fail` maps an index to the error its utilisation
    read raises, `unopenable` the indexes whose handle lookup raises."""
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    fake.NVMLError = NVMLError
    fake.NVMLError_NotSupported = type("NVMLError_NotSupported", (NVMLError,), {})
    fake.NVMLError_GpuIsLost = type("NVMLError_GpuIsLost", (NVMLError,), {})
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetCount = lambda: 4

    def handle(index):
        if index in unopenable:
            raise fake.NVMLError_GpuIsLost("GPU is lost")
        return index

    def utilisation(h):
        if h in fail:
            raise fail[h]
        return types.SimpleNamespace(gpu=70 + h, memory=10)

    fake.nvmlDeviceGetHandleByIndex = handle
    fake.nvmlDeviceGetUtilizationRates = utilisation
    return fake


def test_gpu_usage_loses_only_the_gpu_that_cannot_answer(monkeypatch):
    fail: dict[int, Exception] = {}
    fake = _fake_nvml(fail, unopenable={3})
    fail[1] = fake.NVMLError_NotSupported("Not Supported")  # what NVML answers for a MIG-enabled GPU
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = Meter()
    StandardMetrics(meter, system=True)
    gauge = meter.instruments["machine_gpu_usage_percent"]
    assert gauge.points() == [({"gpu": "0"}, 70), ({"gpu": "2"}, 72)]
    assert 'machine_gpu_usage_percent{gpu="2"} 72' in meter.render_prometheus()
    fail[0] = fake.NVMLError_GpuIsLost("GPU is lost")  # lost while running: the others still read
    assert gauge.points() == [({"gpu": "2"}, 72)]
    del fail[0]
    assert gauge.points() == [({"gpu": "0"}, 70), ({"gpu": "2"}, 72)]

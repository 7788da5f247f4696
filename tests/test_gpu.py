"""GPU readings on real NVIDIA hardware through pynvml, from NVML up to /health, /status, /metrics and the
worker's capabilities in Redis.

Skipped where NVML finds no GPU, which is most CI machines; run the suite on a GPU machine to exercise them
(docs/gpu.md says how and what was seen there).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from emp_machine.runtime import hardware as hw
from emp_machine.telemetry.standard import _gpu_callback
from harness import RunningMachine, health_base, http, http_json, machine_env, wait_for, write_manifest

GPUS, NOTE = hw.read_gpus()
pytestmark = pytest.mark.skipif(not GPUS, reason=f"no NVIDIA GPU here ({NOTE})")

# A few seconds of matrix products on GPU 0, in whatever python3 on PATH has PyTorch (or CuPy).
LOAD = """
import sys, time
try:
    import torch
    a = torch.randn(8192, 8192, device="cuda:0")
    step = lambda: (a @ a, torch.cuda.synchronize())
except ImportError:
    import cupy
    a = cupy.random.rand(8192, 8192, dtype=cupy.float32)
    step = lambda: (a @ a, cupy.cuda.Device(0).synchronize())
print("loading", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    step()
"""


def _load_python() -> str | None:
    for py in ("python3", "python"):
        path = shutil.which(py)
        if path and subprocess.run([path, "-c", "import importlib.util as u, sys; "
                                    "sys.exit(not (u.find_spec('torch') or u.find_spec('cupy')))"],
                                   capture_output=True, timeout=60).returncode == 0:
            return path
    return None


def test_nvml_readings_are_plausible():
    for index, gpu in enumerate(GPUS):
        assert gpu.index == index and gpu.name
        assert gpu.memory_total_bytes > 2**30
        assert 0 <= gpu.memory_used_bytes <= gpu.memory_total_bytes
        assert 0.0 <= gpu.utilization_percent <= 100.0
        assert gpu.temperature_c is None or 0 < gpu.temperature_c < 120
    probe = hw.probe()
    assert probe.gpu_count == len(GPUS) and probe.gpu_note == ""
    assert probe.gpu_model == GPUS[0].name
    assert probe.gpu_memory_gb == pytest.approx(max(g.memory_total_bytes for g in GPUS) / 2**30)


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="nvidia-smi is not on PATH")
def test_nvml_agrees_with_nvidia_smi():
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    gpus = hw.read_gpus()[0]
    rows = [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines()]
    assert [(int(i), name, int(mib)) for i, name, mib, _ in rows] == \
        [(g.index, g.name, g.memory_total_bytes // 2**20) for g in gpus]
    # "used" as nvidia-smi counts it, without the driver's reserved memory (NVML's v1 call counted ~480 MiB
    # of it as used on an idle H100); the slack is for other processes allocating between the two reads
    for (_, _, _, used_mib), g in zip(rows, gpus):
        assert abs(int(used_mib) - g.memory_used_bytes / 2**20) <= 64, (used_mib, g.memory_used_bytes)


def test_gpu_gauge_has_one_reading_per_gpu_and_follows_a_load():
    read = _gpu_callback()
    assert read is not None
    observations = read(None)
    assert [o.attributes for o in observations] == [{"gpu": str(g.index)} for g in GPUS]
    assert all(0 <= o.value <= 100 for o in observations)
    python = _load_python()
    if python is None:
        pytest.skip("no python3 with torch or cupy on PATH to put a load on the GPU")
    load = subprocess.Popen([python, "-c", LOAD, "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert load.stdout.readline().strip() == "loading", load.stderr.read()
        wait_for(lambda: read(None)[0].value >= 50, 30, interval=0.2, message="GPU 0 utilisation >= 50 % under load")
        busy = hw.read_gpus()[0][0]
        assert busy.utilization_percent >= 50 and busy.memory_used_bytes > GPUS[0].memory_used_bytes
    finally:
        load.kill()
        load.wait(timeout=30)


def test_a_machine_reports_its_gpus_in_health_status_metrics_and_worker_capabilities(tmp_path, redis_server):
    manifest = write_manifest(tmp_path / "manifest.yaml", """
health:
  port: 0
workers:
  sim:
    connector: simulation
    count: 1
""", tmp_path, redis_server.url)
    machine = RunningMachine(manifest, tmp_path, machine_env())
    try:
        machine.wait_ready()
        base = health_base(machine)
        wait_for(lambda: http(base + "/health")[0] == 200, 20, message="/health 200")
        _, doc = http_json(base + "/health")
        assert [(g["index"], g["name"], g["memory_total_bytes"]) for g in doc["hardware"]["gpus"]] == \
            [(g.index, g.name, g.memory_total_bytes) for g in GPUS]
        assert doc["hardware"]["gpu_note"] == ""
        _, status = http_json(base + "/status")
        assert status["structure"]["gpu_count"] == len(GPUS)
        body = http(base + "/metrics")[2].decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        samples = families["machine_gpu_usage_percent"].samples
        assert sorted(s.labels["gpu"] for s in samples) == [str(g.index) for g in GPUS]
        page = http(base + "/")[2].decode()
        assert GPUS[0].name in page
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        mid = status["machine_id"]
        caps = json.loads(client.hget(f"worker:{mid}-worker-0", "capabilities"))
        assert caps["hardware"]["gpu_model"] == GPUS[0].name
        assert caps["hardware"]["gpu_memory_gb"] == round(GPUS[0].memory_total_bytes / 2**30, 1)
    finally:
        machine.close()


def test_per_gpu_services_lay_out_one_instance_per_gpu(tmp_path):
    from pathlib import Path

    machines = Path(__file__).resolve().parent.parent / "machines"
    done = subprocess.run([sys.executable, "-m", "emp_machine", "render", str(machines / "comfyui.yaml")],
                          capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    for g in GPUS:
        assert f"[program:comfyui-gpu{g.index}]" in done.stdout
        assert f'CUDA_VISIBLE_DEVICES="{g.index}"' in done.stdout
    assert f"[program:comfyui-gpu{len(GPUS)}]" not in done.stdout

"""Rules of the manifest and of the plan laid out from it that no test held (mutation audit M10: each could be
broken with every other test passing), and a port overlap the plan now refuses. Real manifests, loaded and laid
out as the machine does; no process is started."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from emp_machine.errors import ManifestError
from emp_machine.runtime import manifest as mf, plan
from emp_machine.runtime.hardware import GpuReading, Hardware
from emp_machine.supervisor.config import render

ENV = {"MACHINE_ID": "probe-1"}
REDIS = "redis:\n  url: redis://127.0.0.1:6399/0\n"


def load(text: str, environ: dict | None = None) -> mf.Manifest:
    return mf.loads(REDIS + textwrap.dedent(text), file="m.yaml", environ={**ENV, **(environ or {})})


def hw(gpus: int = 0) -> Hardware:
    return Hardware(4, 8 * 2**30, tuple(GpuReading(i, "g", 2**34, 0, 0.0, None) for i in range(gpus)),
                    "" if gpus else "no NVIDIA driver")


def build(manifest, gpus: int = 0):
    return plan.build(manifest, hw(gpus), resolved_manifest=Path("/nonexistent/manifest.json"),
                      environ={"PATH": "/usr/bin"})


def test_one_groups_env_does_not_leak_into_the_next_groups_workers():
    m = load("""
    workers:
      a: {connector: simulation, env: {ONLY_A: "1"}}
      b: {connector: simulation}
    """)
    laid = build(m)
    assert laid.spec("worker-0").env.get("ONLY_A") == "1"
    assert "ONLY_A" not in laid.spec("worker-1").env


def test_a_worker_groups_stop_grace_becomes_its_programs_stopwaitsecs():
    m = load("""
    workers:
      slow: {connector: simulation, stop_grace: 2m}
    """)
    laid = build(m)
    assert laid.spec("worker-0").stop_grace == 120
    conf = render(list(laid.specs), laid.paths, parent_pid=1, machine_id="probe-1", log_max_bytes=1,
                  log_backups=1)
    section = conf.split("[program:worker-0]", 1)[1].split("\n[", 1)[0]
    assert "stopwaitsecs = 120\n" in section


def test_every_worker_is_told_the_machines_worker_total_across_groups():
    m = load("""
    workers:
      a: {connector: simulation, count: 1}
      b: {connector: simulation, count: 2}
    """)
    laid = build(m)
    assert [laid.spec(f"worker-{i}").env["EMP_WORKERS_TOTAL"] for i in range(3)] == ["3", "3", "3"]


def test_per_instance_workers_are_bound_one_to_each_gpu_instance():
    m = load("""
    machine: {gpus: 2}
    services:
      comfy: {command: "python -m srv --port {port}", instances: per_gpu, port: 8188}
    workers:
      c: {connector: simulation, service: comfy}
    """)
    laid = build(m)
    assert [w.service_process for w in laid.workers] == ["comfy-gpu0", "comfy-gpu1"]
    assert [laid.spec(f"worker-{i}").env["EMP_SERVICE_PORT"] for i in range(2)] == ["8188", "8189"]
    # and the status message counts those GPUs, though this host's NVML reads none (helper-190: gpu_count 0
    # beside workers on GPU 0 and GPU 1)
    import asyncio

    from emp_machine.runtime.aggregate import Aggregator, HardwareState

    async def structure():
        agg = Aggregator(laid, {"c": ("simulation",)}, "test", health_url="")
        agg.set_hardware(HardwareState(1.0, 1, 2, 1, 2))
        agg.commit()
        return agg.message("periodic")["structure"]

    shown = asyncio.run(structure())
    assert shown["gpu_count"] == 2 and sorted(w["gpu_id"] for w in shown["workers"].values()) == [0, 1]


@pytest.mark.parametrize("length, ok", [(40, True), (41, False)])
def test_names_are_at_most_40_characters(length, ok):
    name = "s" * length
    text = f"services:\n  {name}: {{command: python -m srv}}\n"
    if ok:
        assert name in load(text).services
    else:
        with pytest.raises(ManifestError) as info:
            load(text)
        assert any(p.path == f"services.{name}" for p in info.value.problems)


def test_a_service_named_worker_is_refused_its_processes_would_clash_with_the_workers():
    with pytest.raises(ManifestError) as info:
        load("""
        services:
          worker: {command: python -m srv}
        workers:
          w: {connector: simulation}
        """)
    assert any(p.path == "services.worker" and "reserved" in p.message for p in info.value.problems)


def test_redis_url_beats_hub_redis_url():
    m = load("", {"REDIS_URL": "redis://a.example:6379/0", "HUB_REDIS_URL": "redis://hub.example:6379/0"})
    assert m.redis.url == "redis://a.example:6379/0"


def test_per_gpu_ports_past_65535_on_auto_gpus_are_refused_at_plan_time():
    m = load("""
    services:
      comfy: {command: "python -m srv --port {port}", instances: per_gpu, port: 65535}
    """)
    with pytest.raises(plan.PlanError, match="past 65535"):
        build(m, gpus=2)
    assert build(load("""
    services:
      comfy: {command: "python -m srv --port {port}", instances: per_gpu, port: 65534}
    """), gpus=2).spec("comfy-gpu1").env["SERVICE_PORT"] == "65535"


def test_workers_stop_before_services_before_redis_on_supervisords_own_order():
    m = mf.loads(textwrap.dedent("""
    services:
      s: {command: python -m srv}
    workers:
      w: {connector: simulation}
    """), file="m.yaml", environ=ENV)
    laid = plan.build(m, hw(), resolved_manifest=Path("/tmp/x.json"), environ={}, redis_port=6391)
    assert laid.spec("worker-0").priority > laid.spec("s-0").priority > laid.spec("redis").priority


def test_a_users_cuda_visible_devices_for_a_per_gpu_service_is_kept():
    m = load("""
    machine: {gpus: 2}
    services:
      comfy: {command: "python -m srv", instances: per_gpu, env: {CUDA_VISIBLE_DEVICES: "GPU-{index}"}}
    """)
    assert build(m).spec("comfy-gpu1").env["CUDA_VISIBLE_DEVICES"] == "GPU-1"


def test_a_token_named_env_value_of_the_wrong_type_is_not_repeated():
    with pytest.raises(ManifestError) as info:
        load("""
        services:
          s: {command: python -m srv, env: {HF_TOKEN: 918273645501}}
        """)
    text = str(info.value)
    assert "services.s.env.HF_TOKEN" in text and "918273645501" not in text


def test_per_gpu_ports_overlapping_another_service_are_refused_when_gpus_is_a_number():
    with pytest.raises(ManifestError) as info:
        load("""
        machine: {gpus: 2}
        services:
          comfy: {command: "python -m srv --port {port}", instances: per_gpu, port: 8188}
          other: {command: "python -m other --port {port}", port: 8189}
        """)
    assert any(p.path == "services.other.port" and "overlap" in p.message for p in info.value.problems)


def test_backoff_initial_equal_to_backoff_max_is_a_constant_backoff_not_an_error():
    m = load("""
    services:
      s: {command: python -m srv, restart: {backoff_initial: 5s, backoff_max: 5s}}
    """)
    assert m.services["s"].restart.backoff_initial == m.services["s"].restart.backoff_max == 5


def test_a_relative_state_dir_is_relative_to_the_manifests_folder(tmp_path):
    (tmp_path / "m.yaml").write_text(REDIS + "machine: {state_dir: state}\n")
    assert mf.load(tmp_path / "m.yaml", ENV).machine.state_dir == str(tmp_path.resolve() / "state")


def test_the_health_token_is_read_without_surrounding_whitespace():
    m = load("", {"EMP_HEALTH_TOKEN": "  s3cret-token\n"})
    assert m.health.token.get_secret_value() == "s3cret-token"


def test_the_manifests_region_beats_the_platforms():
    m = load("machine: {region: eu-west}\n", {"RAILWAY_REPLICA_REGION": "us-east4"})
    assert m.machine.region == "eu-west"


def test_each_workers_argv_carries_its_machine_wide_index():
    m = load("""
    workers:
      a: {connector: simulation}
      b: {connector: simulation}
    """)
    laid = build(m)
    assert laid.spec("worker-1").argv[-2:] == ("--index", "1")


def test_per_gpu_ports_overlapping_another_service_are_refused_at_boot_when_gpus_is_auto():
    # Validation cannot know the range of a per_gpu service on `gpus: auto`; the plan, laid out for this
    # machine's GPUs, can: comfy on 8188-8189 and another service on 8189 was a machine that booted (found by
    # mutation audit M10).
    m = load("""
    services:
      comfy: {command: "python -m srv --port {port}", instances: per_gpu, port: 8188}
      other: {command: "python -m other --port {port}", port: 8189}
    """)
    assert build(m, gpus=1).spec("other-0").env["SERVICE_PORT"] == "8189"  # one GPU: no overlap
    with pytest.raises(plan.PlanError, match="port 8189 is also a port of services.comfy"):
        build(m, gpus=2)
    m = load("""
    health: {port: 8190}
    services:
      comfy: {command: "python -m srv --port {port}", instances: per_gpu, port: 8188}
    """)
    with pytest.raises(plan.PlanError, match="port 8190 is also health.port"):
        build(m, gpus=3)

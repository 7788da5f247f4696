"""Manifest + hardware -> the concrete processes of one machine: names, commands, ports, env, dependencies.

The supervisor package renders what this produces; the machine starts it in dependency order.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emp_machine.errors import EmpError
from emp_machine.runtime import identity
from emp_machine.runtime.hardware import MAX_GPUS, Hardware  # a larger count (--gpus, a driver's) is refused
from emp_machine.runtime.redis_server import find_server_binary, free_port, server_argv
from emp_machine.supervisor.config import Paths, ProcessSpec
from emp_machine.supervisor.policy import RestartPolicy

if TYPE_CHECKING:  # build() reads a manifest by attribute: the pydantic model or the machine's View of it
    from emp_machine.runtime.manifest import Manifest

REDIS_PROCESS = "redis"
BASE_ENV_KEYS = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
                 # the platform's time between SIGTERM and SIGKILL: workers hand their jobs back within it
                 "EMP_DRAIN_SECONDS", "RAILWAY_DEPLOYMENT_DRAINING_SECONDS",
                 # where OpenSSL finds trusted CAs: a rediss:// Redis behind a private CA, which the machine and
                 # the CLI trusted while every worker failed its certificate check
                 "SSL_CERT_FILE", "SSL_CERT_DIR")


class PlanError(EmpError):
    """The manifest cannot be laid out on this hardware (e.g. per_gpu on a machine without GPUs)."""

    exit_code = 2


@dataclass(frozen=True)
class Probe:
    """A resolved health check: exactly one of url / tcp_port."""

    url: str | None
    tcp_port: int | None
    interval: float
    timeout: float
    start_period: float
    retries: int

    def describe(self) -> str:
        """The check as reasons show it (/health, the status page: read without a token), credentials in its
        URL hidden."""
        return identity.redact_url(self.url) if self.url else f"tcp 127.0.0.1:{self.tcp_port}"


@dataclass(frozen=True)
class ServiceInstance:
    process: str
    service: str
    index: int
    gpu: int | None
    port: int | None
    probe: Probe | None
    required: bool
    memory_limit: int | None


@dataclass(frozen=True)
class WorkerSlot:
    process: str
    index: int
    group: str
    worker_id: str
    connector: str
    service_process: str | None  # the service instance this worker is bound to
    memory_limit: int | None


@dataclass(frozen=True)
class Plan:
    machine_id: str
    paths: Paths
    specs: tuple[ProcessSpec, ...]
    services: tuple[ServiceInstance, ...]
    workers: tuple[WorkerSlot, ...]
    redis_url: str
    redis_probe: Probe | None  # set when the machine runs its embedded Redis

    def spec(self, name: str) -> ProcessSpec:
        return next(s for s in self.specs if s.name == name)

    def dependencies(self, worker: WorkerSlot) -> list[str]:
        """Processes that must be healthy before this worker starts."""
        deps = [REDIS_PROCESS] if self.redis_probe else []
        return deps + ([worker.service_process] if worker.service_process else [])


def _policy(section: Any) -> RestartPolicy:
    return RestartPolicy.from_dict({name: getattr(section, name) for name in RestartPolicy.__dataclass_fields__})


def _probe(check: Any, values: dict) -> Probe | None:
    if check is None:
        return None
    url = check.http.format(**values) if check.http else None
    tcp = int(str(check.tcp).format(**values)) if check.tcp is not None else None
    return Probe(url, tcp, check.interval, check.timeout, check.start_period, check.retries)


def gpu_count(manifest: Manifest, hardware: Hardware) -> int:
    return manifest.machine.gpus if isinstance(manifest.machine.gpus, int) else hardware.gpu_count


def _check_port_ranges(services: list[ServiceInstance], health_port: int | None) -> None:
    """The services' ports as laid out, apart and off health.port. The manifest checks them too, but a per_gpu
    service on `machine.gpus: auto` has its range only here, once the GPU count is known: validated, it then
    listened on another service's port (comfy on 8188-8189 per GPU beside another service on 8189)."""
    owner: dict[int, str] = {}
    for instance in services:
        if instance.port is None:
            continue
        other = owner.setdefault(instance.port, instance.service)
        if other != instance.service:
            raise PlanError(f"services.{instance.service}: port {instance.port} is also a port of services.{other} "
                            f"on this machine (instance i listens on port + i, one instance per GPU); give each "
                            f"service its own range")
        if instance.port == health_port:
            raise PlanError(f"services.{instance.service}: port {instance.port} is also health.port on this "
                            f"machine (instance i listens on port + i, one instance per GPU); pick another port "
                            f"for the health server or the service")


def build(manifest: Manifest, hardware: Hardware, *, resolved_manifest: Path, environ: dict[str, str],
          redis_port: int | None = None) -> Plan:
    """Lay the manifest out. `resolved_manifest` is the JSON the workers load (the machine writes it)."""
    machine_id = manifest.machine.id
    paths = Paths(Path(manifest.machine.state_dir))
    base_env = {k: environ[k] for k in BASE_ENV_KEYS if k in environ}
    gpus = gpu_count(manifest, hardware)
    specs: list[ProcessSpec] = []
    services: list[ServiceInstance] = []
    workers: list[WorkerSlot] = []

    redis_url, redis_probe = manifest.redis.url, None
    if manifest.redis.url == "embedded":
        port = redis_port or free_port()
        data_dir = paths.state / "redis"  # created by the machine at boot
        argv = server_argv(find_server_binary(), port, data_dir, persist=True)  # a crash loses no job
        specs.append(ProcessSpec(name=REDIS_PROCESS, argv=tuple(argv),
                                 kind="redis", env=dict(base_env), stop_grace=10.0, priority=100))
        redis_url = f"redis://127.0.0.1:{port}/0"
        # Checked every 0.1 s until it answers (workers start then), every 5 s after: every 0.5 s it opened and
        # closed a connection twice a second for the machine's life (172,800 a day, 120 sockets in TIME-WAIT),
        # while the machine's own poll PINGs the same server every second over its open connection.
        redis_probe = Probe(None, port, 5.0, 1.0, 10.0, 1)

    for name, svc in manifest.services.items():
        if svc.instances == "per_gpu":
            if gpus == 0:
                raise PlanError(
                    f"services.{name}.instances is per_gpu but this machine has no GPU "
                    f"({hardware.gpu_note or 'none found'}); set machine.gpus (or EMP_MACHINE__GPUS) to run anyway")
            if gpus > MAX_GPUS:
                raise PlanError(f"services.{name}.instances is per_gpu and this machine counts {gpus} GPUs, over "
                                f"the {MAX_GPUS} a machine may have; set machine.gpus (or --gpus) to the real count")
            if svc.port is not None and svc.port + gpus - 1 > 65535:
                raise PlanError(f"services.{name}: {gpus} instances (per_gpu) from port {svc.port} need ports up "
                                f"to {svc.port + gpus - 1}, past 65535; lower services.{name}.port")
            count, per_gpu = gpus, True
        else:
            count, per_gpu = svc.instances, False
        for index in range(count):
            process = f"{name}-gpu{index}" if per_gpu else f"{name}-{index}"
            port = svc.port + index if svc.port is not None else None
            values = {"index": index, "port": port, "gpu": index if per_gpu else None,
                      "machine_id": machine_id, "name": process}
            env = dict(base_env)
            env.update({k: v.format(**values) for k, v in svc.env.items()})
            if per_gpu:
                env.setdefault("CUDA_VISIBLE_DEVICES", str(index))
            env.update({"MACHINE_ID": machine_id, "SERVICE_TYPE": name, "SERVICE_INDEX": str(index)})
            if port is not None:
                env["SERVICE_PORT"] = str(port)
            try:
                argv = shlex.split(svc.command.format(**values))
            except ValueError:  # a quote in a value filled in (the machine id): validation checks the template
                raise PlanError(f"services.{name}.command does not split into words for {process} (an unbalanced "
                                f"quote once its placeholders are filled?); quote the placeholder's value or "
                                f"change it") from None
            specs.append(ProcessSpec(
                name=process, argv=tuple(argv), kind="service", env=env,
                cwd=svc.cwd.format(**values) if svc.cwd else None, stop_signal=svc.stop_signal,
                stop_grace=svc.stop_grace, restart=_policy(svc.restart), memory_limit=svc.memory_limit,
                priority=200,
            ))
            services.append(ServiceInstance(process, name, index, values["gpu"], port, _probe(svc.health, values),
                                            svc.required, svc.memory_limit))

    _check_port_ranges(services, manifest.health.port)

    def bound_to(group) -> list[ServiceInstance]:
        return [s for s in services if s.service == group.service] if group.service else []

    def count_of(group) -> int:
        return group.count if isinstance(group.count, int) else len(bound_to(group)) if group.service else 1

    total_workers = sum(count_of(g) for g in manifest.workers.values())
    index = 0
    for group_name, group in manifest.workers.items():
        bound = bound_to(group)
        for n in range(count_of(group)):
            service = bound[n % len(bound)] if bound else None
            wid = identity.worker_id(machine_id, index)
            process = f"worker-{index}"
            values = {"index": index, "machine_id": machine_id, "worker_id": wid, "name": process,
                      "service_port": service.port if service else None,
                      "service_index": service.index if service else None}
            env = dict(base_env)
            env.update({k: v.format(**values) for k, v in group.env.items()})
            env.update({"MACHINE_ID": machine_id, "WORKER_ID": wid, "WORKER_INDEX": str(index),
                        "WORKER_GROUP": group_name, "CONNECTOR": group.connector,
                        "SERVICE_TYPE": group.service or group.connector, "REDIS_URL": redis_url,
                        "PYTHONUNBUFFERED": "1",
                        "EMP_WORKERS_TOTAL": str(total_workers)})  # each worker's share of the telemetry budget
            if service is not None and service.port is not None:
                env["EMP_SERVICE_PORT"] = str(service.port)
            argv = (sys.executable, "-m", "emp_machine", "worker", "--manifest", str(resolved_manifest),
                    "--index", str(index))
            specs.append(ProcessSpec(name=process, argv=argv, kind="worker", env=env, stop_grace=group.stop_grace,
                                     restart=_policy(group.restart), memory_limit=group.memory_limit, priority=300))
            workers.append(WorkerSlot(process, index, group_name, wid, group.connector,
                                      service.process if service else None, group.memory_limit))
            index += 1

    return Plan(machine_id, paths, tuple(specs), tuple(services), tuple(workers), redis_url, redis_probe)


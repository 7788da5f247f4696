"""Boot and shutdown of one machine: supervisord as a child, services, health-gated workers, drain.

One inbox, one decider (STYLE.md section 2): probes, the process sweep, the supervisord watcher and the
signal handlers only `put` small frozen events; `handle()` alone changes the phase and what is running.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from emp_machine.errors import SupervisorError
from emp_machine.runtime import hardware as hw
from emp_machine.runtime.manifest import Manifest
from emp_machine.runtime.plan import REDIS_PROCESS, Plan, Probe
from emp_machine.runtime.probes import run_probe
from emp_machine.supervisor import config as svconfig
from emp_machine.supervisor.control import ProcessInfo, Supervisor

log = logging.getLogger("emp.machine")

SWEEP_INTERVAL = 1.0
FORCE_EXIT_CODE = 1


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    SHUTDOWN = "shutdown"


# -- events: everything that reaches the decider ------------------------------------------------------------
@dataclass(frozen=True)
class SignalReceived:
    signum: int


@dataclass(frozen=True)
class SupervisordUp:
    pass


@dataclass(frozen=True)
class SupervisordExited:
    returncode: int | None


@dataclass(frozen=True)
class HealthChanged:
    process: str
    healthy: bool
    reason: str


@dataclass(frozen=True)
class ProcessesSwept:
    rows: tuple[ProcessInfo, ...]


@dataclass(frozen=True)
class MemoryExceeded:
    process: str
    rss: int
    limit: int


@dataclass(frozen=True)
class ProcessStarted:
    process: str
    ok: bool


@dataclass(frozen=True)
class StepFailed:
    step: str
    error: str


@dataclass(frozen=True)
class ShutdownDone:
    pass


def step(name: str, level: int = logging.INFO, **fields) -> None:
    """One structured line per boot/shutdown step (JSON on stdout and a record in the telemetry buffer)."""
    log.log(level, name, extra={"fields": {"event_type": f"machine.{name}", **fields}})


class Machine:
    def __init__(self, manifest: Manifest, plan: Plan, hardware: hw.Hardware, telemetry, *, clock=time.monotonic):
        self.manifest = manifest
        self.telemetry = telemetry
        self.plan = plan
        self.hardware = hardware
        self.clock = clock
        self.paths = plan.paths
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.phase = Phase.STARTING
        self.control = Supervisor(self.paths.socket)
        self.proc: asyncio.subprocess.Process | None = None
        self.supervisord_restarts = 0
        self.health: dict[str, bool] = {}
        self.processes: dict[str, ProcessInfo] = {}
        self.started_workers: set[str] = set()  # start requested
        self.running_workers: set[str] = set()  # start confirmed by supervisord
        self.boot_started = 0.0
        self.exit_code: int | None = None
        self._tasks: set[asyncio.Task] = set()
        self._probe_tasks: list[asyncio.Task] = []
        self._restarting: set[str] = set()
        self._tailing = False
        self._probes: dict[str, Probe] = {s.process: s.probe for s in plan.services if s.probe}
        if plan.redis_probe:
            self._probes[REDIS_PROCESS] = plan.redis_probe

    # -- main loop ---------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.inbox.put_nowait, SignalReceived(sig))
        _become_subreaper()
        self.boot_started = self.clock()
        step("boot.start", machine_id=self.plan.machine_id, manifest=self.manifest.source,
             processes=len(self.plan.specs), cpu_count=self.hardware.cpu_count,
             gpu_count=self.hardware.gpu_count, gpu_note=self.hardware.gpu_note)
        self._spawn(self._start_supervisord())
        self._spawn(self._sweep())
        try:
            while self.exit_code is None:
                event = await self.inbox.get()
                await self.handle(event)
        finally:
            for task in self._tasks | set(self._probe_tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, *self._probe_tasks, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self._remove_pointer()
        return self.exit_code

    async def handle(self, event) -> None:
        match event:
            case SupervisordUp():
                await self._on_supervisord_up()
            case HealthChanged(process, healthy, reason):
                self._on_health(process, healthy, reason)
            case ProcessesSwept(rows):
                self._on_sweep(rows)
            case MemoryExceeded(process, rss, limit):
                if process not in self._restarting and self.phase in (Phase.STARTING, Phase.READY):
                    step("resource.exhausted", level=logging.WARNING, process_name=process, rss_bytes=rss,
                         limit_bytes=limit, action="graceful restart")
                    self.telemetry.events.emit("resource.exhausted", level=logging.WARNING, process=process,
                                               rss_bytes=rss, limit_bytes=limit)
                    self._restarting.add(process)
                    self._spawn(self._restart(process))
            case ProcessStarted(process, ok):
                self._on_started(process, ok)
            case SignalReceived(signum):
                self._on_signal(signum)
            case SupervisordExited(returncode):
                await self._on_supervisord_exit(returncode)
            case StepFailed(name, error):
                step("boot.failed", level=logging.ERROR, step_name=name, error=error)
                if self.phase is Phase.STARTING:
                    self._begin_shutdown(exit_code=1)
            case ShutdownDone():
                step("shutdown.done", exit_code=self._shutdown_exit_code)
                self.exit_code = self._shutdown_exit_code

    # -- boot --------------------------------------------------------------------------------------------
    async def _start_supervisord(self) -> None:
        try:
            svconfig.write(list(self.plan.specs), self.paths, parent_pid=os.getpid(),
                           machine_id=self.plan.machine_id, log_max_bytes=self.manifest.logs.max_size,
                           log_backups=self.manifest.logs.backups)
            (self.paths.state / "redis").mkdir(exist_ok=True)
            step("boot.config", conf=str(self.paths.conf))
            env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR",
                                                                  "PYTHONPATH", "VIRTUAL_ENV", "USER")}
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "supervisor.supervisord", "-c", str(self.paths.conf),
                env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            self._spawn(self._watch_supervisord(self.proc))
            deadline = self.clock() + self.manifest.supervisor.boot_timeout
            while not await asyncio.to_thread(self.control.is_up):
                if self.proc.returncode is not None:
                    return  # the watcher reports the exit
                if self.clock() > deadline:
                    raise SupervisorError(f"supervisord did not answer on {self.paths.socket} within "
                                          f"{self.manifest.supervisor.boot_timeout:g}s")
                await asyncio.sleep(0.02)
            self._write_pointer()
            step("boot.supervisord", pid=self.proc.pid, socket=str(self.paths.socket))
            self.inbox.put_nowait(SupervisordUp())
        except Exception as exc:  # noqa: BLE001 - reported through the decider, which shuts down cleanly
            self.inbox.put_nowait(StepFailed("supervisord", str(exc)))

    async def _on_supervisord_up(self) -> None:
        if self.phase is not Phase.STARTING:
            return
        self.health = {}
        self.started_workers = set()
        self.running_workers = set()
        for task in self._probe_tasks:
            task.cancel()
        self._probe_tasks = []
        first = [s for s in self.plan.specs if s.kind in ("redis", "service")]
        for spec in first:
            self._spawn(self._start(spec.name))
            probe = self._probes.get(spec.name)
            if probe is not None:
                self._probe_tasks.append(asyncio.create_task(
                    run_probe(spec.name, probe, self.inbox, HealthChanged, self._process_start_time)))
            else:
                self.health[spec.name] = True  # no check declared: running is healthy
        step("boot.services", started=[s.name for s in first])
        if not self._tailing:
            self._tailing = True
            self.telemetry.tail_service_output([(str(self.paths.log_file(s.process)), s.process, s.service)
                                                for s in self.plan.services])
        self._start_ready_workers()

    def _process_start_time(self, name: str) -> tuple[int, float]:
        """(pid, start epoch) of a process, from the last sweep: probes restart their start period on change."""
        info = self.processes.get(name)
        return (info.pid, float(info.start)) if info else (0, 0.0)

    def _start_ready_workers(self) -> None:
        if self.phase is not Phase.STARTING:
            return
        for worker in self.plan.workers:
            if worker.process in self.started_workers:
                continue
            if all(self.health.get(dep) for dep in self.plan.dependencies(worker)):
                self.started_workers.add(worker.process)
                self._spawn(self._start(worker.process))
        self._check_ready()

    def _on_started(self, name: str, ok: bool) -> None:
        if ok and name in self.started_workers:
            self.running_workers.add(name)
        self._check_ready()

    def _check_ready(self) -> None:
        if self.phase is Phase.STARTING and len(self.running_workers) == len(self.plan.workers):
            self.phase = Phase.READY
            boot_seconds = round(self.clock() - self.boot_started, 3)
            step("machine_ready", boot_seconds=boot_seconds, workers=len(self.plan.workers),
                 services=len(self.plan.services))
            self.telemetry.events.emit("machine.started", boot_seconds=boot_seconds,
                                       workers=len(self.plan.workers), services=len(self.plan.services))

    async def _start(self, name: str) -> None:
        try:
            await asyncio.to_thread(self.control.start, name, False)
            step("process.start", process_name=name)
            self.inbox.put_nowait(ProcessStarted(name, True))
        except SupervisorError as exc:
            step("process.start_failed", level=logging.ERROR, process_name=name, error=str(exc))
            self.inbox.put_nowait(ProcessStarted(name, False))

    def _on_health(self, process: str, healthy: bool, reason: str) -> None:
        before = self.health.get(process)
        self.health[process] = healthy
        if before == healthy:
            return
        if healthy:
            step("service.healthy", process_name=process)
            self._start_ready_workers()
        else:
            step("service.unhealthy", level=logging.WARNING, process_name=process, reason=reason)
            self.telemetry.events.emit("service.unhealthy", level=logging.WARNING, process=process, reason=reason)

    def _on_sweep(self, rows: tuple[ProcessInfo, ...]) -> None:
        for row in rows:
            before = self.processes.get(row.name)
            changed = (before.state, before.pid) != (row.state, row.pid) if before else row.state not in (
                "RUNNING", "STOPPED", "STARTING")
            if changed:
                level = logging.WARNING if row.state in ("ERRORED", "FATAL", "BACKOFF") else logging.INFO
                step("process.state", level=level, process_name=row.name, state=row.state, pid=row.pid,
                     restarts=row.restarts, previous=before.state if before else None,
                     errored_reason=row.errored_reason or None)
            self.processes[row.name] = row

    async def _sweep(self) -> None:
        """Every second: process table from supervisord; memory of each limited process tree."""
        limits = {s.name: s.memory_limit for s in self.plan.specs if s.memory_limit}
        next_memory_check = 0.0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            if self.proc is None or self.proc.returncode is not None:
                continue
            try:
                rows = tuple(await asyncio.to_thread(self.control.processes))
            except SupervisorError:
                continue
            self.inbox.put_nowait(ProcessesSwept(rows))
            if limits and self.clock() >= next_memory_check:
                next_memory_check = self.clock() + self.manifest.supervisor.memory_check_interval
                for row in rows:
                    limit = limits.get(row.name)
                    if limit and row.pid and row.state == "RUNNING":
                        rss = await asyncio.to_thread(hw.tree_rss, row.pid)
                        if rss > limit:
                            self.inbox.put_nowait(MemoryExceeded(row.name, rss, limit))

    async def _restart(self, name: str) -> None:
        grace = self.plan.spec(name).stop_grace
        try:
            await asyncio.to_thread(Supervisor(self.paths.socket, timeout=grace + 15).restart, name)
            step("process.restarted", process_name=name)
        except SupervisorError as exc:
            step("process.restart_failed", level=logging.ERROR, process_name=name, error=str(exc))
        finally:
            self._restarting.discard(name)

    # -- supervisord failure -----------------------------------------------------------------------------
    async def _watch_supervisord(self, proc: asyncio.subprocess.Process) -> None:
        returncode = await proc.wait()
        self.inbox.put_nowait(SupervisordExited(returncode))

    async def _on_supervisord_exit(self, returncode: int | None) -> None:
        if self.phase in (Phase.DRAINING, Phase.SHUTDOWN):
            return  # the shutdown sequence waits for it
        await asyncio.to_thread(_kill_descendants, 5.0)
        if self.supervisord_restarts >= 1:
            step("supervisord.lost", level=logging.ERROR, returncode=returncode, action="exit")
            self.exit_code = 1
            return
        self.supervisord_restarts += 1
        step("supervisord.lost", level=logging.ERROR, returncode=returncode, action="restart once")
        self.phase = Phase.STARTING
        self.processes = {}
        self._spawn(self._start_supervisord())

    # -- shutdown ----------------------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.phase in (Phase.STARTING, Phase.READY):
            step("shutdown.signal", signal=name)
            self._begin_shutdown(exit_code=0)
        else:
            step("shutdown.forced", level=logging.WARNING, signal=name)
            _kill_descendants(0.0)
            self.exit_code = FORCE_EXIT_CODE

    def _begin_shutdown(self, exit_code: int) -> None:
        self.phase = Phase.DRAINING
        self._shutdown_exit_code = exit_code
        for task in self._probe_tasks:
            task.cancel()
        self._spawn(self._shutdown())

    async def _shutdown(self) -> None:
        step("shutdown.drain", phase=self.phase.value)
        for kind in ("worker", "service", "redis"):
            names = [s.name for s in self.plan.specs if s.kind == kind]
            if names and self.proc is not None and self.proc.returncode is None:
                await asyncio.gather(*(self._stop(n) for n in names))
                step(f"shutdown.{kind}_stopped", processes=names)
        self.phase = Phase.SHUTDOWN
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.to_thread(self.control.shutdown)
            except SupervisorError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
            step("shutdown.supervisord", returncode=self.proc.returncode)
        self.inbox.put_nowait(ShutdownDone())

    async def _stop(self, name: str) -> None:
        grace = self.plan.spec(name).stop_grace
        try:
            await asyncio.to_thread(Supervisor(self.paths.socket, timeout=grace + 15).stop, name, True)
        except SupervisorError as exc:
            step("process.stop_failed", level=logging.ERROR, process_name=name, error=str(exc))

    # -- helpers -----------------------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _write_pointer(self) -> None:
        """`run/machine.json` lets `emp-machine ps|restart|logs` find this machine without its manifest."""
        doc = {"pid": os.getpid(), "machine_id": self.plan.machine_id, "socket": str(self.paths.socket),
               "logs": str(self.paths.logs), "manifest": self.manifest.source, "started_at": time.time(),
               "redis_url": self.plan.redis_url}
        target = self.paths.run / "machine.json"  # in run/ (0700): the Redis URL may hold a password
        target.write_text(json.dumps(doc), encoding="utf-8")

    def _remove_pointer(self) -> None:
        try:
            (self.paths.run / "machine.json").unlink()
        except FileNotFoundError:
            pass


def _become_subreaper() -> None:
    """Orphans of a crashed supervisord are re-parented to us, so we can stop them before restarting it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def _kill_descendants(grace: float) -> None:
    """TERM every descendant, KILL what is left after `grace` seconds, and reap them."""
    children = psutil.Process().children(recursive=True)
    if not children:
        return
    for child in children:
        try:
            child.send_signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace) if grace > 0 else ([], children)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def resolved_manifest_path(state_dir: Path) -> Path:
    return state_dir / "run" / "manifest.json"

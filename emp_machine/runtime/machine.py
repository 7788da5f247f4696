"""Boot and shutdown of one machine: supervisord as a child, services, health-gated workers, drain.

One inbox, one decider (STYLE.md section 2): probes, the process sweep, the supervisord watcher and the
signal handlers only `put` small frozen events; `handle()` alone changes the phase and what is running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import enum
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from emp_machine.errors import SupervisorError
from emp_machine.runtime import hardware as hw
from emp_machine.runtime import jobs, output_retention, queries
from emp_machine.runtime import status as st
from emp_machine.runtime.aggregate import Aggregator
from emp_machine.runtime.health import HealthServer, WorkerMetrics
from emp_machine.runtime.identity import NoStateHome
from emp_machine.runtime.plan import REDIS_PROCESS, Plan, Probe
from emp_machine.runtime.probes import run_probe
from emp_machine.runtime.resp import RespError
from emp_machine.supervisor import config as svconfig
from emp_machine.supervisor.control import ProcessInfo, StopUnanswered, Supervisor
from emp_machine.supervisor.policy import ALWAYS, RestartTracker

if TYPE_CHECKING:  # the machine reads the resolved manifest through runtime/view.py, not the model
    from emp_machine.runtime.manifest import Manifest

log = logging.getLogger("emp.machine")

SWEEP_INTERVAL = 1.0
FORCE_EXIT_CODE = 1
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # a closed terminal drains like a stop
# Once supervisord exited at shutdown: what its services left behind (a child that ignores SIGTERM, or in its
# own session) gets this long after a SIGTERM, then SIGKILL.
LEFTOVER_GRACE = 2.0
# A supervisord of this state dir left by a machine that died stops its processes by itself (plugin.py: one
# tier at a time, 2 s each) and frees the socket; a new boot waits this long for it, then SIGKILLs it.
STALE_SUPERVISORD_WAIT = 15.0
# What outlived both its machine and its supervisord (kill -9 of both, the OOM killer) on this state dir: at the
# next boot its workers and services get a SIGTERM, a second one after LEFTOVER_GRACE (a draining worker hands
# its running jobs back at once on its second), then LEFTOVER_SECOND_GRACE before SIGKILL; the embedded Redis
# last (the hand-backs go into it), LEFTOVER_REDIS_GRACE to write its append-only file and exit.
LEFTOVER_SECOND_GRACE = 5.0  # (an orphaned worker hands back in ms, exits in about 3.5 s)
LEFTOVER_REDIS_GRACE = 10.0
# A second signal during the drain: each worker gets a SIGTERM of its own (its second: it hands its running
# jobs back at once), another after FORCED_SECOND_TERM_AFTER (in case that one was its first), and up to
# FORCED_WORKER_WAIT in all to exit, before everything left is SIGKILLed.
FORCED_SECOND_TERM_AFTER = 0.25
FORCED_WORKER_WAIT = 1.0
FORCED_LAST_WORDS_S = 2.0  # what a forced stop waits, at most, for each of its last writes (the hand-backs of
# the workers it killed, then its shutdown message) before it kills the rest, an embedded Redis among them
# A stop asks supervisord first whether it answers at all, within this: a hung one (SIGSTOPped) held each tier's
# stop call for its grace + 15 s before anything was signalled (45 s with a 3 s grace, ~72 s with the defaults).
STOP_ANSWER_TIMEOUT = 2.0


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


@dataclass(frozen=True)
class RestartRequested:
    process: str
    source: str


@dataclass(frozen=True)
class RefreshRequested:
    pass


def step(name: str, level: int = logging.INFO, **fields) -> None:
    """One structured line per boot/shutdown step (JSON on stdout and a record in the telemetry buffer), an
    event: `event.name` (the OTel attribute collectors and `emp-machine telemetry --logs` read) is its full
    name, machine.<name>, as docs/operations.md lists it; event_type repeats it for older readers."""
    full = f"machine.{name}"
    log.log(level, name, extra={"fields": {"event.name": full, "event_type": full, **fields}})


class Machine:
    def __init__(self, manifest: Manifest, plan: Plan, hardware: hw.Hardware, telemetry, *,
                 health_token: str | None = None, clock=time.monotonic):
        self.manifest = manifest
        self.telemetry = telemetry
        self.plan = plan
        self.hardware = hardware
        self.clock = clock
        self.paths = plan.paths
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.phase = Phase.STARTING
        self.control = Supervisor(self.paths.socket)
        # The sweep's own handle, with a short timeout: a hung supervisord must not look healthy for 10 s
        self._sweep_control = Supervisor(self.paths.socket, timeout=2 * SWEEP_INTERVAL)
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
        self._memory_restarts: dict[str, RestartTracker] = {}  # process -> its memory restarts' policy count
        self._tailing = False
        self._probes: dict[str, Probe] = {s.process: s.probe for s in plan.services if s.probe}
        if plan.redis_probe:
            self._probes[REDIS_PROCESS] = plan.redis_probe
        self._supervisord_up = False
        self._worker_ids = {w.process: w.worker_id for w in plan.workers}
        self._offline_marked: set[str] = set()
        self._offline_failing: set[str] = set()  # workers whose offline mark failed (said once per spell)
        self._redis_ok: bool | None = None
        self._unhealthy_since: dict[str, float] = {}
        # Health and status: the aggregator is fed here only (handle() and the on_* steps); the HTTP server
        # and the publisher read it.
        self.aggregate = Aggregator(plan, {name: g.job_types or (g.connector,) for name, g in manifest.workers.items()},
                                    st.version(), health_url="",
                                    leases={name: g.lease for name, g in manifest.workers.items()})
        metrics = getattr(telemetry, "metrics", None)
        if metrics is not None and hasattr(metrics, "workers_active"):
            self.aggregate.gauges = (metrics.workers_active, metrics.workers_total)
        # /metrics: the machine's meter plus what each worker publishes under state/metrics/ (worker.py)
        self.worker_metrics = WorkerMetrics(self.paths.state / "metrics", [w.worker_id for w in plan.workers],
                                            meter=getattr(telemetry, "meter", None))
        self.health_server = HealthServer(
            self.aggregate, host=manifest.health.host, port=manifest.health.port,
            token=health_token, token_env=manifest.health.token_env,
            cors_origins=manifest.health.cors_origins, process_names={s.name for s in plan.specs},
            restart=self._request_restart, refresh=lambda: self.inbox.put_nowait(RefreshRequested()),
            metrics=lambda: self.worker_metrics.render(telemetry.metrics_snapshot),
            errors=lambda since_s: queries.recent_errors(self.paths.logs, since_s))
        self._redis = st.redis_client(plan.redis_url)
        self.publisher = st.Publisher(self.aggregate, self._redis, plan.redis_url, manifest.status.interval)
        self._publisher_task: asyncio.Task | None = None
        self._announced_shutdown = False
        self._announcing: asyncio.Future | None = None  # the one shutdown message, which every caller awaits
        self._shutdown_task: asyncio.Task | None = None
        self._settle_lock = asyncio.Lock()
        self._unanswering = ""  # why supervisord did not answer at the stop: its processes are stopped directly
        self._supervisords: list[asyncio.subprocess.Process] = []  # ours: their watchers reap them, never the sweep
        self._stopping = threading.Event()  # set with the shutdown: boot steps in threads cut their waits short
        # Blocking waits on supervisord for one process (a start, or a stop or restart within its stop_grace): a
        # thread each, from this pool, never the default one (min(32, cores + 4) threads, 6 on 2 cores), which
        # the sweep and /metrics need every second: a tier of 64 workers was stopped six at a time, so it took
        # ~10 stop_graces and a platform's SIGKILL came first, with most running jobs never handed back, and the
        # sweep stalled; 32 starts waiting on a stalled supervisord (10 s each) held /metrics 21 s and hid the
        # stall from the sweep. Room for a start, a stop and a restart of every process at once; threads are
        # made only as they are needed.
        self._waits = concurrent.futures.ThreadPoolExecutor(max_workers=3 * max(1, len(plan.specs)),
                                                            thread_name_prefix="emp-wait")

    # -- main loop ---------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in SHUTDOWN_SIGNALS:
            loop.add_signal_handler(sig, self.inbox.put_nowait, SignalReceived(sig))
        # `run`/`demo` held them (cli._hold_stop_signals): one that came meanwhile is taken now, and nothing this
        # machine starts inherits them blocked (a child keeps its parent's signal mask)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)
        _become_subreaper()
        raise_open_file_limit()
        loop.set_exception_handler(_quiet_accept_errors())
        self.boot_started = self.clock()
        step("boot.start", machine_id=self.plan.machine_id, manifest=self.manifest.source,
             processes=len(self.plan.specs), cpu_count=self.hardware.cpu_count,
             gpu_count=self.hardware.gpu_count, gpu_note=self.hardware.gpu_note)
        if await self._start_health():
            self._spawn(self._start_supervisord())
        self._spawn(self._sweep())
        self._spawn(self._prune_outputs())
        if self.plan.redis_probe:  # our embedded Redis: nobody else forgets its finished jobs
            self._spawn(self._expire_finished())
        if self.manifest.workers:
            self._spawn(self._reaper())
        workers = [w.worker_id for w in self.plan.workers]
        self._spawn(st.poll_redis(self._redis, self.plan.redis_url, workers, self.inbox))
        if workers:
            self._spawn(st.watch_worker_status(self.plan.redis_url, workers, self.inbox))
        self._spawn(st.read_hardware(str(self.paths.state), self.inbox))
        self._publisher_task = asyncio.create_task(self.publisher.run())
        self._tasks.add(self._publisher_task)
        try:
            while self.exit_code is None:
                event = await self.inbox.get()
                was = self.phase
                await self.handle(event)
                if self.phase is Phase.READY and was is not Phase.READY:
                    await self._refresh_processes("machine_ready")  # it goes out from this very commit
                self.aggregate.set_phase(self.phase.value, self._supervisord_up)
                self.aggregate.commit()
        finally:
            await jobs.cancel_and_wait([*self._tasks, *self._probe_tasks])  # a lost cancellation: not waited on
            await self.health_server.stop()
            try:
                await self._redis.aclose()
            except Exception:  # noqa: BLE001 - closing a client of a Redis that is gone
                pass
            for sig in SHUTDOWN_SIGNALS:
                loop.remove_signal_handler(sig)
            self._waits.shutdown(wait=False)
            self._remove_pointer()
            self._remove_config()
        return self.exit_code

    async def handle(self, event) -> None:
        match event:
            case SupervisordUp():
                self._supervisord_up = True
                await self._on_supervisord_up()
            case HealthChanged(process, healthy, reason):
                self._on_health(process, healthy, reason)
            case ProcessesSwept(rows):
                self._on_sweep(rows)
            case MemoryExceeded(process, rss, limit):
                if process not in self._restarting and self.phase in (Phase.STARTING, Phase.READY):
                    self._on_memory_exceeded(process, rss, limit)
            case ProcessStarted(process, ok):
                self._on_started(process, ok)
            case SignalReceived(signum):
                await self._on_signal(signum)
            case SupervisordExited(returncode):
                self._supervisord_up = False
                await self._on_supervisord_exit(returncode)
            case st.RedisPolled(ok, reason, rows):
                self._on_redis(ok, reason, rows)
            case st.WorkerStatusSeen(worker_id, status, current_job_id, at):
                self.aggregate.set_worker_status(worker_id, status, current_job_id, at)
            case st.HardwareRead(state):
                self.aggregate.set_hardware(state)
            case RestartRequested(process, source):
                if process not in self._restarting and self.phase in (Phase.STARTING, Phase.READY):
                    step("process.restart_requested", process_name=process, source=source)
                    self._restarting.add(process)
                    self._spawn(self._restart(process))
            case RefreshRequested():
                self.aggregate.request_publish("event_driven")
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
            # An earlier machine that did not exit cleanly left its pointer (removed at a clean exit) or its
            # supervisord's pidfile (removed by supervisord's own clean exit): only then can anything of this
            # state dir still run, and only then is every process of the host scanned (~11 ms per 60 here).
            unclean = (self.paths.run / "machine.json").exists() or self.paths.pidfile.exists()
            await asyncio.to_thread(self._clear_stale_supervisord)
            if unclean:
                await asyncio.to_thread(self._clear_leftovers)
            if self.phase is not Phase.STARTING:
                return  # a signal came while the leftovers were stopped: the shutdown has nothing to stop
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
            self._supervisords.append(self.proc)
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

    def _clear_stale_supervisord(self) -> None:
        """A supervisord of this state dir that outlived its machine (killed, crashed) still stops its processes
        and owns the socket: a new one started now exits 2 ("Another program is already listening"). Wait for
        it (bounded), then SIGKILL it and what is left of its process tree."""
        ours = {proc.pid for proc in self._supervisords}
        stale = _stale_supervisord(self.paths.pidfile, self.paths.conf, ours)
        if stale is None:
            return
        tree = [stale, *_children(stale)]
        step("boot.stale_supervisord", level=logging.WARNING, pid=stale.pid, wait_seconds=STALE_SUPERVISORD_WAIT,
             reason="left running by an earlier machine on this state dir")
        killed = []
        # a stop asked for meanwhile ends the wait: the stale one is killed now, as after the wait
        if not _exits_within(stale, STALE_SUPERVISORD_WAIT, self._stopping):
            tree += _children(stale)
            with contextlib.suppress(OSError):
                os.killpg(stale.pid, signal.SIGKILL)  # its own group (it was started in a new session)
                killed.append(stale.pid)
        for proc in tree:  # what it left: a service's child that ignores SIGTERM or runs in its own session
            if proc.pid in killed or _status(proc) in (psutil.STATUS_ZOMBIE, None):
                continue
            try:
                proc.kill()  # psutil checks it is still the same process (no pid reuse)
                killed.append(proc.pid)
            except psutil.Error:
                pass
        psutil.wait_procs(tree, timeout=5)
        step("boot.stale_supervisord_gone", pid=stale.pid, killed=killed)

    def _clear_leftovers(self) -> None:
        """Processes of this state dir that outlived their machine and its supervisord too (kill -9 of both, the
        OOM killer, on a VM or a bare host): a worker still claiming jobs unsupervised and holding its telemetry
        buffer (the new worker of its slot crash-loops on it), the embedded Redis still writing the append-only
        file the new one opens. Stopped before anything of this boot starts: workers and services first, the
        Redis last (the workers' hand-backs go into it). Never a process of another state dir."""
        found = _leftovers(self.paths)
        if not found:
            return
        for proc, kind, name in found:
            step("boot.leftover", level=logging.WARNING, pid=proc.pid, kind=kind, process_name=name,
                 reason="left running by an earlier machine on this state dir whose supervisord is gone too",
                 action="terminate")
        killed = _terminate([p for p, kind, _ in found if kind != "redis"], LEFTOVER_GRACE, LEFTOVER_SECOND_GRACE)
        killed += _terminate([p for p, kind, _ in found if kind == "redis"], LEFTOVER_REDIS_GRACE)
        step("boot.leftovers_stopped", pids=[p.pid for p, _, _ in found], killed=killed)

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
            owners: dict[str, list[str]] = {}  # service process -> the workers bound to it
            for worker in self.plan.workers:
                if worker.service_process:
                    owners.setdefault(worker.service_process, []).append(worker.worker_id)
            # A service serving one worker (one ComfyUI per GPU worker) carries its worker_id; a shared one none.
            self.telemetry.tail_service_output([
                (str(self.paths.log_file(s.process)), s.process, s.service,
                 *(owners[s.process] if len(owners.get(s.process, ())) == 1 else ()))
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
                                       workers=len(self.plan.workers), services=len(self.plan.services),
                                       spans_per_second=round(self.telemetry.sampler.target, 3))  # its share

    async def _start(self, name: str) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._waits, self.control.start, name, False)
            step("process.start", process_name=name)
            self.inbox.put_nowait(ProcessStarted(name, True))
        except SupervisorError as exc:
            step("process.start_failed", level=logging.ERROR, process_name=name, error=str(exc))
            self.inbox.put_nowait(ProcessStarted(name, False))

    def _on_health(self, process: str, healthy: bool, reason: str) -> None:
        before = self.health.get(process)
        self.health[process] = healthy
        self.aggregate.set_health(process, healthy, reason)
        if before == healthy:
            return
        if healthy:
            since = self._unhealthy_since.pop(process, None)
            if since is not None:
                step("service.recovered", process_name=process, unhealthy_seconds=round(self.clock() - since, 3))
            else:
                step("service.healthy", process_name=process)
            self._start_ready_workers()
        else:
            self._unhealthy_since[process] = self.clock()
            step("service.unhealthy", level=logging.WARNING, process_name=process, reason=reason)
            self.telemetry.events.emit("service.unhealthy", level=logging.WARNING, process_name=process, reason=reason)

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
            self._note_worker_down(row)
            if row.state == "RUNNING" and row.name in self.started_workers and row.name not in self.running_workers:
                # its start was asked for and went unanswered (supervisord stalled past the call's timeout:
                # process.start_failed), then carried out: running all the same. Nothing counted it, and the
                # machine stayed `starting` for good, /ready 503, with every worker up.
                self.running_workers.add(row.name)
        self.aggregate.set_processes(rows)
        if self.phase is Phase.READY and self._reloaded(rows):
            # `supervisorctl reload` on run/supervisord.conf: the same supervisord, every program stopped and
            # none started again (none is autostart), and the machine sat READY-then-unhealthy with nothing
            # running, for good. Started again in order, as after a supervisord restart.
            step("supervisord.reloaded", level=logging.WARNING, action="start every program again, in order")
            self.phase = Phase.STARTING
            self._spawn(self._on_supervisord_up())
            return
        self._check_ready()

    def _reloaded(self, rows: tuple[ProcessInfo, ...]) -> bool:
        """supervisord reloaded its configuration: each of the plan's programs it lists is stopped and was never
        started since (a program stopped by anyone keeps its last start time)."""
        ours = {spec.name for spec in self.plan.specs}
        listed = [row for row in rows if row.name in ours]
        return bool(listed) and all(row.state == "STOPPED" and not row.start for row in listed)

    def _note_worker_down(self, row: ProcessInfo) -> None:
        """A worker that died cannot say so in Redis: mark it offline for it, once per time down.

        A supervisord restart is faster than the 1 s sweep, so this acts when a worker stays down (a crash
        loop waiting out its backoff, errored, stopped); a replacement registers itself again as idle."""
        worker_id = self._worker_ids.get(row.name)
        if worker_id is None:
            return
        if row.state in ("RUNNING", "STARTING"):
            self._offline_marked.discard(row.name)
        elif (row.name not in self._offline_marked and row.name in self.started_workers
              and self.phase in (Phase.STARTING, Phase.READY)):  # a drained worker says so itself
            self._offline_marked.add(row.name)
            self._spawn(self._mark_offline(row.name, worker_id))

    async def _mark_offline(self, process: str, worker_id: str) -> None:
        try:
            old = await asyncio.wait_for(jobs.mark_worker_offline(self._redis, worker_id), 5)
        except (RespError, OSError, asyncio.TimeoutError) as exc:
            self._offline_marked.discard(process)  # try again at the next sweep
            if process not in self._offline_failing:  # once per failing spell: it was once a second per worker
                self._offline_failing.add(process)  # while Redis was down (~86k lines a day each)
                step("worker.offline_failed", level=logging.WARNING, process_name=process, error=str(exc),
                     note="tried again each sweep; said again once it succeeds or fails after succeeding")
            return
        self._offline_failing.discard(process)
        if old is None:  # the id is another live process's (a same-id machine beside this one): left to it
            step("worker.offline_left", process_name=process, worker_id=worker_id,
                 reason="worker:{id} is held by another process that may be alive")
        elif old != "offline":
            step("worker.offline", level=logging.WARNING, process_name=process, worker_id=worker_id,
                 previous=old or None)

    def _on_redis(self, ok: bool, reason: str, rows) -> None:
        if ok != self._redis_ok:
            if ok:
                step("redis.reachable", redis_url=st.redact_url(self.plan.redis_url))
            elif (self._redis_ok is not None or self.plan.redis_probe is None) and not self._announced_shutdown:
                # (an embedded Redis that is still starting is not worth a warning; nor one the stop has
                # stopped, after the last status message: every clean stop warned of it)
                step("redis.unreachable", level=logging.WARNING, reason=reason)
            self._redis_ok = ok
        self.aggregate.set_redis(ok, reason, list(rows))

    def _request_restart(self, name: str) -> str | None:
        """From the HTTP server: refuse while draining, else hand the restart to the decider."""
        if self.phase not in (Phase.STARTING, Phase.READY):
            return f"the machine is {self.phase.value}"
        self.inbox.put_nowait(RestartRequested(name, "http"))
        return None

    async def _start_health(self) -> bool:
        try:
            port = await self.health_server.start()
        except OSError as exc:
            self.inbox.put_nowait(StepFailed("health", f"cannot listen on {self.manifest.health.host}:"
                                                       f"{self.manifest.health.port}: {exc.strerror or exc} "
                                                       "(choose another with health.port, EMP_HEALTH__PORT, or "
                                                       "PORT in the shipped manifests; 0 picks a free one)"))
            return False
        self.aggregate.health_url = st.health_url(self.manifest.health.public_url, self.manifest.health.host, port)
        self.aggregate.dirty = True
        step("health.listening", host=self.manifest.health.host, port=port, health_url=self.aggregate.health_url)
        return True

    async def _announce_shutdown(self) -> None:
        """The `shutdown` status message, once, while Redis (maybe our embedded one) is still up. Every caller
        waits for that one message to have gone out (or failed): a second caller used to return at once, and
        the stop went on to kill the embedded Redis under the first caller's publish (no shutdown message, 1 run
        in 3 of a forced stop). A caller that gives up waiting (cancelled, timed out) leaves it going."""
        if self._announcing is None:
            self._announcing = asyncio.ensure_future(self._announce_shutdown_once())
        await asyncio.shield(self._announcing)

    async def _announce_shutdown_once(self) -> None:
        self._announced_shutdown = True
        self.publisher.close()
        if self._publisher_task is not None:
            self._publisher_task.cancel()  # a publish in flight: a slow one is not waited for
        await self._refresh_processes("shutdown")
        self.aggregate.set_phase(Phase.SHUTDOWN.value, self._supervisord_up)
        self.aggregate.commit()
        if not await self.publisher.publish("shutdown", phase=Phase.SHUTDOWN.value):
            # said even when the publisher's earlier failures were (it warns once a spell): the monitor marks the
            # machine disconnected 30 s on, never stopped, and its workers as Redis last had them
            step("status.shutdown_unsent", level=logging.WARNING, redis_url=st.redact_url(self.plan.redis_url))
            return
        # Redis hands a message to its subscribers after the publisher's reply, in the same pass of its loop: a
        # Redis SIGKILLed as soon as that reply came (a forced stop's embedded one) took the monitor's copy with
        # it (CI once; 7 of 30 runs beside other tests, 0 of 60 with this). A second round trip ends after
        # that pass.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._redis.ping(), 1.0)

    async def _refresh_processes(self, update_type: str) -> None:
        """supervisord's process table of now, for a status message about to go out (machine_ready, shutdown).

        The last sweep may be a second old: from before the workers were started, or before they were stopped.
        When supervisord cannot answer (it is gone), the message shows the processes as UNKNOWN (not running)
        and the machine logs why, rather than repeat what the last sweep saw."""
        if self.proc is None:
            return  # supervisord never ran: nothing was started, and the empty table says so
        try:
            if self.proc.returncode is not None:
                raise SupervisorError(f"supervisord has exited (exit code {self.proc.returncode})")
            if self._unanswering:
                raise SupervisorError(self._unanswering)
            rows = tuple(await asyncio.to_thread(Supervisor(self.paths.socket, timeout=5).processes))
        except SupervisorError as exc:
            step("status.processes_unknown", level=logging.WARNING, update_type=update_type, error=str(exc))
            self._processes_unknown(str(exc))
            return
        self._on_sweep(rows)

    def _processes_unknown(self, reason: str) -> None:
        """The process table as not known (supervisord gone or not answering): every process UNKNOWN, its
        restart count kept, `reason` in its description."""
        now = int(time.time())
        self.aggregate.set_processes(tuple(
            ProcessInfo(name=s.name, state="UNKNOWN", pid=0, start=0, now=now,
                        restarts=info.restarts if (info := self.processes.get(s.name)) else 0,
                        exit_status=None, errored_reason="", restart_in=None,
                        description=f"not known: {reason}") for s in self.plan.specs))

    async def _sweep(self) -> None:
        """Every second: process table from supervisord; memory of each limited process tree."""
        limits = {s.name: s.memory_limit for s in self.plan.specs if s.memory_limit}
        next_memory_check = 0.0
        unanswered = 0  # process-list calls in a row that failed
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self._supervisords = [proc for proc in self._supervisords if proc.returncode is None]
            # the leftovers of programs' ended runs are judged only while READY (supervisord silent, lost or
            # restarting, or the stop begun: those paths stop everything themselves)
            judge = self.phase is Phase.READY and not self.aggregate.supervisor_silent
            await asyncio.to_thread(self._reap_orphans, {proc.pid for proc in self._supervisords}, judge)
            if self.proc is None or self.proc.returncode is not None:
                continue
            try:
                rows = tuple(await asyncio.to_thread(self._sweep_control.processes))
            except SupervisorError as exc:
                unanswered += 1
                # Two in a row (about 6 s): one slow answer on a loaded machine is not a hung supervisord.
                if unanswered >= 2 and self._supervisord_up and self.proc.returncode is None \
                        and not self.aggregate.supervisor_silent:
                    # running but not answering (hung, SIGSTOPped): say so, and the table is no longer known
                    reason = f"supervisord not answering: {exc}"[:300]
                    step("supervisord.not_answering", level=logging.WARNING, error=str(exc))
                    self.aggregate.set_supervisor_silent(reason)
                    self._processes_unknown(reason)
                    self.inbox.put_nowait(RefreshRequested())  # the decider commits: /health, event_driven
                continue
            unanswered = 0
            if self.aggregate.supervisor_silent:
                step("supervisord.answering")
                self.aggregate.set_supervisor_silent("")  # the sweep below brings the real table back
            self.inbox.put_nowait(ProcessesSwept(rows))
            if limits and self.clock() >= next_memory_check:
                next_memory_check = self.clock() + self.manifest.supervisor.memory_check_interval
                for row in rows:
                    limit = limits.get(row.name)
                    if limit and row.pid and row.state == "RUNNING":
                        rss = await asyncio.to_thread(hw.tree_rss, row.pid)
                        if rss > limit:
                            self.inbox.put_nowait(MemoryExceeded(row.name, rss, limit))

    async def _prune_outputs(self) -> None:
        """Job output folders past outputs.retention, then the oldest while over outputs.max_size: deleted a
        minute after boot and every PRUNE_INTERVAL_S (runtime/output_retention.py)."""
        bounds = self.manifest.outputs
        if not bounds.retention and not bounds.max_size:
            return
        await asyncio.sleep(60.0)
        while True:
            try:
                pruned = await asyncio.to_thread(output_retention.prune, self.paths.state / "outputs",
                                                 bounds.retention, bounds.max_size, time.time())
                if pruned.folders:
                    step("outputs.pruned", folders=pruned.folders, bytes=pruned.bytes)
            except Exception as exc:  # noqa: BLE001 - one bad round must not end pruning for the machine's life
                step("outputs.prune_failed", level=logging.WARNING, error=f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(output_retention.PRUNE_INTERVAL_S)

    async def _expire_finished(self) -> None:
        """The embedded Redis keeps every finished job's hash, progress and result (an external one is the EMP
        API's to clean): those older than jobs.FINISHED_RETENTION_S are deleted, a minute after boot and every
        EXPIRE_FINISHED_INTERVAL_S. A failure (Redis restarting) waits for the next round."""
        await asyncio.sleep(60.0)
        failing = ""
        while True:
            try:
                removed = await jobs.expire_finished(self._redis, int(time.time() * 1000))
                if removed:
                    step("redis.finished_expired", jobs=removed)
                failing = ""
            except (OSError, TimeoutError) as exc:  # Redis restarting: the next round
                log.debug("finished jobs not expired this round: %s", exc)
            except Exception as exc:  # noqa: BLE001 - a script error (a stray key): said once, never the end
                error = f"{type(exc).__name__}: {exc}"[:300]
                if error != failing:
                    failing = error
                    step("redis.finished_expiry_failed", level=logging.WARNING, error=error)
            await asyncio.sleep(EXPIRE_FINISHED_INTERVAL_S)

    async def _reaper(self) -> None:
        """Every machine reaps expired leases, not only its workers: a one-worker machine whose worker stalled
        (SIGSTOP, a blocked event loop) left its job in_progress for good, no one else running to reap it. Its
        workers' pace (a quarter of the shortest lease, at most 15 s); a round that fails waits for the next."""
        leases = [g.lease for g in self.manifest.workers.values()]
        interval = min(15.0, max(0.5, min(leases) / 4))
        failing = ""
        while True:
            await asyncio.sleep(interval)
            try:
                requeued = await jobs.reap_with(self._redis, max(leases))
                failing = ""
            except (OSError, TimeoutError) as exc:  # Redis restarting or unreachable: the next round
                log.debug("leases not reaped this round: %s", exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a script error (a stray key): said once, never the end
                error = f"{type(exc).__name__}: {exc}"[:300]
                if error != failing:
                    failing = error
                    step("redis.reap_failed", level=logging.WARNING, error=error)
                continue
            if requeued:
                step("jobs.requeued", level=logging.WARNING, job_ids=requeued, reason="lease expired")

    @staticmethod
    def _reap_orphans(supervisords: set[int], judge: bool) -> None:
        """As the subreaper, the machine inherits what supervisord's processes orphan (a service's background
        child): reap those that exited. Never a supervisord of ours: its watcher waits on it. With `judge`,
        kill those left by a program run that ended (_kill_leftovers)."""
        children = _children(psutil.Process(), recursive=False)  # (reads every process's parent: once a round)
        reaped = _reap_orphans(supervisords, children)
        if reaped:
            log.debug("reaped orphans", extra={"fields": {"event_type": "machine.orphans_reaped", "pids": reaped}})
        if judge:
            for name, pids in _kill_leftovers(supervisords, children).items():
                step("process.leftovers_killed", level=logging.WARNING, process_name=name, pids=pids,
                     reason="left running by an earlier run of the program, outside its process group")

    def _on_memory_exceeded(self, process: str, rss: int, limit: int) -> None:
        """A graceful restart, under the process's `restart` policy as a crash is: repeated ones (each after a
        run shorter than `reset_after`) wait out the backoff first, and more than `max_restarts` within `window`
        leave it `errored` (stopped; the cool-down starts it again), where they used to loop for good (a limit
        under a worker's working size: a restart every 2 s, each handing its job back). Counted apart from the
        crashes supervisord sees (the plugin's count)."""
        tracker = self._memory_restarts.get(process)
        if tracker is None:
            # (whatever restarts its exits: `never` and `on-failure` said nothing of memory restarts)
            policy = replace(self.plan.spec(process).restart, policy=ALWAYS)
            tracker = self._memory_restarts[process] = RestartTracker(policy)
        row = self.processes.get(process)
        decision = tracker.on_exit(time.monotonic(), row.uptime if row is not None else 0.0, expected=False)
        # (a worker's says which: the id its own records carry)
        fields = {"process_name": process, "rss_bytes": rss, "limit_bytes": limit,
                  **({"worker_id": self._worker_ids[process]} if process in self._worker_ids else {})}
        self.telemetry.events.emit("resource.exhausted", level=logging.WARNING, **fields)
        self._restarting.add(process)
        if decision.restart:
            step("resource.exhausted", level=logging.WARNING, **fields, action="graceful restart",
                 delay_s=round(decision.delay, 3))
            self._spawn(self._restart(process, decision.delay))
        else:
            reason = f"memory over its limit ({rss} > {limit} bytes): {decision.reason}"
            step("resource.exhausted", level=logging.WARNING, **fields, action="errored", reason=reason,
                 hint="raise memory_limit above the process's working size, or find what grows")
            del self._memory_restarts[process]  # after the cool-down: a fresh count
            self._spawn(self._memory_errored(process, reason))

    async def _memory_errored(self, name: str, reason: str) -> None:
        """Stop `name` and leave it errored with `reason` (its restart policy's cool-down starts it again)."""
        control = Supervisor(self.paths.socket, timeout=self.plan.spec(name).stop_grace + 15)

        def stop_errored() -> None:
            control.stop(name, wait=True)
            control.call("emp.markErrored", name, reason)

        try:
            await asyncio.get_running_loop().run_in_executor(self._waits, stop_errored)
            step("process.errored", level=logging.ERROR, process_name=name, reason=reason)
        except SupervisorError as exc:
            step("process.restart_failed", level=logging.ERROR, process_name=name, error=str(exc))
        finally:
            self._restarting.discard(name)

    async def _restart(self, name: str, delay: float = 0.0) -> None:
        """Graceful restart; `delay`: seconds between the stop and the start (a memory restart's backoff)."""
        control = Supervisor(self.paths.socket, timeout=self.plan.spec(name).stop_grace + 15)
        loop = asyncio.get_running_loop()
        try:
            if delay > 0:
                await loop.run_in_executor(self._waits, control.stop, name)
                await asyncio.sleep(delay)
                if self.phase not in (Phase.STARTING, Phase.READY):
                    return  # the machine stops meanwhile: nothing to start
                await loop.run_in_executor(self._waits, control.start, name)
            else:
                await loop.run_in_executor(self._waits, control.restart, name)
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
        final = self.supervisord_restarts >= 1
        step("supervisord.lost", level=logging.ERROR, returncode=returncode,
             action="exit" if final else "restart once")
        await asyncio.to_thread(self._stop_orphaned, False)
        if self.proc is not None:
            _remove_run_files(self.paths, self.proc.pid)  # killed, it could not remove them
        if final:
            self.phase = Phase.SHUTDOWN
            await self._announce_shutdown()  # while the embedded Redis still runs
            await asyncio.to_thread(self._stop_orphaned, True)
            self.exit_code = 1
            return
        await asyncio.to_thread(self._stop_orphaned, True)
        self.supervisord_restarts += 1
        self.phase = Phase.STARTING
        self.processes = {}
        self.aggregate.set_processes(())
        self._spawn(self._start_supervisord())

    # -- shutdown ----------------------------------------------------------------------------------------
    async def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.phase in (Phase.STARTING, Phase.READY):
            step("shutdown.signal", signal=name)
            self._begin_shutdown(exit_code=0)
        else:
            step("shutdown.forced", level=logging.WARNING, signal=name)
            if self._shutdown_task is not None:  # the ordered stop in progress ends here: it would go on beside
                await jobs.cancel_and_wait([self._shutdown_task])  # this one, and kill the Redis under it
            await self._forced_end()
            self.exit_code = FORCE_EXIT_CODE

    async def _forced_end(self) -> None:
        """The end of a stop that cannot be ordered (a second signal, or the ordered stop failing): the workers
        stopped at once (each hands its running jobs back on its second SIGTERM), then, while Redis (maybe our
        embedded one) is still up, the jobs of workers that had to be killed handed back and the shutdown
        message, each within FORCED_LAST_WORDS_S; then everything left is SIGKILLed. The forced stop sent no
        shutdown message (the ordered stop that would have was ended with the machine's loop: the monitor last
        heard "draining"), and a failed one left the killed workers' jobs claimed until their leases ran out."""
        await asyncio.to_thread(self._force_stop_workers)
        self.phase = Phase.SHUTDOWN
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._settle_dead_workers(), FORCED_LAST_WORDS_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._announce_shutdown(), FORCED_LAST_WORDS_S)
        await asyncio.to_thread(_kill_descendants, 0.0)
        if self.proc is not None:
            _remove_run_files(self.paths, self.proc.pid)  # SIGKILLed with the rest: it could not remove them

    def _force_stop_workers(self) -> None:
        """A second signal: the workers first get a SIGTERM of their own, which a draining worker takes as its
        second and hands its running jobs back at once (a SIGKILL left them claimed until their lease ran out),
        a short wait for them, then SIGKILL to the workers left (the rest is _forced_end's, after the last
        words). supervisord goes first (SIGKILL): it would start again what exits meanwhile (a program not yet
        held by the stop), after the last look for descendants, and that one would outlive the machine. What
        it ran is the machine's then, as the subreaper."""
        argvs = {tuple(s.argv) for s in self.plan.specs if s.kind == "worker"}
        # The workers are found before supervisord goes, under it: looked for after its SIGKILL, a worker read
        # while still its child, with supervisord already reaped (gone from /proc), was reached from nowhere,
        # got no SIGTERM and was SIGKILLed holding its job (1 run in 5 of the forced-stop test).
        workers = [p for p in _children(psutil.Process()) if _cmdline(p) in argvs]
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # (not reaped yet: the pid is still ours)
                os.kill(self.proc.pid, signal.SIGKILL)
        workers += [p for p in _children(psutil.Process()) if _cmdline(p) in argvs and p not in workers]
        if workers:
            left = _signal_all(workers, signal.SIGTERM)
            _, left = psutil.wait_procs(left, timeout=FORCED_SECOND_TERM_AFTER)
            _, left = psutil.wait_procs(_signal_all(left, signal.SIGTERM),
                                        timeout=FORCED_WORKER_WAIT - FORCED_SECOND_TERM_AFTER)
            step("shutdown.forced_workers", pids=[p.pid for p in workers], exited=len(workers) - len(left))
            _signal_all(left, signal.SIGKILL)
            psutil.wait_procs(left, timeout=5)

    def _stop_orphaned(self, last: bool) -> None:
        """supervisord died: what it ran is ours now (the subreaper), running unsupervised. Stopped in the
        machine's order: the workers, each a second SIGTERM shortly after its first (draining on its stop_grace,
        one SIGTERM and a SIGKILL 5 s later left its running jobs claimed by a dead worker until the lease ran
        out; on its second it hands them back at once), then the services and what else is left; with `last`,
        the embedded Redis (the hand-backs and the shutdown message go into it first), then any straggler."""
        redis_dir = os.path.normpath(os.path.abspath(self.paths.state / "redis"))
        tree = [p for p in _children(psutil.Process()) if _status(p) not in (psutil.STATUS_ZOMBIE, None)]
        redis = [p for p in tree if _is_embedded_redis(p, redis_dir)]
        if last:
            killed = _terminate(redis, LEFTOVER_REDIS_GRACE) + _kill_descendants(LEFTOVER_GRACE)
        else:
            argvs = {tuple(s.argv) for s in self.plan.specs if s.kind == "worker"}
            workers = [p for p in tree if _cmdline(p) in argvs]
            killed = _terminate(workers, FORCED_SECOND_TERM_AFTER, LEFTOVER_SECOND_GRACE)
            killed += _terminate([p for p in tree if p not in workers and p not in redis], LEFTOVER_GRACE)
        if tree:
            step("supervisord.orphans_stopped", pids=[p.pid for p in tree], killed=killed,
                 tier="redis" if last else "workers and services")

    async def _settle_dead_workers(self) -> None:
        """Workers the stop found dead (SIGKILLed or crashed just before it, or killed by it) could neither hand
        their jobs back nor say they were offline, and a stopping machine starts no replacement to do it: the
        API saw a busy worker with a live heartbeat for a minute after the machine had gone, its job claimed
        until some other machine's reaper found the lease expired. Their jobs go back to the queue (no attempt
        counted, as a drain's do) and they are marked offline. A worker still running is left alone; one that
        drained has done both itself."""
        async with self._settle_lock:  # (the ordered stop's and a forced end's, one after the other)
            await self._settle_dead_workers_now()

    async def _settle_dead_workers_now(self) -> None:
        running = await asyncio.to_thread(lambda: {_cmdline(p) for p in _children(psutil.Process())})
        for slot in self.plan.workers:
            if tuple(self.plan.spec(slot.process).argv) in running:
                continue
            try:
                handed, old = await asyncio.wait_for(jobs.settle_dead_worker(
                    self._redis, slot.worker_id, "its worker died; the machine is stopping"), 5)
            except (RespError, OSError, asyncio.TimeoutError) as exc:
                unreachable = not isinstance(exc, RespError)
                more = {"note": "Redis unreachable: the other workers are not tried"} if unreachable else {}
                step("shutdown.worker_settle_failed", level=logging.WARNING, process_name=slot.process,
                     worker_id=slot.worker_id, error=str(exc) or type(exc).__name__, **more)
                if unreachable:  # each try would wait out its connect timeout: 64 workers, 2 minutes
                    return
                continue
            if handed or old:
                step("shutdown.worker_settled", level=logging.WARNING, process_name=slot.process,
                     worker_id=slot.worker_id, handed_back=handed, previous=old or None)

    def _begin_shutdown(self, exit_code: int) -> None:
        self.phase = Phase.DRAINING
        self._stopping.set()
        self._shutdown_exit_code = exit_code
        for task in self._probe_tasks:
            task.cancel()
        self._shutdown_task = self._spawn(self._shutdown())

    async def _shutdown(self) -> None:
        try:
            await self._stop_in_order()
        except Exception as exc:  # noqa: BLE001 - a failed stop must still end: a machine hung for good never restarts
            step("shutdown.failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}"[:300],
                 action="stop every process directly")
            await self._forced_end()
            if self._shutdown_exit_code == 0:
                self._shutdown_exit_code = 1
        self.inbox.put_nowait(ShutdownDone())

    async def _stop_in_order(self) -> None:
        step("shutdown.drain", phase=self.phase.value)
        started = False  # supervisord came up: what it started is stopped, even should it die meanwhile
        for kind in ("worker", "service", "redis"):
            names = [s.name for s in self.plan.specs if s.kind == kind]
            if kind == "redis":
                await self._announce_shutdown()
            # (a supervisord not up yet has started nothing: nothing to stop, and it could not be asked; one that
            # died during the stop does not answer, and what it ran, the machine's now as the subreaper, is
            # stopped directly)
            started = started or self._supervisord_up
            if not (names and started and self.proc is not None):
                continue
            if not self._unanswering:
                await self._check_answering()  # asked even when the sweep found it silent: it may be back
            asked: dict[str, float] = {}  # name -> when a stop went to supervisord that answered nothing
            if not self._unanswering:
                stopped = await asyncio.gather(*(self._stop(name, asked) for name in names))  # at once: self._waits
                if not all(stopped):  # refused, or timed out: a supervisord that hung meanwhile?
                    await self._check_answering()
            if self._unanswering:
                known = {row.pid: row.name for row in self.processes.values() if row.pid}  # the last sweep's
                killed = await asyncio.to_thread(self._stop_directly, names, known, asked)
                step(f"shutdown.{kind}_stopped", processes=names, direct=True, killed=killed)
            else:
                step(f"shutdown.{kind}_stopped", processes=names)
            if kind == "worker":
                await self._settle_dead_workers()
        self.phase = Phase.SHUTDOWN
        await self._announce_shutdown()
        if self.proc is not None and self.proc.returncode is None:
            try:
                if self._unanswering:
                    raise SupervisorError(self._unanswering)
                await asyncio.to_thread(self.control.shutdown)
            except SupervisorError:  # not listening yet (still starting) or not answering: SIGTERM does the same
                with contextlib.suppress(ProcessLookupError):
                    if self._unanswering:  # a hung one would not act on a SIGTERM; what it ran is stopped
                        self.proc.kill()
                    else:
                        self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
            step("shutdown.supervisord", returncode=self.proc.returncode)
        if self.proc is not None and (self.proc.returncode or 0) < 0:  # killed: it left its socket and pidfile
            _remove_run_files(self.paths, self.proc.pid)
        # supervisord is gone: what its services left (re-parented to us) would outlive a clean exit
        left = await asyncio.to_thread(_kill_descendants, LEFTOVER_GRACE)
        if left:
            step("shutdown.leftovers", level=logging.WARNING, pids=left, action="terminated")

    async def _stop(self, name: str, asked: dict[str, float]) -> bool:
        """supervisord stops `name`; False when it did not. A stop it took and never answered (it died or
        hung meanwhile) goes into `asked` with when it was sent: the stop signal may have gone out."""
        grace = self.plan.spec(name).stop_grace
        stop = Supervisor(self.paths.socket, timeout=grace + 15).stop
        sent = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(self._waits, stop, name, True)
            return True
        except SupervisorError as exc:
            if isinstance(exc, StopUnanswered):
                asked[name] = sent
            step("process.stop_failed", level=logging.ERROR, process_name=name, error=str(exc))
            return False

    async def _check_answering(self) -> None:
        """Whether supervisord answers a short call; if not, the rest of the stop goes without it
        (self._unanswering)."""
        try:
            await asyncio.to_thread(Supervisor(self.paths.socket, timeout=STOP_ANSWER_TIMEOUT).call,
                                    "supervisor.getState")
            return
        except SupervisorError as exc:
            reason = f"supervisord not answering: {exc}"[:300]
        self._unanswering = reason
        step("shutdown.supervisord_not_answering", level=logging.WARNING, error=reason,
             action="stop its processes directly, then SIGKILL it")

    def _stop_directly(self, names: list[str], known: dict[int, str], asked: dict[str, float]) -> list[int]:
        """supervisord does not answer: stop these processes of its as it would have (stopasgroup, killasgroup):
        each one's stop signal to its process group, up to its stop_grace (a worker drains on it and hands back
        what still runs before its grace ends), then SIGKILL to the group. Returns the pids that were killed.

        Those in `asked` (name -> when), whose stop supervisord took and never answered, may have had their
        signal: not sent again now (a worker takes a second SIGTERM as "hand the running jobs back at once",
        and would give up jobs it could still finish). Their grace counts from the stop sent; one still running
        at its end had no signal after all, or ignored it: its stop signal then (a worker's twice, to hand back
        at once), and SIGKILL LEFTOVER_SECOND_GRACE later."""
        # (the embedded Redis overwrites its environment with its title: known, the sweep's pid -> name, then)
        targets = [(proc, name) for proc in self._supervisords_children()
                   if (name := self._name_of(proc, known)) in names
                   and _status(proc) not in (psutil.STATUS_ZOMBIE, None)]
        start = time.monotonic()
        deadline, late = {}, set()  # pid -> when its group is SIGKILLed; pids signalled at their grace's end
        for proc, name in targets:
            spec = self.plan.spec(name)
            deadline[proc.pid] = asked.get(name, start) + math.ceil(spec.stop_grace)  # as supervisord's stopwaitsecs
            if name not in asked:
                _signal_group(proc, spec.stop_signal)
        killed = []
        # polled, not waited on: their parent is hung, so they stay zombies (gone for us), which psutil waits out
        while targets:
            time.sleep(0.05)
            now = time.monotonic()
            for proc, name in list(targets):
                if _status(proc) in (psutil.STATUS_ZOMBIE, None):
                    targets.remove((proc, name))
                    continue
                if now < deadline[proc.pid]:
                    continue
                if name in asked and proc.pid not in late:
                    late.add(proc.pid)
                    spec = self.plan.spec(name)
                    with contextlib.suppress(psutil.Error):
                        if proc.is_running():  # (not a pid reaped meanwhile and reused)
                            _signal_group(proc, spec.stop_signal)
                            if spec.kind == "worker":
                                time.sleep(FORCED_SECOND_TERM_AFTER)
                                _signal_group(proc, spec.stop_signal)
                    deadline[proc.pid] = time.monotonic() + LEFTOVER_SECOND_GRACE
                    continue
                # (is_running compares the start time: a pid reaped meanwhile and reused is someone else's)
                with contextlib.suppress(OSError, psutil.Error):
                    if proc.is_running():
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                targets.remove((proc, name))
        return killed

    @staticmethod
    def _name_of(proc: psutil.Process, known: dict[int, str]) -> str:
        try:
            return proc.environ().get("SUPERVISOR_PROCESS_NAME") or known.get(proc.pid, "")
        except psutil.Error:
            return known.get(proc.pid, "")

    def _supervisords_children(self) -> list[psutil.Process]:
        """What supervisord runs: its children and, should it have died, those the machine adopted from it as the
        subreaper: its children outside the machine's own session (supervisord leads a session of its own)."""
        found = {p.pid: p for p in _children_of(self.proc.pid)}  # (none once it is gone and reaped)
        for proc in _adopted(_children(psutil.Process(), recursive=False), {self.proc.pid}):
            found.setdefault(proc.pid, proc)
        return list(found.values())

    # -- helpers -----------------------------------------------------------------------------------------
    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _write_pointer(self) -> None:
        """`run/machine.json` lets `emp-machine ps|restart|logs` find this machine without its manifest."""
        doc = {"pid": os.getpid(), "machine_id": self.plan.machine_id, "socket": str(self.paths.socket),
               "logs": str(self.paths.logs), "manifest": self.manifest.source, "started_at": time.time(),
               "redis_url": self.plan.redis_url, "health_port": self.health_server.bound_port,
               "health_host": self.manifest.health.host}
        target = self.paths.run / "machine.json"  # in run/ (0700): the Redis URL may hold a password
        target.write_text(json.dumps(doc), encoding="utf-8")
        # And an entry in the per-user registry, for a state dir outside the per-user state root: the operator
        # commands find this machine without --manifest wherever its state is. Only a convenience: a failure to
        # write it changes nothing else.
        try:
            entry = registry_entry(self.paths.state, os.environ)
            entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"state_dir": str(self.paths.state), "pid": os.getpid()}), encoding="utf-8")
            os.replace(tmp, entry)
        except (OSError, NoStateHome) as exc:  # NoStateHome: no home directory for the per-user registry
            log.debug("machine registry entry not written: %s", exc)

    def _remove_config(self) -> None:
        """A stopped machine leaves supervisord.conf (every process's resolved environment, secrets included;
        written again at each boot) no more. Left while the supervisord it belongs to still runs. run/manifest.json
        stays as it is (0600): `emp-machine errors` reads the exact secret values from it to mask them in the raw
        service logs, which keep whatever a service printed (masked there, the token showed in plain text)."""
        if self.proc is not None and self.proc.returncode is None:
            return
        with contextlib.suppress(OSError):
            self.paths.conf.unlink()

    def _remove_pointer(self) -> None:
        try:
            (self.paths.run / "machine.json").unlink()
        except FileNotFoundError:
            pass
        try:
            entry = registry_entry(self.paths.state, os.environ)
            if json.loads(entry.read_text(encoding="utf-8")).get("pid") == os.getpid():  # ours, not a successor's
                entry.unlink()
        except (OSError, ValueError, AttributeError, NoStateHome):
            pass


OPEN_FILES_WANTED = 65536  # the soft RLIMIT_NOFILE the machine asks for (never above the hard limit)


def raise_open_file_limit(wanted: int = OPEN_FILES_WANTED) -> tuple[int, int]:
    """Raise this process's soft open-file limit to min(hard, `wanted`): a container's `ulimit -n 1024` (or
    64) would otherwise let a few dozen idle health clients starve supervisord's socket and Redis. What it
    starts (supervisord, services, workers) inherits it. Returns (before, after)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.debug("open-file limit left at %s (hard %s): %s", soft, hard, exc)
            return soft, soft
        log.debug("open-file limit raised from %s to %s (hard %s)", soft, target, hard)
        return soft, target
    return soft, soft


ACCEPT_ERROR_EVERY_S = 30.0  # "socket.accept() out of system resource": logged at most this often


def _quiet_accept_errors(clock=time.monotonic):
    """The loop's exception handler: asyncio logs each failed accept() of a listening socket out of file
    descriptors, up to the backlog per retry, each second (44k lines in 17 s, rotating every other log line
    away); one line per ACCEPT_ERROR_EVERY_S with the count, everything else as asyncio would."""
    state = {"last": -ACCEPT_ERROR_EVERY_S, "count": 0}

    def handler(loop, context) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        state["count"] += 1
        now = clock()
        if now - state["last"] >= ACCEPT_ERROR_EVERY_S:
            exc = context.get("exception")
            log.error("health.accept_failed", extra={"fields": {
                "event_type": "machine.health.accept_failed", "error": str(exc)[:200], "failures": state["count"],
                "detail": "out of file descriptors: new connections to the health port wait (raise the open-file "
                          "limit, ulimit -n)"}})
            state["last"], state["count"] = now, 0

    return handler


def _become_subreaper() -> None:
    """Orphans of a crashed supervisord are re-parented to us, so we can stop them before restarting it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def _kill_descendants(grace: float) -> list[int]:
    """TERM every descendant, KILL what is left after `grace` seconds, and reap them. Returns the pids of
    those that were still running (not zombies)."""
    children = psutil.Process().children(recursive=True)
    if not children:
        return []
    running = [child.pid for child in children if _status(child) not in (psutil.STATUS_ZOMBIE, None)]
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
    return running


def _exits_within(proc: psutil.Process, timeout: float, stop: threading.Event) -> bool:
    """Whether `proc` exits (or is gone) within `timeout`, waited on in slices that `stop` cuts short (False)."""
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            proc.wait(min(left, 0.1))
            return True
        except psutil.TimeoutExpired:
            continue
        except psutil.Error:
            return True
    return False


def _signal_all(procs: list[psutil.Process], sig: int) -> list[psutil.Process]:
    """Send `sig` to each (psutil checks it is still the same process); returns those it reached."""
    reached = []
    for proc in procs:
        try:
            proc.send_signal(sig)
            reached.append(proc)
        except psutil.Error:
            pass
    return reached


def _signal_group(proc: psutil.Process, stop_signal: str) -> None:
    """`stop_signal` (a name without SIG) to the process group `proc` leads (supervisord's setpgrp)."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, getattr(signal, f"SIG{stop_signal}"))


def _terminate(procs: list[psutil.Process], grace: float, second_grace: float = 0.0) -> list[int]:
    """SIGTERM each, up to `grace` seconds to exit; with `second_grace`, a second SIGTERM to those left and that
    long again; then SIGKILL. Returns the pids that had to be killed."""
    if not procs:
        return []
    _, alive = psutil.wait_procs(_signal_all(procs, signal.SIGTERM), timeout=grace)
    if alive and second_grace > 0:
        _, alive = psutil.wait_procs(_signal_all(alive, signal.SIGTERM), timeout=second_grace)
    killed = _signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(killed, timeout=5)
    return [p.pid for p in killed]


def _is_embedded_redis(proc: psutil.Process, redis_dir: str) -> bool:
    """Whether `proc` is the embedded Redis of the state dir whose redis folder is `redis_dir` (_redis_of)."""
    try:
        return _redis_of(proc.name(), proc.cwd(), proc.cmdline(), redis_dir)
    except psutil.Error:
        return False


def _redis_of(name: str | None, cwd: str | None, argv: list[str], redis_dir: str) -> bool:
    """A process (its name, working directory, command line) is the embedded Redis whose folder is `redis_dir`:
    `--dir` names it, or (it rewrites its command line and environment into its process title) a redis-server /
    valkey-server works there."""
    if (name or "").startswith(("redis-server", "valkey-server")) and cwd == redis_dir:
        return True
    return any(argv[i] == "--dir" and os.path.normpath(argv[i + 1]) == redis_dir for i in range(len(argv) - 1))


def _cmdline(proc: psutil.Process) -> tuple[str, ...]:
    try:
        return tuple(proc.cmdline())
    except psutil.Error:
        return ()


def _leftovers(paths: svconfig.Paths) -> list[tuple[psutil.Process, str, str]]:
    """This state dir's processes still running with no machine (the caller holds the state dir's lock), as
    (process, kind, supervisord's name for it or ""): a worker (worker --manifest <state>/run/manifest.json), a
    supervisord (-c <state>/run/supervisord.conf), the embedded Redis (--dir <state>/redis; it rewrites its
    command line and environment into its process title, so also: a redis-server / valkey-server whose working
    directory is <state>/redis, where --dir puts it), or a process started by this state dir's supervisord
    (its SUPERVISOR_SERVER_URL, which a service's own children inherit). Only this user's, in this mount namespace
    (another container sees another volume at the same path); never this process or its ancestors; not an
    operator's editor or redis-cli in those folders."""
    norm = os.path.normpath
    manifest, conf = norm(os.path.abspath(resolved_manifest_path(paths.state))), norm(os.path.abspath(paths.conf))
    redis_dir = norm(os.path.abspath(paths.state / "redis"))
    server_url = "unix://" + norm(os.path.abspath(paths.socket))
    me = psutil.Process()
    skip = {me.pid}
    with contextlib.suppress(psutil.Error):
        skip.update(p.pid for p in me.parents())
    uid = os.getuid()
    mounts = _mount_ns(me.pid)
    found = []
    for proc in psutil.process_iter(["cmdline", "uids", "status", "name", "cwd"]):
        info = proc.info
        if proc.pid in skip or info["uids"] is None or info["uids"].real != uid \
                or info["status"] in (psutil.STATUS_ZOMBIE, None):
            continue
        if _mount_ns(proc.pid) != mounts:
            # another mount namespace (a container sharing our pid namespace, same uid): the same path there
            # may be another volume, another machine's state dir
            continue
        argv = info["cmdline"] or []
        try:
            env = proc.environ()
        except psutil.Error:
            env = {}
        name = env.get("SUPERVISOR_PROCESS_NAME", "")
        flags = {argv[i]: norm(argv[i + 1]) for i in range(len(argv) - 1) if argv[i].startswith("-")}
        if _redis_of(info["name"], info["cwd"], argv, redis_dir):
            found.append((proc, "redis", name or REDIS_PROCESS))
        elif "worker" in argv and flags.get("--manifest") == manifest:
            found.append((proc, "worker", name))
        elif "supervisor.supervisord" in argv and flags.get("-c") == conf:
            found.append((proc, "supervisord", name))
        elif env.get("SUPERVISOR_SERVER_URL") == server_url:
            found.append((proc, "service", name))
    return found


def _status(proc: psutil.Process) -> str | None:
    try:
        return proc.status()
    except psutil.Error:
        return None


def _children(proc: psutil.Process, recursive: bool = True) -> list[psutil.Process]:
    try:
        return proc.children(recursive=recursive)
    except psutil.Error:
        return []


def _adopted(children: list[psutil.Process], supervisords: set[int]) -> list[psutil.Process]:
    """Those of our `children` the machine adopted as the subreaper: outside its own session (a child this
    process started itself is in it; supervisord leads a session of its own, and its programs are in that),
    supervisords excepted."""
    own_session = os.getsid(0)
    adopted = []
    for child in children:
        with contextlib.suppress(OSError):  # gone meanwhile
            if child.pid not in supervisords and os.getsid(child.pid) != own_session:
                adopted.append(child)
    return adopted


def _reap_orphans(keep: set[int], children: list[psutil.Process]) -> list[int]:
    """Reap our zombie `children` that we adopted (_adopted), but those in `keep`: a child this process
    started itself has its owner waiting on it."""
    reaped = []
    for child in _adopted(children, keep):
        if _status(child) != psutil.STATUS_ZOMBIE:
            continue
        try:
            pid, _ = os.waitpid(child.pid, os.WNOHANG)
        except OSError:  # reaped meanwhile
            continue
        if pid:
            reaped.append(pid)
    return reaped


def _kill_leftovers(supervisords: set[int], children: list[psutil.Process]) -> dict[str, list[int]]:
    """SIGKILL what a program's earlier run left running outside its process group (a child that called setsid:
    the crash kill of the group, plugin._kill_group, misses it), with its own group. The machine, as the
    subreaper, adopts it when its parents die: one of our `children` (read first) outside our session that
    carries a program's SUPERVISOR_PROCESS_NAME and was started before that program's current process (read
    from supervisord's children after ours: a helper of the current run was started after it, so it is seen),
    or whose program has no current process. One started since is the current run's (a helper it
    daemonized): left alone. Start times are compared as the kernel keeps them (a wall clock stepped since
    would misjudge), not against supervisord's table, which is a round old. Returns {program: [pids killed]}."""
    candidates = []
    for child in _adopted(children, supervisords):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            name = child.environ().get("SUPERVISOR_PROCESS_NAME")
        except (OSError, psutil.Error):  # gone meanwhile, or not ours to read
            continue
        if name:
            candidates.append((child, name))
    if not candidates or not supervisords:  # (none: it died and was reaped; the supervisord-loss path stops all)
        return {}
    current: dict[str, float] = {}  # program -> when its current process started
    for pid in supervisords:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return {}  # supervisord died: what it ran is adopted, and the supervisord-loss path stops it
        except psutil.Error:
            return {}
        for proc in _children_of(pid):
            try:
                name = proc.environ().get("SUPERVISOR_PROCESS_NAME")
                if name:
                    current[name] = proc.create_time()
            except psutil.Error:
                continue
    killed: dict[str, list[int]] = {}
    for child, name in candidates:
        try:
            if name in current and child.create_time() >= current[name]:
                continue
            if not child.is_running():  # (compares the start time: a pid reused since is someone else's)
                continue
            if os.getpgid(child.pid) == child.pid:
                os.killpg(child.pid, signal.SIGKILL)
            else:
                os.kill(child.pid, signal.SIGKILL)
        except (OSError, psutil.Error):
            continue
        killed.setdefault(name, []).append(child.pid)
    return killed


def _children_of(pid: int) -> list[psutil.Process]:
    try:
        return _children(psutil.Process(pid), recursive=False)
    except psutil.Error:
        return []


def _mount_ns(pid: int) -> str | None:
    """The mount namespace process `pid` lives in (None when it cannot be read: then it is not ours to judge)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _remove_run_files(paths: svconfig.Paths, pid: int) -> None:
    """The socket and pidfile of our supervisord `pid`, which died without removing them."""
    try:
        named = int(paths.pidfile.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        named = None
    if named not in (None, pid):
        return  # another one's (never while this machine holds the state dir's lock)
    for path in (paths.pidfile, paths.socket):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _stale_supervisord(pidfile: Path, conf: Path, ours: set[int]) -> psutil.Process | None:
    """The live supervisord that `pidfile` names, if it runs this state dir's config and is not one of ours."""
    try:
        pid = int(pidfile.read_text(encoding="ascii").strip())
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        zombie = proc.status() == psutil.STATUS_ZOMBIE
    except (OSError, ValueError, psutil.Error):
        return None
    if pid in ours or zombie or "supervisor.supervisord" not in cmdline or str(conf) not in cmdline:
        return None
    return proc


EXPIRE_FINISHED_INTERVAL_S = 600.0  # how often the embedded Redis's finished jobs are looked at

REGISTRY_DIR = ".running"  # under the per-user state root: one <hash of state dir>.json per running machine


def registry_entry(state_dir: Path, environ) -> Path:
    """The per-user registry's file for the machine using `state_dir`: {"state_dir": ..., "pid": ...}, written
    once the machine is up, removed at its exit; one whose process is gone is ignored by its readers
    (manifest.running_machines)."""
    import hashlib

    from emp_machine.runtime.identity import state_root

    digest = hashlib.sha256(str(Path(state_dir).absolute()).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return state_root(environ) / REGISTRY_DIR / f"{digest}.json"


def resolved_manifest_path(state_dir: Path) -> Path:
    return state_dir / "run" / "manifest.json"

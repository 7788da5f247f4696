"""Runs inside supervisord: fast child reaping, PM2-style restarts, orphan protection, the `emp.*` RPC namespace.

supervisord loads this through its documented extension point (an `[rpcinterface:emp]` section whose
factory gets the live `Supervisor` object). From there it changes three things supervisord 4.3.0 does
poorly for us; `tests/test_supervisor_plugin.py` pins each behaviour, and pyproject pins the version:

1. Reaping latency. supervisord's loop sleeps in `poll(timeout=1)` and a SIGCHLD does not wake it (Python
   retries the interrupted poll), so a crashed child is noticed up to 1 s late. We register a
   `signal.set_wakeup_fd` pipe with its poller: SIGCHLD makes `poll` return, the loop reaps, and the next
   `poll` runs with a zero timeout so the restart happens on the very next pass (~ms instead of ~1 s).
2. Restart decisions. Programs are rendered with `autorestart=false`; on every EXITED/FATAL event the
   `RestartTracker` of `policy.py` decides: restart now, restart after a backoff delay, or `errored`
   with a retry after the cool-down. Due restarts run from the poll wrapper, inside supervisord's loop.
3. Orphans. If the machine process that started supervisord dies (even by SIGKILL), the parent pid
   changes; we then stop every process with a short grace and shut supervisord down, so a container is
   left with no strays. The machine's own order holds (workers, then services, then Redis: each priority
   tier at once once the one above has stopped), so a worker's hand-back still reaches the service and
   Redis it runs on. Workers get a second SIGTERM shortly after the first ("hand the running jobs back
   now"): draining on their own stop_grace, the short grace SIGKILLed them before their hand-back.

Keep imports light: this code adds to supervisord's own memory footprint.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time

from supervisor import events
from supervisor.states import ProcessStates, SupervisorStates, getProcessStateDescription
from supervisor.xmlrpc import Faults, RPCError

from emp_machine.supervisor.policy import RestartPolicy, RestartTracker

ORPHAN_STOP_GRACE = 2  # seconds each process gets to stop when the machine died
# The worker's second SIGTERM comes this long after the first: sent at once, the kernel could merge the two
# pending signals into one (the worker would then drain on its stop_grace, past our SIGKILL).
ORPHAN_HANDBACK_AFTER = 0.2
API_VERSION = "1"


class _Restarter:
    """The part of the plugin that lives in supervisord's loop. One per supervisord run."""

    def __init__(self, supervisord, policies: dict[str, RestartPolicy], parent_pid: int):
        self.supervisord = supervisord
        self.options = supervisord.options
        self.trackers = {name: RestartTracker(policy) for name, policy in policies.items()}
        self.default_policy = RestartPolicy()
        self.parent_pid = parent_pid
        self.due: dict[str, float] = {}  # process name -> monotonic time of its scheduled start
        self.held: set[str] = set()  # processes the machine stopped on purpose: never auto-restarted
        self.errored_reason: dict[str, str] = {}
        self._our_spawn: str | None = None
        self._immediate = False
        self._orphaned = False
        self._handback_at: float | None = None  # when orphaned workers get their second SIGTERM
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        # Any Python-level signal handler (supervisord installs them for CHLD, TERM, INT, HUP, USR2)
        # now also writes a byte to the pipe, which `poll` sees.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        poller = self.options.poller
        self._original_poll = poller.poll
        poller.poll = self.poll
        events.subscribe(events.ProcessStateEvent, self.on_state)

    # -- supervisord loop hook -------------------------------------------------------------------------
    def poll(self, timeout):
        self._check_parent()
        if self._orphaned:
            self._stop_orphans()
        spawned = self._run_due()
        now = time.monotonic()
        if spawned or self._immediate:
            timeout = 0
        elif self.due:
            timeout = max(0.0, min(timeout, min(self.due.values()) - now))
        if self._handback_at is not None:
            timeout = max(0.0, min(timeout, self._handback_at - now))
        self._immediate = False
        self.options.poller.register_readable(self._wake_r)
        readable, writable = self._original_poll(timeout)
        if self._wake_r in readable:
            readable = [fd for fd in readable if fd != self._wake_r]
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            # A signal arrived (most often SIGCHLD): reap now, then act on it without sleeping.
            self._immediate = True
        return readable, writable

    def _run_due(self) -> bool:
        if not self.due or self.options.mood < SupervisorStates.RUNNING:
            return False
        now = time.monotonic()
        spawned = False
        for name, when in list(self.due.items()):
            if when > now:
                continue
            del self.due[name]
            process = self._process(name)
            if process is None or name in self.held:
                continue
            tracker = self.tracker(name)
            state = process.get_state()
            if state not in (ProcessStates.EXITED, ProcessStates.FATAL) and not (
                    tracker.errored and state == ProcessStates.STOPPED):  # (STOPPED: a start was refused)
                continue  # started meanwhile, or in supervisord's own BACKOFF retry
            if tracker.errored:
                tracker.on_cooldown_retry()
                self.errored_reason.pop(name, None)
            self._our_spawn = name
            try:
                process.spawn()
            finally:
                self._our_spawn = None
            spawned = True
        return spawned

    def _check_parent(self) -> None:
        if self._orphaned or os.getppid() == self.parent_pid:
            return
        self._orphaned = True
        self.options.logger.warn("emp: the machine process is gone; stopping every process and exiting")
        self.due.clear()
        for group in self.supervisord.process_groups.values():
            for process in group.processes.values():
                process.config.stopwaitsecs = min(process.config.stopwaitsecs, ORPHAN_STOP_GRACE)
        self._handback_at = time.monotonic() + ORPHAN_HANDBACK_AFTER
        self.options.mood = SupervisorStates.SHUTDOWN

    def _stop_orphans(self) -> None:
        """Once orphaned, on every pass: stop the highest priority tier still up, all of its processes at
        once (supervisord's own shutdown stops one program at a time: N x the grace). Then, when due, a
        second SIGTERM to each worker still stopping: it hands its running jobs back at once."""
        up = [g for g in self.supervisord.process_groups.values() if g.get_unstopped_processes()]
        if up:
            tier = max(g.config.priority for g in up)
            for group in up:
                if group.config.priority == tier:
                    group.stop_all()
        if self._handback_at is None or time.monotonic() < self._handback_at:
            return
        self._handback_at = None
        for group in self.supervisord.process_groups.values():
            for process in group.processes.values():
                if process.get_state() == ProcessStates.STOPPING and _is_worker(process):
                    process.signal(signal.SIGTERM)

    # -- events ------------------------------------------------------------------------------------------
    def on_state(self, event) -> None:
        process = event.process
        name = process.config.name
        state = process.get_state()
        if state == ProcessStates.STARTING:
            if self._our_spawn != name and event.from_state != ProcessStates.BACKOFF:
                # started by an operator or by the machine: a deliberate start clears errored
                self.held.discard(name)
                self.due.pop(name, None)
                self.tracker(name).on_manual_start()
                self.errored_reason.pop(name, None)
            return
        if state == ProcessStates.EXITED and process.pid:  # (a stop ends STOPPED; the pid is still set here)
            _kill_group(process.pid)
        if name in self.held or self._orphaned or self.options.mood < SupervisorStates.RUNNING:
            return
        now = time.monotonic()
        if state == ProcessStates.EXITED:
            uptime = max(0.0, process.laststop - process.laststart)
            decision = self.tracker(name).on_exit(now, uptime, event.expected, process.exitstatus)
        elif state == ProcessStates.FATAL:
            decision = self.tracker(name).on_fatal(now, process.spawnerr or "supervisord gave up starting it")
        else:
            return
        if decision.restart:
            self.due[name] = now + decision.delay
            if decision.delay == 0:
                self._immediate = True
        elif decision.errored:
            self.errored_reason[name] = decision.reason
            self.due[name] = self.tracker(name).retry_at
            self.options.logger.warn(f"emp: {name} errored: {decision.reason}; retry in "
                                     f"{self.tracker(name).policy.cooldown:g}s")

    def mark_errored(self, name: str, reason: str) -> None:
        """A start of `name` was refused (its command cannot be run): errored as when supervisord gives up on
        it (FATAL), so the cool-down retry applies; the refused start was deliberate, so it is not held."""
        tracker = self.tracker(name)
        tracker.on_fatal(time.monotonic(), reason)
        self.held.discard(name)
        self.errored_reason[name] = reason
        self.due[name] = tracker.retry_at
        self.options.logger.warn(f"emp: {name} errored: {reason}; retry in {tracker.policy.cooldown:g}s")

    # -- helpers -----------------------------------------------------------------------------------------
    def tracker(self, name: str) -> RestartTracker:
        if name not in self.trackers:
            self.trackers[name] = RestartTracker(self.default_policy)
        return self.trackers[name]

    def _process(self, name: str):
        for group in self.supervisord.process_groups.values():
            process = group.processes.get(name)
            if process is not None:
                return process
        return None

    def close(self) -> None:
        self.options.poller.poll = self._original_poll
        events.unsubscribe(events.ProcessStateEvent, self.on_state)


def _kill_group(pid: int) -> None:
    """SIGKILL what is left of the process group of the program `pid`, which exited on its own (supervisord makes
    each program the leader of its own group). stopasgroup/killasgroup reach the group only on a stop: after a
    crash its children (a service's workers or subprocesses, with their memory, GPU and ports) ran on under the
    machine, one more set at each restart. Sent as it is reaped: while one member is left, the kernel keeps the
    pid for the group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:  # no one left in it
        pass


def _is_worker(process) -> bool:
    """An emp worker process (`python -m emp_machine worker ...`, as plan.py renders it)."""
    return " -m emp_machine worker " in f" {process.config.command} "


class EmpNamespace:
    """XML-RPC methods under `emp.` for the machine and the CLI. Values are JSON-friendly, never None."""

    def __init__(self, restarter: _Restarter):
        self._r = restarter

    def getApiVersion(self) -> str:
        return API_VERSION

    def getPolicyState(self) -> str:
        """JSON: process name -> state, restart counters, errored flag and reason, seconds to next start."""
        now = time.monotonic()
        result = {}
        for group in self._r.supervisord.process_groups.values():
            for name, process in group.processes.items():
                snap = self._r.tracker(name).snapshot(now)
                due = self._r.due.get(name)
                snap.update(
                    state=getProcessStateDescription(process.get_state()),
                    held=name in self._r.held,
                    errored_reason=self._r.errored_reason.get(name, ""),
                    restart_in=None if due is None else max(0.0, due - now),
                    pid=process.pid,
                )
                result[name] = snap
        return json.dumps(result)

    def hold(self, name: str) -> bool:
        """Never auto-restart `name` until it is started again; cancels a scheduled restart."""
        if self._r._process(name) is None:
            raise RPCError(Faults.BAD_NAME, name)
        self._r.held.add(name)
        self._r.due.pop(name, None)
        return True

    def markErrored(self, name: str, reason: str) -> bool:
        """supervisord refused to start `name` (NO_FILE, NOT_EXECUTABLE: its command cannot be run), which
        leaves it STOPPED with nothing to retry it: errored with `reason`, tried again after the cool-down.
        False (nothing done) while it runs, or while supervisord's own BACKOFF retry is under way (its FATAL
        end is errored already)."""
        process = self._r._process(name)
        if process is None:
            raise RPCError(Faults.BAD_NAME, name)
        if process.get_state() not in (ProcessStates.STOPPED, ProcessStates.EXITED, ProcessStates.FATAL):
            return False
        self._r.mark_errored(name, " ".join(str(reason).split())[:500] or "could not be started")
        return True


def make_rpcinterface(supervisord, **config):
    """supervisord's `supervisor.rpcinterface_factory` for the `[rpcinterface:emp]` section."""
    policies: dict[str, RestartPolicy] = {}
    policy_file = config.get("policy_file")
    if policy_file:
        with open(policy_file, encoding="utf-8") as fh:
            policies = {name: RestartPolicy.from_dict(data) for name, data in json.load(fh).items()}
    parent_pid = int(config.get("parent_pid") or os.getppid())
    previous = getattr(supervisord, "_emp_restarter", None)
    if previous is not None:  # supervisord re-runs its factories on reload
        previous.close()
    restarter = _Restarter(supervisord, policies, parent_pid)
    supervisord._emp_restarter = restarter
    return EmpNamespace(restarter)

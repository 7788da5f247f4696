"""The machine's one view of its own health: fed by the decider, read by the HTTP server and the publisher.

The machine's `handle()` forwards what it learns (phase, supervisord's process table, probe verdicts, what
Redis says about the workers, hardware readings) and calls `commit()` after each event. `commit()` rebuilds
the documents once (the /health body and code, the status document, the status page) so that request
handlers only hand out bytes they find ready, and notes transitions for the status publisher.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from emp_machine.runtime.identity import pid_space, token_parts
from emp_machine.runtime.jobs import HEARTBEAT_TTL_S, WorkerRow
from emp_machine.runtime.plan import REDIS_PROCESS, Plan
from emp_machine.supervisor.control import ProcessInfo

# supervisord states (and our ERRORED) in PM2's words, which the monitor reads
PM2_STATUS = {"RUNNING": "online", "STARTING": "launching", "BACKOFF": "launching", "STOPPED": "stopped",
              "STOPPING": "stopped", "EXITED": "stopped", "UNKNOWN": "stopped", "FATAL": "errored",
              "ERRORED": "errored"}
# The states in which a WORKER process runs: one told to stop keeps running its jobs through its stop_grace,
# and Redis says how it is (it was shown offline and idle while it finished its job and sent its progress).
# A service being stopped is not (its health check is not asked for any more): stopped, as before.
UP = ("RUNNING", "STOPPING")


def pm2_status(state: str | None, worker: bool = False) -> str:
    """PM2's word for a supervisord state; a worker draining (STOPPING) is online: the contract has no word for
    PM2's own "stopping", and it reads stopped once it has exited."""
    if worker and state == "STOPPING":
        return "online"
    return PM2_STATUS.get(state or "", "stopped")


@dataclass(frozen=True)
class GpuState:
    index: int
    name: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float | None


@dataclass(frozen=True)
class HardwareState:
    cpu_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    disk_used_bytes: int
    disk_total_bytes: int
    gpus: tuple[GpuState, ...] = ()
    gpu_note: str = ""
    disk_problem: str = ""  # "disk full: <path> (<free> free)" (status.disk_problem), "" while there is room


@dataclass
class _Worker:
    worker_id: str
    process: str
    service_type: str
    connector: str
    job_types: tuple[str, ...]
    service_process: str | None
    gpu: int | None
    lease_s: float = 0.0  # its group's lease: a heartbeat older than that is a stalled worker's
    row: WorkerRow | None = None


@dataclass
class Aggregator:
    plan: Plan
    job_types: dict[str, tuple[str, ...]]  # worker group -> job types
    version: str
    health_url: str
    required: set[str] = field(default_factory=set)  # service processes whose health decides the machine's
    leases: dict[str, float] = field(default_factory=dict)  # worker group -> lease in seconds
    clock: Any = time.time  # wall time: the documents' timestamps only
    monotonic: Any = time.monotonic  # uptime: immune to wall-clock steps (an NTP correction, a manual set)

    def __post_init__(self) -> None:
        self.started_at = self.clock()
        self._started_mono = self.monotonic()
        self._pid_space = pid_space()  # the workers', as supervisord starts them here
        self.phase = "starting"
        self.supervisord_up = False
        self.supervisor_silent = ""  # why supervisord, though running, does not answer (its table is stale)
        self.processes: dict[str, ProcessInfo] = {}
        self.health: dict[str, tuple[bool, str]] = {}
        self.redis_ok: bool | None = None
        self.redis_reason = "not checked yet"
        self.hardware: HardwareState | None = None
        self.workers = {
            w.worker_id: _Worker(w.worker_id, w.process, self._service_type(w), w.connector,
                                 self.job_types.get(w.group, (w.connector,)), w.service_process,
                                 self._gpu_of(w.service_process), self.leases.get(w.group, 0.0))
            for w in self.plan.workers}
        self._by_process = {w.process: w for w in self.workers.values()}
        self.required = self.required or {s.process for s in self.plan.services if s.required}
        self.dirty = True
        self.transition = asyncio.Event()  # set on a worker/service/phase/Redis transition
        self._signature: tuple | None = None
        self._pending_kind: str | None = None
        self._announced_ready = False
        self.version_no = 0
        # built by commit()
        self.health_code = 503
        self.health_body = b"{}"
        self.ready_code = 503
        self.ready_body = b"{}"
        self.status_doc: dict[str, Any] = {}
        self.status_body = b"{}"
        self.gauges = None  # (workers_active, workers_total) telemetry gauges, set by the machine
        self._page: tuple[int, bytes] = (-1, b"")
        self.commit()

    def uptime(self) -> float:
        """Seconds since the machine process started, by the monotonic clock: a wall-clock step (an NTP
        correction) moves the documents' timestamps, never the uptime (it read -3564 s after a 1 h step back)."""
        return max(0.0, self.monotonic() - self._started_mono)

    # -- inputs (the decider calls these) ----------------------------------------------------------------
    def set_phase(self, phase: str, supervisord_up: bool) -> None:
        if (phase, supervisord_up) != (self.phase, self.supervisord_up):
            if phase == "ready" and not self._announced_ready:
                self._announced_ready = True
                self._pending_kind = "machine_ready"
            self.phase, self.supervisord_up = phase, supervisord_up
            self.dirty = True

    def set_processes(self, rows) -> None:
        self.processes = {row.name: row for row in rows}
        self.dirty = True

    def set_supervisor_silent(self, reason: str) -> None:
        """supervisord runs but its process list fails (hung): "" once it answers again."""
        if reason != self.supervisor_silent:
            self.supervisor_silent = reason
            self.dirty = True

    def set_health(self, process: str, healthy: bool, reason: str) -> None:
        self.health[process] = (healthy, reason)
        self.dirty = True

    def set_redis(self, ok: bool, reason: str, rows: list[WorkerRow] | None = None) -> None:
        self.redis_ok, self.redis_reason = ok, reason
        for row in rows or ():
            if row.worker_id in self.workers:
                self.workers[row.worker_id].row = row
        self.dirty = True

    def set_worker_status(self, worker_id: str, status: str, current_job_id: str, at: str) -> None:
        """A `worker_status` message: applied at once, between two Redis polls."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        row = worker.row or WorkerRow(worker_id, "", "", "", "", 0)
        if status == "offline":
            ttl = -2
        elif row.heartbeat_ttl_ms > 0 or row.heartbeat_ttl_ms == -1:
            ttl = row.heartbeat_ttl_ms
        else:  # its sender just wrote the heartbeat key (a registration) or claimed: alive, until the next poll
            ttl = HEARTBEAT_TTL_S * 1000  # reads the key (a worker that had just registered read "no heartbeat")
        # The token is the next poll's to read: the last poll's may be a restarted worker's predecessor's, which
        # showed the new process as "holding another process's registration" until then.
        worker.row = WorkerRow(worker_id, status, current_job_id, at, row.last_heartbeat, ttl, row.problem)
        self.dirty = True

    def set_hardware(self, state: HardwareState) -> None:
        self.hardware = state
        self.dirty = True

    def request_publish(self, kind: str = "event_driven") -> None:
        self._pending_kind = self._pending_kind or kind
        self.transition.set()

    def take_kind(self) -> str:
        kind, self._pending_kind = self._pending_kind, None
        return kind or "event_driven"

    # -- building ----------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Rebuild the documents when something changed; flag a transition for the publisher."""
        if not self.dirty:
            return
        self.dirty = False
        self.version_no += 1
        now = self.clock()
        health = self._health_doc(now)
        self.health_code = 200 if health["healthy"] else 503
        self.health_body = json.dumps(health, separators=(",", ":")).encode()
        ready = self.phase == "ready"
        self.ready_code = 200 if ready else 503
        self.ready_body = json.dumps({"ready": ready, "phase": self.phase}).encode()
        self.status_doc = self._status_doc(now)
        self.status_body = json.dumps(self.message("periodic"), separators=(",", ":")).encode()
        signature = self._transition_signature()
        if signature != self._signature:
            if self._signature is not None or self._pending_kind:
                self.transition.set()
            self._signature = signature
        if self._pending_kind:
            self.transition.set()
        if self.gauges is not None:
            self._set_gauges()

    def message(self, update_type: str, *, phase: str | None = None) -> dict[str, Any]:
        """The contract's machine status message: the last built document, stamped now."""
        doc = dict(self.status_doc)
        doc["timestamp"] = int(self.clock() * 1000)
        doc["update_type"] = update_type
        if phase is not None:
            status = dict(doc["status"])
            status["machine"] = {**status["machine"], "phase": phase}
            doc["status"] = status
        return doc

    def _disk_problem(self) -> str:
        return self.hardware.disk_problem if self.hardware is not None else ""

    def _service_type(self, worker) -> str:
        if worker.service_process:
            return next(s.service for s in self.plan.services if s.process == worker.service_process)
        return worker.connector

    def _gpu_of(self, service_process: str | None) -> int | None:
        for s in self.plan.services:
            if s.process == service_process:
                return s.gpu
        return None

    def _worker_health(self, w: _Worker) -> tuple[bool, str]:
        info = self.processes.get(w.process)
        if info is None or not (info.state in UP or self._table_unknown(info)):
            return False, f"process {w.process} is {(info.state if info else 'not started').lower()}"
        if not self.redis_ok:
            return False, "heartbeat unknown: Redis unreachable"
        if w.row is not None and w.row.problem:
            return False, w.row.problem  # its own keys unreadable (a stray key): Redis itself answers
        if w.row is None or not w.row.status:
            return False, "not registered in Redis yet"
        if other := self._others_registration(w, info):
            return False, f"not registered in Redis yet: worker:{w.worker_id} {other}"
        if w.row.status == "offline":
            return False, "reports offline"
        ttl_ms = w.row.heartbeat_ttl_ms
        if ttl_ms <= 0 and ttl_ms != -1:
            return False, f"no heartbeat (worker:{w.worker_id}:heartbeat missing or expired)"
        # The key lives the contract's 60 s whatever the lease, so its expiry alone left a stalled worker (SIGSTOP,
        # a blocked event loop) healthy for a minute, past the lease after which its jobs are reaped. Its age is
        # read off Redis's own TTL: no clock of ours comes into it.
        age_s = HEARTBEAT_TTL_S - ttl_ms / 1000
        if w.lease_s and ttl_ms > 0 and age_s > w.lease_s:
            return False, f"heartbeat {age_s:.0f}s old, past its {w.lease_s:g}s lease (the worker is stalled)"
        return True, ""

    def _others_registration(self, w: _Worker, info: ProcessInfo | None) -> str:
        """Why worker:{id} is not the registration of this machine's worker process ("" when it is, or when
        that cannot be told): its token (worker.new_instance: pid-random-pidspace) names another pid, or
        another host or container. A machine booted with the id of one killed a moment before (a new container
        of the same service) showed that one's dead workers as its own, busy and connected, and /health 200,
        for the ~20 s its own workers took to take the ids over; or a same-id machine's live ones beside it."""
        row = w.row
        if row is None or not row.instance or info is None or not info.pid or info.state not in UP:
            return ""
        parts = token_parts(row.instance)
        if parts is None:
            return ""  # no token of that form (an earlier version's, a tool's): as before
        pid, space = parts
        if space != self._pid_space:
            return "holds the registration of another host's or container's process"
        if pid != info.pid:
            return f"holds the registration of another process (pid {pid}; this worker's is {info.pid})"
        return ""

    def _table_unknown(self, info: ProcessInfo) -> bool:
        """supervisord does not answer (its table is UNKNOWN) while the machine runs: its table then says nothing
        of a worker, and the worker's own heartbeat in Redis does (a beating, busy worker was reported offline
        and not connected). The shutdown message keeps them offline: the machine is going away."""
        return info.state == "UNKNOWN" and self.phase != "shutdown"

    def _process_health(self, name: str, info: ProcessInfo | None) -> tuple[bool, str]:
        if name in self._by_process:
            return self._worker_health(self._by_process[name])
        if info is None:
            return False, "not started"
        if info.state != "RUNNING":
            reason = f"state {info.state.lower()}"
            return False, reason + (f": {info.errored_reason}" if info.errored_reason else "")
        verdict = self.health.get(name)
        if verdict is None:
            probed = name in {s.process for s in self.plan.services if s.probe} or (
                name == REDIS_PROCESS and self.plan.redis_probe is not None)
            return (False, "health check not passed yet") if probed else (True, "")
        return verdict[0], "" if verdict[0] else verdict[1]

    def _health_doc(self, now: float) -> dict[str, Any]:
        reasons: list[str] = []
        if self.phase != "ready":
            reasons.append(f"machine is {self.phase}")
        sup_reason = "supervisord is down" if not self.supervisord_up else self.supervisor_silent
        supervisor = {"healthy": not sup_reason, "reason": sup_reason}
        if sup_reason:
            reasons.append(sup_reason)
        redis = {"healthy": bool(self.redis_ok), "reason": "" if self.redis_ok else self.redis_reason}
        if not self.redis_ok:
            reasons.append(f"redis: {self.redis_reason}")
        disk_reason = self._disk_problem()
        disk = {"healthy": not disk_reason, "reason": disk_reason}  # a full disk fails every job's outputs
        if disk_reason:
            reasons.append(disk_reason)
        services: dict[str, Any] = {}
        for spec in self.plan.specs:
            info = self.processes.get(spec.name)
            healthy, reason = self._process_health(spec.name, info)
            services[spec.name] = {
                "healthy": healthy, "status": pm2_status(info.state if info else None, spec.kind == "worker"),
                "state": (info.state if info else "NOT_STARTED").lower(), "pid": info.pid if info and info.pid else None,
                "restarts": info.restarts if info else 0, "uptime": round(info.uptime) if info else 0,
                "kind": spec.kind, "required": spec.kind != "service" or spec.name in self.required,
                "reason": reason}
            if info is not None and info.errored_reason:
                services[spec.name]["errored_reason"] = info.errored_reason
            if not healthy and services[spec.name]["required"] and spec.kind != "worker":
                reasons.append(f"{spec.name}: {reason}")
        workers: dict[str, Any] = {}
        for w in self.workers.values():
            healthy, reason = self._worker_health(w)
            # another process's registration is not this worker's status, job or heartbeat
            row = None if self._others_registration(w, self.processes.get(w.process)) else w.row
            workers[w.worker_id] = {
                "healthy": healthy, "process": w.process, "status": (row.status if row else "") or "unknown",
                "current_job_id": row.current_job_id if row else "",
                "heartbeat_ttl_s": round(row.heartbeat_ttl_ms / 1000, 1) if row and row.heartbeat_ttl_ms > 0 else None,
                "last_heartbeat": row.last_heartbeat if row else "", "reason": reason}
            if not healthy:
                reasons.append(f"{w.worker_id}: {reason}")
        doc = {
            "healthy": not reasons, "phase": self.phase, "machine_id": self.plan.machine_id,
            "timestamp": _iso(now), "uptime_s": round(self.uptime(), 1), "reasons": reasons,
            "components": {"supervisor": supervisor, "redis": redis, "disk": disk},
            "services": services, "workers": workers,
            "hardware": self._hardware_doc(),
        }
        return doc

    def _hardware_doc(self) -> dict[str, Any]:
        hw = self.hardware
        if hw is None:
            return {}
        return {"cpu_percent": hw.cpu_percent, "memory_used_bytes": hw.memory_used_bytes,
                "memory_total_bytes": hw.memory_total_bytes, "disk_used_bytes": hw.disk_used_bytes,
                "disk_total_bytes": hw.disk_total_bytes,
                "gpus": [g.__dict__ for g in hw.gpus], "gpu_note": "" if hw.gpus else (hw.gpu_note or "no GPU")}

    def _status_doc(self, now: float) -> dict[str, Any]:
        s_workers, s_services, st_workers, st_services = {}, {}, {}, {}
        disk_full = bool(self._disk_problem())
        capabilities: list[str] = []
        for w in self.workers.values():
            for t in w.job_types:
                if t not in capabilities:
                    capabilities.append(t)
            key = f"{w.worker_id}.{w.service_type}"
            winfo = self.processes.get(w.process)
            sinfo = self.processes.get(w.service_process) if w.service_process else winfo
            w_healthy, _ = self._worker_health(w)
            if w.service_process:
                verdict = self.health.get(w.service_process)
                known = verdict is not None or (sinfo is not None and sinfo.state != "RUNNING")
                s_ok = bool(verdict and verdict[0]) and sinfo is not None and sinfo.state == "RUNNING"
            else:
                # (Redis answers a row for a worker that never registered: status "", not yet known)
                known = bool(w.row and w.row.status) or (winfo is not None and winfo.state not in UP)
                s_ok = w_healthy
            # A full state disk fails every job (its outputs, logs): no service of this machine is healthy.
            health = "unhealthy" if disk_full else "unknown" if not known else "healthy" if s_ok else "unhealthy"
            s_up = sinfo is not None and (sinfo.state == "RUNNING" if w.service_process else sinfo.state in UP)
            active = s_up and winfo is not None and winfo.state in UP
            row = None if self._others_registration(w, winfo) else w.row  # another process's: not this worker's
            status = (row.status if row and row.status else "offline") \
                if winfo and (winfo.state in UP or self._table_unknown(winfo)) else "offline"
            s_workers[w.worker_id] = {"worker_id": w.worker_id, "gpu_id": w.gpu, "worker_type": w.connector,
                                      "services": list(w.job_types), "connectors": [w.connector]}
            s_services[key] = {"worker_id": w.worker_id, "service_type": w.service_type,
                               "status": "active" if active else "inactive", "health": health}
            st_workers[w.worker_id] = {
                "is_connected": w_healthy, "status": status,
                "current_job_id": (row.current_job_id if row and status == "busy" else ""),
                "last_activity": (row.last_status_change or row.last_heartbeat) if row else "",
                "version": self.version}
            st_services[key] = {"status": "active" if active else "inactive", "health": health,
                                "pm2_status": pm2_status(sinfo.state if sinfo else None, not w.service_process)}
        # The GPUs the machine runs services on (a manifest's `machine.gpus: 2` on a host whose NVML reads none,
        # or fewer) or those NVML reads, whichever is more: the hardware reading alone said 0 beside workers on
        # GPU 0 and GPU 1 (helper-190).
        planned = len({s.gpu for s in self.plan.services if s.gpu is not None})
        gpu_count = max(planned, len(self.hardware.gpus) if self.hardware else 0)
        return {
            "machine_id": self.plan.machine_id, "timestamp": 0, "update_type": "periodic",
            "health_url": self.health_url,
            "structure": {"gpu_count": gpu_count, "capabilities": capabilities, "workers": s_workers,
                          "services": s_services},
            "status": {"machine": {"phase": self.phase, "uptime_ms": int(self.uptime() * 1000)},
                       "workers": st_workers, "services": st_services},
        }

    def _transition_signature(self) -> tuple:
        st = self.status_doc["status"]
        return (self.phase, bool(self.redis_ok), self.supervisor_silent, self._disk_problem(),
                tuple((k, v["is_connected"], v["status"], v["current_job_id"]) for k, v in st["workers"].items()),
                tuple((k, v["status"], v["health"], v["pm2_status"]) for k, v in st["services"].items()),
                # pid and restarts too: a crash restarted within one sweep keeps the state RUNNING
                tuple((n, i.state, i.pid, i.restarts) for n, i in sorted(self.processes.items())),
                tuple(sorted((n, v[0]) for n, v in self.health.items())))

    def _set_gauges(self) -> None:
        active_gauge, total_gauge = self.gauges
        active: dict[str, int] = {}
        total: dict[str, int] = {}
        for w in self.workers.values():
            active.setdefault(w.service_type, 0)
            total.setdefault(w.service_type, 0)
            info = self.processes.get(w.process)
            if info is not None and info.state in UP:
                total[w.service_type] += 1
                if w.row is not None and w.row.status == "busy" and not self._others_registration(w, info):
                    active[w.service_type] += 1
        for service, n in total.items():
            total_gauge.set(n, {"service": service})
            active_gauge.set(active[service], {"service": service})

    # -- the status page ---------------------------------------------------------------------------------
    def page(self) -> bytes:
        """The human status page, built at most once per state version."""
        if self._page[0] != self.version_no:
            self._page = (self.version_no, _render_page(self, json.loads(self.health_body)).encode())
        return self._page[1]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list[Any]], cls: list[str] | None = None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(
        f'<tr class="{e(cls[i]) if cls else ""}">' + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td>none</td></tr>'}</tbody></table>"


def _render_page(agg: Aggregator, health: dict[str, Any]) -> str:
    e = html.escape
    procs = [[n, s["kind"], s["status"], s["state"], s["pid"] or "-", s["restarts"], f"{s['uptime']}s",
              "yes" if s["healthy"] else s["reason"] or "no"] for n, s in health["services"].items()]
    procs_cls = ["ok" if s["healthy"] else "bad" for s in health["services"].values()]
    st = agg.status_doc["status"]
    services = [[k, v["status"], v["health"], v["pm2_status"]] for k, v in st["services"].items()]
    services_cls = ["ok" if v["health"] == "healthy" else "bad" for v in st["services"].values()]
    workers = [[wid, w["status"], w["current_job_id"] or "-", w["last_heartbeat"] or "-",
                "yes" if w["healthy"] else w["reason"]] for wid, w in health["workers"].items()]
    workers_cls = ["ok" if w["healthy"] else "bad" for w in health["workers"].values()]
    jobs = [[wid, w["current_job_id"]] for wid, w in health["workers"].items() if w["current_job_id"]]
    hw = health.get("hardware") or {}
    if hw.get("gpus"):
        gpu = _table(["GPU", "name", "utilisation", "memory", "temperature"],
                     [[g["index"], g["name"], f"{g['utilization_percent']:.0f}%",
                       f"{_size(g['memory_used_bytes'])} / {_size(g['memory_total_bytes'])}",
                       "-" if g["temperature_c"] is None else f"{g['temperature_c']:.0f} C"] for g in hw["gpus"]])
    else:
        gpu = f'<p id="gpu-note">{e(hw.get("gpu_note") or "no GPU")}</p>'
    host = ""
    if hw:
        host = (f"<p>CPU {hw['cpu_percent']:.0f}% &middot; memory {_size(hw['memory_used_bytes'])} / "
                f"{_size(hw['memory_total_bytes'])} &middot; disk {_size(hw['disk_used_bytes'])} / "
                f"{_size(hw['disk_total_bytes'])}</p>")
    verdict = "healthy" if health["healthy"] else "unhealthy"
    reasons = "".join(f"<li>{e(r)}</li>" for r in health["reasons"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="3">
<title>{e(agg.plan.machine_id)}: {verdict}</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse;margin:.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}th{{background:#f4f4f4}}
tr.ok td:last-child{{color:#176f2c}}tr.bad td:last-child{{color:#b00020}}.healthy{{color:#176f2c}}
.unhealthy{{color:#b00020}}</style></head>
<body><h1>{e(agg.plan.machine_id)} <span id="verdict" class="{verdict}">{verdict}</span></h1>
<p>phase <b id="phase">{e(health['phase'])}</b> &middot; up {health['uptime_s']:.0f}s &middot; updated {e(health['timestamp'])}
 &middot; refreshes every 3 s</p>
<ul id="reasons">{reasons}</ul>{host}
<h2>Processes</h2>{_table(["name", "kind", "pm2", "state", "pid", "restarts", "uptime", "healthy"], procs, procs_cls)}
<h2>Services</h2>{_table(["service", "status", "health", "pm2"], services, services_cls)}
<h2>Workers</h2>{_table(["worker", "status", "job", "last heartbeat", "healthy"], workers, workers_cls)}
<h2>Current jobs</h2>{_table(["worker", "job"], jobs)}
<h2>GPU</h2>{gpu}
</body></html>
"""

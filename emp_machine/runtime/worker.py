"""One worker process: claim -> connector -> progress -> complete / fail, with a lease, drain and cancel.

supervisord starts it as `emp-machine worker --manifest run/manifest.json --index i` with its identity in
the environment. The loop follows arq's shape (STYLE.md section 2): claim while capacity remains, one task
per job, finishing writes shielded so a cancellation cannot half-record a job. Idle, it waits on
`job_submitted` through JobSignals instead of polling, with a slow fallback sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from opentelemetry.trace import StatusCode
from redis.exceptions import AuthenticationError, AuthenticationWrongNumberOfArgsError, BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, OutOfMemoryError, ReadOnlyError, RedisError, ResponseError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeout

from emp_machine.connectors import _http
from emp_machine.connectors._http import job_dir
from emp_machine.connectors.base import Connector, ConnectorContext, ConnectorJob, JobResult
from emp_machine.connectors.registry import ConnectorRegistry
from emp_machine.errors import (ConnectorLoadError, DuplicateWorkerId, FatalJobError, JobCancelled, RetryableJobError,
                                ServiceUnreachable, classify, describe_exception, machine_local_hint)
from emp_machine.runtime import outputs
from emp_machine.runtime.identity import machine_secrets, pid_space, token_parts, token_pid_state, url_secrets
from emp_machine.runtime.jobs import (CANCELLED_ERROR, AsyncJobStore, Job, JobSignals, Ownership, active_key,
                                      cancel_and_wait, heartbeat_interval, heartbeat_key, job_key,
                                      redis_socket_options, statuses_json, worker_key)
from emp_machine.runtime.manifest import Manifest, WorkerGroup, expand_settings
from emp_machine.telemetry.redact import redact_text
from emp_machine.telemetry.redact import secret_values, set_secret_values

FALLBACK_SWEEP_S = 5.0  # an idle worker looks anyway this often, for anything a wake-up missed
PROGRESS_INTERVAL_S = 0.1  # at most one progress write per job per 100 ms (0 and 100 always go out)
PROGRESS_RETRY_S = 1.0  # a progress value Redis did not take is written again after this, unless a newer one came
PROGRESS_SETTLE_S = 0.5  # the completion waits this long at most for the progress write in flight
DRAIN_MARGIN_S = 2.0  # kept from stop_grace to hand a job back before supervisord's SIGKILL
TELEMETRY_SHUTDOWN_S = 5.0  # the last flush and shipping attempt at exit, at most (within stop_grace on a drain)
EXIT_WAIT_S = 1.0  # at exit, tasks still running (a connector run that ignores cancellation) get this long
REDIS_RETRY_MAX_S = 5.0
CANCEL_GRACE_S = 2.0  # a connector told to stop gets this long before its progress calls raise JobCancelled
HEALTH_TIMEOUT_S = 5.0  # a connector health check slower than this reads as unhealthy
# While its connector is unhealthy the worker claims nothing and checks this often, to resume soon after.
PAUSED_HEALTH_INTERVAL_S = 1.0

# A machine-local fault (a full disk, an unwritable output folder, no file descriptors left): claims pause and
# a probe write into the output folder is retried, first after LOCAL_PROBE_FIRST_S (doubled for each fault in
# a row, so a fault the probe does not see cannot bounce jobs fast), then backing off up to LOCAL_PROBE_MAX_S.
LOCAL_PROBE_FIRST_S = 1.0
LOCAL_PROBE_MAX_S = 30.0
LOCAL_FAULT_JOBS_MAX = 10_000  # ids remembered for the rule "a second such fault of one job is the job's"
PROGRESS_MESSAGE_MAX = 4096  # characters of a progress message stored and published; longer is cut, marked
_CUT = "… [truncated]"

_REDIS_DOWN = (RedisConnectionError, RedisTimeout, OSError)
# Redis refusing a command for a passing reason: maxmemory reached with noeviction (OOM), a replica after a
# failover (READONLY), another client's long script (BUSY), a restart loading its data (LOADING), a replica
# cut off from its primary (MASTERDOWN), a cluster moving slots (TRYAGAIN). A refused command never ran (a
# script is refused whole: nothing written), so it is retried as an outage is. redis-py strips the code of
# the replies it maps to a class, and leaves BUSY a plain ResponseError.
_REFUSAL_CLASSES = ((OutOfMemoryError, "OOM"), (ReadOnlyError, "READONLY"), (BusyLoadingError, "LOADING"),
                    (MasterDownError, "MASTERDOWN"), (TryAgainError, "TRYAGAIN"))
_REFUSAL_CODES = frozenset(("OOM", "READONLY", "BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN"))
_CREDENTIAL_CODES = frozenset(("NOAUTH", "WRONGPASS"))


# Worker instances running in this process (tests run several in one): a same-process instance in worker:{id}
# is alive exactly while it is here (see _predecessor_dead).
_LIVE_INSTANCES: set[str] = set()


def new_instance() -> str:
    """This worker process's token in worker:{id}: `pid-random-pidspace`."""
    return f"{os.getpid()}-{os.urandom(6).hex()}-{pid_space()}"


def _predecessor(instance: str) -> str:
    """What is known of the process that registered `instance` in worker:{id}: 'dead' (the same pid space
    and its pid is gone: a restart of this worker, taken over at once), 'unknown' (another host or container,
    or its pid is alive or reused: the heartbeat watch decides), or 'legacy' (a token not of this form, from
    an earlier version or a tool: taken over as before)."""
    state = token_pid_state(instance)
    if state in ("legacy", "foreign"):
        return "legacy" if state == "legacy" else "unknown"
    if token_parts(instance)[0] == os.getpid():
        return "unknown" if instance in _LIVE_INSTANCES else "dead"
    return "dead" if state == "dead" else "unknown"


def _reply_code(exc: BaseException) -> str:
    """The first word of an error reply redis-py left unmapped ("BUSY Redis is busy running a script...")."""
    return str(exc).split(" ", 1)[0].lstrip("-") if isinstance(exc, ResponseError) else ""


def redis_refusal(exc: BaseException) -> str | None:
    """The code of a passing refusal (OOM, READONLY, BUSY, LOADING, MASTERDOWN, TRYAGAIN), else None."""
    for cls, code in _REFUSAL_CLASSES:
        if isinstance(exc, cls):
            return code
    code = _reply_code(exc)
    return code if code in _REFUSAL_CODES else None


def credentials_refused(exc: BaseException) -> bool:
    """A wrong or missing password (AuthenticationError, or a NOAUTH / WRONGPASS reply)."""
    return isinstance(exc, (AuthenticationError, AuthenticationWrongNumberOfArgsError)) \
        or _reply_code(exc) in _CREDENTIAL_CODES


def redis_passing(exc: BaseException) -> bool:
    """Worth retrying: Redis unreachable, refusing our credentials, or refusing for a passing reason. Any
    other error reply (WRONGTYPE, a script's own error) would only come back: raised at once."""
    return isinstance(exc, _REDIS_DOWN) or credentials_refused(exc) or redis_refusal(exc) is not None


def redis_trouble(exc: BaseException) -> str:
    """What went wrong, in a log line's words: "Redis refused our credentials", "Redis refused the command
    (OOM)", "Redis unreachable", or "Redis error". Never the password (the replies do not carry it)."""
    if credentials_refused(exc):
        return "Redis refused our credentials"
    code = redis_refusal(exc)
    if code is not None:
        return f"Redis refused the command ({code})"
    if isinstance(exc, _REDIS_DOWN):
        return "Redis unreachable"
    return "Redis error"


class _CancelledAtComplete(JobCancelled):
    """The complete script found the job cancelled by the API: it already released the job (and wrote the
    timeline's `cancelled` event), so nothing more is sent for it."""


@dataclass(frozen=True)
class _Escaped:
    """A BaseException (SystemExit, KeyboardInterrupt, GeneratorExit, a plugin's own) out of a connector call,
    boxed on its way out of the call's task: raised out of a task, the event loop re-raises SystemExit and
    KeyboardInterrupt and the worker ends (supervisord restarts it into the same job, forever)."""

    error: BaseException


async def _boxed(method, *args):
    """Call a connector's coroutine method and await it; a BaseException of its own comes back as _Escaped.
    Called here, not by the caller, so that one that raises before returning a coroutine (a plain def) is
    boxed too. The worker handles SIGINT and SIGTERM itself (signal handlers), so a KeyboardInterrupt here
    can only be the plugin's."""
    try:
        return await method(*args)
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:  # noqa: BLE001 - see above
        return _Escaped(exc)


def _escaped_error(exc: BaseException) -> FatalJobError:
    """A connector's BaseException as its job's failure: not retryable, naming it ("connector raised
    KeyboardInterrupt")."""
    error = FatalJobError(f"connector raised {describe_exception(exc)}")
    error.__cause__ = exc
    return error


def redact_secrets(text: str, secrets: tuple[str, ...]) -> str:
    """`text` as it may leave the worker: the group's secret values masked exactly (secret_values; _http.redact
    leaves those under 4 characters, which would mangle ordinary words), then pattern-based redaction (keys,
    bearer tokens, URL passwords...)."""
    return redact_text(_http.redact(text, secrets))


class _StoppedAtStart(Exception):
    """SIGTERM (or SIGINT) while start-up was still waiting for Redis: nothing ran, nothing to hand back."""


@dataclass(frozen=True)
class WorkerIdentity:
    """Who this process is, from the environment the machine gave it (plan.py writes these variables)."""

    index: int
    worker_id: str
    machine_id: str
    group: str
    redis_url: str
    service_port: int | None

    @classmethod
    def from_environ(cls, manifest: Manifest, index: int, environ: Mapping[str, str]) -> "WorkerIdentity":
        machine_id = environ.get("MACHINE_ID") or manifest.machine.id
        group = environ.get("WORKER_GROUP") or next(iter(manifest.workers), "")
        port = environ.get("EMP_SERVICE_PORT")
        return cls(index=index, worker_id=environ.get("WORKER_ID") or f"{machine_id}-worker-{index}",
                   machine_id=machine_id, group=group,
                   redis_url=environ.get("REDIS_URL") or manifest.redis.url,
                   service_port=int(port) if port else None)


def platform_grace(environ: Mapping[str, str]) -> float | None:
    """The seconds the platform leaves between its SIGTERM and its SIGKILL, when told: EMP_DRAIN_SECONDS, else
    RAILWAY_DEPLOYMENT_DRAINING_SECONDS. None when neither holds a positive number."""
    for name in ("EMP_DRAIN_SECONDS", "RAILWAY_DEPLOYMENT_DRAINING_SECONDS"):
        try:
            value = float(environ.get(name) or "")
        except ValueError:
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


def probed_hardware(probe: Any) -> dict[str, Any]:
    """The capability `hardware` object from a hardware.probe() reading: what the claim's matching reads
    (cpu_cores, ram_gb, gpu_memory_gb) and the contract's gpu_model. GPU keys only when there is a GPU."""
    hardware: dict[str, Any] = {"cpu_cores": probe.cpu_count, "ram_gb": round(probe.memory_total_bytes / 2**30, 1)}
    if probe.gpus:
        hardware.update(gpu_memory_gb=round(probe.gpu_memory_gb, 1), gpu_model=probe.gpu_model)
    return hardware


def capabilities(ident: WorkerIdentity, group: WorkerGroup, hardware: Mapping[str, Any]) -> dict[str, Any]:
    """The capability JSON the claim matches against (contract: absent keys omitted, never null).

    The manifest's `capabilities` add keys; an object it gives for a key we fill (`hardware`,
    `performance`) overrides ours key by key, so `hardware: {gpu_model: x}` keeps the probed RAM and
    cores. A null there removes the key (a JSON null would count as present in the claim's Lua)."""
    types = list(group.job_types or (group.connector,))
    caps: dict[str, Any] = {
        "worker_id": ident.worker_id, "machine_id": ident.machine_id, "services": types,
        "job_service_required_map": types, "hardware": dict(hardware),
        "performance": {"concurrent_jobs": group.concurrency},
    }
    for key, value in group.capabilities.items():
        if isinstance(value, Mapping) and isinstance(caps.get(key), dict):
            value = {**caps[key], **value}
        if isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if v is not None}
        if value is None:
            caps.pop(key, None)
        else:
            caps[key] = value
    return caps


class _Progress:
    """The connector's progress callback for one job: throttled writes, cancellation surfaced as JobCancelled.

    The latest value is kept and written at most every PROGRESS_INTERVAL_S; 0 and 100 go out at once (once
    each: the claim already announced 0, and the completion records 100 unless the connector did). Writes go
    out off the connector's path, one at a time: a call returns at once, and a value due while a write is in
    flight waits for it, a newer one replacing it (with Redis 100 ms away, each awaited write held a simulation
    job's steps and a service's message reader for a round trip). Progress never goes backwards on the wire: a
    value below one already taken is dropped. One Redis did not take is written again PROGRESS_RETRY_S later
    unless a newer one came, and the completion records 100 unless Redis took a 100. Each message carries the
    job's workflow current_step / total_steps (from its hash) and an estimated_completion extrapolated from the
    rate so far."""

    def __init__(self, worker: "Worker", job: Job):
        self.worker, self.job = worker, job
        self.task = asyncio.current_task()  # the job's task (built in _run_job): `running` names the newest attempt
        self.started = time.monotonic()  # the claim's reply: the rate that estimated_completion extrapolates
        self.last_sent = 0.0  # when the newest value was handed to the writer
        self.highest = 0.0  # the highest value taken (handed over or throttled); the claim announced 0 (contract)
        self.written_percent = 0.0  # the newest value Redis took (a write refused or lost leaves it)
        self.seq = 0  # numbers every call
        self.sent_seq = 0  # the newest call written
        self.due: tuple[int, float, str] | None = None  # to be written as soon as the write in flight ends
        self.pending: tuple[int, float, str] | None = None  # throttled: handed over by the flusher
        self.flusher: asyncio.Task | None = None
        self.writer: asyncio.Task | None = None
        self.closed = False  # the connector's time is over (it returned, or its deadline passed): nothing is written
        self.abandoned = False  # the worker stopped waiting for the connector (_call_connector): its calls raise

    def _stopping(self) -> bool:
        """True once the job is to stop (cancelled or lost). The connector was told through cancel() and
        stops its service-side work its own way (e.g. A1111's /interrupt): raising here at once would
        unwind it before it could. Only a connector still reporting progress CANCEL_GRACE_S later, one
        that ignores cancel(), gets JobCancelled from this callback (and its run is cancelled then:
        _call_connector)."""
        since = self.worker.stop_requested.get(self.job.id)
        if since is None:
            return False
        if time.monotonic() - since > CANCEL_GRACE_S:
            raise JobCancelled(f"job {self.job.id} was cancelled")
        return True

    async def __call__(self, percent: float, message: str = "") -> None:
        if self.abandoned:  # a connector still running after the worker gave its job up: told to stop again
            raise JobCancelled(f"job {self.job.id} is no longer running on this worker")
        self._take(percent, message)
        # Every call is a turn of the event loop (~2 us): the writes go out in a task, so without it a connector
        # that only computes between calls held the loop the whole job: no heartbeat renewed its lease (the
        # job was reaped and run again elsewhere while it ran here), no cancel was read. One turn a call is
        # enough for the heartbeat's few steps; a yield only when a value was handed over (every 100 ms at
        # most) was not: the lease of a 1 s-lease worker was not renewed in 3 s of such a job.
        await asyncio.sleep(0)

    def _take(self, percent: float, message: str) -> None:
        """The value of one call: dropped, throttled or handed to the writer."""
        if self._stopping() or self.closed:
            return  # nothing more is written for a job that is not ours to report on
        percent = float(percent)
        if not math.isfinite(percent):
            return  # NaN or infinity is no progress (clamped, NaN read as 100: the job looked finished)
        percent = max(0.0, min(100.0, percent))
        if percent < self.highest:
            return  # never backwards on the wire (a connector's own counter starting over at a new stage)
        if percent == self.highest and percent in (0.0, 100.0):
            return  # announced already (the claim announces 0; the worker and the connector both report 100)
        if message and isinstance(message, str):
            # published: the secrets masked first (a cut through one would publish its start), then cut (a
            # connector's 1 MB message, stored in the job hash and published whole, reached every subscriber)
            message = self.worker._redact(message)
            if len(message) > PROGRESS_MESSAGE_MAX:
                message = message[:PROGRESS_MESSAGE_MAX - len(_CUT)] + _CUT
        self.highest = percent
        self.seq += 1
        now = time.monotonic()
        if percent in (0.0, 100.0) or now - self.last_sent >= PROGRESS_INTERVAL_S:
            self._hand_over(self.seq, percent, message)
        else:
            self.pending = (self.seq, percent, message)
            if self.flusher is None or self.flusher.done():
                delay = PROGRESS_INTERVAL_S - (now - self.last_sent)
                self.flusher = asyncio.create_task(self._flush_later(delay))

    def _hand_over(self, seq: int, percent: float, message: str) -> None:
        """Give the writer a value to write now (replacing one still waiting for the write in flight)."""
        self.pending = None
        self.due = (seq, percent, message)
        self.last_sent = time.monotonic()
        if self.writer is None or self.writer.done():
            # kept by the worker: it may outlive this job's task by one round trip
            self.writer = self.worker._keep_side_task(asyncio.create_task(self._write()))

    async def _flush_later(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
        if self.pending is not None and not self.closed:
            self._hand_over(*self.pending)

    async def _write(self) -> None:
        while self.due is not None and not self.closed:
            seq, percent, message = self.due
            self.due = None
            try:
                await self._send(seq, percent, message)
            except Exception as exc:  # noqa: BLE001 - off the connector's path, nothing else would hear of it
                self.worker.log.warning("progress not recorded", extra={"fields": {
                    "job_id": self.job.id, "error": f"{type(exc).__name__}: {exc}"[:300]}})

    async def _send(self, seq: int, percent: float, message: str) -> None:
        if seq <= self.sent_seq:
            return  # a newer value went out meanwhile
        self.sent_seq = seq
        try:
            own = await self.worker.store.progress(
                self.job.id, self.worker.ident.worker_id, percent, message, current_step=self.job.current_step,
                total_steps=self.job.total_steps, estimated_completion=self.estimate(percent),
                token=self.job.token)
        except RedisError as exc:  # progress is advisory: a Redis blip must not fail the job
            self.worker.log.warning("progress not recorded", extra={"fields": {
                "job_id": self.job.id, "error": self.worker._redis_error(exc)}})
            if self.due is None and self.pending is None and not self.closed:
                # nothing newer to say: this value again later (a quiet stage would show it stale till its end)
                self.sent_seq = seq - 1
                self.pending = (seq, percent, message)
                if self.flusher is None or self.flusher.done():
                    self.flusher = asyncio.create_task(self._flush_later(PROGRESS_RETRY_S))
            return
        if own is Ownership.OK:
            self.written_percent = percent
        if own is Ownership.OK or self.worker.running.get(self.job.id) is not self.task:
            return  # ours, or this attempt was already superseded here: a stop now would hit the newer one
        self.worker.request_stop(self.job.id, lost=own is not Ownership.CANCELLED, vanished=own is Ownership.MISSING)

    def estimate(self, percent: float) -> str:
        """When the job should end at the rate it went so far (ISO-8601 UTC), '' before any progress: the
        contract's estimated_completion is then left out rather than guessed."""
        if percent <= 0:
            return ""
        remaining = (time.monotonic() - self.started) * (100.0 - percent) / percent
        if remaining > 30 * 86400:
            return ""  # a crawl of 0.0001 % is no estimate (and would overflow a datetime)
        eta = datetime.now(UTC) + timedelta(seconds=remaining)
        return eta.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def close(self) -> None:
        """Nothing more is written: a value still waiting (throttled, or behind the write in flight) is dropped."""
        self.closed = True
        self.due = self.pending = None
        if self.flusher is not None:
            self.flusher.cancel()

    async def settle(self) -> None:
        """close(), then wait for the write in flight, up to PROGRESS_SETTLE_S: whether Redis took a 100 decides
        whether the completion records 100 itself (`written_percent`). A write still out then (Redis slow, its
        connection lost) does not hold the completion and the job's slot: should it land after the
        completion it is refused as not ours, and the completion has recorded 100."""
        self.close()
        if self.writer is not None and not self.writer.done():
            await asyncio.wait({self.writer}, timeout=PROGRESS_SETTLE_S)


class Worker:
    def __init__(self, manifest: Manifest, ident: WorkerIdentity, client: aioredis.Redis, connector: Connector,
                 telemetry: Any, hardware: Mapping[str, Any], secrets: tuple[str, ...] | None = None):
        self.manifest = manifest
        self.ident = ident
        self.group = manifest.workers[ident.group]
        # Exact values masked in every message the worker writes (see secret_values)
        self.secrets = secret_values(self.group.settings, self.group.env, os.environ) if secrets is None \
            else secrets
        self.redis = client
        self.store = AsyncJobStore(client, lease_s=self.group.lease)
        self.connector = connector
        self.telemetry = telemetry
        self.log = telemetry.logger("emp.worker")
        self.caps = capabilities(ident, self.group, hardware)
        self.job_types = list(self.caps["services"])
        self.slots = asyncio.Semaphore(self.group.concurrency)
        self.running: dict[str, asyncio.Task] = {}  # job id -> the task of its newest attempt here
        # Job tasks at their finishing write: their slot is free already. Tasks, not job ids: the job may be
        # claimed again while its older attempt's finishing write still retries (see _supersede).
        self.slot_freed: set[asyncio.Task] = set()
        self.cancelled: set[str] = set()  # the API cancelled these: stop, never complete
        self.lost: set[str] = set()  # the lease went to the reaper (or the hash vanished): stop, write nothing
        self.vanished: set[str] = set()  # of `lost`, those whose job hash is gone (Redis lost its data)
        self._registering = False  # a _register_again in flight
        self.stop_requested: dict[str, float] = {}  # job id -> when the connector was told to stop it
        self._stop_wakers: dict[str, Callable[[], None]] = {}  # job id -> called by request_stop (_call_connector)
        self.orphans_seen: set[str] = set()  # in jobs:active for us but not running here, at the last heartbeat
        self.draining = asyncio.Event()
        self.drain_started: float | None = None  # monotonic time of the first SIGTERM / SIGINT
        self.status = "offline"  # as last written to worker:{id}
        # This process's token in worker:{id}: its exit (offline) write leaves a same-id successor alone.
        # pid-random-pidspace (new_instance): a restart of this worker (same pid space, the old pid dead) takes
        # the id over at once; another live process holding it refuses this one's start (_check_duplicate).
        self.instance = new_instance()
        self.duplicate_of: str | None = None  # the other live process's instance, once one was seen
        self._foreign_holder: str | None = None  # another live-looking token found in worker:{id} at the last beat
        self._status_lock = asyncio.Lock()
        self._side_tasks: set[asyncio.Task] = set()
        self._abandoned: set[asyncio.Task] = set()  # connector runs that ignored their cancellation (never waited for)
        self._signals: JobSignals | None = None
        self.connector_statuses: dict[str, Any] = {}  # as last written to worker:{id}
        # Set while the connector's last health check said healthy: the claim loop claims only then. Cleared
        # for a moment while a job's ServiceUnreachable is checked (no claim meanwhile), and while unhealthy.
        self.service_ok = asyncio.Event()
        self.service_ok.set()
        self.claims_paused_since: float | None = None  # monotonic; None while claims go on (logged once each way)
        self._health_checked_at = 0.0  # monotonic time of the last health check (the watch's or a job's)
        self._health_wake = asyncio.Event()  # a pause: the health watch shortens its wait at once
        self._health_abandoned: asyncio.Task | None = None  # a check that timed out and ignored its cancellation
        self._health_cleared = 0  # counts jobs that found the service gone (see _health_watch)
        self._registered = False  # its registration landed: a stop from then on writes it offline
        self._start_trouble = "Redis unreachable"  # why start-up last waited (redis_trouble), for its stop line
        # Set while this machine can store outputs: cleared by a machine-local fault (a full disk, an unwritable
        # output folder...), set again once a probe write into the output folder passes (_local_watch).
        self.local_ok = asyncio.Event()
        self.local_ok.set()
        self._local_faults = 0  # machine-local faults in a row (reset by a completed job)
        self._local_fault_jobs: set[str] = set()  # jobs handed back here for a machine-local fault
        self._local_watcher: asyncio.Task | None = None
        self._own_context = contextvars.Context()  # run() takes its own (_own_task)

    # -- the loop ----------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        signals = self._signals = JobSignals(self.redis, self.job_types, on_cancel=self._on_cancel,
                                             on_resubscribed=self._on_resubscribed)
        try:
            await self._register()
            await self._release_orphans(await self._retrying_start(self.store.active_jobs, self.ident.worker_id),
                                        "worker restarted")
            await self._start_or_drain(signals.start())
            await self._check_output_dir()
        except DuplicateWorkerId:
            _LIVE_INSTANCES.discard(self.instance)
            await signals.close()
            await self._close_connector()
            raise  # the CLI prints it and exits non-zero: supervisord shows the worker errored
        except _StoppedAtStart:
            # Told to stop while Redis was unreachable: exit now rather than wait for Redis (supervisord
            # would SIGKILL us at stopwaitsecs) and then register a worker that was told to stop. Told to stop
            # once registered (a stop just after the start), it goes offline as any stopping worker does: it
            # was left `idle` with a live heartbeat, which the machine, stopping, does not correct.
            if self._registered:
                await self._go_offline()
            _LIVE_INSTANCES.discard(self.instance)
            await signals.close()
            await self._close_connector()
            self.log.info(f"worker stopped before start-up finished ({self._start_trouble})",
                          extra={"event_type": "worker.stopped"})
            return 0
        self._own_context = contextvars.copy_context()  # the worker's, for its tasks started inside a job's
        background = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._health_watch()),
                      asyncio.create_task(self._reaper())]
        # spans_per_second: this process's share of the manifest's budget (split across the machine's processes)
        self.telemetry.events.emit("worker.spawned", worker_id=self.ident.worker_id,
                                   connector=self.group.connector, job_types=self.job_types,
                                   spans_per_second=round(self.telemetry.sampler.target, 3))
        try:
            await self._claim_loop(signals)
            await self._drain()
        finally:
            await cancel_and_wait(background)
            await signals.close()
            await self._go_offline()
            _LIVE_INSTANCES.discard(self.instance)
            await self._close_connector()
        self.log.info("worker stopped", extra={"event_type": "worker.stopped"})
        if self.duplicate_of is not None:
            raise DuplicateWorkerId(self._duplicate_message(self.duplicate_of))
        return 0

    def _redis_error(self, exc: BaseException) -> str:
        """A Redis error for a log line's `error` field: what went wrong, then what Redis or the client said,
        redacted (a connection error can quote the URL). Credentials refused say which setting to fix."""
        if credentials_refused(exc):  # no "key: value" shape: redaction would take "Authentication...: x"
            return self._redact(f"{redis_trouble(exc)} ({exc or type(exc).__name__}); fix the password in the "
                                f"Redis URL (redis.url in the manifest, or REDIS_URL)")
        return self._redact(f"{redis_trouble(exc)}: {type(exc).__name__}: {exc}")

    def _redact(self, text: str) -> str:
        return redact_secrets(text, self.secrets)

    async def _close_connector(self) -> None:
        """connector.close() at stop: whatever it raises is one warning line, never a traceback or an exit."""
        try:
            outcome = await _boxed(self.connector.close)
            error = outcome.error if isinstance(outcome, _Escaped) else None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - stopping goes on
            error = exc
        if error is not None:
            self.log.warning(self._redact(f"connector {self.group.connector} failed to close: "
                                          f"{describe_exception(error)}"),
                             extra={"event_type": "worker.connector_close_failed"})

    async def _claim_loop(self, signals: JobSignals) -> None:
        backoff = 0.1
        while not self.draining.is_set():
            if not await self._service_up():  # its service is down: claimed, a job could only fail
                return
            if not await self._wait_or_drain(self.local_ok):  # no disk space, an unwritable output folder...
                return
            if not await self._acquire_slot():
                return
            # a job found the service gone (or this machine at fault) while this waited for its slot
            if not self.service_ok.is_set() or not self.local_ok.is_set():
                self.slots.release()
                continue
            hints = signals.arm()
            try:
                job = await self.store.claim(self.caps, hints=hints, start=True)  # claimed and started at once
                backoff = 0.1
            except RedisError as exc:
                self.slots.release()
                self.log.warning("claim failed", extra={"fields": {"error": self._redis_error(exc)}})
                await self._sleep_or_drain(backoff)
                backoff = min(backoff * 2, REDIS_RETRY_MAX_S)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug or a reply we cannot read must not end the loop
                # (the worker would exit with its jobs claimed, and supervisord would restart it into the same)
                self.slots.release()
                self.log.error("claim failed unexpectedly; retrying", exc_info=exc,
                               extra={"fields": {"error": self._redact(f"{type(exc).__name__}: {exc}")}})
                await self._sleep_or_drain(backoff)  # backing off: never a tight loop of failing claims
                backoff = min(backoff * 2, REDIS_RETRY_MAX_S)
                continue
            if job is None:
                self.slots.release()
                # A job this worker just failed comes back to it when no other worker took it meanwhile.
                back_in = self.store.claimable_in_s
                await signals.wait(FALLBACK_SWEEP_S if back_in is None else min(back_in, FALLBACK_SWEEP_S))
                continue  # a drain interrupts the wait (_on_signal)
            task = asyncio.create_task(self._run_job(job, after=self._supersede(job.id)), name=f"job-{job.id}")
            self.running[job.id] = task
            task.add_done_callback(lambda t, job_id=job.id: self._job_done(job_id, t))

    async def _service_up(self) -> bool:
        """Wait, holding no slot, until the connector's health says healthy; False when a drain began first."""
        return await self._wait_or_drain(self.service_ok)

    async def _wait_or_drain(self, event: asyncio.Event) -> bool:
        """Wait, holding no slot, until `event` is set; False when a drain began first."""
        if event.is_set():
            return True
        up = asyncio.ensure_future(event.wait())
        drain = asyncio.ensure_future(self.draining.wait())
        await asyncio.wait({up, drain}, return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        drain.cancel()
        return not self.draining.is_set()

    async def _acquire_slot(self) -> bool:
        """Wait for a free slot; False when draining started first (then no slot is held)."""
        if not self.slots.locked():  # a slot is free: taken at once, without the two racing tasks below
            await self.slots.acquire()
            return True
        acquire = asyncio.create_task(self.slots.acquire())
        drain = asyncio.create_task(self.draining.wait())
        await asyncio.wait({acquire, drain}, return_when=asyncio.FIRST_COMPLETED)
        drain.cancel()
        if not acquire.done():
            acquire.cancel()
        try:
            await acquire
        except asyncio.CancelledError:
            return False
        if self.draining.is_set():
            self.slots.release()
            return False
        return True

    def _supersede(self, job_id: str) -> asyncio.Task | None:
        """A job just claimed is still `running` here as an older attempt (its lease was reaped, or its
        finishing write still retries after a lost reply, and the job came back to this worker). That
        attempt is over: its writes carry its claim token, so they change nothing now. One still in its
        connector is told to stop and returned, for the new attempt to wait on: connectors know jobs by id,
        so two runs of one id must not overlap. One at its finishing write is left to it (None)."""
        prev = self.running.get(job_id)
        if prev is None:
            return None
        if prev in self.slot_freed:
            self._forget_stop(job_id)  # its marks were read before its write: the new attempt starts clean
            return None
        self.request_stop(job_id, lost=True)
        return prev

    def _forget_stop(self, job_id: str) -> None:
        self.cancelled.discard(job_id)
        self.lost.discard(job_id)
        self.vanished.discard(job_id)
        self.stop_requested.pop(job_id, None)

    def _job_done(self, job_id: str, task: asyncio.Task) -> None:
        if self.running.get(job_id) is task:  # else a newer attempt of the job runs here, with its own marks
            del self.running[job_id]
            self._forget_stop(job_id)
        if task in self.slot_freed:
            self.slot_freed.discard(task)
        else:
            self.slots.release()
        if not task.cancelled() and task.exception() is not None:
            self.log.error("job task failed unexpectedly", exc_info=task.exception(),
                           extra={"fields": {"job_id": job_id}})

    def _free_slot(self, task: asyncio.Task) -> None:
        """The connector is done with the job and its outcome is ready to record (a result's blobs already
        spilled to files): its slot goes to the next claim now, while the finishing write is in flight, so
        the claim's round trip overlaps it instead of following it (jobs/s). Not earlier: a slot freed before
        a long spill let the worker hold more claimed jobs than `concurrency` for as long as the spill took.
        The job stays in `running` (a drain still waits for its write; Redis keeps the worker busy while
        either job is active). Once per task; `_job_done` releases the slot of a task that never got here."""
        # A task already done is _job_done's to release: a shielded _finish_ok may outlive its cancelled task.
        if task not in self.slot_freed and not task.done():
            self.slot_freed.add(task)
            self.slots.release()

    def stop_grace(self) -> float:
        """The group's stop_grace, or less when the platform kills sooner: EMP_DRAIN_SECONDS, else Railway's
        RAILWAY_DEPLOYMENT_DRAINING_SECONDS (the time between its SIGTERM and its SIGKILL). `docker stop`
        kills after 10 s by default: with a 60 s stop_grace the job was still running at the SIGKILL, handed
        back only when its lease expired."""
        return min(self.group.stop_grace, platform_grace(os.environ) or math.inf)

    def shutdown_budget(self) -> float:
        """What telemetry's last flush and shipping may take at exit: TELEMETRY_SHUTDOWN_S, or on a drain what
        is left of stop_grace (less a moment for the exit), so a collector that never answers does not keep the
        worker until supervisord's SIGKILL. The records stay in the buffer for the next start either way."""
        if self.drain_started is None:
            return TELEMETRY_SHUTDOWN_S
        left = self.drain_started + self.stop_grace() - 0.5 - time.monotonic()
        return min(TELEMETRY_SHUTDOWN_S, max(0.2, left))

    async def _go_offline(self) -> None:
        """The exit's offline write. One conditional write: a same-id successor's status and connector statuses
        stay its own. Within what is left of stop_grace: a stalled Redis kept a drained worker past its
        SIGKILL."""
        async with self._status_lock:
            try:
                await asyncio.wait_for(self.store.set_worker_status(
                    self.ident.worker_id, "offline", instance=self.instance,
                    connector_statuses={name: {**entry, "status": "inactive"}
                                        for name, entry in self.connector_statuses.items()}),
                    self._offline_write_budget())
            except (RedisError, TimeoutError):
                pass

    def _offline_write_budget(self) -> float | None:
        """The exit's offline write: unbounded but by the client's socket timeout, or on a drain what is left of
        stop_grace less a second for telemetry's flush and the exit."""
        if self.drain_started is None:
            return None
        return max(0.1, self.drain_started + self.stop_grace() - 1.0 - time.monotonic())

    def drain_budget(self) -> tuple[float, float]:
        """(grace, margin): running jobs get `grace` to finish, then `margin` is left to hand them back
        before supervisord's SIGKILL (stopwaitsecs = stop_grace). The margin shrinks with a short grace."""
        budget = self.stop_grace()
        margin = min(DRAIN_MARGIN_S, budget / 2)
        return budget - margin, margin

    async def _drain(self) -> None:
        """Let running jobs finish within the grace; hand the rest back without counting an attempt."""
        if not self.running:
            return
        grace, margin = self.drain_budget()
        ends = time.monotonic() + grace + margin / 2  # the rest: the offline write and closing, before SIGKILL
        self.log.info("draining", extra={"event_type": "worker.draining",
                                         "fields": {"running": list(self.running), "grace_s": grace}})
        _, pending = await asyncio.wait(list(self.running.values()), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=margin)
        if self._side_tasks:  # the connector's cancel() calls, made after the hand-backs: bounded by the budget
            await asyncio.wait(set(self._side_tasks), timeout=max(0.0, ends - time.monotonic()))

    # -- one job -----------------------------------------------------------------------------------------
    async def _run_job(self, job: Job, after: asyncio.Task | None = None) -> None:
        """`after`: an older attempt of the same job still in its connector, told to stop (_supersede):
        this one starts once it ended, without its stop marks."""
        if after is not None:
            try:
                await asyncio.wait({after})
            except asyncio.CancelledError:
                await asyncio.shield(self._hand_back_at_stop(job))
                raise
            self._forget_stop(job.id)
        tel = self.telemetry
        job_type = job.service_required
        started = time.monotonic()
        steps: dict[str, float] = {}  # step -> ms on this worker, kept in the job's timeline
        progress = _Progress(self, job)
        # Counts a producer wrote as no number ("x") fail this job alone, below: raised out here they would
        # leave it claimed, handed back by the heartbeat and claimed again forever.
        try:
            attempt, malformed = job.retry_count + 1, None
            _ = job.max_retries
        except ValueError as exc:
            attempt, malformed = 0, FatalJobError(f"malformed job: {exc}")
        if not job.id:  # no key the contract can name it by (job:, its events, jobs:active): failed for good
            attempt, malformed = 0, FatalJobError("malformed job: its id is empty (jobs:pending held ''); its "
                                                  "producer must give every job an id")
        if job.not_utf8:  # bytes another producer wrote (the claim reads them undecoded: see jobs._claimed_job)
            attempt, malformed = 0, FatalJobError(
                f"malformed job: job:{job.id} holds bytes that are not UTF-8 text in {', '.join(job.not_utf8)}; "
                f"its producer must write every job field as UTF-8")
        with tel.job_span(job.id, job_hash=job.fields, job_type=job_type,
                          attributes={"job.attempt": attempt} if attempt else None) as span:
            try:
                if malformed is not None:
                    raise malformed
                # The claim already marked it in_progress (one round trip less per job); a cancel or a lost
                # lease from here on is seen by the progress and finishing writes.
                tel.events.emit("job.started", job_id=job.id, job_type=job_type, attempt=attempt)
                mark = time.monotonic()
                with tel.tracer.start_as_current_span("task.preprocessing"):
                    try:
                        payload = job.payload()
                    except ValueError as exc:
                        raise FatalJobError(f"malformed job payload: not JSON ({exc})") from None
                    except RecursionError:  # valid JSON, nested past Python's limit: not the connector's fault
                        raise FatalJobError("malformed job payload: JSON nested too deeply to read (past Python's "
                                            "recursion limit)") from None
                    connector_job = ConnectorJob(id=job.id, service_required=job_type, payload=payload,
                                                 attempt=attempt)
                steps["preprocessing"] = (time.monotonic() - mark) * 1000
                timeout = self.group.job_timeouts.get(job_type, self.group.job_timeout)
                with tel.tracer.start_as_current_span("service.call", attributes={"connector": self.group.connector}):
                    # The service's work is a child of this span: its context goes in every request's headers.
                    headers = tel.http_headers(job.id)
                    connector_job = replace(connector_job, traceparent=headers.get("traceparent"), headers=headers)
                    mark = time.monotonic()
                    returned = False
                    try:
                        result = await self._call_connector(job, connector_job, progress, timeout)
                        returned = True
                    finally:
                        steps["service_call"] = (time.monotonic() - mark) * 1000
                        if not returned:  # failed: the slot goes to the next claim while the failure is written
                            self._free_slot(asyncio.current_task())
                with tel.tracer.start_as_current_span("result.postprocessing"):
                    await progress.settle()  # a value still waiting is overtaken by the completion
                    own = await asyncio.shield(self._finish_ok(job, result, progress.written_percent < 100, steps,
                                                               asyncio.current_task()))
                if own is Ownership.OK:
                    self._local_faults = 0
                    tel.metrics.job_finished(job_type, "completed", time.monotonic() - started, self.ident.worker_id)
                    tel.events.emit("job.completed", job_id=job.id, job_type=job_type,
                                    duration_ms=round((time.monotonic() - started) * 1000, 1))
                else:
                    tel.events.emit("job.not_completed", level=logging.WARNING, job_id=job.id, ownership=str(own))
                    if own is Ownership.MISSING:  # the hash is gone: so may be this worker's registration
                        self.register_again_soon()
            except asyncio.CancelledError as exc:
                if not asyncio.current_task().cancelling() and not self.draining.is_set():
                    # Not this task's cancellation but the connector's own (an inner task of its was
                    # cancelled): its failure. Taken for a drain, the job went back uncounted, forever.
                    await self._job_error(job, exc, span, started, steps)
                    return
                # drain ran out of time, or the worker is stopping: the job goes back, no attempt counted. Not
                # its failure, so not an error trace either (OK is final: the escaping CancelledError does
                # not turn it into ERROR, and the tracer does not count its cancelled calls as a failed job).
                span.set_attribute("job.handed_back", True)
                span.set_status(StatusCode.OK)
                await asyncio.shield(self._hand_back_at_stop(job))
                raise
            except _CancelledAtComplete as exc:
                self.log.info("job stopped without completing", extra={
                    "event_type": "job.cancelled", "fields": {"job_id": job.id, "reason": str(exc)}})
                self._count_cancelled(job, span)
            except JobCancelled as exc:
                await asyncio.shield(self._finish_cancelled(job, str(exc), time.monotonic() - started, span))
            except RedisError as exc:
                # Only our own finishing writes reach Redis (connectors never do): an outage that outlasted
                # the retries is not the job's failure. The job stays in jobs:active; once Redis is back the
                # heartbeat hands it back (a stray) or the reaper re-queues it: run again, never lost.
                self.log.error(f"job result not recorded: {redis_trouble(exc)}; the job will run again",
                               extra={"fields": {"job_id": job.id, "error": self._redis_error(exc)}})
            except Exception as exc:  # noqa: BLE001 - a connector cannot kill the worker (STYLE.md 3)
                await self._job_error(job, exc, span, started, steps)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
                    raise  # not the connector's: one out of connector.run comes boxed (_connector_run)
                # SystemExit (or a plugin's own BaseException) out of a connector: the event loop would
                # re-raise SystemExit and end the worker with its jobs claimed. Its job's failure instead.
                await self._job_error(job, exc, span, started, steps)
            finally:
                progress.close()

    async def _call_connector(self, job: Job, connector_job: ConnectorJob, progress: _Progress,
                              timeout: float) -> JobResult:
        """`connector.run` in a task of its own, watched: the job's outcome, bounded whatever the connector does.

        At the job's deadline the run is cancelled and the connector's cancel() called; the job fails as
        retryable ("job timed out after Ns") whatever the run does next: a result or an error it returns
        once cancelled is discarded. A stop (API cancel, lost lease) gives the connector CANCEL_GRACE_S to
        end its own way (cancel() was called), then its run is cancelled. Either way a run still going
        CANCEL_GRACE_S after its cancellation ignores it: the worker stops waiting (logged as an error), the
        run goes on detached, its progress raises JobCancelled and writes nothing, its result is dropped,
        and the slot goes to the next job. Waited for as before, such a connector held the slot forever
        while the heartbeat renewed the job's lease."""
        loop = asyncio.get_running_loop()
        run = loop.create_task(self._connector_run(connector_job, progress), name=f"connector-{job.id}")
        expires = time.monotonic() + timeout
        # One future per wait, resolved by the run's end, the timer or request_stop (`wake`): no task and no
        # asyncio.wait per job (they cost jobs/s: 1,928 -> 1,686 a second through 2 workers).
        waiter: asyncio.Future | None = None

        def wake(_: object = None) -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        run.add_done_callback(wake)
        self._stop_wakers[job.id] = wake
        try:
            while not run.done():
                since = self.stop_requested.get(job.id)
                until = expires if since is None else min(expires, since + CANCEL_GRACE_S)
                left = until - time.monotonic()
                if left <= 0:
                    break
                waiter = loop.create_future()
                timer = loop.call_later(left, wake)
                try:
                    await waiter
                finally:
                    timer.cancel()
        except asyncio.CancelledError:
            # The job's own task (a drain, a second signal): the run goes with it. Its unwinding is not
            # waited for here (the hand-back is written first); _drain gives it what is left of its budget.
            run.cancel()
            self._keep_side_task(run)
            raise
        finally:
            run.remove_done_callback(wake)
            if self._stop_wakers.get(job.id) is wake:
                del self._stop_wakers[job.id]
        if run.done():  # it ended on its own, before the deadline or a stop's grace ran out
            value = run.result()
            if isinstance(value, _Escaped):  # SystemExit, KeyboardInterrupt...: this job's failure, not retried
                raise _escaped_error(value.error)
            return value
        stopped = job.id in self.stop_requested
        progress.close()  # the run is cancelled now: a progress call it still makes is not written
        run.cancel()
        self._keep_side_task(run)  # referenced whatever happens next (the loop keeps only weak references)
        if stopped:
            await asyncio.wait({run}, timeout=CANCEL_GRACE_S)
        else:
            tel = self.telemetry
            tel.events.emit("job.timeout", level=logging.WARNING, job_id=job.id, timeout_s=timeout)
            cancel_call = self._keep_side_task(asyncio.ensure_future(self._safe_cancel(job.id)))
            await asyncio.wait({run, cancel_call}, timeout=CANCEL_GRACE_S)
        if not run.done():
            progress.abandoned = True
            self.log.error(f"connector {self.group.connector} ignored the cancellation of job {job.id}: still "
                           f"running {CANCEL_GRACE_S:g}s after it; the worker stopped waiting for it (it goes on "
                           f"detached, its result is dropped) and takes the next job. The connector must let "
                           f"asyncio.CancelledError end its run()",
                           extra={"event_type": "job.abandoned",
                                  "fields": {"job_id": job.id, "connector": self.group.connector}})
            run.add_done_callback(functools.partial(self._abandoned_run_ended, job.id))
            # Kept referenced, but not a side task: a drain waited for it (it refuses to end) for its whole
            # grace when it began while a job was still running, and supervisord's SIGKILL came first.
            self._side_tasks.discard(run)
            self._abandoned.add(run)
            run.add_done_callback(self._abandoned.discard)
        elif not run.cancelled():
            run.exception()  # whatever it returned or raised once cancelled is not the job's outcome
        if stopped:
            raise JobCancelled(f"job {job.id} was cancelled")
        raise RetryableJobError(f"job timed out after {timeout:g}s")

    async def _connector_run(self, connector_job: ConnectorJob, progress: _Progress) -> JobResult | _Escaped:
        """connector.run, with a BaseException of its own (SystemExit, KeyboardInterrupt, GeneratorExit)
        handed over boxed: raised out of a task, the event loop re-raises SystemExit and KeyboardInterrupt
        and the worker ends; re-raised as themselves in the job's task, they read as a drain and the job went
        back uncounted to kill every worker that took it. _call_connector fails the job with it instead."""
        return await _boxed(self.connector.run, connector_job, progress)

    def _abandoned_run_ended(self, job_id: str, run: asyncio.Task) -> None:
        """An abandoned run ended after all: its outcome is read (no 'never retrieved' noise) and dropped."""
        error = None if run.cancelled() else run.exception()
        self.log.warning("an abandoned connector run ended; its outcome was dropped",
                         extra={"event_type": "job.abandoned_ended", "fields": {
                             "job_id": job_id,
                             "error": "" if error is None else self._redact(describe_exception(error))}})

    def _own_task(self, coro: Any) -> asyncio.Task:
        """A task of the worker's own, though a job's code starts it (a fault it met, a health check after its
        service failed): run in the worker's context, not the job's. Started in the job's, it took the job's ids
        (a machine-wide `worker.claims_resumed` filed under that job) and, the job unsampled, its records were
        held or shed with the job's and never written."""
        return asyncio.get_running_loop().create_task(coro, context=self._own_context.copy())

    def _keep_side_task(self, task: asyncio.Future) -> asyncio.Future:
        """A task the job no longer waits for, kept (a drain gives it what is left of its budget)."""
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    async def _job_error(self, job: Job, exc: BaseException, span: Any, started: float,
                         steps: dict[str, float]) -> None:
        """An exception out of the job's run, classified (errors.classify) and recorded as its outcome."""
        error = classify(exc)
        if isinstance(error, JobCancelled):
            await asyncio.shield(self._finish_cancelled(job, str(error), time.monotonic() - started, span))
            return
        hint = machine_local_hint(error)
        if hint is not None and job.id in self._local_fault_jobs and await self._probe_output_dir() is None:
            # The same job met such a fault here before, and the output folder takes writes: the job's own (a
            # file its payload names that cannot be read, an output bigger than the disk's free space, a path
            # outside the output folder), not the machine's. Counted like any failure: handed back uncounted
            # every time (no attempt, no avoid window), it went round the fleet for ever.
            hint = None
        if hint is not None:
            if len(self._local_fault_jobs) >= LOCAL_FAULT_JOBS_MAX:
                self._local_fault_jobs.clear()
            self._local_fault_jobs.add(job.id)
            # This machine's fault (a full disk, an unwritable output folder...), not the job's: counted, every
            # queued job became a final failure within milliseconds, its attempts bouncing between this
            # machine's workers. Back to the queue uncounted (another machine may run it); claims pause here
            # until a probe write into the output folder passes.
            self._local_fault(self._redact(str(error)), hint, job_id=job.id)
            span.set_attribute("job.handed_back", True)
            span.set_status(StatusCode.OK)
            await asyncio.shield(self._hand_back_or_say(job, "machine fault", deadline_s=self.group.lease,
                                                        error=self._redact(str(error))))
            return
        if isinstance(error, ServiceUnreachable):
            self.service_ok.clear()  # no claim while the check below runs (it is set again if healthy)
            self._health_cleared += 1  # a healthy answer to a check begun before now does not reopen claims
            if not await asyncio.shield(self._service_unreachable(job, error)):
                span.set_attribute("job.handed_back", True)  # not its failure: no error trace (as a drain's)
                span.set_status(StatusCode.OK)
                return
        span.set_status(StatusCode.ERROR, self._redact(str(error)))  # keeps the whole trace of a failed job
        context = span.get_span_context()  # its retry joins this trace (fail.lua's ARGV[8])
        await asyncio.shield(self._finish_failed(job, error, time.monotonic() - started, steps,
                                                 trace=(context.trace_id, context.span_id)))

    def _output_dir(self) -> Path | None:
        context = getattr(self.connector, "context", None)
        directory = getattr(context, "output_dir", None)
        return Path(directory) if directory else None

    def _local_fault(self, error: str, hint: str, **fields: Any) -> None:
        """A machine-local fault: claims pause (once each way in the log) until _local_watch's probe passes."""
        self._local_faults += 1
        if self.local_ok.is_set():
            self.local_ok.clear()
            self.telemetry.events.emit(
                "resource.exhausted", level=logging.ERROR, worker_id=self.ident.worker_id, error=error,
                output_dir=str(self._output_dir() or ""), **fields,
                hint=f"this machine's problem, not the job's: {hint}. No job is claimed here until a test write "
                     f"into the output folder passes (retried with backoff); the job went back to the queue")
        if self._local_watcher is None or self._local_watcher.done():
            self._local_watcher = self._own_task(self._local_watch())
            self._side_tasks.add(self._local_watcher)
            self._local_watcher.add_done_callback(self._side_tasks.discard)

    async def _local_watch(self) -> None:
        """Probe-write into the output folder with backoff until it passes, then claims resume."""
        paused = time.monotonic()
        wait = min(LOCAL_PROBE_MAX_S, LOCAL_PROBE_FIRST_S * 2 ** max(0, self._local_faults - 1))
        while True:
            await self._sleep_or_drain(wait)
            if self.draining.is_set():
                return
            if await self._probe_output_dir() is None:
                break
            wait = min(LOCAL_PROBE_MAX_S, wait * 2)
        self.local_ok.set()
        self.telemetry.events.emit("worker.claims_resumed", reason="the output folder is writable again",
                                   output_dir=str(self._output_dir() or ""),
                                   paused_s=round(time.monotonic() - paused, 3))

    async def _probe_output_dir(self) -> str | None:
        """None when a small file can be written (and synced) into the output folder, else why not."""
        directory = self._output_dir()
        if directory is None:
            return None
        try:
            await asyncio.to_thread(outputs.probe_dir, directory)
        except OSError as exc:
            return f"{exc.strerror or type(exc).__name__} ({exc.filename or directory})"
        return None

    async def _check_output_dir(self) -> None:
        """At start: the output folder is created and written to once; when it cannot be, no job is claimed
        (each would fail for a reason of this machine) until it can, and the log says where and what to fix."""
        problem = await self._probe_output_dir()
        if problem is None:
            return
        directory = self._output_dir()
        hint = (f"make {directory} a writable directory with free space (fix its permissions, free disk "
                f"space, or remove a file that stands in its place)")
        self.log.error(f"cannot write to the worker's output folder {directory}: {problem}; no job is claimed "
                       f"until it can ({hint})", extra={"event_type": "worker.output_dir_unwritable",
                                                         "fields": {"output_dir": str(directory)}})
        self._local_fault(problem, hint)

    async def _service_unreachable(self, job: Job, error: ServiceUnreachable) -> bool:
        """The job never reached its service. The connector's health, checked now, decides: unhealthy, the
        job goes back to the queue without counting an attempt, and claims pause until the service is back
        (returns False); healthy, only this job's address is unreachable and its attempt counts (True).
        Failed as every other retryable error, a down service emptied the queue into final failures, max_retries
        claims per job in a tight loop."""
        if await self._own_task(self._check_health_now()):
            return True
        await self._hand_back_or_say(job, "service unreachable", deadline_s=self.group.lease,
                                     error=self._redact(str(error)))
        return False

    async def _check_health_now(self) -> bool:
        """The connector's health read and noted now (claims paused or resumed): the worker's own records, in its
        own context (_own_task), though a job's failure asks for it."""
        statuses = await self._read_connector_statuses()
        self._health_checked_at = time.monotonic()
        return await self._note_health(statuses)

    async def _to_files(self, store: Any, result: JobResult, job: Job, what: str) -> JobResult:
        """`store(result, the job's output folder)` in a thread (outputs.spill or outputs.cap). An OSError is
        the worker's own step failing, not the connector's error (and the disk may have room again later):
        retryable, naming the folder; `store` removed the files it had written."""
        directory = job_dir(self.connector.context.output_dir, job.id)
        try:
            return await asyncio.to_thread(store, result, directory)
        except OSError as exc:
            raise RetryableJobError(f"cannot store the job's {what} in {directory}: "
                                    f"{exc.strerror or type(exc).__name__}; free space there or fix its "
                                    f"permissions") from exc

    async def _finish_ok(self, job: Job, result: JobResult, final_progress: bool,
                         steps: dict[str, float], job_task: asyncio.Task) -> Ownership:
        """Complete the job; `final_progress` records progress 100 in the same round trip. The slot of
        `job_task` is freed once the result is ready to record (see _free_slot)."""
        if job.id in self.cancelled or job.id in self.lost:
            raise JobCancelled(f"job {job.id} was cancelled before it completed")
        mark = time.monotonic()
        if not outputs.is_small(result):
            # Masked, spilled, sized and capped in a thread with a bounded Python encoder (outputs.prepare): on
            # the loop, a 26 MB result held the heartbeat 1.8 s (a 1 s lease expired; at 47 MB, 6 s: the job
            # was reaped and run again while this worker still finished it).
            result = await self._to_files(functools.partial(outputs.prepare, secrets=self.secrets), result, job,
                                          "outputs")
        else:
            result = outputs.mask(result, self.secrets)  # a connector echoing its key: never published
            if outputs.needs_spill(result):  # a base64 image or a huge text inline: to files (contract)
                result = await self._to_files(outputs.spill, result, job, "outputs")
            if outputs.result_size(result) > outputs.RESULT_MAX_BYTES:
                # Written whole into jobs:completed and published on complete_job, a large result got the API's
                # subscriber disconnected (Redis' pub/sub output buffer limit): stored as a file, referenced.
                result = await self._to_files(outputs.cap, result, job, "result")
        data = result.to_json()
        steps["postprocessing"] = (time.monotonic() - mark) * 1000
        self._free_slot(job_task)
        own = await self._retrying(self.store.complete, job.id, self.ident.worker_id, data,
                                   final_progress=final_progress, steps=steps, token=job.token)
        if own is Ownership.CANCELLED:
            raise _CancelledAtComplete(f"job {job.id} was cancelled before it completed")
        return own

    async def _finish_failed(self, job: Job, error: Exception, duration_s: float,
                             steps: dict[str, float] | None = None, trace: tuple[int, int] | None = None) -> None:
        retryable = bool(getattr(error, "retryable", False))
        # A service's error can quote a key or a URL with its password: the job hash and job_failed carry the
        # message to the API and the monitor, so it leaves here redacted, as every log record does.
        message = self._redact(str(error))
        # A service's own back-off (HTTP Retry-After on a 429/503): no worker claims the retry before then.
        outcome = await self._retrying(self.store.fail, job.id, self.ident.worker_id, message,
                                       retryable=retryable, steps=steps, token=job.token,
                                       retry_delay_s=getattr(error, "retry_after_s", None), trace=trace)
        if outcome.outcome not in ("retried", "failed"):
            self.telemetry.events.emit("job.not_failed", level=logging.WARNING, job_id=job.id, error=message,
                                       ownership=outcome.outcome)
            return
        status = "retried" if outcome.outcome == "retried" else "failed"
        self.telemetry.metrics.job_finished(job.service_required, status, duration_s, self.ident.worker_id)
        # Counted here, once per failed attempt (retried or final), not by the connector's ConnectorLogger
        self.telemetry.metrics.worker_errors_total.add(1, {"worker_id": self.ident.worker_id, "kind": "job_failed"})
        if status == "retried":
            self.telemetry.events.emit("job.retry", level=logging.WARNING, job_id=job.id, error=message,
                                       retry_count=outcome.retry_count)
        else:
            self.telemetry.events.emit("job.failed", level=logging.ERROR, job_id=job.id, error=message,
                                       retryable=retryable, retry_count=outcome.retry_count)

    async def _finish_cancelled(self, job: Job, reason: str, duration_s: float, span: Any = None) -> None:
        """Never completed: the API already failed it (cancel) or it went to someone else (lost lease).
        A connector that reports a cancellation nobody asked for (a service interrupted by hand) fails
        the job with its own message instead: "cancelled by user" would be untrue."""
        if job.id in self.vanished:
            self.log.warning("job hash vanished while running: Redis lost its data (restarted empty, flushed) or "
                             "the key was deleted; the job is not completed", extra={
                                 "event_type": "job.vanished", "fields": {"job_id": job.id}})
            # No script ended it: this one takes it out of jobs:active and sets the worker idle (or busy with
            # another job) atomically with any claim (a status written from here raced the next claim's busy).
            with contextlib.suppress(RedisError, OSError):  # Redis away: the heartbeat drops it as missing
                await self._retrying(self.store.hand_back, job.id, self.ident.worker_id, "vanished",
                                     deadline_s=DRAIN_MARGIN_S, token=job.token)
            return
        if job.id in self.lost:
            self.log.info("job lost while running; left to its new owner",
                          extra={"event_type": "job.lost", "fields": {"job_id": job.id, "reason": reason}})
            return
        if job.id not in self.cancelled:
            await self._finish_failed(job, FatalJobError(f"interrupted: {reason}"), duration_s)
            return
        self.log.info("job stopped without completing", extra={"event_type": "job.cancelled", "fields": {
            "job_id": job.id, "reason": self._redact(reason)}})
        self._count_cancelled(job, span)
        # The API already wrote the failure; this only drops our bookkeeping (the script sees 'cancelled').
        await self._retrying(self.store.fail, job.id, self.ident.worker_id, CANCELLED_ERROR, retryable=False,
                             token=job.token)
        # What the connector had saved (a download cut short by the cancel) is no job's output now: never
        # completed, a cancelled job's folder waited for the output retention (24 h by default).
        output_dir = self._output_dir()
        if output_dir is not None:
            await asyncio.to_thread(shutil.rmtree, job_dir(output_dir, job.id), True)

    def _count_cancelled(self, job: Job, span: Any) -> None:
        """A job the API cancelled: counted (jobs_processed_total, status `cancelled`) and marked on its span
        (`job.cancelled`). A cancel is no error: the span is OK, as a drained job's, so the tracer does not take
        the call the cancel ended (its JobCancelled made that span an error) for a failed job and keep every
        cancelled job's trace as one. Its time is a user's choice, not the service's, so it goes in no
        duration histogram."""
        self.telemetry.metrics.job_finished(job.service_required, "cancelled", None, self.ident.worker_id)
        if span is not None:
            span.set_attribute("job.cancelled", True)
            span.set_status(StatusCode.OK)

    async def _hand_back(self, job: Job, reason: str = "drain", *, deadline_s: float = DRAIN_MARGIN_S,
                         **fields: Any) -> None:
        """Back to the queue first, then the connector is told to stop, in the background (_drain gives
        those calls what is left of its budget): awaited first, a slow cancel() (up to 5 s) outlasted the
        drain's margin, supervisord's SIGKILL came first and the job stayed claimed until its lease expired.
        A write that gives up (Redis down past `deadline_s`) leaves the job in jobs:active: the heartbeat
        hands it back (a stray) or the reaper re-queues it once Redis is back."""
        try:
            own = await self._retrying(self.store.hand_back, job.id, self.ident.worker_id, reason,
                                       deadline_s=deadline_s, token=job.token)
            self.telemetry.events.emit("job.handed_back", job_id=job.id, ownership=str(own), reason=reason,
                                       **fields)
        finally:
            task = asyncio.get_running_loop().create_task(self._safe_cancel(job.id))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _hand_back_at_stop(self, job: Job) -> None:
        """A drain's hand-back, done by the drain's end (_drain: the rest is the exit's). Redis down or stalled
        past it is a logged give-up: it escaped the job's task as "job task failed unexpectedly", a traceback."""
        deadline_s = DRAIN_MARGIN_S
        if self.drain_started is not None:
            grace, margin = self.drain_budget()
            deadline_s = max(0.1, self.drain_started + grace + margin / 2 - time.monotonic())
        await self._hand_back_or_say(job, deadline_s=deadline_s)

    async def _hand_back_or_say(self, job: Job, reason: str = "drain", *, deadline_s: float, **fields: Any) -> None:
        """_hand_back, a write that gives up logged: the job stays in jobs:active, where the heartbeat hands it
        back (a stray) or the reaper re-queues it."""
        try:
            await self._hand_back(job, reason, deadline_s=deadline_s, **fields)
        except (RedisError, OSError) as exc:
            self.log.error(f"job not handed back: {redis_trouble(exc)}; the job will run again",
                           extra={"fields": {"job_id": job.id, "error": self._redis_error(exc)}})

    async def _release_orphans(self, job_ids: list[str], reason: str) -> None:
        """Jobs Redis says we run but this process does not (a previous process with our worker id was
        killed, or a finishing write gave up): back to the queue, no attempt counted. Without this our
        heartbeat would renew their leases forever and the reaper would never free them."""
        for job_id in job_ids:
            if job_id in self.running:
                continue
            try:
                own = await self.store.hand_back(job_id, self.ident.worker_id, reason, lost=True)
            except RedisError as exc:
                self.log.warning("could not hand back an orphaned job",
                                 extra={"fields": {"job_id": job_id, "error": self._redis_error(exc)}})
                continue
            self.telemetry.events.emit("job.handed_back", level=logging.WARNING, job_id=job_id,
                                       ownership=str(own), reason=reason)

    def request_stop(self, job_id: str, *, lost: bool, vanished: bool = False) -> None:
        """The job was cancelled by the API (or, `lost`, went to another worker; `vanished`, its hash is gone):
        never complete it, and ask the connector to stop it. Called from callbacks; does not wait."""
        if job_id not in self.running:
            return
        (self.lost if lost else self.cancelled).add(job_id)
        if vanished:
            self.vanished.add(job_id)
            self.register_again_soon()
        if job_id in self.stop_requested:
            return
        self.stop_requested[job_id] = time.monotonic()
        if job_id in self._stop_wakers:
            self._stop_wakers[job_id]()
        task = asyncio.get_running_loop().create_task(self._safe_cancel(job_id))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _safe_cancel(self, job_id: str) -> None:
        try:
            outcome = await asyncio.wait_for(_boxed(self.connector.cancel, job_id), 5)
            if isinstance(outcome, _Escaped):
                raise _escaped_error(outcome.error)
        except Exception as exc:  # noqa: BLE001 - best effort: the job is being given up anyway
            self.log.warning("connector cancel failed",
                             extra={"fields": {"job_id": job_id, "error": self._redact(describe_exception(exc))}})

    async def _retrying(self, fn, *args, deadline_s: float | None = None, **kwargs):
        """Finishing writes must land: retry through a Redis outage, or Redis refusing the write for a passing
        reason (OOM, READONLY, BUSY...: see redis_refusal), until the lease would have expired. A refused
        script changed nothing and a retried one carries the attempt's token, so a retry never writes twice.
        A refusal is logged once per write, with what Redis said."""
        deadline = time.monotonic() + (deadline_s or self.group.lease)
        backoff = 0.1
        told = False
        job_id = str(args[0]) if args else ""  # every finishing write takes the job's id first
        while True:
            try:
                try:
                    # Each attempt within the deadline too: one that waits for a stalled Redis takes the whole
                    # socket timeout, so a drain's hand-back outlasted stop_grace.
                    return await asyncio.wait_for(fn(*args, **kwargs), max(0.1, deadline - time.monotonic()))
                except TimeoutError:  # wait_for's (redis-py's own TimeoutError is a RedisError)
                    raise RedisTimeout("no reply from Redis before the write's deadline") from None
            except (RedisError, OSError) as exc:
                if not redis_passing(exc):
                    raise
                if time.monotonic() >= deadline:
                    self.log.error(f"giving up a finishing write: {redis_trouble(exc)}; the reaper will requeue "
                                   f"the job", extra={"fields": {"job_id": job_id, "error": self._redis_error(exc)}})
                    raise
                if not told and (credentials_refused(exc) or redis_refusal(exc) is not None):
                    told = True  # an outage is silent until it outlasts the deadline, as before
                    self.log.warning(f"finishing write not accepted: {redis_trouble(exc)}; retrying",
                                     extra={"fields": {"job_id": job_id, "error": self._redis_error(exc)}})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, REDIS_RETRY_MAX_S)

    async def _retrying_start(self, fn, *args):
        """At start, before anything runs: wait out a Redis outage however long it lasts, unless told to stop
        meanwhile (_StoppedAtStart)."""
        backoff = 0.2
        while True:
            try:
                return await self._start_or_drain(fn(*args))
            except (RedisError, OSError) as exc:
                # A refusal (OOM, READONLY, BUSY...) passes too: raised, it ended the worker, and supervisord
                # restarted it into the same refusal.
                if not redis_passing(exc):
                    raise
                self._start_trouble = redis_trouble(exc)
                self.log.warning(f"{self._start_trouble} at start; retrying",
                                 extra={"fields": {"error": self._redis_error(exc)}})
                await self._sleep_or_drain(backoff)
                backoff = min(backoff * 2, REDIS_RETRY_MAX_S)

    async def _start_or_drain(self, step):
        """Await a start-up step, or raise _StoppedAtStart as soon as a drain begins (the step cancelled):
        a connection attempt can take its whole timeout."""
        if self.draining.is_set():
            if asyncio.iscoroutine(step):
                step.close()  # never started: no "never awaited" warning
            raise _StoppedAtStart
        task = asyncio.ensure_future(step)
        drain = asyncio.ensure_future(self.draining.wait())
        await asyncio.wait({task, drain}, return_when=asyncio.FIRST_COMPLETED)
        drain.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _StoppedAtStart
        return task.result()

    # -- signals, heartbeat, reaper ----------------------------------------------------------------------
    def _on_signal(self) -> None:
        if not self.draining.is_set():
            self.drain_started = time.monotonic()
            self.draining.set()
            if self._signals is not None:
                self._signals.interrupt()  # an idle claim loop stops waiting for jobs
        else:  # a second signal: give the running jobs back now
            for task in self.running.values():
                task.cancel()

    def _on_cancel(self, job_id: str, reason: str) -> None:
        self.request_stop(job_id, lost=False)

    def _on_resubscribed(self) -> None:
        """The job signals' subscription was lost and is back: a `cancel_job` published meanwhile was missed.
        The running jobs' hashes say (the API writes the cancel before it publishes it); without this look
        only the next heartbeat (a third of the lease: 20 s by default) stopped such a job."""
        if self.running:
            self._keep_side_task(asyncio.get_running_loop().create_task(self._look_for_cancels(list(self.running))))
        self.register_again_soon()  # Redis may have come back empty

    async def _look_for_cancels(self, job_ids: list[str]) -> None:
        """As the heartbeat's script judges: a job still in our jobs:active whose hash says failed (a job this
        worker failed itself has left jobs:active in the same script: never taken for a cancel)."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(job_key(job_id), "status")
                    pipe.hexists(active_key(self.ident.worker_id), job_id)
                replies = await pipe.execute()
        except (RedisError, OSError):
            return  # Redis is away again: the next resubscription or the heartbeat looks
        for job_id, status, ours in zip(job_ids, replies[::2], replies[1::2]):
            if ours and status in ("failed", "cancelled"):
                self._on_cancel(job_id, "cancelled while the job signals were reconnecting")

    async def _register(self) -> None:
        # The machine starts a worker once its service is ready, so this first check normally says healthy;
        # if not (the service died meanwhile, a remote one is down), no job is claimed until it is.
        self.connector_statuses = await self._read_connector_statuses()
        self._health_checked_at = time.monotonic()
        entry = self.connector_statuses[self.group.connector]
        self._claims_open(entry["health"] == "healthy", entry.get("reason", ""))
        await self._check_duplicate()
        _LIVE_INSTANCES.add(self.instance)
        await self._retrying_start(functools.partial(self.store.register_worker, instance=self.instance),
                                   self.ident.worker_id, self.ident.machine_id, self.caps, self.connector_statuses)
        self._registered = True
        await self._retrying_start(self.store.heartbeat, self.ident.worker_id)
        self.status = "idle"

    async def _check_duplicate(self) -> None:
        """Refuse to start (DuplicateWorkerId) while another live process holds this worker id: two machines
        started with one MACHINE_ID (a copied environment) share their worker ids, and each handed the
        other's running jobs back (at start and as heartbeat strays), so jobs ran again and again, never
        finishing. A restart of this worker takes the id over at once (its predecessor's pid is gone, even
        though its heartbeat key lives on for up to 60 s); a holder this process cannot see (another host or
        container) is watched for one heartbeat interval: a live one renews the heartbeat key meanwhile."""
        wid = self.ident.worker_id
        other = await self._retrying_start(self.redis.hget, worker_key(wid), "instance")
        if not other or other == self.instance or _predecessor(other) != "unknown":
            return
        beat_key = heartbeat_key(wid)
        first = await self._retrying_start(self.redis.get, beat_key)
        if first is None:
            return  # its heartbeat lapsed (or it went offline): gone
        ends = time.monotonic() + heartbeat_interval(self.group.lease) + 1.0
        while time.monotonic() < ends:
            await self._sleep_or_drain(min(0.25, max(0.0, ends - time.monotonic())))
            if self.draining.is_set():
                raise _StoppedAtStart
            beat, holder = await self._retrying_start(self._beat_and_holder, beat_key, wid)
            if beat is None or holder != other:
                return  # lapsed, or taken over by a process that will settle it with us the same way
            if beat != first:
                break
        else:
            return  # no beat for a whole interval: a dead process of another host or container
        message = self._duplicate_message(other) + ". This worker does not start"
        self.log.error(message, extra={"event_type": "worker.duplicate_id", "fields": {
            "worker_id": wid, "machine_id": self.ident.machine_id, "other_instance": other}})
        raise DuplicateWorkerId(message)

    def _duplicate_message(self, other: str) -> str:
        return (f"worker id {self.ident.worker_id} is already in use by another live process (machine id "
                f"{self.ident.machine_id}, instance {other}): two machines run with the same MACHINE_ID (a "
                f"copied environment?). Give each machine its own MACHINE_ID (or WORKER_ID), or stop the "
                f"other one")

    def _give_up_id(self, other: str) -> None:
        """Another live process registered our worker id while we ran: stop claiming, hand our running jobs
        back now (as a second SIGTERM does) and exit non-zero (run raises DuplicateWorkerId at its end)."""
        self.duplicate_of = other
        self.log.error(self._duplicate_message(other) + "; this worker stops", extra={
            "event_type": "worker.duplicate_id", "fields": {
                "worker_id": self.ident.worker_id, "machine_id": self.ident.machine_id, "other_instance": other}})
        if not self.draining.is_set():
            self._on_signal()
        self._on_signal()

    async def _beat_and_holder(self, beat_key: str, wid: str) -> tuple[str | None, str | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(beat_key)
            pipe.hget(worker_key(wid), "instance")
            beat, holder = await pipe.execute()
        return beat, holder

    async def _refresh_status(self) -> None:
        """Write idle / busy as `self.running` stands now (after re-registering). While jobs run, the
        scripts keep worker:{id} right themselves, atomically with each change: the claim sets busy with
        current_job_id, and complete / fail / hand-back / reap set idle, or busy with a remaining job when
        concurrency > 1. Writing it from here too raced with them (a finishing job's idle landing after a
        new claim's busy) and cost two round trips per job."""
        async with self._status_lock:
            status = "busy" if self.running else "idle"
            try:
                await self.store.set_worker_status(self.ident.worker_id, status, next(iter(self.running), ""))
                self.status = status
            except RedisError:
                pass

    async def _heartbeat(self) -> None:
        """Renews the leases and the heartbeat key on a fixed cadence. Nothing slow may sit in this loop: a
        beat late by more than the lease's other two thirds lets the reaper re-queue jobs running here (a
        connector health check answering in 2.5 s did it to every job with a 3 s lease)."""
        interval = heartbeat_interval(self.group.lease)
        next_beat = time.monotonic()
        while True:
            next_beat += interval
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
            next_beat = max(next_beat, time.monotonic() - interval)  # after a stall, no burst of beats
            try:
                beat = await self.store.heartbeat(self.ident.worker_id)
                has_caps, holder = await self.redis.hmget(worker_key(self.ident.worker_id), "capabilities",
                                                          "instance")
                contested = bool(has_caps and holder and holder != self.instance)
                if contested and _predecessor(holder) == "unknown" and holder == self._foreign_holder:
                    # Another process registered this worker id (they started at once) and wrote it again after
                    # we wrote ours back: a live duplicate. Its jobs would be our strays and ours its. This one
                    # gives the id up: no hand-back of anything not its own, its jobs back to the queue now,
                    # then it exits non-zero.
                    self._give_up_id(holder)
                    return
                if contested:
                    # Another token, seen once: ours is written back. A live duplicate writes its own again
                    # before our next beat (then the branch above); a token no live process holds (our own
                    # dead predecessor's, brought back by a Redis restored from an older snapshot or a replica
                    # behind) just goes: every worker of the machine gave its id up and quit for it.
                    self._foreign_holder = holder if _predecessor(holder) == "unknown" else None
                    self.log.warning("worker id held by another instance: registering again",
                                     extra={"event_type": "worker.reregistered",
                                            "fields": {"other_instance": holder}})
                    await self.store.register_worker(self.ident.worker_id, self.ident.machine_id, self.caps,
                                                     self.connector_statuses, instance=self.instance)
                    await self._refresh_status()
                else:
                    self._foreign_holder = None
                if not has_caps:
                    await self._registration_lost()
            except RedisError as exc:
                self.log.warning("heartbeat failed", extra={"fields": {"error": self._redis_error(exc)}})
                continue
            for job_id in beat.cancelled:
                self._on_cancel(job_id, "cancelled (seen by heartbeat)")
            for job_id in beat.lost:
                self.request_stop(job_id, lost=True, vanished=job_id in beat.missing)
            if contested:  # the jobs in jobs:active may be another live process's: none is a stray now
                self.orphans_seen = set()
                continue
            # Orphans seen twice in a row (so not a claim whose reply is still on its way): hand back.
            strays = {j for j in beat.renewed if j not in self.running}
            await self._release_orphans(sorted(strays & self.orphans_seen), "not running on its worker")
            self.orphans_seen = strays - self.orphans_seen

    def register_again_soon(self) -> None:
        """Redis may have lost this worker's registration (its subscription came back after a lost connection,
        or a job's hash vanished): look now. Only the next beat (a third of the lease: 20 s by default) looked,
        and until then the machine reported a worker running jobs as having no heartbeat (/health 503)."""
        if not self._registering:
            self._registering = True
            self._keep_side_task(self._own_task(self._register_again()))

    async def _register_again(self) -> None:
        try:
            # a few tries: after a restart the pool's first connection is the dead one (Connection closed)
            for delay in (0.0, 0.2, 1.0):
                await asyncio.sleep(delay)
                try:
                    if not await self.redis.hexists(worker_key(self.ident.worker_id), "capabilities"):
                        await self._registration_lost()
                    return
                except RedisError:
                    continue  # then the next beat looks
        finally:
            self._registering = False

    async def _registration_lost(self) -> None:
        """worker:{id} lost its registration (Redis restarted without its data, or was flushed): written again,
        heartbeat key included, and said (it was silent: the only sign was the machine's missing heartbeat)."""
        self.log.warning("worker registration gone from Redis (restarted without its data, or flushed): "
                         "registering again", extra={"event_type": "worker.registration_lost"})
        await self.store.register_worker(self.ident.worker_id, self.ident.machine_id, self.caps,
                                         self.connector_statuses, instance=self.instance)
        await self._refresh_status()

    async def _health_watch(self) -> None:
        """The connector's health, checked as often as the heartbeat beats but in its own task (a check may
        take HEALTH_TIMEOUT_S), and written to worker:{id} when it changed. While claims are paused (the
        connector unhealthy) it checks every PAUSED_HEALTH_INTERVAL_S, so they resume soon after recovery."""
        interval = heartbeat_interval(self.group.lease)
        while True:
            every = interval if self.claims_paused_since is None else min(interval, PAUSED_HEALTH_INTERVAL_S)
            wait = self._health_checked_at + every - time.monotonic()
            if wait > 0:
                self._health_wake.clear()
                try:  # a pause wakes it: the wait is worked out again, shorter
                    await asyncio.wait_for(self._health_wake.wait(), wait)
                except TimeoutError:
                    pass
                continue
            self._health_checked_at = time.monotonic()
            cleared = self._health_cleared
            statuses = await self._read_connector_statuses()
            if cleared != self._health_cleared and statuses[self.group.connector]["health"] == "healthy":
                continue  # begun before a job found the service gone: that job's own check decides
            await self._note_health(statuses)

    async def _note_health(self, statuses: dict[str, Any]) -> bool:
        """A health check's outcome: claims pause or resume by it, and a change is an event
        (service.health_check) and written to worker:{id}, so the machine and the monitor learn it too.
        Returns whether the connector is healthy."""
        entry = statuses[self.group.connector]
        healthy = entry["health"] == "healthy"
        self._claims_open(healthy, entry.get("reason", ""))
        if statuses != self.connector_statuses:
            self.connector.joblog.health_check(healthy, reason=entry.get("reason"))
            try:
                await self._write_connector_statuses(statuses)
            except RedisError as exc:
                self.log.warning("connector status not recorded", extra={"fields": {"error": self._redis_error(exc)}})
        return healthy

    def _claims_open(self, healthy: bool, reason: str = "") -> None:
        """Claim while the connector is healthy, and only then; the change is logged once each way."""
        if healthy:
            self.service_ok.set()
            if self.claims_paused_since is not None:
                paused_s = round(time.monotonic() - self.claims_paused_since, 3)
                self.claims_paused_since = None
                self.telemetry.events.emit("worker.claims_resumed", connector=self.group.connector,
                                           paused_s=paused_s)
            return
        self.service_ok.clear()
        if self.claims_paused_since is None:
            self.claims_paused_since = time.monotonic()
            self._health_wake.set()
            self.telemetry.events.emit(
                "worker.claims_paused", level=logging.WARNING, connector=self.group.connector, reason=reason,
                hint=f"the {self.group.connector} connector's service is unhealthy: no job is claimed until "
                     f"its health check passes again (checked every {PAUSED_HEALTH_INTERVAL_S:g}s)")

    async def _read_connector_statuses(self) -> dict[str, Any]:
        """`connector_statuses` for worker:{id}, in the machine status's words: {connector: {status: active,
        health: healthy | unhealthy, reason}} from the connector's own health check (the service it calls,
        as this worker reaches it). The reason is redacted: a service's error can quote a URL's password.

        The check runs as a task of its own, bounded by HEALTH_TIMEOUT_S: one that ignores its cancellation is
        abandoned (never waited for, as wait_for would, which hung the worker for good), and no other check
        starts while it still runs. Whatever it raises (SystemExit, KeyboardInterrupt, an exception whose
        str() raises) is its unhealth, never the worker's end."""
        entry: dict[str, Any] = {"status": "active"}
        reason = ""
        abandoned = self._health_abandoned
        if abandoned is not None and not abandoned.done():
            entry["health"] = "unhealthy"
            reason = (f"an earlier health check took over {HEALTH_TIMEOUT_S:g}s and ignored its cancellation; "
                      f"it still runs (the connector's health() must let asyncio.CancelledError end it)")
        else:
            self._health_abandoned = None
            check = self._own_task(_boxed(self.connector.health))
            try:
                await asyncio.wait({check}, timeout=HEALTH_TIMEOUT_S)
            except asyncio.CancelledError:
                check.cancel()  # the caller stops (the health watch at exit): the check goes with it
                raise
            if not check.done():
                check.cancel()
                self._health_abandoned = check
                check.add_done_callback(lambda t: t.cancelled() or t.exception())  # its outcome is dropped
                entry["health"], reason = "unhealthy", f"health check took over {HEALTH_TIMEOUT_S:g}s"
            elif check.cancelled():
                entry["health"], reason = "unhealthy", "health check was cancelled"
            elif check.exception() is not None:
                entry["health"] = "unhealthy"
                reason = f"health check failed: {describe_exception(check.exception())}"
            elif isinstance(check.result(), _Escaped):
                entry["health"] = "unhealthy"
                reason = f"health check failed: {describe_exception(check.result().error)}"
            else:
                health = check.result()
                try:
                    healthy = bool(health.healthy)
                    reason = "" if healthy else str(health.reason or "")
                except Exception:  # noqa: BLE001 - not a Health, or a reason whose str() raises
                    healthy, reason = False, f"health check returned {type(health).__name__}, not a Health"
                entry["health"] = "healthy" if healthy else "unhealthy"
        if reason:
            entry["reason"] = self._redact(reason)[:300]
        return {self.group.connector: entry}

    async def _write_connector_statuses(self, statuses: dict[str, Any]) -> None:
        """Only the field: the worker's status and current job stay the scripts' to write."""
        await self.redis.hset(worker_key(self.ident.worker_id), "connector_statuses", statuses_json(statuses))
        self.connector_statuses = statuses

    async def _reaper(self) -> None:
        """Every machine reaps: a job whose worker died (lease expired) goes back to the queue."""
        interval = min(15.0, max(0.5, self.group.lease / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                requeued = await self.store.reap_expired_leases()
            except RedisError:
                continue
            if requeued:
                self.telemetry.events.emit("jobs.requeued", level=logging.WARNING, job_ids=list(requeued),
                                           reason="lease expired")

    async def _sleep_or_drain(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.draining.wait(), seconds)
        except TimeoutError:
            pass



def redis_client(url: str) -> aioredis.Redis:
    """The worker's Redis client: read and connect timeouts and TCP keepalive of its own (redis_socket_options)."""
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30, **redis_socket_options(url))


async def serve(manifest: Manifest, index: int, environ: Mapping[str, str]) -> int:
    """Build the worker's parts (telemetry, Redis client, connector) and run it until drained."""
    from opentelemetry import trace as otel_trace

    from emp_machine import telemetry as telemetry_pkg
    from emp_machine.runtime import hardware as hw
    from emp_machine.runtime.manifest import telemetry_with_env

    ident = WorkerIdentity.from_environ(manifest, index, environ)
    group = manifest.workers[ident.group]
    worker: Worker | None = None
    # This process's own OTEL_* (its group's `env`, which supervisord hands to it) over the manifest's
    # telemetry, as any OTel process honours its own: run/manifest.json holds only the machine's.
    where = f"workers.{ident.group}.env"
    manifest = manifest.model_copy(update={"telemetry": telemetry_with_env(
        manifest.telemetry, environ, manifest.source or "<manifest>", where=where,
        note=f" (in worker {ident.worker_id}'s environment)",
        hint=f"fix or unset it in {where}; it stands for {{field}}")})
    state = Path(manifest.machine.state_dir)
    workers_total = max(1, int(environ.get("EMP_WORKERS_TOTAL") or 1))
    tel = telemetry_pkg.setup(manifest.telemetry, machine_id=ident.machine_id, worker_id=ident.worker_id,
                              service_type=group.service or group.connector, region=manifest.machine.region or None,
                              buffer_path=state / "telemetry" / f"{ident.worker_id}.db",
                              process_share=1 / (workers_total + 1),
                              snapshot_path=state / "metrics" / f"{ident.worker_id}.json")  # for /metrics
    tel.install_logging()
    # The one tracer is OTel's global one, so `trace.get_tracer(...)` in a connector or an OTel-instrumented
    # library records into this job's trace (set once per process, here: OTel refuses a second provider).
    otel_trace.set_tracer_provider(tel.tracer_provider)
    try:
        # Only this worker's own connector is imported: another plugin installed here that is broken, exits or
        # sleeps at import is not this worker's concern (validate and each of its own workers report it).
        registry = ConnectorRegistry.for_connector(group.connector)
        if group.connector in registry.names():  # loaded: what failed beside it is a plugin that clashed with it
            for failure in registry.failures:  # (a failure of its own is raised by get() in _construct)
                tel.logger("emp.worker").warning(failure.render(), extra={"event_type": "worker.connector_clash"})
        values = {"index": index, "machine_id": ident.machine_id, "worker_id": ident.worker_id,
                  "service_port": ident.service_port or "", "name": f"worker-{index}"}
        context = ConnectorContext(machine_id=ident.machine_id, worker_id=ident.worker_id,
                                   output_dir=state / "outputs" / ident.worker_id,
                                   service_type=group.service or group.connector,
                                   logger=tel.logger(f"emp.connector.{group.connector}"), tracer=tel.tracer,
                                   # counting nothing: the worker counts jobs and errors from each job's outcome
                                   joblog=tel.connector_logger(f"{group.connector}-{index}",
                                                               group.service or group.connector, counts=False))
        settings = expand_settings(group.settings, values)
        # Its group's credentials, and the machine's it holds too (the Redis password, the OTLP headers' values):
        # masked in every record of this process, the connector's own logs included, and in what it publishes.
        secrets = tuple(sorted({*secret_values(settings, group.env, environ), *url_secrets(ident.redis_url),
                                *machine_secrets(manifest, environ, groups=())}, key=len, reverse=True))
        set_secret_values(secrets)
        connector = _construct(registry, group.connector, settings, context, f"workers.{ident.group}", secrets)
        hardware = probed_hardware(hw.probe())
        client = redis_client(ident.redis_url)
        worker = Worker(manifest, ident, client, connector, tel, hardware, secrets=secrets)
        try:
            return await worker.run()
        finally:
            await client.aclose()
    finally:
        tel.shutdown(timeout=worker.shutdown_budget() if worker is not None else TELEMETRY_SHUTDOWN_S)


def _construct(registry: ConnectorRegistry, name: str, settings: Mapping[str, Any], context: ConnectorContext,
               where: str, secrets: tuple[str, ...] = ()) -> Connector:
    """The group's connector, built from its settings. A failure (not installed, broken, __init__ raising,
    even SystemExit) is one ConnectorLoadError line naming the connector, its entry point and distribution:
    the CLI prints it and the worker exits non-zero, so supervisord's backoff applies (no traceback per start,
    no silent exit 0 or 130 for a SystemExit or KeyboardInterrupt of the plugin's)."""
    cls = registry.get(name)  # ConnectorNotFound / ConnectorLoadError name the entry point already
    try:
        return cls.from_settings(settings, context)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - see above
        message = registry.construction_failure(name, exc, where)
        raise ConnectorLoadError(redact_secrets(message, secrets).replace("\n", " ")) from None


def run(manifest_path: Path, index: int, environ: Mapping[str, str]) -> int:
    manifest = Manifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    code, finished = 1, False
    try:
        code = loop.run_until_complete(serve(manifest, index, environ))
        finished = True
    finally:
        # Tasks still running now are connector runs that ignored their cancellation (_call_connector): cancelled
        # once more and given EXIT_WAIT_S, never waited for without end as asyncio.run does (the worker hung at
        # exit until supervisord's SIGKILL). Everything of ours (the hand-backs, the offline write, telemetry's
        # flush) is done by now.
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=EXIT_WAIT_S))
        if finished and any(not task.done() for task in left):
            logging.shutdown()
            sys.stdout.flush()
            os._exit(code)  # a coroutine that refuses to end cannot keep the process
        loop.run_until_complete(loop.shutdown_asyncgens())
        if finished:
            loop.run_until_complete(loop.shutdown_default_executor())  # as asyncio.run: to_thread calls joined
        loop.close()
    return code

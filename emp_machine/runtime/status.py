"""Machine status to Redis, and the pollers that feed the aggregator.

Pollers only `put` events on the machine's inbox (STYLE.md section 2): `RedisPolled` (reachability and the
workers' hashes and heartbeats, every second), `WorkerStatusSeen` (each `worker_status` message of our
workers, at once) and `HardwareRead`. The publisher reads the aggregator and publishes the contract's
`machine:status:{machine_id}` message: `periodic` every `status.interval`, `event_driven` within a second of
a transition (a burst is coalesced into one message), `machine_ready` once boot completes and `shutdown` on
exit. While Redis is unreachable it keeps trying at each period; the poller sees Redis come back, which is a
transition, so a fresh full status goes out at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

from emp_machine.runtime import hardware as hw
from emp_machine.runtime import jobs
from emp_machine.runtime.aggregate import Aggregator, GpuState, HardwareState
from emp_machine.runtime.identity import redact_url
from emp_machine.runtime.resp import MiniRedis, RespError
from emp_machine.units import format_size

log = logging.getLogger("emp.machine.status")

REDIS_POLL_INTERVAL = 1.0
REDIS_TIMEOUT = 1.0
HARDWARE_INTERVAL = 5.0
COALESCE_S = 0.1


@dataclass(frozen=True)
class RedisPolled:
    ok: bool
    reason: str
    rows: tuple = ()


@dataclass(frozen=True)
class WorkerStatusSeen:
    worker_id: str
    status: str
    current_job_id: str
    at: str


@dataclass(frozen=True)
class HardwareRead:
    state: HardwareState


def health_url(public_url: str, host: str, port: int, environ: Mapping[str, str] | None = None) -> str:
    """Where the monitor reaches this machine's health server, never loopback when anything else is known:
    the manifest's public URL, or Railway's public domain (`manifest.load` fills it from
    RAILWAY_PUBLIC_DOMAIN; reachable from anywhere, the operator's laptop included); else the address the
    server is bound to, when a specific one; else Railway's private domain (RAILWAY_PRIVATE_DOMAIN,
    reachable from the project's other services, where the EMP monitor runs; the container's host name is
    not); else this host's name. With several replicas both Railway domains name the service, not one
    replica (docs/operations.md, "Railway")."""
    if public_url:
        return public_url.rstrip("/")
    if host not in ("0.0.0.0", "::", "", "127.0.0.1", "::1", "localhost"):
        return f"http://{host}:{port}"
    private = (os.environ if environ is None else environ).get("RAILWAY_PRIVATE_DOMAIN", "").strip().rstrip("/")
    if private:
        return f"http://{private}:{port}"
    name = socket.gethostname() or "localhost"
    return f"http://{name}:{port}"


def redis_client(url: str) -> MiniRedis:
    """The machine's Redis client (runtime/resp.py). The poller, the publisher and the offline marker share
    its one connection; each round trip gets 2 s counted from when its caller holds the connection, so a slow
    but working Redis (1 s a reply) is not reported unreachable for the time spent queueing behind another."""
    return MiniRedis(url, connect_timeout=REDIS_TIMEOUT, timeout=REDIS_TIMEOUT * 2)


def _why(exc: BaseException, url: str) -> str:
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__} talking to {redact_url(url)}: {text.replace(url, redact_url(url))}"[:300]


async def poll_redis(client: MiniRedis, url: str, worker_ids: list[str], inbox: asyncio.Queue) -> None:
    while True:
        try:
            ok, rows = await jobs.read_workers(client, worker_ids)  # bounded by the client's own timeout
            inbox.put_nowait(RedisPolled(ok, "" if ok else "PING failed", tuple(rows)))
        except (RespError, OSError, asyncio.TimeoutError) as exc:
            inbox.put_nowait(RedisPolled(False, _why(exc, url)))
        await asyncio.sleep(REDIS_POLL_INTERVAL)


async def watch_worker_status(url: str, worker_ids: list[str], inbox: asyncio.Queue,
                              ping_after_s: float = jobs.SIGNALS_PING_AFTER_S, pong_within_s: float = 2.0) -> None:
    """`worker_status` messages of our workers, as they happen (a transition must reach Redis within 1 s).

    A subscription quiet for `ping_after_s` is PINGed, and subscribed again when nothing answers within
    `pong_within_s`: a connection dropped without a word (a NAT entry gone) otherwise read nothing for ever,
    every transition then waiting for the next poll of the workers' hashes (as the workers' own JobSignals)."""
    ours = set(worker_ids)
    while True:
        client = redis_client(url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(jobs.CH_WORKER_STATUS)
            pinged = 0.0  # when the unanswered PING went out; 0: none
            while True:
                due = (pinged + pong_within_s) if pinged else (pubsub.last_reply + ping_after_s)
                msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                               timeout=max(0.0, due - time.monotonic()))
                now = time.monotonic()
                if pinged and pubsub.last_reply >= pinged:
                    pinged = 0.0  # answered (by the pong or a message): the connection carries
                if pinged and now - pinged >= pong_within_s:
                    log.warning("status.worker_status_deaf", extra={"fields": {
                        "event_type": "machine.status.worker_status_deaf", "action": "subscribe again",
                        "error": f"no reply to PING within {pong_within_s:g} s"}})
                    break
                if not pinged and now - pubsub.last_reply >= ping_after_s:
                    await pubsub.ping()
                    pinged = now
                if msg is None or msg.get("type") != "message":
                    continue
                try:
                    data = json.loads(msg["data"])
                    wid = str(data.get("worker_id") or "")
                except (ValueError, AttributeError):
                    continue
                if wid in ours:
                    inbox.put_nowait(WorkerStatusSeen(wid, str(data.get("new_status") or ""),
                                                      str(data.get("current_job_id") or ""),
                                                      jobs.iso_now()))
        except (RespError, OSError):
            await asyncio.sleep(0.5)
        finally:
            try:
                await pubsub.aclose()
                await client.aclose()
            except Exception:  # closing a broken connection may fail again; nothing to keep
                pass


DISK_FREE_FLOOR_BYTES = 64 * 1024 * 1024  # below min(this, DISK_FREE_FLOOR_FRACTION of the disk) free: "disk full"
DISK_FREE_FLOOR_FRACTION = 0.01


def disk_floor(total_bytes: int) -> int:
    """The free space under which a disk counts as full: 1 % of it or 64 MiB, whichever is smaller."""
    return min(DISK_FREE_FLOOR_BYTES, int(total_bytes * DISK_FREE_FLOOR_FRACTION))


def disk_problem(paths, floor=disk_floor) -> str:
    """"disk full: <path> (<free> free)" for each file system holding one of `paths` (the state dir, then the
    outputs dir where it is another file system) with less free than `floor(total)`; "" when all have room.
    Free is what this user may use (statvfs f_bavail): a disk full for jobs is full though root's 5 % remain.
    A path that cannot be read is no verdict (its folder may not exist yet)."""
    problems, seen = [], set()
    for path in paths:
        try:
            st = os.statvfs(path)
            dev = os.stat(path).st_dev
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        if total and free < floor(total):
            problems.append(f"disk full: {path} ({format_size(free)} free)")
    return "; ".join(problems)


def _read_hardware(disk_path: str, last: list) -> HardwareState:
    times = psutil.cpu_times()
    busy, total = sum(times) - times.idle - getattr(times, "iowait", 0.0), sum(times)
    cpu = 0.0
    if last:
        d_total = total - last[1]
        cpu = round(100.0 * (busy - last[0]) / d_total, 1) if d_total > 0 else 0.0
    last[:] = [busy, total]
    memory = psutil.virtual_memory()
    try:
        disk = psutil.disk_usage(disk_path)
        disk_used, disk_total = disk.used, disk.total
    except OSError:
        disk_used = disk_total = 0
    gpus, note = hw.read_gpus()
    return HardwareState(cpu, memory.total - memory.available, memory.total, disk_used, disk_total,
                         tuple(GpuState(g.index, g.name, g.utilization_percent, g.memory_used_bytes,
                                        g.memory_total_bytes, g.temperature_c) for g in gpus), note,
                         disk_problem=disk_problem((disk_path, os.path.join(disk_path, "outputs"))))


async def read_hardware(disk_path: str, inbox: asyncio.Queue) -> None:
    last: list = []
    while True:
        inbox.put_nowait(HardwareRead(await asyncio.to_thread(_read_hardware, disk_path, last)))
        await asyncio.sleep(HARDWARE_INTERVAL)


class Publisher:
    """PUBLISH machine:status:{machine_id}: periodic, event-driven (coalesced), machine_ready, shutdown."""

    def __init__(self, aggregate: Aggregator, client: MiniRedis, url: str, interval: float, *,
                 clock=time.monotonic):
        self.aggregate = aggregate
        self.client = client
        self.url = url
        self.interval = interval
        self.clock = clock
        self.published = 0
        self.failed = 0
        self._owed: str | None = None  # a machine_ready that could not go out yet
        self._down = False
        self._closed = False

    def close(self) -> None:
        """Send nothing more from run(): the machine's shutdown message is the last word.

        Cancelling run() alone was not enough: Python 3.11's wait_for swallows a cancellation that lands as the
        wait it guards ends, and the loop went on to send the machine_ready it owed after the shutdown message
        (the monitor saw a stopped machine announce itself ready)."""
        self._closed = True
        self.aggregate.transition.set()  # wake run(), which ends

    async def run(self) -> None:
        next_periodic = self.clock() + self.interval
        transition = self.aggregate.transition
        while not self._closed:
            try:
                await asyncio.wait_for(transition.wait(), max(0.0, next_periodic - self.clock()))
            except asyncio.TimeoutError:
                kind = "periodic"
                next_periodic += self.interval
                if next_periodic <= self.clock():  # fell behind (a stalled loop): keep the rhythm from now
                    next_periodic = self.clock() + self.interval
            else:
                await asyncio.sleep(COALESCE_S)  # everything that happens meanwhile goes out in one message
                transition.clear()
                kind = self.aggregate.take_kind()
            if self._closed:
                return
            if self._owed and kind != "shutdown":
                kind, self._owed = self._owed, None
            ok = await self.publish(kind)
            if not ok and kind == "machine_ready":
                self._owed = kind

    async def publish(self, kind: str, *, phase: str | None = None) -> bool:
        message = json.dumps(self.aggregate.message(kind, phase=phase), separators=(",", ":"))
        try:
            await jobs.publish_machine_status(self.client, self.aggregate.plan.machine_id, message)
        except (RespError, OSError, asyncio.TimeoutError) as exc:
            self.failed += 1
            if not self._down:
                self._down = True
                log.warning("status.publish_failed", extra={"fields": {
                    "event_type": "machine.status.publish_failed", "update_type": kind,
                    "error": _why(exc, self.url)}})
            return False
        self.published += 1
        if self._down:
            self._down = False
            log.info("status.publish_resumed", extra={"fields": {"event_type": "machine.status.publish_resumed",
                                                                  "update_type": kind}})
        return True


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("emp-machine")
    except Exception:  # not installed as a distribution (a bare source checkout)
        return "unknown"

"""The health server (aiohttp, `health.port`, default 9090): reads the aggregator, never computes per request.

GET  /health   200 when the machine can do its work, else 503 (JSON: components with reasons)
GET  /ready    200 once booted and not draining, else 503
GET  /status   the machine status document published to Redis
GET  /metrics  Prometheus text exposition of the machine's meter and its workers' (see WorkerMetrics)
GET  /errors?since=1h  error records from the machine's log files (`emp-machine errors --machine`): they can
               quote what services answered, so with a token configured it needs `Authorization: Bearer
               <token>`; without one only this host's own requests are answered (see _local_request; 403 for others)
GET  /         a small self-refreshing status page
POST /processes/{name}/restart, POST /refresh-status: `Authorization: Bearer <token>`; 403 without a
               configured token. Actions are put on the machine's inbox; the decider carries them out.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

from emp_machine.runtime.aggregate import Aggregator
from emp_machine.telemetry.metrics import SNAPSHOT_MAX_AGE, merge_snapshots, parse_snapshot, render_prometheus
from emp_machine.units import parse_duration

log = logging.getLogger("emp.machine.health")

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def _is_loopback(remote: str | None) -> bool:
    """Whether a request's peer address is this host (127.0.0.0/8, ::1, or either IPv4-mapped)."""
    try:
        address = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _loopback_name(host: str | None) -> bool:
    """Whether a Host header or an Origin's host names this host: localhost, a loopback address, or nothing."""
    if not host:
        return True
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") and "]:" in host else host
    name = name.strip("[]").lower()
    return name == "localhost" or name.endswith(".localhost") or _is_loopback(name)


def _local_request(request: web.Request) -> bool:
    """A request of this host's own: from a loopback peer, to a loopback name (a DNS-rebound hostile name that
    resolves to 127.0.0.1 carries its own Host), and not sent by a page of another site (no Origin, or a
    loopback one): a loopback peer alone let any website the local user opened read /errors."""
    if not _is_loopback(request.remote) or not _loopback_name(request.headers.get("Host")):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    try:
        return _loopback_name(urllib.parse.urlsplit(origin).netloc)
    except ValueError:
        return False


def _error(status: int, message: str, **extra) -> web.Response:
    return web.Response(status=status, content_type=JSON, text=json.dumps({"error": message, **extra}))


class WorkerMetrics:
    """The workers' meters, for /metrics. Each worker's telemetry writes its meter's snapshot to
    `{directory}/{worker_id}.json` every few seconds and at exit (`setup(snapshot_path=...)`, an atomic
    rename); `render()` merges the fresh ones of this machine's workers into the machine's own snapshot.

    Each worker's series carry its `worker_id` label (the worker_* ones already do), as each target's would
    in Prometheus: a restarted worker's counters start again from zero, which `rate()` reads as one
    counter reset; summed across workers instead, a restart would lower the sum and `rate()` would count
    the other workers' totals as new. A snapshot not rewritten for `max_age` seconds is a worker that is
    gone (stopped, removed, or a previous run's): its series stop, as a vanished target's do. A file that
    cannot be read or parsed is skipped, logged once per version and counted in
    `telemetry_worker_snapshots_skipped_total{reason}`. Cost: one stat per worker per scrape, a parse only
    when a file changed (a few KB of JSON), nothing between scrapes."""

    def __init__(self, directory: Path, worker_ids: Iterable[str], *, max_age: float = SNAPSHOT_MAX_AGE,
                 clock: Callable[[], float] = time.time, meter: Any = None):
        self.directory = Path(directory)
        self.worker_ids = tuple(sorted(set(worker_ids)))
        self.max_age, self.clock = max_age, clock
        self.skipped: dict[str, int] = {}
        self._cache: dict[str, tuple[tuple, list]] = {}  # worker_id -> (file version, snapshot)
        self._bad: dict[str, tuple] = {}  # worker_id -> file version already counted as skipped
        self._lock = threading.Lock()
        if meter is not None:
            from opentelemetry.metrics import Observation

            meter.create_observable_counter("telemetry_worker_snapshots_skipped_total", [
                lambda _: [Observation(n, {"reason": r}) for r, n in list(self.skipped.items())]], "1",
                "worker metric snapshots left out of /metrics: unreadable or corrupt")

    def read(self) -> list[tuple[str, list[tuple]]]:
        """(worker_id, snapshot) of every worker whose snapshot is fresh and sound."""
        with self._lock:
            now = self.clock()
            out = []
            for worker_id in self.worker_ids:
                path = self.directory / f"{worker_id}.json"
                try:
                    st = path.stat()
                except FileNotFoundError:
                    self._cache.pop(worker_id, None)
                    continue
                except OSError as exc:
                    self._skip(worker_id, ("stat", exc.errno), "unreadable", str(exc))
                    continue
                if now - st.st_mtime > self.max_age:
                    self._cache.pop(worker_id, None)
                    continue
                version = (st.st_ino, st.st_mtime_ns, st.st_size)
                cached = self._cache.get(worker_id)
                if cached is not None and cached[0] == version:
                    out.append((worker_id, cached[1]))
                    continue
                if self._bad.get(worker_id) == version:
                    continue
                try:
                    holder, snapshot = parse_snapshot(path.read_bytes())
                    if holder != worker_id:
                        raise ValueError(f"holds the snapshot of {holder[:80]!r}")
                except OSError as exc:
                    self._skip(worker_id, version, "unreadable", str(exc))
                    continue
                except ValueError as exc:
                    self._skip(worker_id, version, "corrupt", str(exc))
                    continue
                self._cache[worker_id] = (version, snapshot)
                out.append((worker_id, snapshot))
            return out

    def render(self, own: Callable[[], Iterable[tuple]]) -> str:
        """Prometheus text of this process's snapshot (`own()`, taken after the files are read, so that it
        counts what this read skipped) and the live workers' (labelled by worker_id)."""
        workers = self.read()
        return render_prometheus(merge_snapshots(own(), workers))

    def _skip(self, worker_id: str, version: tuple, reason: str, error: str) -> None:
        if self._bad.get(worker_id) == version:
            return
        self._bad[worker_id] = version
        self._cache.pop(worker_id, None)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("metrics.snapshot_skipped", extra={"fields": {
            "event_type": "metrics.snapshot_skipped", "worker_id": worker_id, "reason": reason,
            "path": str(self.directory / f"{worker_id}.json"), "error": error[:300]}})


KEEPALIVE_TIMEOUT_S = 5.0  # an idle connection (none of its requests in flight) is closed after this long
MAX_CONNECTIONS = 64  # open at once; the next ones are answered 503 and closed (lower under a low fd limit)
LISTEN_BACKLOG = 64


def max_connections() -> int:
    """MAX_CONNECTIONS, or a quarter of this process's open-file limit where that is lower (a `ulimit -n 64`
    the machine could not raise): the rest stay for supervisord's socket, Redis, logs and telemetry."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, soft // 4))


class _Refused(asyncio.Protocol):
    """A connection over the limit: one 503 and closed, before anything is read."""

    def connection_made(self, transport) -> None:
        body = b'{"error": "too many open connections to the health server; try again"}'
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        transport.close()


class _SaysSomething(asyncio.Protocol):
    """aiohttp's handler of one connection, closed after KEEPALIVE_TIMEOUT_S unless its client has sent the head
    of a request by then. aiohttp before 3.14.4 starts its keep-alive timeout only after a response and has no
    deadline for a request never finished: a client that connected and sent nothing (or one byte) kept its
    connection, and its file descriptor, for ever, and enough of them held every slot of max_connections()
    (/health answered 503 to the monitor until they went). Until its head has come, the connection is listed
    in `waiting` (oldest first), where _Bounded takes the oldest from when the slots are full."""

    __slots__ = ("_handler", "_deadline", "_tail", "_waiting", "_transport")

    def __init__(self, handler: asyncio.Protocol, waiting: dict):
        self._handler = handler
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes received, while the head's end (a blank line) is looked for
        self._waiting = waiting
        self._transport = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._deadline = asyncio.get_running_loop().call_later(KEEPALIVE_TIMEOUT_S, transport.close)
        self._waiting[self] = None
        self._handler.connection_made(transport)

    def _said(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting.pop(self, None)

    def evict(self) -> None:
        """Closed for a newer connection (the slots are full): it has sent no whole request head yet."""
        self._said()
        self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:  # a whole head: the rest is aiohttp's
                self._said()
            else:
                self._tail = seen[-3:]
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._said()
        self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


class _Bounded:
    """aiohttp's protocol factory (its web.Server), holding `limit` open connections. Past it, a new connection
    takes the slot of the oldest one that has not sent a whole request head yet; with none such, it gets
    _Refused (503). Refused, one client holding the slots with connections that never finish a request (and
    opening new ones as the old were cut) kept the monitor's every poll out: 60 of 60 answered 503."""

    def __init__(self, server: web.Server, limit: int):
        self.server, self.limit = server, limit
        self.refused = self.evicted = 0
        self.waiting: dict[_SaysSomething, None] = {}

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) >= self.limit:
            if self.waiting:
                next(iter(self.waiting)).evict()
                self.evicted += 1
                if self.evicted == 1 or self.evicted % 1000 == 0:
                    log.warning("health.connection_evicted", extra={"fields": {
                        "event_type": "health.connection_evicted", "open": len(self.server.connections),
                        "limit": self.limit, "evicted": self.evicted,
                        "why": "every slot taken: the oldest connection without a whole request closed"}})
                return _SaysSomething(self.server(), self.waiting)
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("health.connections_refused", extra={"fields": {
                    "event_type": "health.connections_refused", "open": len(self.server.connections),
                    "limit": self.limit, "refused": self.refused}})
            return _Refused()
        return _SaysSomething(self.server(), self.waiting)


class HealthServer:
    def __init__(self, aggregate: Aggregator, *, host: str, port: int, token: str | None,
                 token_env: str, cors_origins: tuple[str, ...], process_names: set[str],
                 restart: Callable[[str], str | None], refresh: Callable[[], None], metrics: Callable[[], str],
                 errors: Callable[[float], list] | None = None):
        self.aggregate = aggregate
        self.host, self.port = host, port
        self._token = token.encode() if token else None
        self._token_env = token_env
        self._origins = set(cors_origins)
        self._names = process_names
        self._restart, self._refresh, self._metrics = restart, refresh, metrics
        self._errors = errors
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.bound_port = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/errors", self.errors)
        app.router.add_get("/", self.page)
        app.router.add_post("/processes/{name}/restart", self.restart)
        app.router.add_post("/refresh-status", self.refresh)
        return app

    async def start(self) -> int:
        # An idle connection (a client that connects and sends nothing, or keeps one open between polls) is
        # closed after KEEPALIVE_TIMEOUT_S; past max_connections() open at once, a new one gets a 503 and is
        # closed: idle clients cannot hold the machine's file descriptors (supervisord's socket, Redis, logs).
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     keepalive_timeout=KEEPALIVE_TIMEOUT_S)
        await self._runner.setup()
        factory = _Bounded(self._runner.server, max_connections())
        self._listener = await asyncio.get_running_loop().create_server(
            factory, self.host, self.port, reuse_address=True, backlog=LISTEN_BACKLOG)
        self.bound_port = self._listener.sockets[0].getsockname()[1]
        return self.bound_port

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- reads -------------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        a = self.aggregate
        return web.Response(body=a.health_body, status=a.health_code, content_type=JSON)

    async def ready(self, request: web.Request) -> web.Response:
        a = self.aggregate
        return web.Response(body=a.ready_body, status=a.ready_code, content_type=JSON)

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(body=self.aggregate.status_body, content_type=JSON)

    async def metrics(self, request: web.Request) -> web.Response:
        """In a thread: rendering reads the workers' snapshot files."""
        text = await asyncio.to_thread(self._metrics)
        return web.Response(text=text, headers={"Content-Type": PROMETHEUS})

    async def errors(self, request: web.Request) -> web.Response:
        """Read from the log files on demand (in a thread): the one read that is not pre-aggregated. Error texts
        quote services' answers (which may hold what a secret-blind redaction missed): not for anyone who can
        reach the public port. The token's holders may read them; with no token, only this host's clients."""
        if self._token is not None:
            denied = self._authorise(request)
            if denied is not None:
                return denied
        elif not _local_request(request):
            return _error(403, f"/errors answers only local clients while no token is configured: set the "
                               f"{self._token_env} environment variable and send it as `Authorization: Bearer "
                               f"<token>`")
        if self._errors is None:
            return _error(404, "no error source configured")
        try:
            since = parse_duration(request.query.get("since", "1h"))
        except ValueError as exc:
            return _error(400, f"since: {exc}")
        rows = await asyncio.to_thread(self._errors, since)
        return web.Response(content_type=JSON, text=json.dumps(rows, default=str))

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.aggregate.page(), content_type="text/html", charset="utf-8")

    # -- actions -----------------------------------------------------------------------------------------
    def _authorise(self, request: web.Request) -> web.Response | None:
        if self._token is None:
            return _error(403, f"disabled: no token configured (set the {self._token_env} environment variable)")
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return web.Response(status=401, content_type=JSON, headers={"WWW-Authenticate": "Bearer"},
                                text=json.dumps({"error": "missing bearer token"}))
        if not hmac.compare_digest(given.strip().encode(), self._token):
            log.warning("health.unauthorised", extra={"fields": {"event_type": "health.unauthorised",
                                                                  "path": request.path,
                                                                  "remote": request.remote or ""}})
            return web.Response(status=401, content_type=JSON, headers={"WWW-Authenticate": "Bearer"},
                                text=json.dumps({"error": "wrong bearer token"}))
        return None

    async def restart(self, request: web.Request) -> web.Response:
        denied = self._authorise(request)
        if denied is not None:
            return denied
        name = request.match_info["name"]
        if name not in self._names:
            return _error(404, f"no process named {name!r}", processes=sorted(self._names))
        refused = self._restart(name)
        if refused:
            return _error(409, refused)
        return web.Response(status=202, content_type=JSON, text=json.dumps({"restarting": name}))

    async def refresh(self, request: web.Request) -> web.Response:
        denied = self._authorise(request)
        if denied is not None:
            return denied
        self._refresh()
        return web.Response(status=202, content_type=JSON, text=json.dumps({"refresh": "requested"}))

    # -- CORS and errors ---------------------------------------------------------------------------------
    @staticmethod
    def _options(request: web.Request) -> web.StreamResponse:
        """OPTIONS (a CORS preflight, or asking what a path takes): 204 with `Allow` for a path that exists,
        404 for one that does not (it answered 204 for any path)."""
        refused = request.match_info.http_exception  # the router's: no route for the path, or not OPTIONS
        if isinstance(refused, web.HTTPMethodNotAllowed):
            methods = set(refused.allowed_methods) | {"OPTIONS"}
        elif refused is not None:
            raise refused
        else:
            methods = {request.method}
        return web.Response(status=204, headers={"Allow": ", ".join(sorted(methods))})

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            response = self._options(request) if request.method == "OPTIONS" else await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error(exc.status, exc.reason)
            if exc.status == 405:
                allow = exc.headers.get("Allow")
                if allow:
                    response.headers["Allow"] = allow
        except Exception:  # noqa: BLE001 - a bug in a handler must not take the server down
            log.exception("health.handler_failed")
            response = _error(500, "internal error")
        origin = request.headers.get("Origin")
        # /errors without a token answers this host's own requests only: never another site's page
        tokenless_errors = self._token is None and request.path == "/errors"
        if origin and ("*" in self._origins or origin in self._origins) and not tokenless_errors:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
                response.headers["Access-Control-Max-Age"] = "600"
        return response

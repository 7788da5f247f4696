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
from aiohttp.http_exceptions import HttpProcessingError

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
    """A connection over the limit: one 503, then closed. Closed at once with the client's request unread, the
    kernel answered it with a reset that threw the 503 away (the monitor saw a network error, not why): so the
    write side is shut and the connection closed once the request has come (or after REFUSED_LINGER_S), for
    at most REFUSED_LINGERING at once (past them, closed at once: a flood must not hold descriptors). The
    lingering ones are listed in `lingering` (their server's), which closes them when it stops."""

    def __init__(self, lingering: set):
        self._lingering = lingering
        self._transport = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        body = b'{"error": "too many open connections to the health server; try again"}'
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if len(self._lingering) >= REFUSED_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        self._lingering.add(self)
        self._transport = transport
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._transport is not None and (b"\r\n\r\n" in data or b"\n\n" in data):
            self._transport.close()  # its request read: a close now sends no reset

    def eof_received(self) -> bool:
        return False  # closed

    def connection_lost(self, exc: Exception | None) -> None:
        self._lingering.discard(self)
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()


REFUSED_LINGER_S = 1.0
REFUSED_LINGERING = 64
EVICTED_DRAIN_S = 1.0  # an evicted connection's unsent response: this long to drain, then the connection aborted


class _BadRequests(logging.Filter):
    """aiohttp logs every malformed request (no Host, a line or header over its limit, a bad chunk) as an ERROR
    with its traceback: anyone reaching the public port wrote ~2,950 such records a second into machine.log,
    wiping its rotation in under two minutes and filling /errors. They are counted instead, and said once per
    thousand (`health.bad_requests`); errors of our own handlers still go through."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self.count += 1
        if self.count == 1 or self.count % 1000 == 0:
            log.warning("health.bad_requests", extra={"fields": {
                "event_type": "health.bad_requests", "count": self.count,
                "last": f"{type(exc).__name__}: {str(exc)[:200]}",
                "why": "malformed HTTP requests to the health server, answered 400 and counted, not logged"}})
        return False


class _SaysSomething(asyncio.Protocol):
    """aiohttp's handler of one connection, closed after KEEPALIVE_TIMEOUT_S unless its client has sent the head
    of a request by then. aiohttp before 3.14.4 starts its keep-alive timeout only after a response and has no
    deadline for a request never finished: a client that connected and sent nothing (or one byte) kept its
    connection, and its file descriptor, for ever, and enough of them held every slot of max_connections()
    (/health answered 503 to the monitor until they went). While no request of it is being handled (none
    begun, or its response handed over, even if the client never reads it) it is listed in `idle`, oldest
    first, where _Bounded takes the oldest from when the slots are full."""

    __slots__ = ("_handler", "_deadline", "_tail", "_idle", "_transport", "_in_flight", "_of")

    def __init__(self, handler: asyncio.Protocol, idle: dict, of: dict | None = None):
        self._handler = handler
        self._of = of  # _Bounded.of (handler -> wrapper), left when the connection is lost
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes received, while the head's end (a blank line) is looked for
        self._idle = idle
        self._transport = None
        self._in_flight = 0  # requests of it being handled (HealthServer's middleware counts them)

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._deadline = asyncio.get_running_loop().call_later(KEEPALIVE_TIMEOUT_S, transport.close)
        self._idle[self] = None
        self._handler.connection_made(transport)

    def _said(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def begin(self) -> None:
        """A request of it is being handled: not to be evicted meanwhile."""
        self._in_flight += 1
        self._idle.pop(self, None)

    def end(self) -> None:
        """That request is handled (its response handed to aiohttp): idle again unless another is in flight."""
        self._in_flight -= 1
        if self._in_flight <= 0 and self._transport is not None and not self._transport.is_closing():
            self._idle[self] = None  # the newest idle

    def evict(self) -> None:
        """Closed for a newer connection (the slots are full): no request of it is being handled. A response
        its client is not reading would hold a plain close() for ever (asyncio waits for the write buffer to
        drain): given EVICTED_DRAIN_S, then aborted."""
        self._said()
        self._idle.pop(self, None)
        transport = self._transport
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(EVICTED_DRAIN_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        if not self._in_flight and self in self._idle:
            # a keep-alive client sending its next request: the newest idle now (the oldest, it was evicted
            # between its bytes arriving and the middleware's begin(), the request lost without an answer)
            del self._idle[self]
            self._idle[self] = None
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
        self._idle.pop(self, None)
        if self._of is not None:
            self._of.pop(self._handler, None)
        self._transport = None
        self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


class _Bounded:
    """aiohttp's protocol factory (its web.Server), holding `limit` open connections. Past it, a new connection
    takes the slot of the oldest idle one (no request of it being handled: one that never finished a head,
    sent a bare blank line, is kept alive between requests, or never reads its response); with none such, it
    gets _Refused (503). Refusing alone, a client holding the slots with connections that never finish a
    request kept the monitor's every poll out (60 of 60 answered 503); evicting only those that had sent no
    whole head, 70 keep-alive clients polling every 4.5 s, or 64 that sent a blank line, did (0 of 198)."""

    def __init__(self, server: web.Server, limit: int):
        self.server, self.limit = server, limit
        self.refused = self.evicted = 0
        self.idle: dict[_SaysSomething, None] = {}
        self.of: dict[Any, _SaysSomething] = {}  # aiohttp's handler -> its wrapper, for the middleware
        self.lingering: set[_Refused] = set()

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) >= self.limit:
            if self.idle:
                next(iter(self.idle)).evict()
                self.evicted += 1
                if self.evicted == 1 or self.evicted % 1000 == 0:
                    log.warning("health.connection_evicted", extra={"fields": {
                        "event_type": "health.connection_evicted", "open": len(self.server.connections),
                        "limit": self.limit, "evicted": self.evicted,
                        "why": "every slot taken: the oldest idle connection closed"}})
                return self._wrapped()
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("health.connections_refused", extra={"fields": {
                    "event_type": "health.connections_refused", "open": len(self.server.connections),
                    "limit": self.limit, "refused": self.refused}})
            return _Refused(self.lingering)
        return self._wrapped()

    def _wrapped(self) -> _SaysSomething:
        handler = self.server()
        self.of[handler] = wrapper = _SaysSomething(handler, self.idle, self.of)
        return wrapper


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
        self._bounded: _Bounded | None = None
        self._bad_requests = _BadRequests()
        self._errors_busy = False  # one /errors read at a time (each reads every log file)
        self._errors_pool: Any = None
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
        factory = self._bounded = _Bounded(self._runner.server, max_connections())
        logging.getLogger("aiohttp.server").addFilter(self._bad_requests)
        self._listener = await asyncio.get_running_loop().create_server(
            factory, self.host, self.port, reuse_address=True, backlog=LISTEN_BACKLOG)
        self.bound_port = self._listener.sockets[0].getsockname()[1]
        return self.bound_port

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
            self._listener = None
        if self._bounded is not None:
            for refused in list(self._bounded.lingering):  # the runner knows nothing of these
                refused.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        logging.getLogger("aiohttp.server").removeFilter(self._bad_requests)
        if self._errors_pool is not None:
            self._errors_pool.shutdown(wait=False)
            self._errors_pool = None

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
        # One read at a time, in a thread of its own: each reads every log file (150 MB within the default
        # rotation; 1.9 s), and eight at once in the default pool slowed /health to 0.4 s and the machine's
        # sweep, which shares that pool, from 0.8 s to 6.4 s to see a worker die.
        if self._errors_busy:
            return web.Response(status=429, content_type=JSON, headers={"Retry-After": "2"},
                                text=json.dumps({"error": "an /errors read is under way; try again shortly"}))
        if self._errors_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._errors_pool = ThreadPoolExecutor(1, thread_name_prefix="health-errors")
        self._errors_busy = True
        try:
            rows = await asyncio.get_running_loop().run_in_executor(self._errors_pool, self._errors, since)
        finally:
            self._errors_busy = False
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
        connection = self._bounded.of.get(request.protocol) if self._bounded is not None else None
        if connection is not None:
            connection.begin()  # not evicted while its request is handled
        try:
            return await self._handle(request, handler)
        finally:
            if connection is not None:
                connection.end()

    async def _handle(self, request: web.Request, handler) -> web.StreamResponse:
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

"""The health server (aiohttp, `health.port`, default 9090): reads the aggregator, never computes per request.

GET  /health   200 when the machine can do its work, else 503 (JSON: components with reasons)
GET  /ready    200 once booted and not draining, else 503
GET  /status   the machine status document published to Redis
GET  /metrics  Prometheus text exposition of the telemetry meters
GET  /errors?since=1h  error records from the machine's log files (`emp-machine errors --machine`)
GET  /         a small self-refreshing status page
POST /processes/{name}/restart, POST /refresh-status: `Authorization: Bearer <token>`; 403 without a
               configured token. Actions are put on the machine's inbox; the decider carries them out.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable

from aiohttp import web

from emp_machine.runtime.aggregate import Aggregator
from emp_machine.units import parse_duration

log = logging.getLogger("emp.machine.health")

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def _error(status: int, message: str, **extra) -> web.Response:
    return web.Response(status=status, content_type=JSON, text=json.dumps({"error": message, **extra}))


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
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.bound_port = self._runner.addresses[0][1]
        return self.bound_port

    async def stop(self) -> None:
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
        return web.Response(text=self._metrics(), headers={"Content-Type": PROMETHEUS})

    async def errors(self, request: web.Request) -> web.Response:
        """Read from the log files on demand (in a thread): the one read that is not pre-aggregated."""
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
    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            response = web.Response(status=204) if request.method == "OPTIONS" else await handler(request)
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
        if origin and ("*" in self._origins or origin in self._origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
                response.headers["Access-Control-Max-Age"] = "600"
        return response

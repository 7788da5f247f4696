"""A real OTLP/HTTP receiver for tests: aiohttp on loopback, decoding with opentelemetry-proto.

Runs its own event loop in a thread so synchronous tests can use it. It can be stopped and started again
on the same port (a collector outage), and scripted to answer the next requests with an error status.

    receiver = OtlpReceiver().start()
    ... endpoint=receiver.endpoint ...
    receiver.wait_for(lambda r: len(r.spans()) >= 10, timeout=10)
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_SIGNALS = {
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse),
    "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fast_shipper(buffer, endpoint: str, resource: dict[str, str], **kw):
    """A Shipper of `buffer` to `endpoint` on test timings (sends every 50 ms, backs off 50-200 ms): the tests
    wait on conditions, never on its intervals. Keyword arguments override them."""
    from emp_machine.telemetry.encode import Encoder
    from emp_machine.telemetry.shipper import Shipper

    kw.setdefault("interval", 0.05)
    kw.setdefault("poll", 0.01)
    kw.setdefault("base_backoff", 0.05)
    kw.setdefault("max_backoff", 0.2)
    return Shipper(buffer, Encoder(resource), endpoint, **kw)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; the last answer is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def attributes(kvs) -> dict:
    """A repeated KeyValue as a plain dict (scalars and arrays of scalars)."""
    out = {}
    for kv in kvs:
        out[kv.key] = any_value(kv.value)
    return out


def any_value(value):
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which)


@dataclass
class Received:
    path: str
    headers: dict
    raw_size: int
    request: object


class OtlpReceiver:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.requests: list[Received] = []
        self.statuses: list[int] = []  # every status answered, in order
        self._script: list[tuple[int, dict, bytes, str | None]] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control -------------------------------------------------------------------------------------

    def respond_next(self, status: int, count: int = 1, headers: dict | None = None, body: bytes = b"",
                     content_type: str | None = None) -> None:
        """Answer the next `count` requests with `status` (and headers, and a body of `content_type`: a
        partial_success, a google.rpc.Status, a proxy's page) instead of 200. Scripted requests are not
        recorded in `requests` (only counted in `statuses`)."""
        with self._lock:
            self._script.extend([(status, headers or {}, body, content_type)] * count)

    def start(self) -> "OtlpReceiver":
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # report a bind failure to start()
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="otlp-receiver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("OTLP receiver did not start")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        for path in _SIGNALS:
            app.router.add_post(path, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            scripted = self._script.pop(0) if self._script else None
        if scripted is not None:
            self.statuses.append(scripted[0])
            status, headers, answer, content_type = scripted
            if not answer:
                return web.Response(status=status, headers=headers)
            return web.Response(status=status, headers=headers, body=answer,
                                content_type=content_type or "application/x-protobuf")
        # aiohttp already inflates a gzip body; inflate here only if it did not (older versions).
        if request.headers.get("Content-Encoding") == "gzip" and body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        request_cls, response_cls = _SIGNALS[request.path]
        message = request_cls()
        message.ParseFromString(body)
        with self._lock:
            self.requests.append(Received(request.path, dict(request.headers), len(body), message))
            self.statuses.append(200)
        return web.Response(body=response_cls().SerializeToString(), content_type="application/x-protobuf")

    # --- reading what arrived ------------------------------------------------------------------------

    def _of(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def spans(self) -> list:
        return [span for r in self._of("/v1/traces") for rs in r.request.resource_spans
                for ss in rs.scope_spans for span in ss.spans]

    def logs(self) -> list:
        return [record for r in self._of("/v1/logs") for rl in r.request.resource_logs
                for sl in rl.scope_logs for record in sl.log_records]

    def metrics(self) -> list:
        return [metric for r in self._of("/v1/metrics") for rm in r.request.resource_metrics
                for sm in rm.scope_metrics for metric in sm.metrics]

    def resources(self, path: str = "/v1/traces") -> list[dict]:
        out = []
        for r in self._of(path):
            groups = getattr(r.request, {"/v1/traces": "resource_spans", "/v1/logs": "resource_logs",
                                         "/v1/metrics": "resource_metrics"}[path])
            out.extend(attributes(g.resource.attributes) for g in groups)
        return out

    def wait_for(self, predicate: Callable[["OtlpReceiver"], bool], timeout: float = 10.0) -> bool:
        return wait_until(lambda: predicate(self), timeout)

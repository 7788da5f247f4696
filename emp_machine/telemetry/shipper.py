"""The shipper: buffer -> OTLP/HTTP protobuf, at least once, in a background thread.

Per signal (`/v1/traces`, `/v1/logs`, `/v1/metrics`) it sends when a full batch (`batch_max` records) is
waiting, or every `interval` when at least one record is, in requests of at most `batch_max` records and
`max_request_size` bytes, gzip level 1. Records leave the buffer only after a 2xx (`Buffer.ack`, partial
chunks included, so a batch split across requests is never sent twice by us).

Failures: connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter, honouring
`Retry-After`; after `breaker_threshold` consecutive failures the circuit opens, and once the backoff has passed
a single small probe request (at most `probe_records`) must succeed before full batches resume. Each signal has
its own backoff and breaker: a failing one (its endpoint down, or a collector whose traces pipeline answers 503)
neither holds the others back nor is retried sooner because they succeed. The exception is a connection that
cannot be opened (refused, timed out, name not resolved, TLS handshake failed): that is the origin's fault
(scheme://host:port), so every signal sending there is held back with it, and one connection per backoff probes
the origin instead of one per signal; once a connection opens, each signal goes on from its own state.
A 4xx other than 429 means the collector will never take that batch: it moves to the buffer's dead-letter table
(kept, counted), its reason with the collector's message (the body's google.rpc.Status), logged once per reason.
A 2xx's body is the signal's Export*ServiceResponse: what its partial_success rejected is counted as dropped
(`rejected_by_collector`), not exported, and logged with the collector's message; it is never retried (the
collector would reject it again). An empty body is a full success; an HTML page (a proxy's login page answered 200)
means the collector never saw the records: retried like a 5xx, and logged; any other body that is no such
response ("OK" from a receiver that is not quite OTLP) is taken as a whole success, logged once.
A 3xx means the endpoint is wrong, not the records: not followed, retried like a 5xx, and logged.
Duplicates are possible only when a collector accepted a request and the reply was lost, or an HTML page
answered for a receiver that had taken the records (at least once).
Credentials in an endpoint's URL (http://user:password@collector:4318) are sent as Basic auth, as the stock
OTel HTTP exporter does, unless an `Authorization` header is configured; no message or stat quotes them.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import math
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from emp_machine.telemetry.buffer import Buffer, Kind
from emp_machine.telemetry.urls import http_url_problem
from emp_machine.telemetry.encode import Encoder, encode_log, encode_span
from emp_machine.telemetry.redact import redact_text

PATHS = {Kind.SPAN: "/v1/traces", Kind.LOG: "/v1/logs", Kind.METRIC: "/v1/metrics"}
SIGNALS = {Kind.SPAN: "traces", Kind.LOG: "logs", Kind.METRIC: "metrics"}
_REQUEST_OVERHEAD = 4096  # resource + scope + framing, well above what ours take
# Each signal's Export*ServiceResponse and its partial_success count of what the collector rejected.
_RESPONSES = {Kind.SPAN: (ExportTraceServiceResponse, "rejected_spans"),
              Kind.LOG: (ExportLogsServiceResponse, "rejected_log_records"),
              Kind.METRIC: (ExportMetricsServiceResponse, "rejected_data_points")}
REJECTED_BY_COLLECTOR = "rejected_by_collector"  # the drop reason of records a partial_success rejected


@dataclass
class SignalStats:
    """One signal's retry state: its failures since its last 2xx, and whether its circuit is open."""

    consecutive_failures: int = 0
    breaker_open: bool = False
    last_error: str = ""
    # Its endpoint's origin (scheme://host:port) could not be connected to at the last try: held back until
    # it can. Such a try counts as a failure of every signal of that origin with records waiting (none of them
    # could be sent), though it was one request (`ShipperStats.requests_failed`).
    unreachable: bool = False


@dataclass
class ShipperStats:
    exported: dict[str, int] = field(default_factory=lambda: {"spans": 0, "logs": 0, "metrics": 0})
    requests_ok: int = 0
    requests_failed: int = 0
    dead_lettered: int = 0
    # Spans and log records, and metric data points, a collector's partial_success said it rejected (2xx
    # answers): counted as dropped (`rejected_by_collector`), not exported, never retried.
    rejected: int = 0
    # Over the signals that have an endpoint (each in `signals`, by "traces"/"logs"/"metrics"): the most
    # consecutive failures of any, and whether any signal's circuit is open.
    consecutive_failures: int = 0
    breaker_open: bool = False
    signals: dict[str, SignalStats] = field(default_factory=dict)
    last_error: str = ""
    bytes_sent: int = 0
    redirects: int = 0  # 3xx answers: the endpoint is wrong (retried, and warned about once per answer)
    cpu_seconds: float = 0.0


_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Target:
    """Where one signal goes: a connection's address, the request path and the headers."""

    scheme: str
    host: str
    port: int | None
    path: str
    headers: dict[str, str] = field(repr=False)  # may hold credentials (an API key, the URL's Basic auth)


_KIND_NAMES = {Kind.SPAN: "spans", Kind.LOG: "logs", Kind.METRIC: "metrics"}


@dataclass
class _Signal:
    """One signal's backoff: its public stats, when it may be tried again, the last redirect warned about."""

    stats: SignalStats
    not_before: float = 0.0  # stays set until a 2xx (once passed, the usual waits hold)
    warned: str = ""  # once per distinct answer, until a 2xx
    noted: str = ""  # the last warning a collector's full success carried (logged once per distinct one)


@dataclass
class _Origin:
    """One scheme://host:port that signals send to: while it cannot be connected to, none of its signals
    tries before `not_before` (then the first due one probes it for all)."""

    failures: int = 0  # connections that could not be opened since the last one that could
    not_before: float = 0.0


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Unreachable(_Retry):
    """No connection to the target's origin could be opened (refused, timed out, not resolved, TLS failed)."""


class _Rejected(Exception):
    """The collector refused the batch for good (4xx other than 429)."""


def _basic_auth(parts: SplitResult) -> str | None:
    """`Basic base64(user:password)` from a URL's user info, percent-decoded (UTF-8), the password empty when
    absent (as curl and Go send `http://token@host`); None when the URL has no user info. The stock OTel HTTP
    exporter sends URL credentials this way (through requests): a collector behind basic auth answered our
    requests without them 401, and every batch was dead-lettered."""
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    if not user and not password:
        return None
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _gzip(body: bytes) -> bytes:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    return compressor.compress(body) + compressor.flush()


def _moved_to(location: str | None) -> str:
    """` (to scheme://host:port)` of a redirect's Location: its path and query are left out (they may carry
    a token); '' when absent or unreadable."""
    try:
        parts = urlsplit(location or "")
        origin = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return ""
    return f" (to {origin})" if parts.scheme and parts.hostname else ""


# A Retry-After longer than this is read as this: a collector that asks for an hour (or sends "inf") would
# otherwise hold every record past the buffer's retention. Records stay buffered meanwhile.
MAX_RETRY_AFTER_S = 300.0


def _retry_after(value: str | None, cap: float = MAX_RETRY_AFTER_S) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), within 0 and `cap`; None
    when absent or unreadable (the backoff then decides alone). Never raises: a collector's junk header must
    not stop the shipper."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        seconds = parsed.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(cap, max(0.0, seconds))


def _status_message(answer: bytes, content_type: str | None) -> str:
    """`: message` of a refusal's body, for its dead-letter reason: a google.rpc.Status (OTLP/HTTP's error
    body), else the body's first 200 characters of text; redacted (it may quote what we sent), one line,
    '' when there is nothing to say."""
    if not answer:
        return ""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    message = ""
    if "protobuf" in media or not media:
        try:
            status = Status.FromString(answer)
            message = status.message or (f"code {status.code}" if status.code else "")
        except DecodeError:
            message = ""
    if not message and "protobuf" not in media:
        message = answer[:800].decode("utf-8", "replace")[:200]
    message = " ".join(redact_text(message).split())[:500]
    return f": {message}" if message else ""


def otlp_signals(config: Any) -> dict[str, tuple[str, dict[str, str]]]:
    """Each signal's own (endpoint, headers) where it has either, for `Shipper(signals=...)`. `config`: a
    TelemetryConfig, or the machine's resolved manifest view of one (which has its fields, not its methods)."""
    out = {}
    for name in ("traces", "logs", "metrics"):
        signal = getattr(config, f"otlp_{name}", None)
        endpoint = getattr(signal, "endpoint", "") or ""
        headers = getattr(signal, "headers", None) or {}
        if endpoint or headers:
            out[name] = (endpoint, {key: headers[key] for key in headers})
    return out


def ships(config: Any) -> bool:
    """Whether any signal has somewhere to go (else records stay in the local buffer)."""
    return bool(config.otlp_endpoint or any(url for url, _ in otlp_signals(config).values()))


class Shipper:
    def __init__(self, buffer: Buffer, encoder: Encoder, endpoint: str, *, headers: dict[str, str] | None = None,
                 batch_min: int = 100, batch_max: int = 1000, max_request_size: int = 10**6,
                 interval: float = 5.0, timeout: float = 10.0, compression: str = "gzip",
                 max_backoff: float = 60.0, base_backoff: float = 0.5, breaker_threshold: int = 3,
                 probe_records: int = 10, poll: float = 1.0, max_retry_after: float = MAX_RETRY_AFTER_S,
                 on_exported: Callable[[str, int], None] | None = None,
                 signals: Mapping[str, tuple[str, Mapping[str, str] | None]] | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 eager: bool = False):
        """`endpoint` is the base URL (`/v1/traces` etc. appended); `signals` maps "traces"/"logs"/"metrics"
        to (URL used as given, headers sent instead of `headers` when not empty), as the OTLP exporter spec
        does with OTEL_EXPORTER_OTLP_{SIGNAL}_ENDPOINT/_HEADERS. A signal with neither is not shipped (its
        records stay buffered). `encoder` encodes the records of chunks the buffer knows no other resource of
        (`Buffer.resource_of`: records an earlier owner of the file made go with its resource). `eager`: send
        whatever is pending without waiting for a batch to fill (a buffer nothing is added to any more: an
        adopted orphan's)."""
        self._compress = compression == "gzip"
        base = {"Content-Type": "application/x-protobuf", **({"Content-Encoding": "gzip"} if self._compress else {})}
        self._targets: dict[Kind, _Target] = {}
        for kind, name in SIGNALS.items():
            own_url, own_headers = (signals or {}).get(name) or ("", None)
            field_name = f"telemetry.otlp_{name}.endpoint" if own_url else "telemetry.otlp_endpoint"
            url = own_url or endpoint
            if not url:
                continue
            if (problem := http_url_problem(url)) is not None:  # the URL is not quoted: it may hold a password
                raise ValueError(f"{field_name} {problem}")
            parts = urlsplit(url)
            if not own_url:
                path = parts.path.rstrip("/") + PATHS[kind]
            else:
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            sent = {**base, **(own_headers or headers or {})}
            # The URL's credentials, unless a configured Authorization header (in any case) says otherwise.
            if (auth := _basic_auth(parts)) is not None and not any(k.lower() == "authorization" for k in sent):
                sent["Authorization"] = auth
            self._targets[kind] = _Target(parts.scheme.lower(), parts.hostname, parts.port, path, sent)
        if not self._targets:
            raise ValueError("telemetry.otlp_endpoint is empty: set it (or a signal's endpoint) to ship")
        self.buffer = buffer
        self.encoder = encoder
        self._encoders: dict[str, Encoder] = {}  # by resource attributes (JSON), for earlier owners' chunks
        self.eager = eager
        self.batch_min, self.batch_max = batch_min, batch_max
        self.max_request_size = max_request_size
        self.interval, self.timeout = interval, timeout
        self.max_backoff, self.base_backoff = max_backoff, base_backoff
        self.breaker_threshold, self.probe_records = breaker_threshold, probe_records
        self.max_retry_after = max_retry_after
        self.poll = poll
        self.on_exported = on_exported
        self._rng = rng or random.Random()
        self._clock = clock
        self._conns: dict[tuple, http.client.HTTPConnection] = {}  # by (scheme, host, port)
        self._last_sent = {kind: clock() for kind in PATHS}
        self._next_due = clock()  # when the first signal with records waiting falls due (ship_once)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._draining = False
        self._thread: threading.Thread | None = None
        self.stats = ShipperStats()
        self._signals = {kind: _Signal(SignalStats()) for kind in self._targets}
        self._dead_warned: set[str] = set()  # dead-letter reasons logged already
        # Signals that send to one origin share its reachability (the port as connected to: 80/443 if none).
        self._origin_of = {kind: (t.scheme, t.host, t.port or (443 if t.scheme == "https" else 80))
                           for kind, t in self._targets.items()}
        self._origins = {key: _Origin() for key in self._origin_of.values()}
        self.stats.signals = {SIGNALS[kind]: signal.stats for kind, signal in self._signals.items()}

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> "Shipper":
        # The writer wakes us when a full batch is stored; otherwise we sleep until something can be due.
        self.buffer.on_commit = lambda stored: stored >= self.batch_max and self._wake.set()
        self._thread = threading.Thread(target=self._run, name="telemetry-shipper", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Try to send everything buffered, then stop, all within `drain_timeout`: a request still waiting
        for its answer then is cut off (a collector that never answers held shutdown for the request's
        whole `timeout`). What is left stays buffered for the next run."""
        if self._thread is None:
            return
        deadline = time.monotonic() + drain_timeout
        drain_until = deadline - min(0.2, drain_timeout / 10)  # the rest is for stopping the thread
        self._draining = True
        self._wake.set()
        self.buffer.flush(max(0.05, drain_until - time.monotonic()))
        # Until every signal with an endpoint is sent or has its circuit open (a signal without one stays).
        while time.monotonic() < drain_until and self._thread.is_alive() and any(
                self.buffer.pending(kind) and not signal.stats.breaker_open for kind, signal in self._signals.items()):
            time.sleep(0.02)  # polling the drain's progress, not synchronising with it
        self._stop.set()
        self._wake.set()
        # Again until the thread is out: a connection it opened just after an abort is cut too.
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._abort()
            self._thread.join(min(0.05, max(0.0, deadline - time.monotonic())))
        self._thread = None
        self._close()

    def _run(self) -> None:
        start_cpu = time.thread_time()
        while not self._stop.is_set():
            try:
                progressed = self.ship_once()
            except Exception as exc:  # never let the shipper thread die; the records stay buffered
                self.stats.last_error = redact_text(f"shipper error: {exc!r}")  # it may quote a header
                progressed = False
            self.stats.cpu_seconds = time.thread_time() - start_cpu
            if not progressed:
                now = self._clock()
                # Signals backing off (their own or their origin's); once a backoff has passed, the usual waits
                # hold (a signal's not_before stays set until its 2xx: waiting until it, 0, spun a core).
                backoffs = [until for kind in self._signals if (until := self._held_until(kind)) > now]
                retry_in = min(backoffs, default=math.inf) - now
                if self._draining:
                    wait = 0.01 if len(backoffs) < len(self._signals) else retry_in
                elif self.eager:  # nothing left to send, or backing off
                    wait = min(self.poll, retry_in)
                else:
                    # Until the first signal falls due (a full batch wakes us sooner: Buffer.on_commit), or the
                    # first backoff ends, and after at most an interval, for records committed meanwhile.
                    wait = min(self.interval, max(self.poll, self._next_due - now), retry_in)
                self._wake.wait(wait)
                self._wake.clear()

    # --- one pass ------------------------------------------------------------------------------------

    def ship_once(self) -> bool:
        """Send at most one request per signal that is due and not backing off; True when a request was
        accepted. A signal's retryable failure backs off that signal alone: the next one is still tried."""
        now = self._clock()
        self._next_due = now + self.interval  # nothing pending: look again in an interval
        if not self.buffer.pending():
            return False
        progressed = False
        for kind in (Kind.SPAN, Kind.LOG, Kind.METRIC):
            signal = self._signals.get(kind)
            if signal is None or now < self._held_until(kind):  # no endpoint: kept; backing off (itself, or
                continue  # its origin, unreachable or just found so in this pass): _run wakes us then
            pending = self.buffer.pending(kind)
            if not pending:
                continue
            # A full batch goes at once; batch_min records wait for the interval (5 s by default); fewer wait
            # for twice the interval, so a quiet machine still ships every 10 s.
            due = self._last_sent[kind] + (self.interval if pending >= self.batch_min else 2 * self.interval)
            if not (self._draining or self.eager or pending >= self.batch_max or now >= due):
                self._next_due = min(self._next_due, due)
                continue
            limit = self.probe_records if signal.stats.breaker_open else self.batch_max
            try:
                sent = self._send(kind, limit)
            except _Unreachable as unreachable:
                self._unreachable(kind, str(unreachable))
                continue
            except _Retry as retry:
                self._failed(kind, str(retry), retry.retry_after)
                continue
            self._last_sent[kind] = self._clock()
            if sent:
                progressed = True
                self._succeeded(kind)
        return progressed

    def _send(self, kind: Kind, limit: int) -> int:
        chunks = self.buffer.read(kind, limit)
        if not chunks:
            return 0
        # (chunk id, index within chunk, record), in runs of one resource each: the records of each chunk go
        # with the resource of the process that made them (an earlier owner of the file, or the process whose
        # orphaned file this is), one resource a request.
        runs: list[tuple[Encoder, list[tuple[int, int, tuple]]]] = []
        taken = 0
        for chunk in chunks:
            encoder = self._encoder_for(chunk.id)
            if not runs or runs[-1][0] is not encoder:
                runs.append((encoder, []))
            flat = runs[-1][1]
            for index in range(chunk.sent, chunk.count):
                flat.append((chunk.id, index, chunk.records[index]))
                taken += 1
                if taken >= limit:
                    break
            if taken >= limit:
                break
        accepted = 0
        for batch, encoder in [(batch, encoder) for encoder, items in runs
                               for batch in self._requests(kind, items, encoder)]:
            if self._stop.is_set():  # stop() is cutting the drain short: the rest stays buffered
                break
            body = self._body(kind, [item[2] for item in batch[0]], batch[1], encoder)
            progress = self._progress(batch[0])
            try:
                rejected = self._post(kind, body)
            except _Rejected as rejection:
                self.buffer.dead_letter(kind, [item[2] for item in batch[0]], progress, str(rejection))
                self._dead_lettered(kind, len(batch[0]), str(rejection))
                continue
            self.buffer.ack(progress)  # a partial success too: what it rejected would be rejected again
            count = len(batch[0])
            accepted += count
            if rejected:
                # Spans and log records are records; a metric record is every series' point, so its rejected
                # data points are counted as such, and its records as exported (the rest of their points were).
                dropped = rejected if kind == Kind.METRIC else min(rejected, count)
                self.stats.rejected += dropped
                self.buffer.count_drop(REJECTED_BY_COLLECTOR, dropped)
                if kind != Kind.METRIC:
                    count -= dropped
            if count:
                self.stats.exported[_KIND_NAMES[kind]] += count
                if self.on_exported is not None:
                    self.on_exported(_KIND_NAMES[kind], count)
        return accepted

    def _dead_lettered(self, kind: Kind, count: int, reason: str) -> None:
        """Count a batch the collector refused for good, and warn once per distinct reason."""
        self.stats.dead_lettered += count
        self.stats.last_error = reason
        if reason not in self._dead_warned:
            if len(self._dead_warned) >= 64:  # bounded: a collector's messages may quote each batch
                self._dead_warned.clear()
            self._dead_warned.add(reason)
            _log.warning("telemetry shipper: %d %s dead-lettered: %s (the collector will not take them: kept in "
                         "the buffer's dead-letter table, see `emp-machine telemetry --dead-letters`; this reason "
                         "is not logged again)", count, _KIND_NAMES[kind], reason)

    def _encoder_for(self, chunk_id: int) -> Encoder:
        """The encoder for chunk `chunk_id`'s records: of the resource the buffer recorded for it, else ours."""
        resource = self.buffer.resource_of(chunk_id)
        if resource is None:
            return self.encoder
        encoder = self._encoders.get(resource)
        if encoder is None:
            try:
                attributes = json.loads(resource)
                if not isinstance(attributes, dict):
                    raise ValueError("not an object")
                encoder = self.encoder.for_resource(attributes)
            except Exception as exc:  # a damaged entry: its records still ship, with our resource
                _log.warning("telemetry shipper: %s: unreadable resource recorded for chunk %d (%s); its records "
                             "are sent with this process's resource", self.buffer.path.name, chunk_id, exc)
                encoder = self.encoder
            self._encoders[resource] = encoder
        return encoder

    def _requests(self, kind: Kind, flat: list, encoder: Encoder) -> list[tuple[list, list[bytes] | None]]:
        """Split `flat` into requests under `max_request_size` (spans and logs are encoded here, once; a metric
        record, one point of every series, is measured by encoding it alone: 40 job types make ~23 KB, and 50
        of those were a 1.1 MB request). A single record over the limit goes alone."""
        budget = self.max_request_size - _REQUEST_OVERHEAD
        if kind == Kind.METRIC:
            empty = len(encoder.metrics([]))
            sized = [(item, None, len(encoder.metrics([item[2]])) - empty) for item in flat]
            count_cap = 50
        else:
            encode = encode_span if kind == Kind.SPAN else encode_log
            sized = []
            for item in flat:
                data = encode(item[2])
                sized.append((item, data, len(data) + 6))  # + field tag and length
            count_cap = len(flat)
        requests: list[tuple[list, list[bytes] | None]] = []
        items: list = []
        encoded: list[bytes] = []
        size = 0
        for item, data, item_size in sized:
            if items and (size + item_size > budget or len(items) >= count_cap):
                requests.append((items, encoded if kind != Kind.METRIC else None))
                items, encoded, size = [], [], 0
            items.append(item)
            encoded.append(data)
            size += item_size
        if items:
            requests.append((items, encoded if kind != Kind.METRIC else None))
        return requests

    def _body(self, kind: Kind, records: list, encoded: list[bytes] | None, encoder: Encoder) -> bytes:
        if kind == Kind.SPAN:
            return encoder.traces(encoded)
        if kind == Kind.LOG:
            return encoder.logs(encoded)
        return encoder.metrics(records)

    @staticmethod
    def _progress(items: list) -> list[tuple[int, int]]:
        last: dict[int, int] = {}
        for chunk_id, index, _ in items:
            last[chunk_id] = index + 1
        return list(last.items())

    # --- HTTP ----------------------------------------------------------------------------------------

    def _connection(self, target: _Target) -> http.client.HTTPConnection:
        key = (target.scheme, target.host, target.port)
        if (conn := self._conns.get(key)) is None:
            cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
            conn = self._conns[key] = cls(target.host, target.port, timeout=self.timeout)
        return conn

    def _close(self, target: _Target | None = None) -> None:
        """Close `target`'s connection, or all of them."""
        keys = [(target.scheme, target.host, target.port)] if target is not None else list(self._conns)
        for key in keys:
            if (conn := self._conns.pop(key, None)) is not None:
                conn.close()

    def _abort(self) -> None:
        """From stop()'s thread: cut the shipper thread's requests short (shutdown wakes a blocked recv, close
        does not); it sees a connection error and keeps the records."""
        for conn in tuple(self._conns.values()):
            sock = conn.sock
            if sock is not None:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, under TLS too
                except OSError:
                    pass

    def _post(self, kind: Kind, body: bytes) -> int:
        """Send one request; the number of records (metric data points) an accepted request's partial_success
        says were rejected. Raises _Retry (and _Unreachable) for what may go through later, _Rejected for what
        never will."""
        target = self._targets[kind]
        payload = _gzip(body) if self._compress else body
        conn = self._connection(target)
        if conn.sock is None:  # opened here, apart from the request: failing to is the origin's fault
            try:
                conn.connect()
            except (OSError, socket.timeout) as exc:  # refused, timed out, not resolved (gaierror), TLS (SSLError)
                self._close(target)
                raise _Unreachable(f"{type(exc).__name__}: {exc}") from None
            self._reached(kind)
        try:
            conn.request("POST", target.path, body=payload, headers=target.headers)
            response = conn.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException, socket.timeout) as exc:
            self._close(target)
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        self._reached(kind)  # an answer (on a connection kept from before the origin was found down, too)
        status = response.status
        if response.getheader("Connection", "").lower() == "close":
            self._close(target)
        if 200 <= status < 300:
            rejected = self._accepted(kind, status, answer, response.getheader("Content-Type") or "")
            self.stats.bytes_sent += len(payload)
            return rejected
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status}", _retry_after(response.getheader("Retry-After"), self.max_retry_after))
        if 300 <= status < 400:
            # Not followed (a POST is not re-sent blindly, and the URL is ours to fix), not a rejection of
            # the records either: retried with backoff, kept, and warned about so the endpoint gets fixed.
            self.stats.redirects += 1
            reason = f"HTTP {status} from {PATHS[kind]}{_moved_to(response.getheader('Location'))}: " \
                     f"redirects are not followed, fix the OTLP endpoint"
            raise self._retry_warned(kind, reason)
        message = _status_message(answer, response.getheader("Content-Type"))
        raise _Rejected(f"HTTP {status} from {PATHS[kind]}{message}")

    def _retry_warned(self, kind: Kind, reason: str) -> _Retry:
        """_Retry(reason), warned about once while the answer stays the same (the endpoint is to fix)."""
        if reason != self._signals[kind].warned:
            self._signals[kind].warned = reason
            _log.warning("telemetry shipper: %s (records stay buffered and are retried)", reason)
        return _Retry(reason)

    def _accepted(self, kind: Kind, status: int, answer: bytes, content_type: str) -> int:
        """A 2xx answer's Export*ServiceResponse: the count its partial_success rejected (warned about with
        the collector's message), 0 for an empty body. An HTML page answered 2xx (a proxy's login page) raises
        _Retry: whatever answered, it was not the collector, so the records were not taken. Any other body that
        is no such response ("OK", "Accepted", a JSON of another shape: receivers that are not quite OTLP) is
        taken as a whole success, warned about once: retried, a receiver that did take the records got them
        again and again, and nothing after them was ever sent."""
        if not answer:
            return 0
        response_type, rejected_field = _RESPONSES[kind]
        media = content_type.split(";", 1)[0].strip().lower()
        unreadable = f"HTTP {status} from {PATHS[kind]} whose body is not an OTLP response " \
                     f"({media or 'no content type'})"
        if media == "text/html":
            reason = f"{unreadable}: a proxy or another service answered in the collector's place; check the " \
                     f"OTLP endpoint"
            raise self._retry_warned(kind, reason)
        try:
            if media == "application/json":  # OTLP/JSON's answer, from a collector that ignores what we sent
                response = json_format.Parse(answer, response_type(), ignore_unknown_fields=True)
            else:
                response = response_type.FromString(answer)
        except (DecodeError, json_format.ParseError, ValueError, UnicodeDecodeError):
            if unreadable != self._signals[kind].noted:
                self._signals[kind].noted = unreadable
                _log.warning("telemetry shipper: %s: taken as accepted (a receiver that is not quite OTLP)",
                             unreadable)
            return 0
        partial = response.partial_success
        rejected = getattr(partial, rejected_field)
        message = " ".join(redact_text(partial.error_message).split())[:500]
        what = "data points" if kind == Kind.METRIC else _KIND_NAMES[kind]
        if rejected > 0:
            _log.warning("telemetry shipper: the collector rejected %d %s of a request to %s: %s (counted as "
                         "dropped, reason %s; not retried)", rejected, what, PATHS[kind],
                         message or "no reason given", REJECTED_BY_COLLECTOR)
        elif message and message != self._signals[kind].noted:  # accepted, with a warning of the collector's
            self._signals[kind].noted = message
            _log.warning("telemetry shipper: the collector accepted a whole request to %s and says: %s",
                         PATHS[kind], message)
        return max(0, rejected)

    # --- backoff and circuit breaker -----------------------------------------------------------------

    def _failed(self, kind: Kind, reason: str, retry_after: float | None) -> None:
        """Back `kind` off (the other signals keep their own state)."""
        signal = self._signals[kind]
        stats = signal.stats
        self.stats.requests_failed += 1
        self.stats.last_error = reason
        self._count_failure(stats, reason)
        delay = self._delay(stats.consecutive_failures)
        if retry_after is not None:
            delay = min(max(delay, retry_after), max(self.max_backoff, retry_after))
        signal.not_before = self._clock() + delay
        self._aggregate()

    def _count_failure(self, stats: SignalStats, reason: str) -> None:
        """One more failure in a row for a signal's `stats`: its circuit opens at `breaker_threshold`."""
        stats.last_error = reason
        stats.consecutive_failures += 1
        if stats.consecutive_failures >= self.breaker_threshold:
            stats.breaker_open = True

    def _delay(self, failures: int) -> float:
        """The backoff after `failures` failures in a row: exponential up to `max_backoff`, jittered to 50-100%."""
        exponent = min(failures - 1, 16)
        return min(self.max_backoff, self.base_backoff * 2**exponent) * self._rng.uniform(0.5, 1.0)

    def _held_until(self, kind: Kind) -> float:
        """When `kind` may be tried again: after its own backoff and its origin's."""
        return max(self._signals[kind].not_before, self._origins[self._origin_of[kind]].not_before)

    def _unreachable(self, kind: Kind, reason: str) -> None:
        """No connection to `kind`'s origin: back the origin off, which holds back every signal sending there
        (one probe per backoff, not one per signal). The failure counts for each of them with records waiting
        (none could be sent); their own not_before (a Retry-After) is kept for when the origin is back."""
        origin = self._origins[self._origin_of[kind]]
        origin.failures += 1
        origin.not_before = self._clock() + self._delay(origin.failures)
        self.stats.requests_failed += 1
        self.stats.last_error = reason
        for other, signal in self._signals.items():
            if self._origin_of[other] != self._origin_of[kind]:
                continue
            stats = signal.stats
            stats.unreachable = True
            if other != kind and not self.buffer.pending(other):
                continue  # held back too, but nothing of it failed
            self._count_failure(stats, reason)
        self._aggregate()

    def _reached(self, kind: Kind) -> None:
        """A connection to `kind`'s origin opened: its signals go on from their own state (an open circuit
        still probes first, a Retry-After still holds)."""
        key = self._origin_of[kind]
        origin = self._origins[key]
        if not origin.failures:
            return
        origin.failures, origin.not_before = 0, 0.0
        for other, signal in self._signals.items():
            if self._origin_of[other] == key:
                signal.stats.unreachable = False

    def _succeeded(self, kind: Kind) -> None:
        signal = self._signals[kind]
        self.stats.requests_ok += 1
        signal.stats.consecutive_failures = 0
        signal.stats.breaker_open = False  # the probe got through: full batches resume
        signal.not_before = 0.0
        signal.warned = ""
        self._aggregate()

    def _aggregate(self) -> None:
        """The shipper-wide view: the most consecutive failures of any signal, open when any circuit is."""
        signals = [signal.stats for signal in self._signals.values()]
        self.stats.consecutive_failures = max(stats.consecutive_failures for stats in signals)
        self.stats.breaker_open = any(stats.breaker_open for stats in signals)

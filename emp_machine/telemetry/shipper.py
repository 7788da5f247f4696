"""The shipper: buffer -> OTLP/HTTP protobuf, at least once, in a background thread.

Per signal (`/v1/traces`, `/v1/logs`, `/v1/metrics`) it sends when a full batch (`batch_max` records) is
waiting, or every `interval` when at least one record is, in requests of at most `batch_max` records and
`max_request_size` bytes, gzip level 1. Records leave the buffer only after a 2xx (`Buffer.ack`, partial
chunks included, so a batch split across requests is never sent twice by us).

Failures: connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter, honouring
`Retry-After`; after `breaker_threshold` consecutive failures the circuit opens, and once the backoff has passed
a single small probe request (at most `probe_records`) must succeed before full batches resume. A 4xx other than
429 means the collector will never take that batch: it moves to the buffer's dead-letter table (kept, counted).
Duplicates are possible only when a collector accepted a request and the reply was lost (at least once).
"""

from __future__ import annotations

import email.utils
import http.client
import math
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from emp_machine.telemetry.buffer import Buffer, Kind
from emp_machine.telemetry.urls import http_url_problem
from emp_machine.telemetry.encode import Encoder, encode_log, encode_span

PATHS = {Kind.SPAN: "/v1/traces", Kind.LOG: "/v1/logs", Kind.METRIC: "/v1/metrics"}
_REQUEST_OVERHEAD = 4096  # resource + scope + framing, well above what ours take


@dataclass
class ShipperStats:
    exported: dict[str, int] = field(default_factory=lambda: {"spans": 0, "logs": 0, "metrics": 0})
    requests_ok: int = 0
    requests_failed: int = 0
    dead_lettered: int = 0
    consecutive_failures: int = 0
    breaker_open: bool = False
    last_error: str = ""
    bytes_sent: int = 0
    cpu_seconds: float = 0.0


_KIND_NAMES = {Kind.SPAN: "spans", Kind.LOG: "logs", Kind.METRIC: "metrics"}


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Rejected(Exception):
    """The collector refused the batch for good (4xx other than 429)."""


def _gzip(body: bytes) -> bytes:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    return compressor.compress(body) + compressor.flush()


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


class Shipper:
    def __init__(self, buffer: Buffer, encoder: Encoder, endpoint: str, *, headers: dict[str, str] | None = None,
                 batch_min: int = 100, batch_max: int = 1000, max_request_size: int = 10**6,
                 interval: float = 5.0, timeout: float = 10.0, compression: str = "gzip",
                 max_backoff: float = 60.0, base_backoff: float = 0.5, breaker_threshold: int = 3,
                 probe_records: int = 10, poll: float = 1.0, max_retry_after: float = MAX_RETRY_AFTER_S,
                 on_exported: Callable[[str, int], None] | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        if (problem := http_url_problem(endpoint)) is not None:  # the URL is not quoted: it may hold a password
            raise ValueError(f"telemetry.otlp_endpoint {problem}")
        parts = urlsplit(endpoint)
        self.buffer = buffer
        self.encoder = encoder
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._base_path = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        if compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._compress = compression == "gzip"
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
        self._conn: http.client.HTTPConnection | None = None
        self._last_sent = {kind: clock() for kind in PATHS}
        self._next_due = clock()  # when the first signal with records waiting falls due (ship_once)
        self._not_before = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._draining = False
        self._thread: threading.Thread | None = None
        self.stats = ShipperStats()

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> "Shipper":
        # The writer wakes us when a full batch is stored; otherwise we sleep until something can be due.
        self.buffer.on_commit = lambda stored: stored >= self.batch_max and self._wake.set()
        self._thread = threading.Thread(target=self._run, name="telemetry-shipper", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Try to send everything buffered (up to `drain_timeout`), then stop; what is left stays buffered."""
        if self._thread is None:
            return
        self._draining = True
        self._wake.set()
        deadline = time.monotonic() + drain_timeout
        self.buffer.flush(max(0.1, drain_timeout))
        while time.monotonic() < deadline and self.buffer.pending() and not self.stats.breaker_open \
                and self._thread.is_alive():
            time.sleep(0.02)  # polling the drain's progress, not synchronising with it
        self._stop.set()
        self._wake.set()
        self._thread.join(self.timeout + 1)
        self._thread = None
        self._close()

    def _run(self) -> None:
        start_cpu = time.thread_time()
        while not self._stop.is_set():
            try:
                progressed = self.ship_once()
            except Exception as exc:  # never let the shipper thread die; the records stay buffered
                self.stats.last_error = f"shipper error: {exc!r}"
                progressed = False
            self.stats.cpu_seconds = time.thread_time() - start_cpu
            if not progressed:
                now = self._clock()
                if self._not_before:
                    wait = max(0.0, self._not_before - now)
                elif self._draining:
                    wait = 0.01
                else:
                    # Until the first signal falls due (a full batch wakes us sooner: Buffer.on_commit), and
                    # after at most an interval, for records committed meanwhile.
                    wait = min(self.interval, max(self.poll, self._next_due - now))
                self._wake.wait(wait)
                self._wake.clear()

    # --- one pass ------------------------------------------------------------------------------------

    def ship_once(self) -> bool:
        """Send at most one request per signal that is due; True when a request was accepted."""
        now = self._clock()
        self._next_due = now + self.interval  # nothing pending: look again in an interval
        if now < self._not_before:
            return False
        if not self.buffer.pending():
            return False
        progressed = False
        for kind in (Kind.SPAN, Kind.LOG, Kind.METRIC):
            pending = self.buffer.pending(kind)
            if not pending:
                continue
            # A full batch goes at once; batch_min records wait for the interval (5 s by default); fewer wait
            # for twice the interval, so a quiet machine still ships every 10 s.
            due = self._last_sent[kind] + (self.interval if pending >= self.batch_min else 2 * self.interval)
            if not (self._draining or pending >= self.batch_max or now >= due):
                self._next_due = min(self._next_due, due)
                continue
            limit = self.probe_records if self.stats.breaker_open else self.batch_max
            try:
                sent = self._send(kind, limit)
            except _Retry as retry:
                self._failed(str(retry), retry.retry_after)
                return progressed
            self._last_sent[kind] = self._clock()
            if sent:
                progressed = True
                self._succeeded()
        return progressed

    def _send(self, kind: Kind, limit: int) -> int:
        chunks = self.buffer.read(kind, limit)
        if not chunks:
            return 0
        flat: list[tuple[int, int, tuple]] = []  # (chunk id, index within chunk, record)
        for chunk in chunks:
            for index in range(chunk.sent, chunk.count):
                flat.append((chunk.id, index, chunk.records[index]))
                if len(flat) >= limit:
                    break
            if len(flat) >= limit:
                break
        accepted = 0
        for batch in self._requests(kind, flat):
            body = self._body(kind, [item[2] for item in batch[0]], batch[1])
            progress = self._progress(batch[0])
            try:
                self._post(PATHS[kind], body)
            except _Rejected as rejected:
                self.buffer.dead_letter(kind, [item[2] for item in batch[0]], progress, str(rejected))
                self.stats.dead_lettered += len(batch[0])
                self.stats.last_error = str(rejected)
                continue
            self.buffer.ack(progress)
            accepted += len(batch[0])
            self.stats.exported[_KIND_NAMES[kind]] += len(batch[0])
            if self.on_exported is not None:
                self.on_exported(_KIND_NAMES[kind], len(batch[0]))
        return accepted

    def _requests(self, kind: Kind, flat: list) -> list[tuple[list, list[bytes] | None]]:
        """Split `flat` into requests under `max_request_size` (spans and logs are encoded here, once)."""
        if kind == Kind.METRIC:
            return [(flat[i:i + 50], None) for i in range(0, len(flat), 50)]
        encode = encode_span if kind == Kind.SPAN else encode_log
        budget = self.max_request_size - _REQUEST_OVERHEAD
        requests: list[tuple[list, list[bytes]]] = []
        items: list = []
        encoded: list[bytes] = []
        size = 0
        for item in flat:
            data = encode(item[2])
            if items and size + len(data) + 6 > budget:
                requests.append((items, encoded))
                items, encoded, size = [], [], 0
            items.append(item)
            encoded.append(data)
            size += len(data) + 6
        if items:
            requests.append((items, encoded))
        return requests

    def _body(self, kind: Kind, records: list, encoded: list[bytes] | None) -> bytes:
        if kind == Kind.SPAN:
            return self.encoder.traces(encoded)
        if kind == Kind.LOG:
            return self.encoder.logs(encoded)
        return self.encoder.metrics(records)

    @staticmethod
    def _progress(items: list) -> list[tuple[int, int]]:
        last: dict[int, int] = {}
        for chunk_id, index, _ in items:
            last[chunk_id] = index + 1
        return list(last.items())

    # --- HTTP ----------------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _post(self, path: str, body: bytes) -> None:
        payload = _gzip(body) if self._compress else body
        conn = self._connection()
        try:
            conn.request("POST", self._base_path + path, body=payload, headers=self._headers)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException, socket.timeout) as exc:
            self._close()
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        status = response.status
        if response.getheader("Connection", "").lower() == "close":
            self._close()
        if 200 <= status < 300:
            self.stats.bytes_sent += len(payload)
            return
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status}", _retry_after(response.getheader("Retry-After"), self.max_retry_after))
        raise _Rejected(f"HTTP {status} from {path}")

    # --- backoff and circuit breaker -----------------------------------------------------------------

    def _failed(self, reason: str, retry_after: float | None) -> None:
        stats = self.stats
        stats.requests_failed += 1
        stats.consecutive_failures += 1
        stats.last_error = reason
        if stats.consecutive_failures >= self.breaker_threshold:
            stats.breaker_open = True
        exponent = min(stats.consecutive_failures - 1, 16)
        delay = min(self.max_backoff, self.base_backoff * 2**exponent) * self._rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = min(max(delay, retry_after), max(self.max_backoff, retry_after))
        self._not_before = self._clock() + delay

    def _succeeded(self) -> None:
        self.stats.requests_ok += 1
        self.stats.consecutive_failures = 0
        self.stats.breaker_open = False  # the probe got through: full batches resume
        self._not_before = 0.0

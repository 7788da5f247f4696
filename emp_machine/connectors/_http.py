"""What every HTTP connector shares: trace headers, redaction, error mapping, files.

Context propagation is telemetry's: the worker puts telemetry's `http_headers`, made in the job's
`service.call` span, on the ConnectorJob, and `service_headers` hands them to each request. Lifecycle
records go through the connector's `joblog` (telemetry's ConnectorLogger).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import mimetypes
import re
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, ServiceUnreachable
from emp_machine.telemetry.context import header_value
from emp_machine.telemetry.tracing import note_request_id

REDACTED = "[REDACTED]"
# Stopping a cancelled job's work on the service (an interrupt) gets this long in all, not request_timeout_s
# per call: a hung server must not hold a job timeout or a drain's hand-back for half a minute (it did).
STOP_GRACE_S = 2.0
# close() lets such stops still in flight finish for at most this long before the session goes.
CLOSE_STOP_WAIT_S = 0.5
# The default cap on a reply held in memory (JSON or text): a service answering 150 MiB cost +575 MiB of peak
# memory. Files streamed to disk (save_response) are capped by it where the connector passes it.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class HttpSession:
    """The lazily created aiohttp session of an HTTP connector (created inside the running loop), closed by
    `close()`. Mixed in before `Connector`; the connector's settings give `request_timeout_s` and
    `connect_timeout_s`."""

    _session: aiohttp.ClientSession | None = None
    _stopping: set[asyncio.Task] | None = None  # stops going on after their job's run() was cancelled

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=self.settings.request_timeout_s, connect=self.settings.connect_timeout_s))
        return self._session

    def _stop_in_background(self, stop: Any) -> None:
        """Run `stop` (a coroutine telling the service to drop a job) without holding the job's cancellation:
        the worker records the timeout or hands the job back at once, while the stop goes on, bounded by the
        coroutine itself (STOP_GRACE_S)."""
        if self._stopping is None:
            self._stopping = set()
        task = asyncio.get_running_loop().create_task(stop)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        if self._stopping:  # a live server answers in milliseconds; a hung one is not waited for
            await asyncio.wait(set(self._stopping), timeout=CLOSE_STOP_WAIT_S)
        if self._session is not None:
            await self._session.close()

    async def _request(self, service: str, method: str, url: str, headers: Mapping[str, str],
                       **kwargs: Any) -> tuple[int, Any]:
        """One request: (status, parsed JSON, or the text when it is not JSON). Transport failures become
        RetryableJobError naming `service` and the URL."""
        status, answer, _ = await self._exchange(service, method, url, headers, **kwargs)
        return status, answer

    async def _exchange(self, service: str, method: str, url: str, headers: Mapping[str, str],
                        **kwargs: Any) -> tuple[int, Any, Mapping[str, str]]:
        """_request with the response's headers too (its Retry-After, say)."""
        try:
            async with self._http().request(method, url, headers=headers, **kwargs) as response:
                # a binary or mis-encoded reply must not raise a bare UnicodeDecodeError (permanent, not ours)
                text = await response.text(errors="replace")
        except TRANSPORT_ERRORS as exc:
            raise transport_error(service, url, exc) from None
        try:
            return response.status, json.loads(text) if text else None, response.headers
        except ValueError:
            return response.status, text, response.headers


def service_headers(job: Any, request_id: str | None = None) -> dict[str, str]:
    """The headers of a request to the service for `job`: its `headers` (telemetry's, made by the worker in
    the job's `service.call` span: traceparent, tracestate, x-job-id), a copy per request, each with its own
    `x-request-id` (`request_id`, else a new `req-{uuid}`): one id per HTTP request, as services log them,
    also kept in the current span's `request_ids` attribute.

    A job without them (built outside a worker, or by another producer) gets `x-job-id`, a new `x-request-id`
    and its `traceparent` / `tracestate` fields when it has them, read with getattr; a malformed traceparent
    is passed through untouched, as the architecture asks."""
    request_id = request_id or f"req-{uuid.uuid4()}"
    note_request_id(request_id)  # on the service.call span: the id is findable from our side too
    given = getattr(job, "headers", None)
    if given:
        headers = dict(given)
        headers["x-request-id"] = request_id
        return headers
    headers = {"x-job-id": header_value(str(job.id)), "x-request-id": request_id}
    for name in ("traceparent", "tracestate"):
        value = getattr(job, name, None)
        if value:
            headers[name] = str(value)
    return headers


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced; secrets shorter than 4 characters are ignored (they would
    redact ordinary words and are not credentials anyway)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


def transport_error(service: str, url: str, exc: BaseException) -> RetryableJobError:
    """A connection refused / reset / timed out talking to a service: always worth another attempt. One that
    failed before a connection was made (refused, DNS, connect timeout: CONNECT_ERRORS) is ServiceUnreachable:
    the request never reached the service (the worker then checks its health before counting an attempt)."""
    kind = "timed out" if isinstance(exc, TimeoutError) else "unreachable"
    cls = ServiceUnreachable if isinstance(exc, CONNECT_ERRORS) else RetryableJobError
    return cls(f"{service} {kind} at {strip_query(url)}: {type(exc).__name__}: {exc}")


# aiohttp's connection errors are OSError subclasses but not ConnectionError; name them once here.
TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError)
# Those of them raised before a connection existed: nothing was sent (refused, DNS failure, connect timeout).
CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, ConnectionRefusedError)


def strip_query(url: str) -> str:
    """Query strings can carry tokens: errors and logs show only scheme, host and path."""
    return url.split("?", 1)[0]


def ms_since(started: float) -> float:
    """Milliseconds since a `time.monotonic()` reading, for a record's duration_ms."""
    return round((time.monotonic() - started) * 1000, 1)


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, default: str = "output") -> str:
    """A file name that cannot leave its directory, whatever the service called the file."""
    cleaned = _UNSAFE.sub("_", Path(name).name).strip("._")
    return cleaned[:120] or default


def job_dir(output_dir: str | Path, job_id: str) -> Path:
    """The directory of one job's outputs under `output_dir`: the id itself when it is a plain file name,
    else its safe form and a digest of the whole id, so that ids differing only in the characters
    safe_name drops (`a/b` and `c/b`, `x:1` and `x_1`) never share a directory, and no id leaves
    `output_dir`."""
    name = safe_name(job_id, "job")
    if name != job_id:
        name = f"{name[:100]}-{hashlib.sha256(job_id.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
    return Path(output_dir) / name


def unique_path(directory: Path, name: str) -> Path:
    """`directory/name`, or `stem-N.suffix` when a file of that name is already there."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    n = 1
    while path.exists():
        path = directory / f"{Path(name).stem}-{n}{Path(name).suffix}"
        n += 1
    return path


def mime_for(name: str, header: str | None = None) -> str:
    if header and header.split(";")[0].strip() not in ("", "application/octet-stream"):
        return header.split(";")[0].strip()
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _too_big(what: str, size: str, limit: int, setting: str) -> FatalJobError:
    return FatalJobError(f"{what} answered {size} bytes, more than {setting} ({limit} bytes): raise the "
                         f"connector's {setting} setting or ask the service for a smaller answer")


async def read_limited(response: aiohttp.ClientResponse, limit: int, what: str,
                       setting: str = "max_response_bytes") -> bytes:
    """The whole body of `response`, refused (FatalJobError naming `setting`) when Content-Length says more
    than `limit` bytes or the body read grows past it: an oversized reply is never held in memory whole.
    For an error answer (status >= 400) read_head instead: its status decides, not its size."""
    length = response.content_length
    if length is not None and length > limit:
        raise _too_big(what, str(length), limit, setting)
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise _too_big(what, f"over {limit}", limit, setting)
        chunks.append(chunk)
    return b"".join(chunks)


def same_origin(a: str, b: str) -> bool:
    """Whether two absolute URLs share scheme, host and port (default ports made explicit)."""
    def origin(url: str) -> tuple[str, str, int | None]:
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)
    return origin(a) == origin(b)


# What of an error answer's body is read (for its message): a proxy's huge error page must not turn a
# retryable 429 or 5xx into a permanent "answer too large".
ERROR_BODY_BYTES = 64 * 1024


async def read_head(response: aiohttp.ClientResponse, limit: int = ERROR_BODY_BYTES) -> bytes:
    """At most the first `limit` bytes of `response`'s body (the rest is left unread: the connection closes)."""
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        chunks.append(chunk[:limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    return b"".join(chunks)


async def save_response(response: aiohttp.ClientResponse, path: Path, limit: int | None = None,
                        what: str = "the service", setting: str = "max_response_bytes") -> int:
    """Stream a response body to `path` (outputs can be large: never hold them whole in memory); with `limit`,
    refused (FatalJobError naming `setting`) past that many bytes: a body that never ends must not fill the
    disk. The caller removes `path` on an error."""
    if limit is not None and response.content_length is not None and response.content_length > limit:
        raise _too_big(what, str(response.content_length), limit, setting)
    size = 0
    with path.open("wb") as out:
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if limit is not None and size > limit:
                raise _too_big(what, f"over {limit}", limit, setting)
            out.write(chunk)
    return size


def sniff_image_suffix(data: bytes) -> str:
    """The suffix for base64 image bytes, whose name the service never says."""
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    return ".bin"


async def until_cancelled(coro, cancelled: asyncio.Event, what: str):
    """Await `coro` unless `cancelled` is set first: then the request is abandoned (closing its
    connection, which is all an HTTP service without a cancel endpoint offers) and JobCancelled raised."""
    work = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
    if work.done() and not work.cancelled():
        return work.result()
    raise JobCancelled(f"{what} cancelled")

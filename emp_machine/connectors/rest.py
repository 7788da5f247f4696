"""The rest connector: a generic HTTP service described entirely in the manifest.

`mode: sync` sends the payload as JSON to `submit_url` and takes the result from the answer. `mode: async`
submits the same way, then polls `status_url` every `poll_interval_s` until the value at `status_path` is one
of `done_values` (result from that answer) or `failed_values` (message from `error_path`), reporting the
value at `progress_path` (0-1, or 0-100 with `progress_scale: 100`).

Stopping an async task: with a `cancel_url`, the service is told (a POST, given `_http.STOP_GRACE_S` in all,
its failure logged as `cancel_failed`, never raised) whenever the job ends before the service finished it: a
user's cancel (awaited, before the job reports cancelled), `job_timeout_s` or the worker cancelling run() (its
job timeout, a drain handing the job back to run elsewhere: in the background, so nothing waits for a hung
service). A cancel, timeout or drain while the submit is still being answered does not abandon it (the
service may have created the task and be slow to answer): it goes on in the background, bounded by
`request_timeout_s`, and cancel_url is posted with its answer. Without a `cancel_url` the submit is
abandoned and the service is never told: it runs the task to its end.

URLs are templates: `{job_id}` is the job's id, any other `{a.b}` is a dot path into the submit answer
(`{id}`, `{data.task_id}`), URL-quoted. Paths are dot paths with integer indexes (`output.0.url`); an empty
path means the whole answer. Header values come from environment variables *named* in `header_env` (read
once at construction through an injectable mapping) and are redacted from errors, logs, health reasons and
results, whole and in the parts a service may quote back (the token after `Bearer`, Basic's password).

429 and 5xx are retryable, other 4xx permanent; connection failures and timeouts retryable.

`method: GET` sends the payload as query parameters (a flat JSON object: scalar values, or lists of them as
repeated parameters; anything nested is refused). Redirects are followed by hand, at most MAX_REDIRECTS: to
the same origin (scheme, host, port) with every header, to another origin without the `header_env` headers
(nor Authorization, Proxy-Authorization, Cookie), and none of them afterwards. A JSON or text answer is held
in memory up to `max_response_bytes` (over it: permanent); in sync mode, an answer that is neither (an image,
audio, application/octet-stream) is streamed to a file in the job's output directory, the job's output.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import mimetypes
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from emp_machine.connectors import _http
from emp_machine.connectors.base import (
    Connector, ConnectorJob, ConnectorSettings, Health, HttpUrl, JobResult, OutputFile, ProgressFn,
)
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, ServiceUnreachable, can_retry

_MISSING = object()
_FIELD = re.compile(r"\{([^{}]+)\}")
MAX_REDIRECTS = 10
_REDIRECTS = (301, 302, 303, 307, 308)
# Never sent to another origin than the configured URL's, whichever settings key they come from.
_CREDENTIAL_HEADERS = {"authorization", "proxy-authorization", "cookie"}
_TEXT_TYPES = {"application/json", "application/xml", "application/javascript", "application/ecmascript",
               "application/x-ndjson", "application/x-www-form-urlencoded", "application/yaml", "application/x-yaml"}


class RestSettings(ConnectorSettings):
    mode: Literal["sync", "async"] = "sync"
    method: Literal["POST", "PUT", "GET"] = "POST"
    submit_url: HttpUrl
    status_url: HttpUrl | None = None
    cancel_url: HttpUrl | None = None  # async only: POSTed (templated) when the job is cancelled, times out, is drained
    health_url: HttpUrl | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    header_env: dict[str, str] = Field(default_factory=dict)  # header name -> env var NAME
    result_path: str = ""
    status_path: str = "status"
    progress_path: str | None = None
    progress_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    error_path: str = "error"
    done_values: list[str] = Field(default_factory=lambda: ["done", "completed", "succeeded", "success"])
    failed_values: list[str] = Field(default_factory=lambda: ["failed", "error", "cancelled", "canceled"])
    poll_interval_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    connect_timeout_s: float = Field(default=5, gt=0, allow_inf_nan=False)
    request_timeout_s: float = Field(default=60, gt=0, allow_inf_nan=False)
    job_timeout_s: float = Field(default=3600, gt=0, allow_inf_nan=False)
    max_response_bytes: int = Field(default=_http.DEFAULT_MAX_RESPONSE_BYTES, gt=0)  # JSON/text held in memory

    @model_validator(mode="after")
    def _async_needs_status_url(self):
        if self.mode == "async" and not self.status_url:
            raise ValueError("status_url is required when mode is async")
        return self


def at_path(document: Any, path: str, default: Any = _MISSING) -> Any:
    """The value at a dot path (`a.b.0.c`); `default`, or FatalJobError naming the path, when absent."""
    value = document
    for part in [p for p in path.split(".") if p] if path else []:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        elif default is not _MISSING:
            return default
        else:
            raise FatalJobError(f"the service's answer has nothing at {path!r}: {json.dumps(document)[:300]}")
    return value


def render(template: str, job_id: str, submitted: Any) -> str:
    def field(match: re.Match) -> str:
        name = match.group(1)
        value = str(job_id if name == "job_id" else at_path(submitted, name))
        if value in (".", ".."):
            # quote() leaves dots alone and the URL library removes dot segments, even encoded: a job id `..`
            # turned `/tasks/{job_id}/cancel` into `/cancel` on the service, another endpoint than configured
            raise FatalJobError(f"{{{name}}} is {value!r} here, which would change the path of "
                                f"{_http.strip_query(template)} on the service: refused")
        return urllib.parse.quote(value, safe="")
    return _FIELD.sub(field, template)


def query_url(url: str, payload: Any) -> str:
    """`url` with a flat JSON-object `payload` appended as query parameters (GET has no body)."""
    if payload is None:
        return url
    if not isinstance(payload, dict):
        raise FatalJobError(f"method GET sends the payload as query parameters, so it must be a flat JSON object, "
                            f"not a {type(payload).__name__}: use POST or PUT for another body")
    pairs = []
    for key, value in payload.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (dict, list)):
                raise FatalJobError(f"method GET sends the payload as query parameters: {key!r} holds a nested "
                                    f"{'object' if isinstance(item, dict) else 'list'}; send a flat object or "
                                    "use POST or PUT")
            if item is not None:
                pairs.append((str(key), "true" if item is True else "false" if item is False else str(item)))
    if not pairs:
        return url
    parts = urllib.parse.urlsplit(url)
    query = "&".join(q for q in (parts.query, urllib.parse.urlencode(pairs)) if q)
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _is_text(content_type: str | None) -> bool | None:
    """Whether a reply's Content-Type is JSON or text (None: it says nothing)."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if not mime:
        return None
    return mime.startswith("text/") or mime.endswith(("+json", "+xml")) or mime in _TEXT_TYPES


# Masking the connector's secrets in a successful result skips shorter ones (see RestConnector._mask_result).
RESULT_SECRET_MIN = 8
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9._~+-]*")


def _secrets_of(header_values: Iterable[str], urls: Iterable[str | None]) -> list[str]:
    """Every form in which the connector's credentials may be quoted back: each secret header value whole and
    its credential after a scheme word (`Bearer x`, `Token x`, `Basic x`: a service's error often names the
    bare token), for Basic also the decoded `user:password` and the password, and the password of any URL's
    userinfo. Longest first, so that a whole value is masked before a part of it."""
    found: set[str] = set()
    for value in header_values:
        value = value.strip()
        found.add(value)
        scheme, _, credential = value.partition(" ")
        credential = credential.strip()
        if not credential or not _SCHEME.fullmatch(scheme):
            continue
        found.add(credential)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credential, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                continue
            found.add(decoded)
            found.add(decoded.partition(":")[2])
    for url in urls:
        try:
            password = urllib.parse.urlsplit(url or "").password
        except ValueError:
            password = None
        if password:
            found.update({password, urllib.parse.unquote(password)})
    return sorted((s for s in found if s), key=len, reverse=True)


class RestConnector(_http.HttpSession, Connector):
    name = "rest"
    Settings = RestSettings
    settings: RestSettings

    def __init__(self, settings: RestSettings, context, env: Mapping[str, str] | None = None):
        super().__init__(settings, context)
        env = os.environ if env is None else env
        self._secret_headers = {name: env.get(var, "") for name, var in settings.header_env.items()}
        # headers dropped on a redirect to another origin than the configured URL's
        self._secret_names = {name.lower() for name in settings.header_env} | _CREDENTIAL_HEADERS
        # A header_env variable this process lacks (the worker gets only its group's `env`): no request goes
        # out with an empty credential (the service answered 401 and each job failed for good).
        self._unset = sorted({var for var in settings.header_env.values() if not env.get(var)})
        self._secrets = _secrets_of(self._secret_headers.values(), (
            settings.submit_url, settings.status_url, settings.cancel_url, settings.health_url))
        self._cancel: dict[str, asyncio.Event] = {}

    def _redact(self, text: str) -> str:
        return _http.redact(text, self._secrets)

    def _mask_result(self, value: Any) -> Any:
        """`value` (a result's data or metadata) with the connector's own secrets masked in every string, keys
        included: a service that echoes the request's headers must not publish the machine's token in
        complete_job. Only secrets of RESULT_SECRET_MIN characters or more: a short one could turn up by
        chance in an inline image's base64 and corrupt it. The producer's data is left as it is."""
        secrets = [s for s in self._secrets if len(s) >= RESULT_SECRET_MIN]
        if not secrets:
            return value

        def walk(item: Any) -> Any:
            if isinstance(item, str):
                return _http.redact(item, secrets)
            if isinstance(item, Mapping):
                return {walk(k) if isinstance(k, str) else k: walk(v) for k, v in item.items()}
            if isinstance(item, (list, tuple)):
                return [walk(v) for v in item]
            return item
        return walk(value)

    async def cancel(self, job_id: str) -> None:
        event = self._cancel.get(job_id)
        if event is not None:
            event.set()

    def _unset_reason(self) -> str:
        names = ", ".join(self._unset)
        return (f"environment variable {names} (header_env) is not set in this worker: list it under "
                f"workers.<group>.env in the manifest (a worker gets only its group's env)")

    async def health(self) -> Health:
        if self._unset:
            return Health(False, self._unset_reason())
        if not self.settings.health_url:
            return Health(True)
        try:
            status, _ = await self._call(None, "GET", self.settings.health_url)
        except RetryableJobError as exc:
            return Health(False, str(exc))
        return Health(status < 400, "" if status < 400 else f"health check answered {status}")

    async def _call(self, job: ConnectorJob | None, method: str, url: str, body: Any = None,
                    files: bool = False) -> tuple[int, Any]:
        """One call: (status, the parsed JSON, or the text). With `files` (a sync submit), an answer that is
        neither JSON nor text is streamed into the job's output directory and returned as an OutputFile."""
        if self._unset:  # never sent: the worker checks health (unhealthy), hands the job back, pauses claims
            raise ServiceUnreachable(self._unset_reason())
        headers = {**self.settings.headers, **self._secret_headers, **(_http.service_headers(job) if job else {})}
        if method == "GET":
            url, body = query_url(url, body), None
        started = time.monotonic()
        origin, current, hops = url, url, 0
        try:
            while True:
                async with self._http().request(method, current, headers=headers, json=body,
                                                allow_redirects=False) as response:
                    status, location = response.status, response.headers.get("Location")
                    if status in _REDIRECTS and location:
                        target = urllib.parse.urljoin(current, location)
                        how = f"more than {MAX_REDIRECTS} times" if hops >= MAX_REDIRECTS else "to a non-HTTP URL" \
                            if urllib.parse.urlsplit(target).scheme not in ("http", "https") else None
                        if how:
                            raise FatalJobError(self._redact(f"{method} {_http.strip_query(url)} was redirected "
                                                             f"{how} (last {_http.strip_query(target)})"))
                    else:
                        wait = _http.retry_after_s(response.headers)
                        answer = await self._read(job, response, current, status, files)
                        break
                hops += 1
                if status == 303 and method != "HEAD" or status in (301, 302) and method == "POST":
                    method, body = "GET", None  # as browsers and aiohttp do
                if not _http.same_origin(origin, target):
                    # the secrets are the configured origin's: another one never sees them, nor any hop after
                    dropped = {k for k in headers if k.lower() in self._secret_names}
                    headers = {k: v for k, v in headers.items() if k not in dropped}
                if job is not None:
                    self.joblog.event("service.redirect", job.id, logging.DEBUG, status_code=status,
                                      endpoint=_http.strip_query(current), location=_http.strip_query(target))
                current = target
        except _http.TRANSPORT_ERRORS as exc:
            error = _http.transport_error("service", current, exc)
            raise type(error)(self._redact(str(error))) from None  # ServiceUnreachable stays that
        if job is not None:
            self.joblog.event("service.call", job.id, logging.DEBUG, method=method,
                              endpoint=_http.strip_query(current), status_code=status,
                              duration_ms=_http.ms_since(started), request_id=headers.get("x-request-id"))
        if status >= 400:
            message = self._redact(f"{method} {_http.strip_query(current)} answered {status}: {str(answer)[:500]}")
            if status == 429 or status >= 500:  # retried no sooner than the service's Retry-After, if it sent one
                error = RetryableJobError(message, retry_after_s=wait)
            else:
                error = FatalJobError(message)
            error.status_code = status  # for the job.failed record
            raise error
        return status, answer

    async def _read(self, job: ConnectorJob | None, response: Any, url: str, status: int, files: bool) -> Any:
        """A reply's body: JSON parsed, text decoded (undecodable bytes replaced), held in memory up to
        max_response_bytes; with `files` and a success, a binary body streamed to a file (OutputFile)."""
        content_type = response.headers.get("Content-Type")
        text_like = _is_text(content_type)
        to_file = files and job is not None and status < 400
        if to_file and text_like is False:
            return await self._save(job, response, content_type)
        what = f"{response.method} {_http.strip_query(url)}"
        # an error answer's size never decides its class: its status does (a proxy's huge 502 page stays retryable)
        raw = await (_http.read_head(response) if status >= 400 else
                     _http.read_limited(response, self.settings.max_response_bytes, what))
        if to_file and text_like is None and raw:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:  # no Content-Type and not text: a file all the same
                path = self._output_path(job, response, content_type, raw[:16])
                path.write_bytes(raw)
                return OutputFile(str(path), _http.mime_for(path.name, content_type), len(raw))
        try:
            text = raw.decode(response.charset or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            text = raw.decode("utf-8", errors="replace")
        try:
            return json.loads(text) if text else None
        except ValueError:
            return text

    def _output_path(self, job: ConnectorJob, response: Any, content_type: str | None, head: bytes = b"") -> Path:
        """Where a file answer goes: the name the service gave (Content-Disposition), made safe, else
        `output` with the suffix of its type."""
        named = re.search(r'filename="?([^";]+)"?', response.headers.get("Content-Disposition") or "")
        mime = (content_type or "").split(";")[0].strip()
        name = _http.safe_name(named.group(1)) if named else \
            "output" + ((mimetypes.guess_extension(mime) if mime else None) or _http.sniff_image_suffix(head))
        return _http.unique_path(_http.job_dir(self.context.output_dir, job.id), name)

    async def _save(self, job: ConnectorJob, response: Any, content_type: str | None) -> OutputFile:
        path = self._output_path(job, response, content_type)
        try:
            size = await _http.save_response(response, path, self.settings.max_response_bytes,  # streamed
                                             f"{response.method} {_http.strip_query(str(response.url))}")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return OutputFile(str(path), _http.mime_for(path.name, content_type), size)

    async def run(self, job: ConnectorJob, progress: ProgressFn) -> JobResult:
        settings = self.settings
        endpoint = _http.strip_query(settings.submit_url)
        started = time.monotonic()
        self.joblog.received(job.id, method=settings.method, mode=settings.mode, endpoint=endpoint)
        cancelled = self._cancel.setdefault(job.id, asyncio.Event())
        submitted: Any = None
        posted = False  # the submit call was answered: the job reached the service
        task: Any = _MISSING  # async: the submit's answer while the service runs the task (cancel_url's fields)
        try:
            async with asyncio.timeout(settings.job_timeout_s):
                await progress(0.0, "submitting")
                url = render(settings.submit_url, job.id, {})
                status, submitted = await self._submit(job, url, cancelled)
                posted = True
                outputs: list[OutputFile] = []
                if isinstance(submitted, OutputFile):  # a binary answer, saved: the file is the result
                    outputs, result = [submitted], {"mime_type": submitted.mime_type,
                                                    "size_bytes": submitted.size_bytes}
                    submitted = None
                elif settings.mode == "async":
                    task = submitted
                    submitted = await self._poll(job, submitted, cancelled, progress)
                    task = _MISSING  # the service finished it: nothing left to stop
                    result = at_path(submitted, settings.result_path)
                else:
                    result = at_path(submitted, settings.result_path)
            await progress(100.0, "done")
            self.joblog.completed(job.id, _http.ms_since(started), method=settings.method, endpoint=endpoint,
                                  status_code=status, outputs=len(outputs))
            return JobResult(data=self._mask_result(result), outputs=outputs,
                             service_metadata=self._mask_result({"connector": self.name, "mode": settings.mode}))
        except asyncio.CancelledError:
            # The worker cancelled run(): a drain (the job goes back to pending and runs again elsewhere) or its
            # job_timeout. The service is told in the background: the hand-back is not held by a hung service.
            if task is not _MISSING and settings.cancel_url:
                self._stop_in_background(self._stop(job, task))
            raise
        except TimeoutError:
            if task is not _MISSING and settings.cancel_url:  # job_timeout_s: the service would go on with it
                self._stop_in_background(self._stop(job, task))
            error = RetryableJobError(f"job did not finish within {settings.job_timeout_s:g} s")
            self.joblog.failed(job.id, error, _http.ms_since(started), True, method=settings.method,
                               endpoint=endpoint)
            raise error from None
        except JobCancelled:
            if task is not _MISSING and settings.cancel_url:
                await self._stop(job, task)
            self.joblog.event("job.cancelled", job.id, method=settings.method, endpoint=endpoint)
            raise
        except Exception as caught:
            exc = caught
            if isinstance(exc, ServiceUnreachable) and posted:
                # A poll found the service gone after it took the job: an attempt of the job (one that
                # brings the service down must run out of retries), not a job that never reached it.
                exc = RetryableJobError(str(exc))
            # secret header values are redacted from the text itself (they need not look like secrets, which
            # is all the logging layer redacts), so the text is passed and the type named beside it
            text = self._redact(str(exc))
            self.joblog.failed(job.id, text, _http.ms_since(started), can_retry(exc),
                               method=settings.method, endpoint=endpoint,
                               status_code=getattr(exc, "status_code", None),
                               **{"error.type": type(exc).__name__})
            if text != str(exc) or exc is not caught:
                # The error becomes the job's `error` in Redis, read by the API and its users: an answer that
                # quoted a secret header value (e.g. one with nothing at the result path) must not carry it.
                clean = (ServiceUnreachable if isinstance(exc, ServiceUnreachable) else
                         RetryableJobError if can_retry(exc) else FatalJobError)(text)
                clean.status_code = getattr(exc, "status_code", None)
                if isinstance(clean, RetryableJobError):
                    clean.retry_after_s = getattr(exc, "retry_after_s", None)
                raise clean from None
            raise
        finally:
            self._cancel.pop(job.id, None)

    async def _submit(self, job: ConnectorJob, url: str, cancelled: asyncio.Event) -> tuple[int, Any]:
        """The submit call, cut short by a cancel. In async mode with a `cancel_url`, a submit still in flight
        when the job is cancelled, times out or is drained is not abandoned: the service may have created
        the task already and only be slow to answer. It goes on in the background, and its answer names the
        task that cancel_url stops (_stop_after_submit)."""
        settings = self.settings
        call = self._call(job, settings.method, url, job.payload, files=settings.mode == "sync")
        if settings.mode != "async" or not settings.cancel_url:
            return await _http.until_cancelled(call, cancelled, f"job {job.id}")
        work = asyncio.ensure_future(call)
        waiter = asyncio.ensure_future(cancelled.wait())
        try:
            await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # a drain, the worker's job timeout, job_timeout_s
            self._stop_in_background(self._stop_after_submit(job, work))
            raise
        finally:
            waiter.cancel()
        if work.done():
            return work.result()
        self._stop_in_background(self._stop_after_submit(job, work))
        raise JobCancelled(f"job {job.id} cancelled")

    async def _stop_after_submit(self, job: ConnectorJob, work: asyncio.Future) -> None:
        """Wait for a submit left in flight by a stopped job (request_timeout_s at most), then stop the task
        its answer names. A submit that failed created no task we could name: nothing to stop."""
        try:
            done, _ = await asyncio.wait({work}, timeout=self.settings.request_timeout_s)
        finally:
            if not work.done():
                work.cancel()
        if not done:
            self.joblog.event("cancel_failed", job.id, logging.WARNING, error=(
                f"the submit was not answered within request_timeout_s ({self.settings.request_timeout_s:g} s) "
                "after the job was stopped: cancel_url was not called and the service may still run the task"))
            return
        if work.cancelled() or work.exception() is not None:
            return
        await self._stop(job, work.result()[1])

    async def _stop(self, job: ConnectorJob, submitted: Any) -> None:
        """POST cancel_url for the task `submitted` (the submit's answer) names, bounded by STOP_GRACE_S in
        all: a hung service holds neither the job's cancellation nor a drain. Failures are logged, not raised."""
        try:
            async with asyncio.timeout(_http.STOP_GRACE_S):
                await self._call(job, "POST", render(self.settings.cancel_url or "", job.id, submitted))
        except (RetryableJobError, FatalJobError) as exc:
            self.joblog.event("cancel_failed", job.id, logging.WARNING, error=self._redact(str(exc)))
        except TimeoutError:
            self.joblog.event("cancel_failed", job.id, logging.WARNING, error=(
                f"the service did not answer cancel_url within {_http.STOP_GRACE_S:g} s: it may still run the task"))

    async def _poll(self, job: ConnectorJob, submitted: Any, cancelled: asyncio.Event,
                    progress: ProgressFn) -> Any:
        settings = self.settings
        url = render(settings.status_url or "", job.id, submitted)
        reported = 0.0
        while True:
            _, answer = await _http.until_cancelled(self._call(job, "GET", url), cancelled, f"job {job.id}")
            state = str(at_path(answer, settings.status_path, ""))
            if state in settings.done_values:
                return answer
            if state in settings.failed_values:
                raise FatalJobError(self._redact(f"the service reports the job {state}: "
                                                 f"{str(at_path(answer, settings.error_path, ''))[:500]}"))
            if settings.progress_path:
                value = at_path(answer, settings.progress_path, None)
                try:
                    percent = min(99.0, float(value) * 100 / settings.progress_scale)
                except (TypeError, ValueError):
                    percent = reported
                if percent > reported:
                    reported = percent
                    await progress(percent, state or "running")
            try:  # the poll interval, cut short by a cancel
                await asyncio.wait_for(cancelled.wait(), settings.poll_interval_s)
            except TimeoutError:
                continue
            raise JobCancelled(f"job {job.id} cancelled")

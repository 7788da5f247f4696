"""The rest connector: a generic HTTP service described entirely in the manifest.

`mode: sync` sends the payload as JSON to `submit_url` and takes the result from the answer. `mode: async`
submits the same way, then polls `status_url` every `poll_interval_s` until the value at `status_path` is one
of `done_values` (result from that answer) or `failed_values` (message from `error_path`), reporting the
value at `progress_path` (0-1, or 0-100 with `progress_scale: 100`).

URLs are templates: `{job_id}` is the job's id, any other `{a.b}` is a dot path into the submit answer
(`{id}`, `{data.task_id}`), URL-quoted. Paths are dot paths with integer indexes (`output.0.url`); an empty
path means the whole answer. Header values come from environment variables *named* in `header_env` (read
once at construction through an injectable mapping) and are redacted from errors, logs, health reasons and
results, whole and in the parts a service may quote back (the token after `Bearer`, Basic's password).

429 and 5xx are retryable, other 4xx permanent; connection failures and timeouts retryable.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from emp_machine.connectors import _http
from emp_machine.connectors.base import (
    Connector, ConnectorJob, ConnectorSettings, Health, JobResult, ProgressFn,
)
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, ServiceUnreachable, can_retry

_MISSING = object()
_FIELD = re.compile(r"\{([^{}]+)\}")


class RestSettings(ConnectorSettings):
    mode: Literal["sync", "async"] = "sync"
    method: Literal["POST", "PUT", "GET"] = "POST"
    submit_url: str
    status_url: str | None = None
    cancel_url: str | None = None  # async only: POSTed (templated) when the job is cancelled
    health_url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    header_env: dict[str, str] = Field(default_factory=dict)  # header name -> env var NAME
    result_path: str = ""
    status_path: str = "status"
    progress_path: str | None = None
    progress_scale: float = Field(default=1.0, gt=0)
    error_path: str = "error"
    done_values: list[str] = Field(default_factory=lambda: ["done", "completed", "succeeded", "success"])
    failed_values: list[str] = Field(default_factory=lambda: ["failed", "error", "cancelled", "canceled"])
    poll_interval_s: float = Field(default=1.0, gt=0)
    connect_timeout_s: float = Field(default=5, gt=0)
    request_timeout_s: float = Field(default=60, gt=0)
    job_timeout_s: float = Field(default=3600, gt=0)

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
        value = job_id if name == "job_id" else at_path(submitted, name)
        return urllib.parse.quote(str(value), safe="")
    return _FIELD.sub(field, template)


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

    async def _call(self, job: ConnectorJob | None, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        if self._unset:  # never sent: the worker checks health (unhealthy), hands the job back, pauses claims
            raise ServiceUnreachable(self._unset_reason())
        headers = {**self.settings.headers, **self._secret_headers, **(_http.service_headers(job) if job else {})}
        started = time.monotonic()
        try:
            async with self._http().request(method, url, headers=headers,
                                            json=body if method != "GET" else None) as response:
                status, text, wait = response.status, await response.text(), _http.retry_after_s(response.headers)
        except _http.TRANSPORT_ERRORS as exc:
            error = _http.transport_error("service", url, exc)
            raise type(error)(self._redact(str(error))) from None  # ServiceUnreachable stays that
        if job is not None:
            self.joblog.event("service.call", job.id, logging.DEBUG, method=method, endpoint=_http.strip_query(url),
                              status_code=status, duration_ms=_http.ms_since(started),
                              request_id=headers.get("x-request-id"))
        try:
            answer = json.loads(text) if text else None
        except ValueError:
            answer = text
        if status >= 400:
            message = self._redact(f"{method} {_http.strip_query(url)} answered {status}: {str(answer)[:500]}")
            if status == 429 or status >= 500:  # retried no sooner than the service's Retry-After, if it sent one
                error = RetryableJobError(message, retry_after_s=wait)
            else:
                error = FatalJobError(message)
            error.status_code = status  # for the job.failed record
            raise error
        return status, answer

    async def run(self, job: ConnectorJob, progress: ProgressFn) -> JobResult:
        settings = self.settings
        endpoint = _http.strip_query(settings.submit_url)
        started = time.monotonic()
        self.joblog.received(job.id, method=settings.method, mode=settings.mode, endpoint=endpoint)
        cancelled = self._cancel.setdefault(job.id, asyncio.Event())
        submitted: Any = None
        posted = False  # the submit call was answered: the job reached the service
        try:
            async with asyncio.timeout(settings.job_timeout_s):
                await progress(0.0, "submitting")
                url = render(settings.submit_url, job.id, {})
                status, submitted = await _http.until_cancelled(
                    self._call(job, settings.method, url, job.payload), cancelled, f"job {job.id}")
                posted = True
                if settings.mode == "async":
                    submitted = await self._poll(job, submitted, cancelled, progress)
                    result = at_path(submitted, settings.result_path)
                else:
                    result = at_path(submitted, settings.result_path)
            await progress(100.0, "done")
            self.joblog.completed(job.id, _http.ms_since(started), method=settings.method, endpoint=endpoint,
                                  status_code=status)
            return JobResult(data=self._mask_result(result),
                             service_metadata=self._mask_result({"connector": self.name, "mode": settings.mode}))
        except TimeoutError:
            error = RetryableJobError(f"job did not finish within {settings.job_timeout_s:g} s")
            self.joblog.failed(job.id, error, _http.ms_since(started), True, method=settings.method,
                               endpoint=endpoint)
            raise error from None
        except JobCancelled:
            if settings.cancel_url and submitted is not None:
                try:
                    await self._call(job, "POST", render(settings.cancel_url, job.id, submitted))
                except (RetryableJobError, FatalJobError) as exc:
                    self.joblog.event("cancel_failed", job.id, logging.WARNING, error=self._redact(str(exc)))
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

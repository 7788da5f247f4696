"""The openai connector: images and text through the OpenAI HTTP API (or any server speaking it).

Payload: the request body of one endpoint, plus an optional `"endpoint"`: `images` (/v1/images/generations),
`chat` (/v1/chat/completions) or `responses` (/v1/responses). Without it the body decides: `messages` is
chat, `input` is responses, `prompt` is images. `b64_json` images (and `image_generation_call` results of
/v1/responses) become output files, as do images answered as URLs (dall-e's default `response_format`): each
is downloaded into the job's output directory (the signed URL itself is never kept); token usage goes into the
service metadata. `"stream": true` and `"background": true` are refused: the connector needs the whole answer.
`base_url` may end in `/v1` (the OpenAI SDK's OPENAI_BASE_URL form) or not.

The API key is read once, at construction, from the environment variable *named* in the settings (the
manifest never holds the key). It is sent only in the Authorization header and redacted from anything the
connector says: errors, logs, results.

408, 409, 429 and 5xx are retried here (as OpenAI's SDKs do; an `x-should-retry: true|false` header decides
first), waiting what Retry-After / retry-after-ms says, `max_retries` times; after that, or at once when the
server asks for a longer wait than `max_retry_wait_s`, the job fails as retryable carrying the server's wait
(`retry_after_s`: the queue delays it). 429 `insufficient_quota` is permanent (billing, not load), as are the
other 4xx. A 200 that is not a finished JSON answer (a proxy's HTML page, a truncated or non-UTF-8 body, a
JSON `error` object, a response still queued) is never completed empty: it fails, classified as its error
says (unreadable bodies retryable). Errors and the failed record carry the status code and OpenAI's
`x-request-id`. A reply larger than `max_response_bytes` is refused (permanent).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import mimetypes
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import aiohttp
from pydantic import Field

from emp_machine.connectors import _http
from emp_machine.connectors.base import (
    Connector, ConnectorJob, ConnectorSettings, Health, HttpUrl, JobResult, OutputFile, ProgressFn,
)
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, can_retry


def _parse(raw: bytes) -> tuple[Any, str | None]:
    """(the JSON in `raw`, None), or (None, why it is unreadable: not UTF-8, not JSON or cut short)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"a body that is not UTF-8 ({len(raw)} bytes)"
    try:
        return json.loads(text), None
    except ValueError:
        return None, f"a body that is not JSON or is cut short: {text[:200]!r}"


PATHS = {"images": "/v1/images/generations", "chat": "/v1/chat/completions", "responses": "/v1/responses"}


class OpenAISettings(ConnectorSettings):
    base_url: HttpUrl = "https://api.openai.com"
    api_key_env: str = "OPENAI_API_KEY"
    organization: str | None = None
    endpoint: Literal["images", "chat", "responses"] | None = None
    default_model: str | None = None
    connect_timeout_s: float = Field(default=10, gt=0, allow_inf_nan=False)
    request_timeout_s: float = Field(default=300, gt=0, allow_inf_nan=False)
    max_retries: int = Field(default=2, ge=0)
    max_retry_wait_s: float = Field(default=30, ge=0, allow_inf_nan=False)
    max_response_bytes: int = Field(default=_http.DEFAULT_MAX_RESPONSE_BYTES, gt=0)


def _api_root(base_url: str) -> str:
    """`base_url` without its trailing slash and one trailing `/v1`: PATHS start with /v1, and the SDK's
    OPENAI_BASE_URL (`https://api.openai.com/v1`, vLLM's and LiteLLM's `http://host:8000/v1`) includes it."""
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def _transient(status: int, error: Mapping[str, Any], headers: Mapping[str, str]) -> bool:
    """Worth another attempt, as OpenAI's SDKs decide: the server's `x-should-retry` first, then 408, 409,
    429 (not `insufficient_quota`: billing, not load) and 5xx."""
    should = (headers.get("x-should-retry") or "").strip().lower()
    if should in ("true", "false"):
        return should == "true"
    if status == 429:
        return "insufficient_quota" not in (str(error.get("code")), str(error.get("type")))
    return status in (408, 409) or status >= 500


def _error_status(error: Mapping[str, Any]) -> int:
    """The HTTP status an `error` object answered with a 200 stands for: its own numeric `code`/`status`
    (vLLM's), else its OpenAI type or code; an unknown kind counts as a server error (retryable)."""
    for key in ("status", "code"):
        value = error.get(key)
        if isinstance(value, (int, str)) and str(value).isdigit() and 400 <= int(value) <= 599:
            return int(value)
    kind = f"{error.get('code') or ''} {error.get('type') or ''}".lower()
    if "insufficient_quota" in kind or "rate_limit" in kind or error.get("type") in ("requests", "tokens"):
        return 429
    if any(word in kind for word in ("invalid", "authentication", "permission", "not_found", "content_policy",
                                     "context_length")):
        return 400
    return 500


def _objects(document: Mapping[str, Any], key: str) -> list[dict]:
    """`document[key]` as a list of objects ([] when absent); any other shape is a clear permanent error."""
    items = document.get(key)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise FatalJobError(f"OpenAI's answer has a {key!r} that is not a list of JSON objects: {str(items)[:200]}")
    return items


class OpenAIConnector(_http.HttpSession, Connector):
    name = "openai"
    Settings = OpenAISettings
    settings: OpenAISettings

    def __init__(self, settings: OpenAISettings, context, env: Mapping[str, str] | None = None):
        super().__init__(settings, context)
        env = os.environ if env is None else env
        self._key = env.get(settings.api_key_env) or ""
        self._group = env.get("WORKER_GROUP") or ""  # set by the machine for each worker it starts
        self._base = _api_root(settings.base_url)
        self._cancel: dict[str, asyncio.Event] = {}

    def _redact(self, text: str) -> str:
        return _http.redact(text, [self._key])

    def _key_missing(self) -> str:
        """Why there is no key, and the fix. A worker's environment is only its group's `env:` (supervisord
        passes nothing else), so a key exported to the machine alone is not there. Never shows a value."""
        name = self.settings.api_key_env
        where = f"workers.{self._group}.env" if self._group else "workers.<group>.env"
        if self._group:
            return (f"environment variable {name} is not set in this worker's environment: a worker gets only "
                    f"the variables listed in {where}, not the machine's; add {name}: ${{{name}}} there")
        return (f"environment variable {name} is not set: export it (a machine's workers get only the variables "
                f"listed in {where}: add {name}: ${{{name}}} there)")

    async def health(self) -> Health:
        if not self._key:
            return Health(False, self._key_missing())
        return Health(True)  # the API has no free liveness probe; every call would cost a request

    async def cancel(self, job_id: str) -> None:
        event = self._cancel.get(job_id)
        if event is not None:
            event.set()

    def _endpoint(self, payload: dict) -> str:
        endpoint = payload.get("endpoint") or self.settings.endpoint
        if endpoint is None:
            endpoint = "chat" if "messages" in payload else "responses" if "input" in payload else \
                "images" if "prompt" in payload else None
        if endpoint not in PATHS:
            raise FatalJobError(f"openai payload needs an endpoint ({', '.join(PATHS)}) or a body with "
                                "messages, input or prompt")
        return endpoint

    async def run(self, job: ConnectorJob, progress: ProgressFn) -> JobResult:
        if not isinstance(job.payload, dict):
            raise FatalJobError("openai payload must be a JSON object (the endpoint's request body)")
        if not self._key:
            raise FatalJobError(self._key_missing())
        endpoint = self._endpoint(job.payload)
        for field, why in (("stream", "it would answer a stream of server-sent events"),
                           ("background", "it would answer a response still queued, to be polled")):
            if job.payload.get(field):
                raise FatalJobError(f'openai payload sets "{field}": true, which this connector cannot use: {why}, '
                                    f'and the connector needs the whole answer in one reply; remove "{field}"')
        body = {k: v for k, v in job.payload.items() if k != "endpoint"}
        if "model" not in body and self.settings.default_model:
            body["model"] = self.settings.default_model
        model = body.get("model")
        started = time.monotonic()
        self.joblog.received(job.id, endpoint=endpoint, model=model)
        cancelled = self._cancel.setdefault(job.id, asyncio.Event())
        try:
            await progress(0.0, f"calling {PATHS[endpoint]}")
            answer, headers = await _http.until_cancelled(self._post(job, endpoint, body), cancelled,
                                                          f"openai job {job.id}")
            result = await _http.until_cancelled(self._result(job, endpoint, model, answer, headers), cancelled,
                                                 f"openai job {job.id}")
            await progress(100.0, "done")
            meta = result.service_metadata
            self.joblog.completed(job.id, _http.ms_since(started), endpoint=endpoint, model=model,
                                  request_id=meta.get("request_id"), usage=meta.get("usage"),
                                  outputs=len(result.outputs))
            return result
        except JobCancelled:
            self.joblog.event("job.cancelled", job.id, endpoint=endpoint, model=model)
            raise
        except Exception as exc:
            # the key is redacted from the text itself: it need not look like one to the telemetry's redaction
            self.joblog.failed(job.id, self._redact(f"{type(exc).__name__}: {exc}"), _http.ms_since(started),
                               can_retry(exc), endpoint=endpoint, model=model,
                               status_code=getattr(exc, "status_code", None),
                               request_id=getattr(exc, "request_id", None))
            raise
        finally:
            self._cancel.pop(job.id, None)

    def _failure(self, cls: type[Exception], text: str, status: int | None, request_id: str | None,
                 **kwargs: Any) -> Exception:
        """`cls(text)`, redacted, carrying the status code and OpenAI's request id (for the failed record)."""
        error = cls(self._redact(text), **kwargs)
        error.status_code, error.request_id = status, request_id
        return error

    async def _post(self, job: ConnectorJob, endpoint: str, body: dict) -> tuple[Any, Mapping[str, str]]:
        url = self._base + PATHS[endpoint]
        shown = _http.strip_query(url)
        headers = {**_http.service_headers(job), "Authorization": f"Bearer {self._key}"}
        if self.settings.organization:
            headers["OpenAI-Organization"] = self.settings.organization
        attempt = 0
        while True:
            try:
                async with self._http().post(url, json=body, headers=headers) as response:
                    status, response_headers = response.status, response.headers
                    # an error answer is read in part: its status decides (a huge 502 page stays retryable)
                    raw = await (_http.read_limited(response, self.settings.max_response_bytes, f"OpenAI POST {shown}")
                                 if status < 400 else _http.read_head(response))
            except _http.TRANSPORT_ERRORS as exc:
                error = _http.transport_error("OpenAI", url, exc)
                raise type(error)(self._redact(str(error))) from None  # ServiceUnreachable stays that
            request_id = response_headers.get("x-request-id")
            where = f"OpenAI POST {shown} answered {status}" + (f" (x-request-id {request_id})" if request_id else "")
            answer, unreadable = _parse(raw)
            if status == 200:
                if unreadable:  # a proxy's page, a cut body: nothing says the request failed for good
                    raise self._failure(RetryableJobError, f"{where} with {unreadable}", status, request_id)
                if not isinstance(answer, dict):
                    raise self._failure(RetryableJobError, f"{where} with a JSON {type(answer).__name__}, not the "
                                        f"JSON object of a result: {str(answer)[:200]}", status, request_id)
                if not answer.get("error"):  # /v1/responses always has "error": null
                    if endpoint == "responses" and answer.get("status") in ("queued", "in_progress"):
                        raise self._failure(RetryableJobError, f"{where} with a response not finished (status "
                                            f"{answer.get('status')})", status, request_id)
                    return answer, response_headers
                error = answer["error"] if isinstance(answer["error"], dict) else {"message": str(answer["error"])}
                where, effective = f"{where} with an error", _error_status(error)
            else:
                error = answer.get("error") if isinstance(answer, dict) else None
                if not isinstance(error, dict):
                    error = {"message": str(answer)[:300] if unreadable is None else unreadable}
                effective = status
            text = f"{where}: {error.get('type') or error.get('code') or 'error'}: {error.get('message', '')}"
            wait = _http.retry_after_s(response_headers)
            if not _transient(effective, error, response_headers):
                raise self._failure(FatalJobError, text, status, request_id)
            if attempt >= self.settings.max_retries or (wait is not None and wait > self.settings.max_retry_wait_s):
                # a longer wait than ours is the queue's to keep: the job goes back, delayed by retry_after_s
                raise self._failure(RetryableJobError, text, status, request_id, retry_after_s=wait)
            attempt += 1
            delay = wait if wait is not None else min(self.settings.max_retry_wait_s, 2.0 ** attempt)
            self.joblog.event("service.retry", job.id, status_code=status, wait_s=round(delay, 3), attempt=attempt,
                              request_id=request_id)
            await asyncio.sleep(delay)  # the server's own instruction, not a synchronisation guess

    async def _result(self, job: ConnectorJob, endpoint: str, model: str | None, answer: dict,
                      headers: Mapping[str, str]) -> JobResult:
        directory = _http.job_dir(self.context.output_dir, job.id)
        files: list[OutputFile] = []
        data: dict[str, Any] = {"id": answer.get("id")}
        if endpoint == "images":
            revised = []
            for item in _objects(answer, "data"):
                if item.get("b64_json"):
                    files.append(self._save_b64(item["b64_json"], directory, f"image-{len(files)}"))
                elif item.get("url"):  # hosted for an hour behind a signed URL: fetched now, never passed on
                    files.append(await self._download(str(item["url"]), directory, f"image-{len(files)}"))
                if item.get("revised_prompt"):
                    revised.append(item["revised_prompt"])
            data.update(revised_prompts=revised)
        elif endpoint == "chat":
            choices = _objects(answer, "choices")
            data.update(text=[c["message"].get("content") if isinstance(c.get("message"), dict) else None
                              for c in choices],
                        finish_reason=[c.get("finish_reason") for c in choices])
        else:
            texts = []
            for item in _objects(answer, "output"):
                if item.get("type") == "message":
                    texts += [c.get("text") for c in _objects(item, "content") if c.get("type") == "output_text"]
                elif item.get("type") == "image_generation_call" and item.get("result"):
                    files.append(self._save_b64(item["result"], directory, f"image-{len(files)}"))
            data.update(text=texts, status=answer.get("status"))
        metadata = {"connector": self.name, "endpoint": endpoint, "model": answer.get("model") or model,
                    "usage": answer.get("usage") or {}, "request_id": headers.get("x-request-id")}
        return JobResult(data=data, outputs=files, service_metadata=metadata)

    async def _download(self, url: str, directory: Path, stem: str) -> OutputFile:
        """An image answered as a URL, streamed into `directory`. No Authorization goes with it (the URL is
        signed, usually on another host), and its query string (the signature) is in no error: a failure is
        retryable (the next attempt generates a fresh image and URL), but an image over max_response_bytes is
        not (permanent: every attempt would answer as big)."""
        shown = _http.strip_query(url)
        query = url[len(shown):]

        def hide(text: str) -> str:
            return self._redact(text.replace(query, "") if query else text)
        part = _http.unique_path(directory, stem + ".part")
        try:
            async with self._http().get(url) as response:
                if response.status != 200:
                    raise RetryableJobError(f"downloading OpenAI's image {shown} answered {response.status}")
                content_type = response.headers.get("Content-Type")
                size = await _http.save_response(response, part, self.settings.max_response_bytes,
                                                 f"downloading OpenAI's image {shown}")
        except RetryableJobError:
            part.unlink(missing_ok=True)
            raise
        except (*_http.TRANSPORT_ERRORS, aiohttp.ClientError, ValueError) as exc:
            part.unlink(missing_ok=True)
            raise RetryableJobError(hide(f"downloading OpenAI's image {shown} failed: {type(exc).__name__}: {exc}")) \
                from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        with part.open("rb") as head:
            suffix = _http.sniff_image_suffix(head.read(16))
        if suffix == ".bin":
            suffix = mimetypes.guess_extension((content_type or "").split(";")[0].strip()) or \
                Path(shown).suffix or ".bin"
        path = _http.unique_path(directory, stem + suffix)
        part.rename(path)
        return OutputFile(str(path), _http.mime_for(path.name, content_type), size)

    @staticmethod
    def _save_b64(encoded: str, directory: Path, stem: str) -> OutputFile:
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise FatalJobError("OpenAI returned an image that is not valid base64") from None
        suffix = _http.sniff_image_suffix(raw)
        path = _http.unique_path(directory, stem + suffix)
        path.write_bytes(raw)
        return OutputFile(str(path), _http.mime_for(path.name), len(raw))

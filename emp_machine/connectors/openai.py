"""The openai connector: images and text through the OpenAI HTTP API (or any server speaking it).

Payload: the request body of one endpoint, plus an optional `"endpoint"`: `images` (/v1/images/generations),
`chat` (/v1/chat/completions) or `responses` (/v1/responses). Without it the body decides: `messages` is
chat, `input` is responses, `prompt` is images. `b64_json` images (and `image_generation_call` results of
/v1/responses) become output files; token usage goes into the service metadata.

The API key is read once, at construction, from the environment variable *named* in the settings (the
manifest never holds the key). It is sent only in the Authorization header and redacted from anything the
connector says: errors, logs, results.

429 and 5xx are retried here, waiting what Retry-After / retry-after-ms says (capped), `max_retries` times;
after that the job fails as retryable carrying the server's wait. 429 `insufficient_quota` is permanent
(billing, not load), as are the other 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from emp_machine.connectors import _http
from emp_machine.connectors.base import (
    Connector, ConnectorJob, ConnectorSettings, Health, JobResult, OutputFile, ProgressFn,
)
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, can_retry

PATHS = {"images": "/v1/images/generations", "chat": "/v1/chat/completions", "responses": "/v1/responses"}


class OpenAISettings(ConnectorSettings):
    base_url: str = "https://api.openai.com"
    api_key_env: str = "OPENAI_API_KEY"
    organization: str | None = None
    endpoint: Literal["images", "chat", "responses"] | None = None
    default_model: str | None = None
    connect_timeout_s: float = Field(default=10, gt=0)
    request_timeout_s: float = Field(default=300, gt=0)
    max_retries: int = Field(default=2, ge=0)
    max_retry_wait_s: float = Field(default=30, ge=0)


class OpenAIConnector(_http.HttpSession, Connector):
    name = "openai"
    Settings = OpenAISettings
    settings: OpenAISettings

    def __init__(self, settings: OpenAISettings, context, env: Mapping[str, str] | None = None):
        super().__init__(settings, context)
        env = os.environ if env is None else env
        self._key = env.get(settings.api_key_env) or ""
        self._group = env.get("WORKER_GROUP") or ""  # set by the machine for each worker it starts
        self._base = settings.base_url.rstrip("/")
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
            result = self._result(job, endpoint, model, answer, headers)
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
                               can_retry(exc), endpoint=endpoint, model=model)
            raise
        finally:
            self._cancel.pop(job.id, None)

    async def _post(self, job: ConnectorJob, endpoint: str, body: dict) -> tuple[Any, Mapping[str, str]]:
        url = self._base + PATHS[endpoint]
        headers = {**_http.service_headers(job), "Authorization": f"Bearer {self._key}"}
        if self.settings.organization:
            headers["OpenAI-Organization"] = self.settings.organization
        attempt = 0
        while True:
            try:
                async with self._http().post(url, json=body, headers=headers) as response:
                    status, response_headers = response.status, response.headers
                    try:
                        answer = await response.json(content_type=None)
                    except ValueError:
                        answer = {"error": {"message": (await response.text())[:300]}}
            except _http.TRANSPORT_ERRORS as exc:
                error = _http.transport_error("OpenAI", url, exc)
                raise type(error)(self._redact(str(error))) from None  # ServiceUnreachable stays that
            if status == 200:
                return answer, response_headers
            error = answer.get("error") if isinstance(answer, dict) and isinstance(answer.get("error"), dict) else {}
            text = self._redact(f"OpenAI {PATHS[endpoint]} answered {status}: "
                                f"{error.get('type') or error.get('code') or 'error'}: {error.get('message', '')}")
            wait = _http.retry_after_s(response_headers)
            transient = status == 429 and error.get("code") != "insufficient_quota" or status >= 500
            if not transient:
                raise FatalJobError(text)
            if attempt >= self.settings.max_retries:
                raise RetryableJobError(text, retry_after_s=wait)
            attempt += 1
            delay = min(self.settings.max_retry_wait_s, wait if wait is not None else 2.0 ** attempt)
            self.joblog.event("service.retry", job.id, status_code=status, wait_s=round(delay, 3), attempt=attempt)
            await asyncio.sleep(delay)  # the server's own instruction, not a synchronisation guess

    def _result(self, job: ConnectorJob, endpoint: str, model: str | None, answer: Any,
                headers: Mapping[str, str]) -> JobResult:
        if not isinstance(answer, dict):
            raise FatalJobError(f"OpenAI answered 200 with a non-object body: {str(answer)[:200]}")
        directory = _http.job_dir(self.context.output_dir, job.id)
        files: list[OutputFile] = []
        data: dict[str, Any] = {"id": answer.get("id")}
        if endpoint == "images":
            urls, revised = [], []
            for item in answer.get("data") or []:
                if item.get("b64_json"):
                    files.append(self._save_b64(item["b64_json"], directory, f"image-{len(files)}"))
                elif item.get("url"):
                    urls.append(item["url"])  # hosted by OpenAI for an hour; not fetched here
                if item.get("revised_prompt"):
                    revised.append(item["revised_prompt"])
            data.update(urls=urls, revised_prompts=revised)
        elif endpoint == "chat":
            choices = answer.get("choices") or []
            data.update(text=[(c.get("message") or {}).get("content") for c in choices],
                        finish_reason=[c.get("finish_reason") for c in choices])
        else:
            texts = []
            for item in answer.get("output") or []:
                if item.get("type") == "message":
                    texts += [c.get("text") for c in item.get("content") or [] if c.get("type") == "output_text"]
                elif item.get("type") == "image_generation_call" and item.get("result"):
                    files.append(self._save_b64(item["result"], directory, f"image-{len(files)}"))
            data.update(text=texts, status=answer.get("status"))
        metadata = {"connector": self.name, "endpoint": endpoint, "model": answer.get("model") or model,
                    "usage": answer.get("usage") or {}, "request_id": headers.get("x-request-id")}
        return JobResult(data=data, outputs=files, service_metadata=metadata)

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

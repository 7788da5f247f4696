"""A fake OpenAI API: /v1/images/generations, /v1/chat/completions and /v1/responses with the real response
and error shapes (`{"error": {"message", "type", "param", "code"}}`), Bearer auth, `x-request-id`, and 429s
with `retry-after` / `retry-after-ms`.

`script` queues canned answers (status, body, headers) served before normal handling, for error sequences; a
body given as bytes is sent as it is (a proxy's HTML page, a cut or non-UTF-8 body), with the headers given.
Images honour `response_format` as the API does (dall-e's default is `url`, gpt-image-1 always answers
`b64_json`): a `url` image is served by the fake itself under /files/, behind a signed query string (`se`,
`sig`) as Azure blob URLs are, answering 403 without the signature. Unknown paths get OpenAI's JSON 404
("Invalid URL (POST /v1/...)"); every answer carries an `x-request-id`.
`echo_key` makes the 401 quote the whole key it was given: the worst a service could do, so the test can
show the connector redacts it.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid

from aiohttp import web

from ._server import ServerThread
from .comfyui_nodes import png


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


RATE_LIMITED = (429, error_body("Rate limit reached for gpt-4o-mini in organization org-x on requests per min "
                                "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.", "requests",
                                "rate_limit_exceeded"), {"retry-after": "1"})
SERVER_ERROR = (500, error_body("The server had an error while processing your request. Sorry about that!",
                                "server_error"), {})
QUOTA = (429, error_body("You exceeded your current quota, please check your plan and billing details.",
                         "insufficient_quota", "insufficient_quota"), {})


class FakeOpenAI:
    def __init__(self, key: str, *, echo_key: bool = False, delay_s: float = 0.0):
        self.key, self.echo_key, self.delay_s = key, echo_key, delay_s
        self.script: list[tuple[int, dict, dict]] = []
        self.requests: list[tuple[str, dict, dict]] = []  # (path, lower-cased headers, body)
        self.files: dict[str, tuple[str, bytes]] = {}  # url images: name -> (signature, bytes)
        self.downloads: list[tuple[str, dict]] = []  # (path with query, lower-cased headers) of /files/ GETs
        self._thread = ServerThread(self._app)

    @property
    def url(self) -> str:
        return self._thread.url

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def close(self) -> None:
        self._thread.close()

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self._wrap(self.images))
        app.router.add_post("/v1/chat/completions", self._wrap(self.chat))
        app.router.add_post("/v1/responses", self._wrap(self.responses))
        app.router.add_get("/files/{name}", self.file)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        return app

    @staticmethod
    async def unknown(request: web.Request) -> web.Response:
        return web.json_response(error_body(f"Invalid URL ({request.method} {request.path})", "invalid_request_error"),
                                 status=404, headers={"x-request-id": f"req_{uuid.uuid4().hex}"})

    async def file(self, request: web.Request) -> web.Response:
        self.downloads.append((request.path_qs, {k.lower(): v for k, v in request.headers.items()}))
        signature, data = self.files.get(request.match_info["name"], (None, b""))
        if signature is None or request.query.get("sig") != signature:
            return web.Response(status=403, text="<Error><Code>AuthenticationFailed</Code></Error>",
                                content_type="application/xml")
        return web.Response(body=data, content_type="image/png")

    def _wrap(self, handler):
        async def wrapped(request: web.Request) -> web.Response:
            body = await request.json()
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.requests.append((request.path, headers, body))
            request_id = f"req_{uuid.uuid4().hex}"
            if self.script:
                status, answer, extra = self.script.pop(0)
                if isinstance(answer, bytes):
                    return web.Response(body=answer, status=status, headers={"x-request-id": request_id, **extra})
                return web.json_response(answer, status=status, headers={"x-request-id": request_id, **extra})
            sent = headers.get("authorization", "").removeprefix("Bearer ")
            if sent != self.key:
                shown = sent if self.echo_key else (sent[:3] + "*" * 8 + sent[-4:])
                return web.json_response(error_body(f"Incorrect API key provided: {shown}. You can find your "
                                                    "API key at https://platform.openai.com/account/api-keys.",
                                                    "invalid_request_error", "invalid_api_key"), status=401,
                                         headers={"x-request-id": request_id})
            if not body.get("model"):
                return web.json_response(error_body("you must provide a model parameter", "invalid_request_error",
                                                    None, None), status=400,
                                         headers={"x-request-id": request_id})
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return web.json_response(handler(body), headers={"x-request-id": request_id})
        return wrapped

    def images(self, body: dict) -> dict:
        width, height = (int(x) for x in str(body.get("size", "64x64")).split("x"))
        model = str(body.get("model", ""))
        as_url = body.get("response_format", "url" if model.startswith("dall-e") else "b64_json") == "url"
        images = []
        for i in range(int(body.get("n", 1))):
            data = png(width, height, 0x3366CC + i)
            if as_url:
                name, signature = f"img-{uuid.uuid4().hex}.png", secrets.token_urlsafe(16)
                self.files[name] = (signature, data)
                images.append({"url": f"{self.url}/files/{name}?se=2030-01-01T00%3A00%3A00Z&sp=r&sig={signature}",
                               "revised_prompt": f"{body.get('prompt')}, detailed" if model == "dall-e-3" else None})
            else:
                images.append({"b64_json": base64.b64encode(data).decode()})
        words = len(str(body.get("prompt", "")).split())
        return {"created": int(time.time()), "data": images, "background": "opaque", "output_format": "png",
                "quality": "low", "size": body.get("size", "1024x1024"),
                "usage": {"input_tokens": words, "output_tokens": 272 * len(images),
                          "total_tokens": words + 272 * len(images),
                          "input_tokens_details": {"text_tokens": words, "image_tokens": 0}}}

    @staticmethod
    def chat(body: dict) -> dict:
        last = str(body["messages"][-1].get("content", ""))
        prompt_tokens, completion = len(last.split()) + 8, f"echo: {last}"
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"] + "-2024-07-18", "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion, "refusal": None},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(completion.split()),
                          "total_tokens": prompt_tokens + len(completion.split())}}

    @staticmethod
    def responses(body: dict) -> dict:
        text = body["input"] if isinstance(body["input"], str) else str(body["input"])
        output = [{"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": f"echo: {text}", "annotations": []}]}]
        if any(t.get("type") == "image_generation" for t in body.get("tools", [])):
            output.insert(0, {"type": "image_generation_call", "id": f"ig_{uuid.uuid4().hex}",
                              "status": "completed", "result": base64.b64encode(png(16, 16, 0xFF0000)).decode()})
        return {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
                "status": "completed", "model": body["model"], "output": output,
                "usage": {"input_tokens": len(text.split()), "output_tokens": 2 + len(text.split()),
                          "total_tokens": 2 + 2 * len(text.split())}}

"""A fake Automatic1111 WebUI API: txt2img / img2img (one generation at a time, base64 PNGs, `info` as a
JSON string), `/sdapi/v1/progress`, `/sdapi/v1/interrupt` (the running request still answers 200 with what it
has), `/internal/ping`, `/sdapi/v1/options`, FastAPI's 422 shape and A1111's error shape for 404/500.

img2img decodes `init_images` (inside the queue lock) and `mask` (before it) as A1111's
decode_base64_to_image does: base64 (optionally a `data:image/...;base64,` URL) that is no image is its
HTTPException 500 "Invalid encoded image"; an http(s) URL is fetched unless `api_enable_requests` is off
("Requests not allowed") or `api_forbid_local_requests` is on and the URL's netloc does not resolve to global
addresses only ("Request to local resource not allowed"; a netloc with a port never resolves, as there);
a fetched body that is no image is "Invalid image url". Without `init_images` it is 404 "Init image not
found". A run's `job_timestamp` is set when it begins, shown by /progress and written in `info`, and
`interrupted` is reset then, as A1111's shared.state.begin() does.

`fail_next` = (status, body) answers the next generation with that, e.g. the 500 of CUDA out of memory.
`hang_interrupt` = True: `/sdapi/v1/interrupt` never answers (a wedged server).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import socket
import time
from urllib.parse import urlparse

import aiohttp
from aiohttp import web

from ._server import ServerThread
from .comfyui_nodes import png

SAMPLERS = ["DPM++ 2M", "Euler a", "Euler", "DDIM"]
OOM = (500, {"error": "OutOfMemoryError", "detail": "", "body": "",
             "errors": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.64 GiB total capacity)"})


class FakeA1111:
    def __init__(self, *, step_s: float = 0.02, ping: bool = True, api_enable_requests: bool = True,
                 api_forbid_local_requests: bool = True):
        self.step_s, self.ping = step_s, ping
        self.api_enable_requests, self.api_forbid_local_requests = api_enable_requests, api_forbid_local_requests
        self.fail_next: tuple[int, dict] | None = None
        self.hang_interrupt = False
        self.requests: list[tuple[str, str, dict]] = []
        self._thread = ServerThread(self._app)

    @property
    def url(self) -> str:
        return self._thread.url

    def start(self) -> FakeA1111:
        self._thread.start()
        return self

    def close(self) -> None:
        self._thread.close()

    def _app(self) -> web.Application:
        self.lock = asyncio.Lock()
        self.interrupted = False
        self.state = {"step": 0, "steps": 0, "job_count": 0}
        self.job_timestamp = "0"
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/sdapi/v1/txt2img", self.txt2img)
        app.router.add_post("/sdapi/v1/img2img", self.img2img)
        app.router.add_get("/sdapi/v1/progress", self.progress)
        app.router.add_post("/sdapi/v1/interrupt", self.interrupt)
        app.router.add_get("/sdapi/v1/options", self.options)
        if self.ping:
            app.router.add_get("/internal/ping", self.ping_handler)
        return app

    @web.middleware
    async def _record(self, request, handler):
        self.requests.append((request.method, request.path, {k.lower(): v for k, v in request.headers.items()}))
        return await handler(request)

    async def txt2img(self, request):
        return await self._generate(await request.json(), img2img=False)

    async def img2img(self, request):
        return await self._generate(await request.json(), img2img=True)

    @staticmethod
    def _error(status: int, error: str, detail: str = "", errors: str | None = None):
        """A1111's exception handler: {"error": class name, "detail", "body", "errors": str(exc)}."""
        return web.json_response({"error": error, "detail": detail, "body": "",
                                  "errors": f"{status}: {detail}" if errors is None else errors}, status=status)

    async def _decode_image(self, encoding):
        """None when `encoding` is an image, else A1111's error answer (decode_base64_to_image)."""
        if not isinstance(encoding, str):
            return self._error(500, "AttributeError", errors=f"'{type(encoding).__name__}' object has no "
                                                            "attribute 'startswith'")
        if encoding.startswith(("http://", "https://")):
            if not self.api_enable_requests:
                return self._error(500, "HTTPException", "Requests not allowed")
            if self.api_forbid_local_requests and not self._global_url(encoding):
                return self._error(500, "HTTPException", "Request to local resource not allowed")
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                    async with http.get(encoding) as response:
                        data = await response.read()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:  # requests' error, unhandled
                return self._error(500, "ConnectionError", errors=str(exc))
            return None if self._is_image(data) else self._error(500, "HTTPException", "Invalid image url")
        if encoding.startswith("data:image/"):
            try:
                encoding = encoding.split(";")[1].split(",")[1]
            except IndexError:
                return self._error(500, "IndexError", errors="list index out of range")
        try:
            data = base64.b64decode(encoding)
        except (binascii.Error, ValueError):
            data = b""
        return None if self._is_image(data) else self._error(500, "HTTPException", "Invalid encoded image")

    @staticmethod
    def _global_url(url: str) -> bool:
        """A1111's verify_url: every address of the URL's netloc is global (a netloc with a port fails)."""
        try:
            addresses = socket.gethostbyname_ex(urlparse(url).netloc)[2]
            return all(ipaddress.ip_address(a).is_global for a in addresses)
        except Exception:  # noqa: BLE001 - as there: anything that fails is "not global"
            return False

    @staticmethod
    def _is_image(data: bytes) -> bool:
        return data.startswith((b"\x89PNG", b"\xff\xd8", b"GIF87a", b"GIF89a")) or \
            (data[:4] == b"RIFF" and data[8:12] == b"WEBP")

    async def _generate(self, body: dict, img2img: bool):
        if img2img:
            if body.get("init_images") is None:
                return self._error(404, "HTTPException", "Init image not found")
            if body.get("mask"):
                if (bad := await self._decode_image(body["mask"])) is not None:
                    return bad
        steps = body.get("steps", 20)
        if not isinstance(steps, int):
            return web.json_response({"detail": [{"type": "int_parsing", "loc": ["body", "steps"], "msg":
                                                  "Input should be a valid integer", "input": steps}]}, status=422)
        sampler = body.get("sampler_name", "Euler a")
        if sampler not in SAMPLERS:
            return web.json_response({"error": "HTTPException", "detail": "Sampler not found", "body": "",
                                      "errors": ""}, status=404)
        async with self.lock:  # A1111's queue lock: one generation at a time
            if self.fail_next:
                status, answer = self.fail_next
                self.fail_next = None
                return web.json_response(answer, status=status)
            for encoding in (body.get("init_images") or []) if img2img else []:
                if (bad := await self._decode_image(encoding)) is not None:
                    return bad
            self.interrupted = False  # shared.state.begin()
            self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            self.state = {"step": 0, "steps": steps, "job_count": 1}
            for step in range(1, steps + 1):
                if self.interrupted:
                    break  # stops after the current step and still answers with the image so far
                await asyncio.sleep(self.step_s)
                self.state["step"] = step
            self.state = {"step": 0, "steps": 0, "job_count": 0}
        width, height = body.get("width", 512), body.get("height", 512)
        count = body.get("batch_size", 1) * body.get("n_iter", 1)
        seed = body.get("seed", -1) if body.get("seed", -1) != -1 else 1234
        info = {"prompt": body.get("prompt", ""), "all_prompts": [body.get("prompt", "")] * count, "seed": seed,
                "all_seeds": [seed + i for i in range(count)], "sampler_name": sampler, "steps": steps,
                "width": width, "height": height, "sd_model_name": "v1-5-pruned-emaonly",
                "job_timestamp": self.job_timestamp,
                "infotexts": [f"{body.get('prompt', '')}\nSteps: {steps}, Sampler: {sampler}, Seed: {seed + i}"
                              for i in range(count)]}
        images = [base64.b64encode(png(width, height, 0x101010 * (i + 1))).decode() for i in range(count)]
        return web.json_response({"images": images, "parameters": body, "info": json.dumps(info)})

    async def progress(self, request):
        steps = self.state["steps"]
        fraction = self.state["step"] / steps if steps else 0.0
        return web.json_response({
            "progress": fraction, "eta_relative": (steps - self.state["step"]) * self.step_s,
            "state": {"skipped": False, "interrupted": self.interrupted, "stopping_generation": False,
                      "job": "txt2img" if steps else "", "job_count": self.state["job_count"],
                      "job_timestamp": self.job_timestamp, "job_no": 0,
                      "sampling_step": self.state["step"], "sampling_steps": steps},
            "current_image": None, "textinfo": None})

    async def ping_handler(self, request):
        return web.json_response({})

    async def interrupt(self, request):
        if self.hang_interrupt:
            await asyncio.sleep(3600)
        self.interrupted = True
        return web.json_response({})

    async def options(self, request):
        return web.json_response({"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
                                  "samples_format": "png"})

"""A fake Automatic1111 WebUI API: txt2img / img2img (one generation at a time, base64 PNGs, `info` as a
JSON string), `/sdapi/v1/progress`, `/sdapi/v1/interrupt` (the running request still answers 200 with what it
has), `/internal/ping`, `/sdapi/v1/options`, FastAPI's 422 shape and A1111's error shape for 404/500.

`fail_next` = (status, body) answers the next generation with that, e.g. the 500 of CUDA out of memory.
`hang_interrupt` = True: `/sdapi/v1/interrupt` never answers (a wedged server).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

from aiohttp import web

from ._server import ServerThread
from .comfyui_nodes import png

SAMPLERS = ["DPM++ 2M", "Euler a", "Euler", "DDIM"]
OOM = (500, {"error": "OutOfMemoryError", "detail": "", "body": "",
             "errors": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.64 GiB total capacity)"})


class FakeA1111:
    def __init__(self, *, step_s: float = 0.02, ping: bool = True):
        self.step_s, self.ping = step_s, ping
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

    async def _generate(self, body: dict, img2img: bool):
        if img2img and not body.get("init_images"):
            return web.json_response({"detail": [{"type": "missing", "loc": ["body", "init_images"],
                                                  "msg": "Field required", "input": None}]}, status=422)
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
            self.interrupted = False
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
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": 0,
                      "sampling_step": self.state["step"], "sampling_steps": steps},
            "current_image": None, "textinfo": None})

    async def ping_handler(self, request):
        return web.json_response({})

    async def interrupt(self, request):
        if self.hang_interrupt:
            await asyncio.sleep(3600)
        self.interrupted = True
        return web.json_response(None)

    async def options(self, request):
        return web.json_response({"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
                                  "samples_format": "png"})

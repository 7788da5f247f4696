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

Task ids, as A1111 >= 1.6 and Forge keep them (modules/progress.py): a generation's id is the body's
`force_task_id` or a `task(txt2img-XXXXXXX)` of its own; it is queued (`pending_tasks`) before the queue lock,
becomes `current_task` once it holds the lock (after state.begin()) and goes to `finished_tasks` (the last 16)
when it ends without an exception (an exception leaves it current; an init image that does not decode, inside
the lock, leaves it queued). `POST /internal/progress {"id_task", "id_live_preview"}` answers
{"active", "queued", "completed", "progress", "eta", "live_preview", "id_live_preview", "textinfo"}
(progress and eta only when active). `/sdapi/v1/interrupt` sets the flag whatever runs: a queued request is not
interrupted (its begin() resets the flag), the running one is.
`runs` records each generation that ran: its task id, steps asked and run, and whether it was interrupted;
`interrupts` the task that was running (None: none) when each interrupt came.

`fail_next` = (status, body[, headers]) answers the next generation with that, e.g. the 500 of CUDA out of memory.
`hang_interrupt` = True: `/sdapi/v1/interrupt` never answers (a wedged server).
`interrupt_lag_s`: how long an interrupted run takes to end after its current step (A1111 decodes the partial
latents: seconds for a large image), still holding the queue lock, running, with the flag set.
`queued_behind` records the task id of each generation that arrived while another one held the queue lock.
`task_ids` = False: a build before 1.6, which ignores `force_task_id` and keeps no ids of API runs (its
`/internal/progress` knows none of them); `internal_progress` = False: one without `/internal/progress` (404).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import random
import socket
import string
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
                 api_forbid_local_requests: bool = True, task_ids: bool = True, internal_progress: bool = True):
        self.step_s, self.ping = step_s, ping
        self.task_ids, self.internal_progress = task_ids, internal_progress
        self.api_enable_requests, self.api_forbid_local_requests = api_enable_requests, api_forbid_local_requests
        self.fail_next: tuple[int, dict] | None = None
        self.hang_interrupt = False
        self.interrupt_lag_s = 0.0
        self.queued_behind: list[str] = []
        self.requests: list[tuple[str, str, dict]] = []
        self.runs: list[dict] = []  # per generation that ran: task_id, steps, done (steps run), interrupted
        self.interrupts: list[str | None] = []  # the current task when each interrupt came
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
        self.current_task: str | None = None
        self.pending_tasks: dict[str, float] = {}
        self.finished_tasks: list[str] = []
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/sdapi/v1/txt2img", self.txt2img)
        app.router.add_post("/sdapi/v1/img2img", self.img2img)
        app.router.add_get("/sdapi/v1/progress", self.progress)
        app.router.add_post("/sdapi/v1/interrupt", self.interrupt)
        app.router.add_get("/sdapi/v1/options", self.options)
        if self.internal_progress:
            app.router.add_post("/internal/progress", self.internal_progress_handler)
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
        kind = "img2img" if img2img else "txt2img"
        task_id = body.get("force_task_id") or \
            f"task({kind}-{''.join(random.choices(string.ascii_uppercase + string.digits, k=7))})"
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
        if self.task_ids:
            self.pending_tasks[task_id] = time.time()  # add_task_to_queue, before the queue lock
        if self.lock.locked():
            self.queued_behind.append(task_id)
        async with self.lock:  # A1111's queue lock: one generation at a time
            for encoding in (body.get("init_images") or []) if img2img else []:
                if (bad := await self._decode_image(encoding)) is not None:
                    return bad  # raised before start_task: the id stays queued, as there
            self.interrupted = False  # shared.state.begin()
            self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            self.state = {"step": 0, "steps": steps, "job_count": 1}
            if self.task_ids:  # start_task
                self.current_task = task_id
                self.pending_tasks.pop(task_id, None)
            try:
                if self.fail_next:  # raised inside process_images: no finish_task, the id stays current
                    status, answer, *headers = self.fail_next  # (a proxy's answer may carry Retry-After)
                    self.fail_next = None
                    return web.json_response(answer, status=status, headers=headers[0] if headers else None)
                done = 0
                for step in range(1, steps + 1):
                    if self.interrupted:  # stops after the current step and still answers with the image so far
                        await asyncio.sleep(self.interrupt_lag_s)
                        break
                    await asyncio.sleep(self.step_s)
                    self.state["step"] = done = step
                self.runs.append({"task_id": task_id, "steps": steps, "done": done, "interrupted": done < steps})
                if self.task_ids:  # finish_task
                    if self.current_task == task_id:
                        self.current_task = None
                    self.finished_tasks = [*self.finished_tasks, task_id][-16:]
            finally:
                self.state = {"step": 0, "steps": 0, "job_count": 0}  # shared.state.end()
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

    async def internal_progress_handler(self, request):
        """modules/progress.py's progressapi: about one task id, whatever else runs."""
        try:
            req = await request.json()
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return web.json_response({"detail": [{"type": "model_attributes_type", "loc": ["body"],
                                                  "msg": "Input should be a valid dictionary", "input": req}]},
                                     status=422)
        id_task = req.get("id_task")
        active = id_task == self.current_task
        queued = id_task in self.pending_tasks
        completed = id_task in self.finished_tasks
        if not active:
            textinfo = "Waiting..."
            if queued:
                order = sorted(self.pending_tasks, key=self.pending_tasks.__getitem__)
                textinfo = f"In queue: {order.index(id_task) + 1}/{len(order)}"
            return web.json_response({"active": False, "queued": queued, "completed": completed, "progress": None,
                                      "eta": None, "live_preview": None, "id_live_preview": -1,
                                      "textinfo": textinfo})
        steps = self.state["steps"]
        progress = min(self.state["step"] / steps, 1) if steps else 0
        return web.json_response({"active": True, "queued": queued, "completed": completed, "progress": progress,
                                  "eta": (steps - self.state["step"]) * self.step_s if progress else None,
                                  "live_preview": None, "id_live_preview": req.get("id_live_preview", -1),
                                  "textinfo": None})

    async def ping_handler(self, request):
        return web.json_response({})

    async def interrupt(self, request):
        if self.hang_interrupt:
            await asyncio.sleep(3600)
        self.interrupts.append(self.current_task if self.task_ids else None)
        self.interrupted = True
        return web.json_response({})

    async def options(self, request):
        return web.json_response({"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
                                  "samples_format": "png"})

"""A protocol-faithful fake ComfyUI 0.3.64 server (paths, status codes, JSON, WebSocket messages and their
order as captured in ../shared/comfyui-protocol.md; section numbers below refer to it).

One "process" (`_Process`) holds what a real server keeps in memory: queue, history, cache, sockets, temp
files. `kill()` drops it the way SIGTERM does (sockets cut without a close frame, connection refused) and
`restart()` starts an empty one on the same port; output files persist like a disk, temp files do not.

Knobs beyond the capture, for fault injection: `history_hidden_gets` answers `{}` to that many GETs of a
finished prompt's history (the race of §5.1, made deterministic), `preview_frames` sends binary preview
frames (§4, sent by samplers on a real server), `blur_s`/`node_s` set node run times, `prompt_answer_delay_s`
holds the answer of an accepted `POST /prompt` that long after the prompt was queued (a late answer or a
connection lost before it: the prompt runs anyway). `freeze()` blocks the
server's event loop, as a node holding it does on a real server: connections are still accepted (by the
kernel) but no request is answered and no frame is sent until `close()`.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import comfyui_nodes as nodes
from ._server import ServerThread

JSON = "application/json"


def _ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Item:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list[str]

    def as_list(self) -> list:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class _Process:
    """What dies with the server process."""

    queue: list[_Item] = field(default_factory=list)
    running: _Item | None = None
    current_node: str | None = None
    history: dict[str, dict] = field(default_factory=dict)
    sockets: dict[str, tuple[web.WebSocketResponse, Any]] = field(default_factory=dict)
    cache: dict[str, tuple[Any, dict | None]] = field(default_factory=dict)
    counter: int = 0
    interrupt: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    executor: asyncio.Task | None = None
    temp_suffix: str = field(default_factory=lambda: "".join(random.choices(string.ascii_lowercase, k=5)))


class FakeComfyUI:
    def __init__(self, *, node_s: float = 0.0, blur_s: float = 0.3, history_hidden_gets: int = 0,
                 preview_frames: bool = False, prompt_answer_delay_s: float = 0.0):
        self.node_s, self.blur_s = node_s, blur_s
        self.prompt_answer_delay_s = prompt_answer_delay_s
        self.queue_read_failures = 0  # GET /queue answers this many 502s (a proxy in front of ComfyUI) first
        self.history_hidden_gets = history_hidden_gets
        self.preview_frames = preview_frames
        self.files: dict[tuple[str, str, str], bytes] = {}  # (type, subfolder, filename): the "disk"
        self.requests: list[tuple[str, str, dict]] = []  # (method, path_qs, headers) of every request
        self.interrupt_calls: list[Any] = []
        self.temp_view_cut = False  # /view of a temp image: the connection drops halfway through its body
        self.temp_view_hold: threading.Event | None = None  # ... or the second half waits until it is set
        self.proc = _Process()
        self._thread = ServerThread(self._make_app)
        self._thawed = threading.Event()

    # -- lifecycle (call from tests) ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._thread.url

    def start(self) -> FakeComfyUI:
        self._thread.start()
        return self

    def close(self) -> None:
        self._thawed.set()
        self._thread.close()

    def freeze(self) -> None:
        """Block the server's event loop (until `close()`, at most a minute): a hung server."""
        self._thawed.clear()
        self._thread.loop.call_soon_threadsafe(self._thawed.wait, 60)

    async def kill(self) -> None:
        """SIGTERM while running (§6.4): sockets cut (client sees 1006), then connection refused."""
        await self._thread.acall(self._kill())

    async def drop_sockets(self) -> None:
        """Cut every WebSocket (as a proxy or network blip would) while the server keeps running."""
        async def drop():
            for _, transport in list(self.proc.sockets.values()):
                transport.abort()
        await self._thread.acall(drop())

    async def restart(self) -> None:
        await self._thread.acall(self._thread._start())

    async def call(self, fn, *args):
        """Run `fn(*args)` on the server loop (for reading state consistently from a test)."""
        async def wrapper():
            return fn(*args)
        return await self._thread.acall(wrapper())

    async def _kill(self) -> None:
        proc = self.proc
        if proc.executor:
            proc.executor.cancel()
        for _, transport in list(proc.sockets.values()):
            if transport is not None:
                transport.abort()
        await self._thread._stop()

    def _make_app(self) -> web.Application:
        self.proc = _Process()
        # temp/ is wiped at server start (§5.2)
        self.files = {k: v for k, v in self.files.items() if k[0] != "temp"}
        app = web.Application(middlewares=[self._record])
        routes = [("GET", "/system_stats", self.system_stats), ("GET", "/queue", self.get_queue),
                  ("POST", "/queue", self.post_queue), ("GET", "/prompt", self.get_prompt),
                  ("POST", "/prompt", self.post_prompt), ("GET", "/history", self.get_history_all),
                  ("GET", "/history/{prompt_id}", self.get_history), ("POST", "/history", self.post_history),
                  ("POST", "/interrupt", self.interrupt), ("GET", "/view", self.view),
                  ("GET", "/features", self.features), ("GET", "/object_info/{cls}", self.object_info),
                  ("GET", "/ws", self.websocket)]
        for method, path, handler in routes:  # every route also exists under /api (§3)
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.on_startup.append(self._start_executor)
        return app

    async def _start_executor(self, app) -> None:
        self.proc.executor = asyncio.create_task(self._execute_loop(self.proc))

    @web.middleware
    async def _record(self, request, handler):
        self.requests.append((request.method, request.path_qs, {k.lower(): v for k, v in request.headers.items()}))
        return await handler(request)

    # -- messaging -----------------------------------------------------------------------------------

    async def _send(self, proc: _Process, client_id: str | None, type_: str, data: dict) -> None:
        targets = list(proc.sockets.items()) if client_id is None else \
            [(client_id, proc.sockets[client_id])] if client_id in proc.sockets else []
        for _, (ws, _) in targets:
            try:
                await ws.send_str(json.dumps({"type": type_, "data": data}))
            except (ConnectionError, RuntimeError):
                pass  # a socket closing under us: its events are lost, as on the real server

    async def _status(self, proc: _Process) -> None:
        remaining = len(proc.queue) + (proc.running is not None)
        await self._send(proc, None, "status", {"status": {"exec_info": {"queue_remaining": remaining}}})

    # -- HTTP ----------------------------------------------------------------------------------------

    async def system_stats(self, request):
        return web.json_response({
            "system": {"os": "posix", "ram_total": 1 << 34, "ram_free": 1 << 33, "comfyui_version": "0.3.64",
                       "required_frontend_version": "1.27.10", "installed_templates_version": "0.1.94",
                       "required_templates_version": "0.1.94", "python_version": "3.11.9", "pytorch_version":
                       "2.8.0+cpu", "embedded_python": False, "argv": ["main.py", "--cpu"]},
            "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 1 << 34,
                         "vram_free": 1 << 33, "torch_vram_total": 1 << 34, "torch_vram_free": 1 << 33}]})

    async def features(self, request):
        return web.json_response({"supports_preview_metadata": True, "max_upload_size": 104857600})

    async def object_info(self, request):
        schema = nodes.SCHEMAS.get(request.match_info["cls"])
        if schema is None:
            return web.json_response({})
        name = request.match_info["cls"]
        return web.json_response({name: {"input": {"required": {k: list(v) for k, v in schema.items()}},
                                         "name": name, "output_node": name in nodes.OUTPUT_NODES}})

    async def get_queue(self, request):
        if self.queue_read_failures > 0:
            self.queue_read_failures -= 1
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>")
        proc = self.proc
        running = [proc.running.as_list()] if proc.running else []
        pending = [i.as_list() for i in sorted(proc.queue, key=lambda i: i.number)]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def post_queue(self, request):
        body = await request.json()
        if body.get("clear"):
            self.proc.queue.clear()
        delete = set(body.get("delete") or [])
        self.proc.queue = [i for i in self.proc.queue if i.prompt_id not in delete]  # running: untouched
        await self._status(self.proc)
        return web.Response(status=200)

    async def get_prompt(self, request):
        proc = self.proc
        return web.json_response({"exec_info": {"queue_remaining": len(proc.queue) + (proc.running is not None)}})

    async def post_prompt(self, request):
        proc = self.proc
        try:
            body = json.loads(await request.text())
        except ValueError:
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
        number = proc.counter
        proc.counter += 1  # consumed by every JSON body, rejected ones too (§3.1)
        if "prompt" not in body:
            return web.json_response({"error": {"type": "no_prompt", "message": "No prompt provided", "details":
                                                "No prompt provided", "extra_info": {}}, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        try:
            outputs, node_errors = nodes.validate(prompt, body.get("partial_execution_targets"))
        except nodes.PromptRejected as rejected:
            return web.json_response(rejected.body, status=400)
        except (TypeError, AttributeError):
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")
        if body.get("front"):
            number = -number
        elif "number" in body:
            number = float(body["number"])
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        extra = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        proc.queue.append(_Item(number, prompt_id, prompt, extra, outputs))
        await self._status(proc)
        proc.wake.set()
        if self.prompt_answer_delay_s:
            await asyncio.sleep(self.prompt_answer_delay_s)
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def get_history(self, request):
        prompt_id = request.match_info["prompt_id"]
        entry = self.proc.history.get(prompt_id)
        if entry is not None and self.history_hidden_gets > 0:
            self.history_hidden_gets -= 1
            entry = None
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def get_history_all(self, request):
        return web.json_response(self.proc.history)

    async def post_history(self, request):
        body = await request.json()
        if body.get("clear"):
            self.proc.history.clear()
        for prompt_id in body.get("delete") or []:
            self.proc.history.pop(prompt_id, None)
        return web.Response(status=200)

    async def interrupt(self, request):
        text = await request.text()
        body = json.loads(text) if text.strip() else {}
        self.interrupt_calls.append(body)
        proc = self.proc
        target = body.get("prompt_id") if isinstance(body, dict) else None
        if target is None or (proc.running is not None and proc.running.prompt_id == target):
            proc.interrupt = True
        # else: "Prompt X is not currently running, skipping interrupt" (§6.3)
        return web.Response(status=200)

    async def view(self, request):
        q = request.query
        filename = q.get("filename")
        if not filename:
            return web.Response(status=404)
        if ".." in filename or filename.startswith("/"):
            return web.Response(status=400)
        data = self.files.get((q.get("type", "output"), q.get("subfolder", ""), filename))
        if data is None:
            return web.Response(status=404)
        if q.get("type") == "temp" and (self.temp_view_cut or self.temp_view_hold is not None):
            # A slow or broken link for temp images: half the body, then the connection dropped, or the rest
            # once the test sets temp_view_hold.
            response = web.StreamResponse(headers={"Content-Type": "image/png",
                                                   "Content-Disposition": f'filename="{filename}"'})
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            if self.temp_view_cut:
                request.transport.close()
                return response
            await asyncio.get_running_loop().run_in_executor(None, self.temp_view_hold.wait, 60)
            await response.write(data[len(data) // 2:])
            return response
        return web.Response(body=data, content_type="image/png",
                            headers={"Content-Disposition": f'filename="{filename}"'})

    async def websocket(self, request):
        proc = self.proc
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        proc.sockets[client_id] = (ws, request.transport)  # the same clientId replaces the old socket
        remaining = len(proc.queue) + (proc.running is not None)
        await ws.send_str(json.dumps({"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": remaining}}, "sid": client_id}}))
        if proc.running and proc.running.extra_data.get("client_id") == client_id and proc.current_node:
            await ws.send_str(json.dumps({"type": "executing", "data": {"node": proc.current_node}}))
        first = True
        try:
            async for message in ws:
                if first and message.type.name == "TEXT":
                    frame = json.loads(message.data)
                    if frame.get("type") == "feature_flags":
                        await ws.send_str(json.dumps({"type": "feature_flags", "data": {
                            "supports_preview_metadata": True, "max_upload_size": 104857600}}))
                first = False
        finally:
            if proc.sockets.get(client_id, (None,))[0] is ws:
                del proc.sockets[client_id]
        return ws

    # -- execution -----------------------------------------------------------------------------------

    async def _execute_loop(self, proc: _Process) -> None:
        while True:
            while not proc.queue:
                proc.wake.clear()
                await proc.wake.wait()
            item = min(proc.queue, key=lambda i: i.number)
            proc.queue.remove(item)
            proc.running = item
            try:
                await self._status(proc)  # on dequeue by the worker
                await _Execution(self, proc, item).run()
            finally:
                proc.running, proc.current_node = None, None


class _Execution:
    """One prompt run, sending what §4.2 (success), §4.3 (cached), §6.2 (error) and §6.3 (interrupt) show."""

    def __init__(self, server: FakeComfyUI, proc: _Process, item: _Item):
        self.server, self.proc, self.item = server, proc, item
        self.client_id = item.extra_data.get("client_id")
        self.pid = item.prompt_id
        self.node: str | None = None
        self.states: dict[str, dict] = {}
        self.messages: list = []

    async def send(self, type_: str, data: dict) -> None:
        if type_.startswith("execution_"):
            self.messages.append([type_, data])
        # Without a client_id only progress_state (to everyone) and interrupts are broadcast (§4.1).
        if self.client_id is None and type_ not in ("progress_state", "execution_interrupted"):
            return
        await self.server._send(self.proc, self.client_id, type_, data)

    async def state(self, node: str, value: float, max_: float, state: str) -> None:
        self.states[node] = {"value": value, "max": max_, "state": state, "node_id": node, "prompt_id": self.pid,
                             "display_node_id": node, "parent_node_id": None, "real_node_id": node}
        await self.send("progress_state", {"prompt_id": self.pid, "nodes": dict(self.states)})

    async def work(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def sleep_with_progress(self, seconds: float) -> None:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            if self.proc.interrupt:
                raise nodes.Interrupted()
            await self.send("progress", {"value": elapsed, "max": seconds, "prompt_id": self.pid, "node": self.node})
            await self.state(self.node, elapsed, seconds, "running")
            if self.server.preview_frames and self.client_id in self.proc.sockets:
                frame = struct.pack(">II", 1, 2) + nodes.png(8, 8, 0x808080)  # PREVIEW_IMAGE, PNG
                try:
                    await self.proc.sockets[self.client_id][0].send_bytes(frame)
                except (ConnectionError, RuntimeError):
                    pass
            await asyncio.sleep(0.01)

    def save(self, image, prefix: str, type_: str) -> dict:
        _, width, height, color = image
        if type_ == "temp":
            subfolder, base = "", f"ComfyUI_temp_{self.proc.temp_suffix}"
        else:
            subfolder, _, base = prefix.rpartition("/")
        taken = [k[2] for k in self.server.files if k[0] == type_ and k[1] == subfolder and k[2].startswith(base + "_")]
        filename = f"{base}_{len(taken) + 1:05d}_.png"
        self.server.files[(type_, subfolder, filename)] = nodes.png(width, height, color)
        return {"filename": filename, "subfolder": subfolder, "type": type_}

    async def run(self) -> None:
        proc, prompt = self.proc, self.item.prompt
        proc.interrupt = False  # reset at the start of every prompt, like nodes.interrupt_processing(False)
        await self.send("execution_start", {"prompt_id": self.pid, "timestamp": _ms()})
        order = nodes.execution_order(prompt, self.item.outputs)
        sigs = {n: nodes.signature(prompt, n) for n in order}
        cached = [n for n in order if sigs[n] in proc.cache]
        await self.send("execution_cached", {"nodes": cached, "prompt_id": self.pid, "timestamp": _ms()})
        values: dict[str, Any] = {}
        outputs: dict[str, dict] = {}
        executed: list[str] = []
        for node_id in order:
            class_type = prompt[node_id]["class_type"]
            if node_id in cached:  # no executing frame; cached UI output is re-sent (§4.3)
                values[node_id], ui = proc.cache[sigs[node_id]]
                if ui is not None:
                    outputs[node_id] = ui
                    await self.send("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                                 "prompt_id": self.pid})
                    await self.state(node_id, 1.0, 1.0, "finished")
                continue
            self.node = proc.current_node = node_id
            await self.state(node_id, 0.0, 1.0, "running")
            await self.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.pid})
            inputs = {k: values[v[0]] if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) else v
                      for k, v in prompt[node_id].get("inputs", {}).items()}
            try:
                if proc.interrupt:
                    raise nodes.Interrupted()
                values[node_id], ui = await nodes.run_node(class_type, inputs, self)
            except nodes.Interrupted:
                await self.send("execution_interrupted", {"prompt_id": self.pid, "node_id": node_id, "node_type":
                                                          class_type, "executed": executed, "timestamp": _ms()})
                return await self.end("error", {})
            except Exception as exc:  # what the node raised, reported as ComfyUI does (§6.2)
                await self.send("execution_error", {
                    "prompt_id": self.pid, "node_id": node_id, "node_type": class_type, "executed": executed,
                    "exception_message": f"{exc}\n", "exception_type": nodes.full_type_name(exc),
                    "traceback": ['  File "execution.py", line 496, in execute\n'],
                    "current_inputs": {k: [str(v)] for k, v in inputs.items()}, "current_outputs": order,
                    "timestamp": _ms()})
                return await self.end("error", {})
            proc.cache[sigs[node_id]] = (values[node_id], ui)
            executed.append(node_id)
            if ui is not None:
                outputs[node_id] = ui
                await self.send("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                             "prompt_id": self.pid})
            await self.state(node_id, 1.0, 1.0, "finished")
        await self.send("execution_success", {"prompt_id": self.pid, "timestamp": _ms()})
        await self.end("success", outputs)

    async def end(self, status: str, outputs: dict) -> None:
        # History is written after execution_success/error/interrupted went out, and before the status
        # broadcast and the terminal executing{node: null} (§5.1).
        await asyncio.sleep(0)
        self.proc.history[self.pid] = {
            "prompt": self.item.as_list(), "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": self.messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs}}
        self.proc.current_node = None
        self.proc.running = None
        await self.server._status(self.proc)
        await self.send("executing", {"node": None, "prompt_id": self.pid})

"""The ComfyUI connector: one job = one API-format workflow run through ComfyUI's HTTP + WebSocket API.

Follows the captured protocol in ../shared/comfyui-protocol.md (section numbers below refer to it):
WebSocket `/ws?clientId=` first, then `POST /prompt` with the same client_id and our own prompt_id (so we
know the id before the POST returns, §3.1/§7.1); `executing{node: null, prompt_id}` is the end, and only then
is `/history/{id}` read, polled briefly because it can still be empty (§5.1). Outputs are downloaded through
`/view` to the output directory and returned by reference.

Error classification (the decisions, and why):
* POST 400, and 200 with non-empty `node_errors` (a partial run, §6.1): permanent; the node errors are in the
  message. The partial run is stopped, since its result is not what the job asked for.
* POST 500: permanent. ComfyUI answers 500 text/plain only when validating the graph itself raised (§6.1);
  the same graph raises again. 502/503/504 come from a proxy in front of it and are retryable.
* `execution_error` (§6.2): permanent, naming node id, class and exception, unless the exception is an
  out-of-memory or connection/timeout error (a custom node fetching something): those depend on the
  machine's state, not the workflow, so another attempt (maybe elsewhere) can succeed.
* `execution_interrupted` (§6.3): JobCancelled.
* Our prompt deleted from the queue by someone else before it started (`POST /queue {"delete"|"clear"}`,
  §6.3): no frame names it, only a `status` frame with a lower `queue_remaining`. On such a frame, while our
  prompt has not started, one `/queue` read (and, when it is gone, one `/history` read) tells: in neither =
  retryable "removed from ComfyUI's queue", not a wait until the job timeout.
* A `POST /prompt` whose answer never came (timeout, connection dropped, run() cancelled meanwhile): ComfyUI
  may have queued it, and we know its id, so it is stopped (queue delete + interrupt) in the background.
* Socket dropped (1006, §6.4): reconnect with the same client id, then `/history` non-empty = finished,
  prompt in `/queue` = still running or pending (keep listening), neither = lost with a restarted server:
  retryable. The server unreachable past `reconnect_timeout_s`: retryable.
* Connection refused / timeouts on any call, and the job timeout: retryable. Before the prompt is submitted
  (the WebSocket connect, POST /prompt) a connection that cannot be made is ServiceUnreachable: the job never
  reached ComfyUI, and the worker hands it back uncounted while ComfyUI's health says it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import Field

from emp_machine.connectors import _http
from emp_machine.connectors._comfyui_events import (
    ProgressTracker, execution_error, node_errors_text, rejection_text, workflow_from_payload,
)
from emp_machine.connectors.base import (
    Connector, ConnectorJob, ConnectorSettings, Health, HttpUrl, JobResult, OutputFile, ProgressFn,
)
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, ServiceUnreachable, can_retry


class ComfyUISettings(ConnectorSettings):
    # The caller (manifest) fills this from the service instance bound to the worker; no env reads here.
    base_url: HttpUrl = "http://127.0.0.1:8188"
    connect_timeout_s: float = Field(default=5, gt=0, allow_inf_nan=False)
    request_timeout_s: float = Field(default=30, gt=0, allow_inf_nan=False)
    job_timeout_s: float = Field(default=3600, gt=0, allow_inf_nan=False)
    # How long /history may stay empty after the terminal frame (captured: never, but see §5.1).
    history_wait_s: float = Field(default=5, gt=0, allow_inf_nan=False)
    # A real restart took 10.2 s to ready (§6.4); beyond this the job fails as retryable.
    reconnect_timeout_s: float = Field(default=60, gt=0, allow_inf_nan=False)
    # Interrupts are cooperative (§6.3): wait this long for ComfyUI to confirm before reporting cancelled.
    cancel_wait_s: float = Field(default=15, gt=0, allow_inf_nan=False)
    # Which `type`s of listed images to download: "output" (SaveImage) and "temp" (PreviewImage).
    output_types: tuple[str, ...] = ("output", "temp")
    client_id_prefix: str = "emp"


@dataclass
class _Active:
    """One job in flight: its ids and the inbox its run loop reads (WebSocket frames and cancel requests)."""

    job: ConnectorJob
    prompt_id: str
    client_id: str
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: bool = False  # POST /prompt answered 200: ComfyUI has it
    # POST /prompt sent and not refused: ComfyUI may hold the prompt even when its answer never came
    may_be_queued: bool = False
    started: bool = False  # a frame of its run came (execution_start and after)
    queue_remaining: int | None = None  # from the last `status` frame


class ComfyUIConnector(_http.HttpSession, Connector):
    name = "comfyui"
    Settings = ComfyUISettings
    settings: ComfyUISettings

    def __init__(self, settings: ComfyUISettings, context):
        super().__init__(settings, context)
        self._base = settings.base_url.rstrip("/")
        self._active: dict[str, _Active] = {}

    # -- plumbing ------------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, headers: dict[str, str], **kwargs) -> tuple[int, Any]:
        """One request; (status, parsed JSON or text). Transport failures become RetryableJobError."""
        return await self._request("ComfyUI", method, self._base + path, headers, **kwargs)

    async def health(self) -> Health:
        try:
            status, body = await self._call("GET", "/system_stats", {})
        except RetryableJobError as exc:
            return Health(False, str(exc))
        if status == 200 and isinstance(body, dict) and "system" in body:
            return Health(True)
        return Health(False, f"GET /system_stats answered {status}")

    # -- cancel --------------------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> None:
        active = self._active.get(job_id)
        if active is not None:
            active.inbox.put_nowait(("cancel", None))  # the run loop alone decides what happens next

    async def _stop_prompt(self, active: _Active) -> None:
        """Delete it if pending, interrupt it if running. Both are sent: `delete` ignores a running prompt
        and a targeted interrupt ignores any prompt but the running one (§6.3), so the pair is race-free
        where checking /queue first would not be."""
        if not (active.submitted or active.may_be_queued):
            return
        headers = _http.service_headers(active.job)
        try:
            async with asyncio.timeout(_http.STOP_GRACE_S):  # queue delete + interrupt, in all
                await self._call("POST", "/queue", headers, json={"delete": [active.prompt_id]})
                await self._call("POST", "/interrupt", headers, json={"prompt_id": active.prompt_id})
        except RetryableJobError as exc:  # the server is gone: nothing left to stop
            self._log("cancel_failed", active, logging.WARNING, error=str(exc))
        except TimeoutError:  # hung: it may still run the prompt, but waiting longer changes nothing
            self._log("cancel_failed", active, logging.WARNING,
                      error=f"ComfyUI did not answer the stop within {_http.STOP_GRACE_S:g} s")

    # -- run -----------------------------------------------------------------------------------------

    def _ids(self, active: _Active) -> dict[str, str]:
        """The ComfyUI fields of every record of a job."""
        return {"prompt_id": active.prompt_id, "client_id": active.client_id}

    def _log(self, event: str, active: _Active, level: int = logging.INFO, **fields) -> None:
        self.joblog.event(event, active.job.id, level, **self._ids(active), **fields)

    async def run(self, job: ConnectorJob, progress: ProgressFn) -> JobResult:
        graph = workflow_from_payload(job.payload)
        active = _Active(job, str(uuid.uuid4()), f"{self.settings.client_id_prefix}-{uuid.uuid4().hex[:12]}")
        self._active[job.id] = active
        started = time.monotonic()
        self.joblog.received(job.id, **self._ids(active), nodes=len(graph), base_url=self._base)
        ws: list[aiohttp.ClientWebSocketResponse] = []
        reader: list[asyncio.Task] = []
        deadline = asyncio.timeout(self.settings.job_timeout_s)
        try:
            async with deadline:
                result = await self._run(active, graph, progress, ws, reader)
            self.joblog.completed(job.id, _http.ms_since(started), **self._ids(active),
                                  outputs=len(result.outputs))
            return result
        except TimeoutError:
            if not deadline.expired():  # every call converts its own timeouts: this one is a bug
                raise
            await self._stop_prompt(active)
            error = RetryableJobError(f"ComfyUI prompt {active.prompt_id} did not finish within "
                                      f"{self.settings.job_timeout_s:g} s")
            self.joblog.failed(job.id, error, _http.ms_since(started), True, **self._ids(active))
            raise error from None
        except asyncio.CancelledError:
            self._stop_in_background(self._stop_prompt(active))  # the worker goes on at once
            raise
        except JobCancelled:
            self._log("job.cancelled", active)
            raise
        except Exception as exc:
            error = exc
            if isinstance(exc, ServiceUnreachable) and active.submitted:
                # ComfyUI took the prompt and is gone now: an attempt of the job (a prompt that brings the
                # server down must run out of retries), not a job that never reached it.
                error = RetryableJobError(str(exc))
            self.joblog.failed(job.id, error, _http.ms_since(started), can_retry(error), **self._ids(active))
            if error is exc:
                raise
            raise error from None
        finally:
            self._active.pop(job.id, None)
            for task in reader:
                task.cancel()
            for socket in ws:
                await socket.close()

    async def _connect(self, active: _Active, ws: list, reader: list) -> None:
        """Open the WebSocket for our client id and start the task that feeds its frames to the inbox."""
        url = f"{self._base}/ws?clientId={active.client_id}"
        try:
            socket = await self._http().ws_connect(url, headers=_http.service_headers(active.job),
                                                   max_msg_size=0, timeout=aiohttp.ClientWSTimeout(
                                                       ws_receive=None, ws_close=2))
        except (aiohttp.WSServerHandshakeError, *_http.TRANSPORT_ERRORS) as exc:
            raise _http.transport_error("ComfyUI", url, exc) from None
        ws.append(socket)
        reader.append(asyncio.create_task(self._read(socket, active.inbox)))

    @staticmethod
    async def _read(socket: aiohttp.ClientWebSocketResponse, inbox: asyncio.Queue) -> None:
        async for message in socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                try:
                    inbox.put_nowait(("frame", json.loads(message.data)))
                except ValueError:
                    continue
            # Binary frames are sampler previews (§4): skipped, never parsed into the job's result.
        inbox.put_nowait(("closed", socket.close_code))

    async def _submit(self, active: _Active, graph: dict) -> None:
        body = {"prompt": graph, "client_id": active.client_id, "prompt_id": active.prompt_id,
                "extra_data": {"emp_job_id": active.job.id}}
        # ComfyUI may queue the prompt before its answer reaches us: from here a stop is worth sending.
        active.may_be_queued = True
        try:
            status, answer = await self._call("POST", "/prompt", _http.service_headers(active.job), json=body)
        except ServiceUnreachable:  # no connection was made: nothing was sent
            active.may_be_queued = False
            raise
        except RetryableJobError:
            # Timed out or dropped after it was sent: the prompt may be queued and would run for nobody.
            # Harmless for an id ComfyUI does not know (§6.3); in the background, as on a cancel.
            self._stop_in_background(self._stop_prompt(active))
            raise
        if status != 200:
            active.may_be_queued = False  # refused: nothing was queued
        if status == 200 and isinstance(answer, dict):
            active.submitted = True
            if answer.get("node_errors"):
                await self._stop_prompt(active)  # a partial run is not the job that was asked for
                raise FatalJobError("ComfyUI accepted only part of the workflow, the rest failed "
                                    f"validation: {node_errors_text(answer['node_errors'])}")
            self.joblog.started(active.job.id, **self._ids(active), number=answer.get("number"))
            return
        if status == 400:
            raise FatalJobError(f"ComfyUI rejected the workflow: {rejection_text(answer)}")
        if status in (502, 503, 504) or status == 429:
            raise RetryableJobError(f"ComfyUI POST /prompt answered {status}: {str(answer)[:300]}")
        raise FatalJobError(f"ComfyUI POST /prompt answered {status}: {str(answer)[:300]}")

    async def _run(self, active: _Active, graph: dict, progress: ProgressFn, ws: list,
                   reader: list) -> JobResult:
        await self._connect(active, ws, reader)
        await self._submit(active, graph)
        tracker = ProgressTracker(graph)
        await progress(0.0, f"queued as prompt {active.prompt_id}")
        cancel_by: float | None = None  # monotonic deadline once a cancel was sent
        while True:
            timeout = None if cancel_by is None else max(0.0, cancel_by - time.monotonic())
            try:
                async with asyncio.timeout(timeout):  # not wait_for, which in 3.11 can swallow the worker's
                    kind, item = await active.inbox.get()  # cancellation as a frame arrives
            except TimeoutError:
                raise JobCancelled(f"ComfyUI prompt {active.prompt_id} cancelled; the server had not "
                                   f"confirmed within {self.settings.cancel_wait_s:g} s") from None
            if kind == "cancel":
                if cancel_by is None:
                    self._log("job.cancelling", active)
                    await self._stop_prompt(active)
                    cancel_by = time.monotonic() + self.settings.cancel_wait_s
                    if await self._in_queue(active) is False:  # deleted while pending: no frames will come
                        raise JobCancelled(f"ComfyUI prompt {active.prompt_id} cancelled")
                continue
            if kind == "frame" and cancel_by is None and self._removed_hint(active, item):
                entry = await self._gone_before_start(active)
                if entry is not None:
                    return await self._finish(active, tracker, entry, progress)
                continue
            if kind == "closed":
                if cancel_by is not None:
                    raise JobCancelled(f"ComfyUI prompt {active.prompt_id} cancelled (socket closed)")
                entry = await self._after_drop(active, item, ws, reader)
                if entry is not None:
                    return await self._finish(active, tracker, entry, progress)
                continue
            outcome = self._on_frame(active, tracker, item)
            if outcome == "done":
                if cancel_by is not None:
                    raise JobCancelled(f"ComfyUI prompt {active.prompt_id} cancelled")
                entry = await self._history(active, self.settings.history_wait_s)
                if entry is None:
                    raise RetryableJobError(f"ComfyUI finished prompt {active.prompt_id} but /history had no "
                                            f"entry within {self.settings.history_wait_s:g} s")
                return await self._finish(active, tracker, entry, progress)
            if outcome == "interrupted":
                raise JobCancelled(f"ComfyUI interrupted prompt {active.prompt_id} at node "
                                   f"{item['data'].get('node_id')} ({item['data'].get('node_type')})")
            if outcome == "error":
                raise execution_error(item["data"])
            if outcome == "progress" and cancel_by is None:
                percent, message = tracker.report()
                if percent is not None:
                    self.joblog.progress(active.job.id, round(percent, 1), message, **self._ids(active),
                                         node=tracker.current)
                    await progress(percent, message)

    def _on_frame(self, active: _Active, tracker: ProgressTracker, frame: Any) -> str | None:
        """Classify one JSON frame for our prompt; frames of other prompts and unknown types are ignored."""
        if not isinstance(frame, dict) or not isinstance(frame.get("data"), dict):
            return None
        kind, data = frame.get("type"), frame["data"]
        # After a reconnect the server re-sends the running node without a prompt_id (§4.1); with a
        # client id of our own per job, a frame on our socket without prompt_id is ours.
        if data.get("prompt_id", active.prompt_id) != active.prompt_id:
            return None
        if kind in ("execution_start", "execution_cached", "executing", "progress", "executed"):
            active.started = True
        if kind == "executing":
            if data.get("node") is None:
                return "done" if "prompt_id" in data else None
            tracker.executing(str(data["node"]))
            return "progress"
        if kind == "progress":
            tracker.tick(str(data.get("node") or tracker.current), data.get("value"), data.get("max"))
            return "progress"
        if kind == "execution_cached":
            nodes = [str(n) for n in data.get("nodes") or []]
            tracker.cached(nodes)
            return "progress" if nodes else None
        if kind == "execution_error":
            return "error"
        if kind == "execution_interrupted":
            return "interrupted"
        return None

    @staticmethod
    def _removed_hint(active: _Active, frame: Any) -> bool:
        """True for a `status` frame with a lower queue_remaining than the last one while our prompt has not
        started: the only sign of a prompt deleted from the queue (§6.3). A prompt ahead of ours finishing
        lowers it too; one /queue read then tells them apart."""
        if not (isinstance(frame, dict) and frame.get("type") == "status" and isinstance(frame.get("data"), dict)):
            return False
        info = frame["data"].get("status")
        exec_info = info.get("exec_info") if isinstance(info, dict) else None
        remaining = exec_info.get("queue_remaining") if isinstance(exec_info, dict) else None
        if not isinstance(remaining, int) or isinstance(remaining, bool):
            return False
        lower = active.queue_remaining is not None and remaining < active.queue_remaining
        active.queue_remaining = remaining
        return lower and active.submitted and not active.started

    async def _gone_before_start(self, active: _Active) -> dict | None:
        """Our prompt, not started yet, after the queue shrank: still in /queue (pending, or running now):
        None, keep listening; finished meanwhile (its frames missed): its history entry; in neither: someone
        deleted it or cleared the queue (§6.3), retryable. ComfyUI moves a prompt from the queue to the
        history under one lock, so reading /queue first and /history second cannot miss a finished one. An
        unreadable /queue answer (a proxy's 502) tells nothing: keep listening."""
        if await self._in_queue(active) is not False:
            return None
        entry = await self._history(active, 0)
        if entry is not None:
            return entry
        raise RetryableJobError(f"ComfyUI prompt {active.prompt_id} was removed from ComfyUI's queue before it "
                                "started (someone deleted it or cleared the queue)")

    async def _in_queue(self, active: _Active) -> bool | None:
        """Whether /queue lists our prompt (running or pending); None when its answer could not be read."""
        status, body = await self._call("GET", "/queue", _http.service_headers(active.job))
        if status != 200 or not isinstance(body, dict):
            return None
        items = (body.get("queue_running") or []) + (body.get("queue_pending") or [])
        return any(isinstance(i, list) and len(i) > 1 and i[1] == active.prompt_id for i in items)

    async def _history(self, active: _Active, wait_s: float) -> dict | None:
        """The history entry, polled until present or `wait_s` passed (it can lag the frames, §5.1)."""
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            status, body = await self._call("GET", f"/history/{active.prompt_id}",
                                            _http.service_headers(active.job))
            if status == 200 and isinstance(body, dict) and isinstance(body.get(active.prompt_id), dict):
                return body[active.prompt_id]
            if time.monotonic() + delay > deadline:
                return None
            await asyncio.sleep(delay)  # a bounded poll of a condition, not a synchronisation guess
            delay = min(delay * 2, 0.5)

    async def _after_drop(self, active: _Active, close_code: Any, ws: list, reader: list) -> dict | None:
        """The socket closed before our terminal frame: reconnect with the same client id and decide.
        Returns the history entry when the prompt finished meanwhile, None when it is still queued or
        running (keep listening); raises RetryableJobError when the server lost it."""
        self._log("ws.dropped", active, logging.WARNING, close_code=close_code)
        deadline = time.monotonic() + self.settings.reconnect_timeout_s
        delay = 0.05
        while True:
            try:
                # Connect before asking: any event after this point reaches the new socket, so a prompt
                # that is in the queue now cannot finish unseen.
                await self._connect(active, ws, reader)
                break
            except RetryableJobError as exc:
                if time.monotonic() + delay > deadline:
                    raise RetryableJobError(f"ComfyUI connection lost during prompt {active.prompt_id} "
                                            f"and not back within {self.settings.reconnect_timeout_s:g} s: "
                                            f"{exc}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        entry = await self._history(active, 0)
        if entry is not None:
            return entry
        if await self._in_queue(active):
            self._log("ws.reconnected", active, state="still queued or running")
            return None
        # Not in the queue: either it just finished (history written after the queue entry is dropped)
        # or a restarted server never knew it. One more brief history look tells them apart.
        entry = await self._history(active, min(1.0, self.settings.history_wait_s))
        if entry is not None:
            return entry
        raise RetryableJobError(f"ComfyUI restarted during prompt {active.prompt_id}: it is in neither "
                                "/history nor /queue, so the job was lost")

    async def _finish(self, active: _Active, tracker: ProgressTracker, entry: dict,
                      progress: ProgressFn) -> JobResult:
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        last = messages[-1] if messages and isinstance(messages[-1], list) else [None, {}]
        if last[0] == "execution_interrupted":
            raise JobCancelled(f"ComfyUI interrupted prompt {active.prompt_id}")
        if last[0] == "execution_error":
            raise execution_error(last[1] if isinstance(last[1], dict) else {})
        if status.get("status_str") not in (None, "success"):
            raise FatalJobError(f"ComfyUI prompt {active.prompt_id} ended with status {status.get('status_str')}")
        outputs, other = await self._download(active, entry.get("outputs") or {})
        await progress(100.0, "done")
        return JobResult(
            data={"prompt_id": active.prompt_id, "node_outputs": other},
            outputs=outputs,
            service_metadata={"connector": self.name, "prompt_id": active.prompt_id,
                              "client_id": active.client_id, "cached_nodes": sorted(tracker.cached_nodes),
                              "base_url": self._base})

    async def _download(self, active: _Active, outputs: dict) -> tuple[list[OutputFile], dict]:
        """Files listed in the history outputs, fetched through /view; other UI values (text) returned as
        data. Cached re-runs list the old files (§4.3): fetched again, they are still this job's result."""
        files: list[OutputFile] = []
        other: dict[str, dict] = {}
        directory = _http.job_dir(self.context.output_dir, active.job.id)
        for node_id, ui in sorted(outputs.items()):
            for key, items in (ui or {}).items():
                if not isinstance(items, list):
                    continue
                wanted = [i for i in items if isinstance(i, dict) and "filename" in i
                          and i.get("type", "output") in self.settings.output_types]
                rest = [i for i in items if not (isinstance(i, dict) and "filename" in i)]
                for item in wanted:
                    files.append(await self._fetch(active, node_id, item, directory))
                if rest:
                    other.setdefault(node_id, {})[key] = rest
        return files, other

    async def _fetch(self, active: _Active, node_id: str, item: dict, directory: Path) -> OutputFile:
        params = {"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                  "type": item.get("type", "output")}
        url = f"{self._base}/view"
        path = _http.unique_path(directory, f"{_http.safe_name(node_id)}_{_http.safe_name(item['filename'])}")
        try:
            async with self._http().get(url, params=params,
                                        headers=_http.service_headers(active.job)) as response:
                if response.status != 200:
                    # Listed in history but gone: temp files die with a restart (§5.2). Running the
                    # prompt again makes them again.
                    raise RetryableJobError(f"ComfyUI /view of {params['type']}/{params['subfolder']}/"
                                            f"{params['filename']} answered {response.status}")
                size = await _http.save_response(response, path)
                mime = _http.mime_for(item["filename"], response.headers.get("Content-Type"))
        except BaseException as exc:  # a cancel or a drain too: no file cut short is left behind
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            if isinstance(exc, _http.TRANSPORT_ERRORS):
                raise _http.transport_error("ComfyUI", url, exc) from None
            raise
        return OutputFile(str(path), mime, size)

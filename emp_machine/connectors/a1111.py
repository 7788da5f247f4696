"""The a1111 connector: Automatic1111 / Forge `/sdapi/v1/txt2img` and `/img2img`.

Payload: the endpoint's request body plus an optional `"endpoint"` (`txt2img`, `img2img`); without it a body with
`init_images` is img2img. The call blocks until the images are ready, so progress comes from polling
`/sdapi/v1/progress` meanwhile (A1111 runs one generation at a time, so its progress is ours; while ours waits
behind another client's run, it is that run's). Cancel is `/sdapi/v1/interrupt` (see below): A1111 then *returns
200 with the partial images*, which the connector discards and reports as cancelled. An interrupt by someone else
(the UI's button, another client) gives the same partial 200: a `/progress` reading of our run with
`state.interrupted` true (polled during the run, read once more after the answer) makes it JobCancelled too, as
ComfyUI's `execution_interrupted` is. A reading is our run's when its `job_timestamp` is the one in the answer's
`info` (A1111 resets the flag when a run begins, so a stale flag of an earlier run read while ours waited for
A1111's queue lock is not ours); without one (another build), any reading of a running job counts. Base64 images
in the answer become output files; `info` (a JSON string) is parsed.

A1111's interrupt stops whatever it is generating, not a request of ours. So a connector (one worker process)
has one generation at A1111 at a time: with `concurrency` >= 2 the other jobs wait here at progress 0 ("waiting
for A1111: another job of this worker is generating"; the job's timeout counts), and one cancelled while waiting
sends nothing. Against other clients of the same A1111 (other workers or machines, its UI) each generation
carries a `force_task_id` of ours (`emp-{job id}-{random}`, replacing any in the payload), and a stop asks
`POST /internal/progress {"id_task"}` (A1111 >= 1.6, Forge) first: our run active, interrupt; queued behind
another client's run (an interrupt would stop that one, and ours would still run once begun: its begin resets
the flag), the job ends at once as cancelled and, in the background, the run is watched until it begins, then
interrupted (for at most request_timeout_s; this connector's next job waits until then, and until an
interrupted run of ours has answered); completed, nothing.
Where A1111 cannot tell (no `/internal/progress`: 404 on an older build; a failed reading; an id still unknown
STOP_GRACE_S after the request went out, a build before 1.6 that ignores force_task_id), it interrupts as before:
what it stops may then be another client's run.

422 (request validation) and other 4xx are permanent, and so are A1111's deliberate 500s for bad input (body
`"error": "HTTPException"`: "Invalid encoded image", "Invalid image url", "Requests not allowed", ...); other
5xx (A1111 answers 500 `"error": "OutOfMemoryError"` for CUDA out of memory) and connection failures are
retryable. A generation request that timed out or whose connection dropped leaves A1111 generating (and
holding its queue lock): it is stopped, in the background, as on a cancel (an interrupt once it runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import binascii
import json
import time
import uuid
from typing import Any, Literal

import aiohttp
from pydantic import Field

from emp_machine.connectors import _http
from emp_machine.connectors.base import (
    Connector, ConnectorJob, ConnectorSettings, Health, HttpUrl, JobResult, OutputFile, ProgressFn,
)
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, ServiceUnreachable, can_retry


# What to do about A1111's deliberate 500s (decode_base64_to_image in its modules/api/api.py).
_BAD_INPUT_HINTS = {
    "Invalid encoded image": ": init_images and mask must be base64 images (PNG, JPEG, WebP), optionally as "
                             "data:image/...;base64, URLs",
    "Invalid image url": ": an image URL in the request did not return an image",
    "Requests not allowed": ": this A1111 does not fetch image URLs (its api_enable_requests option); send the "
                            "image as base64",
    "Request to local resource not allowed": ": this A1111 does not fetch URLs of local addresses (its "
                                             "api_forbid_local_requests option); send the image as base64",
}


class A1111Settings(ConnectorSettings):
    base_url: HttpUrl = "http://127.0.0.1:7860"
    endpoint: Literal["txt2img", "img2img"] | None = None
    connect_timeout_s: float = Field(default=5, gt=0, allow_inf_nan=False)
    request_timeout_s: float = Field(default=900, gt=0, allow_inf_nan=False)
    progress_interval_s: float = Field(default=0.5, gt=0, allow_inf_nan=False)


class A1111Connector(_http.HttpSession, Connector):
    name = "a1111"
    Settings = A1111Settings
    settings: A1111Settings

    def __init__(self, settings: A1111Settings, context):
        super().__init__(settings, context)
        self._base = settings.base_url.rstrip("/")
        self._cancel: dict[str, asyncio.Event] = {}
        self._turn: asyncio.Lock | None = None  # one generation of ours at A1111 at a time (_turns)
        self._turn_loop: asyncio.AbstractEventLoop | None = None

    async def _call(self, method: str, path: str, headers: dict, timeout: float | None = None,
                    **kwargs) -> tuple[int, Any]:
        extra = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout else {}
        return await self._request("A1111", method, self._base + path, headers, **extra, **kwargs)

    async def _generate(self, endpoint: str, headers: dict, body: dict) -> tuple[int, Any, float | None]:
        """POST the generation: (status, answer as _call reads it, the answer's Retry-After in seconds or
        None), so a 429/503 is retried no sooner than A1111 (or a proxy before it) asked."""
        url = f"{self._base}/sdapi/v1/{endpoint}"
        status, answer, response_headers = await self._exchange("A1111", "POST", url, headers, json=body)
        return status, answer, _http.retry_after_s(response_headers)

    async def health(self) -> Health:
        reason = ""
        for path in ("/internal/ping", "/sdapi/v1/options"):  # ping is cheap; older builds lack it
            try:
                status, _ = await self._call("GET", path, {}, timeout=self.settings.connect_timeout_s * 2)
            except RetryableJobError as exc:
                return Health(False, str(exc))
            if status == 200:
                return Health(True)
            reason = f"GET {path} answered {status}"
        return Health(False, reason)

    async def cancel(self, job_id: str) -> None:
        event = self._cancel.get(job_id)
        if event is not None:
            event.set()

    async def run(self, job: ConnectorJob, progress: ProgressFn) -> JobResult:
        if not isinstance(job.payload, dict):
            raise FatalJobError("a1111 payload must be a JSON object (the txt2img/img2img request body)")
        body = {k: v for k, v in job.payload.items() if k != "endpoint"}
        endpoint = job.payload.get("endpoint") or self.settings.endpoint or \
            ("img2img" if "init_images" in body else "txt2img")
        if endpoint not in ("txt2img", "img2img"):
            raise FatalJobError(f"a1111 endpoint must be txt2img or img2img, not {endpoint!r}")
        fields = {"endpoint": endpoint, "sampler": body.get("sampler_name"), "steps": body.get("steps"),
                  "size": f"{body.get('width', 512)}x{body.get('height', 512)}"}
        # the records' fields: size as (width, height), which the job log writes as width and height
        logged = {**fields, "size": (body.get("width", 512), body.get("height", 512))}
        started = time.monotonic()
        self.joblog.received(job.id, **logged)
        cancelled = self._cancel.setdefault(job.id, asyncio.Event())
        headers = _http.service_headers(job)
        # Our run's id at A1111 (its force_task_id), so that a stop interrupts it and nobody else's
        # (always ours: a payload's own, from a template shared by jobs or attempts, named other runs too)
        task_id = f"emp-{job.id}-{uuid.uuid4().hex[:12]}"
        body["force_task_id"] = task_id
        turn = self._turns()
        holding = False  # this run holds `turn` (released at its end, or by the stop it hands it to)
        generate: asyncio.Task | None = None
        sent_at = 0.0
        readings: list[tuple[Any, bool]] = []  # (job_timestamp, interrupted) of /progress during a job
        interrupted: list[bool] = []  # _watch sent the interrupt (a cancel)
        try:
            await progress(0.0, "started")
            holding = await self._wait_turn(job, turn, cancelled, progress)
            generate = asyncio.create_task(self._generate(endpoint, headers, body))
            sent_at = time.monotonic()
            await self._watch(job, generate, cancelled, progress, headers, logged, readings, task_id, sent_at,
                              interrupted)
            if not generate.done():  # cancelled before A1111 began our run: stopped in the background (finally)
                raise JobCancelled(f"a1111 job {job.id} cancelled before A1111 began its generation (queued "
                                   "behind another client's); it is interrupted there once it begins")
            try:
                status, answer, wait = generate.result()
            except ServiceUnreachable:
                raise  # never reached A1111: nothing to interrupt
            except RetryableJobError:
                # Timed out or dropped after the request went out: A1111 goes on generating for nobody,
                # holding its queue lock. Stopped as on a cancel, in the background.
                self._stop_in_background(self._stop(task_id, headers, None, sent_at, turn.release))
                holding = False
                raise
            if cancelled.is_set():
                raise JobCancelled(f"a1111 job {job.id} interrupted")
            if status == 200 and isinstance(answer, dict) and \
                    await self._interrupted_by_others(answer, headers, readings):
                raise JobCancelled(f"A1111 interrupted job {job.id}'s generation at the request of someone "
                                   "else (its UI's Interrupt button or another client); its partial images "
                                   "were discarded")
            result = self._result(job, status, answer, fields, wait)
            await progress(100.0, "done")
            self.joblog.completed(job.id, _http.ms_since(started), outputs=len(result.outputs), **logged)
            return result
        except JobCancelled:
            self.joblog.event("job.cancelled", job.id, **logged)
            raise
        except Exception as exc:
            self.joblog.failed(job.id, exc, _http.ms_since(started), can_retry(exc), **logged)
            raise
        finally:
            self._cancel.pop(job.id, None)
            if holding and generate is not None and not generate.done():
                # Leaving before A1111 answered (a cancel, one seen by the progress callback, a timeout, a
                # drain): stop it there too, or the GPU goes on generating for nobody. In the background: a
                # hung A1111 held a drain's hand-back past its 2 s margin.
                self._stop_in_background(self._stop(task_id, headers, generate, sent_at, turn.release,
                                                    interrupted=bool(interrupted)))
            elif holding:
                turn.release()

    def _turns(self) -> asyncio.Lock:
        """This connector's turn at A1111 (A1111's interrupt stops whatever it runs: two runs of ours there at
        once, a cancel of the waiting one stopped the other). One per event loop: a lock is bound to its loop."""
        loop = asyncio.get_running_loop()
        if self._turn is None or self._turn_loop is not loop:
            self._turn, self._turn_loop = asyncio.Lock(), loop
        return self._turn

    async def _wait_turn(self, job: ConnectorJob, turn: asyncio.Lock, cancelled: asyncio.Event,
                         progress: ProgressFn) -> bool:
        """Take `turn` (True); a cancel while waiting for it is JobCancelled, with nothing sent to A1111."""
        if turn.locked():
            await progress(0.0, "waiting for A1111: another job of this worker is generating")
        # Waited on beside the cancel even when the lock reads free: just released, it may still be promised to
        # a woken waiter, and a bare acquire() then waited a whole generation deaf to a cancel.
        acquire = asyncio.ensure_future(turn.acquire())
        cancel_wait = asyncio.ensure_future(cancelled.wait())
        try:
            await asyncio.wait({acquire, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._give_up_turn(acquire, turn)
            raise
        finally:
            cancel_wait.cancel()
        if cancelled.is_set():
            self._give_up_turn(acquire, turn)
            raise JobCancelled(f"a1111 job {job.id} cancelled while it waited for another job of this worker")
        return True

    @staticmethod
    def _give_up_turn(acquire: asyncio.Future, turn: asyncio.Lock) -> None:
        """Stop waiting for `turn`: released again if the wait got it meanwhile."""
        def release(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is None:
                turn.release()
        if acquire.done():
            release(acquire)
        else:
            acquire.cancel()
            acquire.add_done_callback(release)

    async def _interrupt(self, headers: dict) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._call("POST", "/sdapi/v1/interrupt", headers), _http.STOP_GRACE_S)

    async def _task_state(self, task_id: str, headers: dict) -> str | None:
        """Our run at A1111, as its `POST /internal/progress` tells: "active", "queued", "completed", "unknown"
        (no such id: the request has not reached it yet, or a build before 1.6 ignored force_task_id), or None
        where it cannot tell (no such endpoint, 404 on an older build; no answer; an answer of another shape)."""
        try:
            status, answer = await self._call("POST", "/internal/progress", headers, timeout=_http.STOP_GRACE_S,
                                              json={"id_task": task_id, "id_live_preview": -1,
                                                    "live_preview": False})
        except RetryableJobError:
            return None
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
            return None
        if answer["active"]:
            return "active"
        if answer.get("queued") is True:
            return "queued"
        return "completed" if answer.get("completed") is True else "unknown"

    @staticmethod
    def _stop_now(state: str | None, sent_at: float) -> str:
        """What a stop does about our run in `state`: "interrupt" it (it runs, or A1111 cannot tell: then as
        before task ids), "wait" (A1111 has not begun it: an interrupt now stops another client's run, and
        ours still runs once it begins, which resets the flag), or nothing ("done": it ended). An id still
        unknown STOP_GRACE_S after the request went out is a build that ignores force_task_id: interrupt."""
        if state is None or state == "active":
            return "interrupt"
        if state == "completed":
            return "done"
        if state == "unknown" and time.monotonic() - sent_at >= _http.STOP_GRACE_S:
            return "interrupt"
        return "wait"

    async def _stop(self, task_id: str, headers: dict, generate: asyncio.Task | None, sent_at: float,
                    release: Any, interrupted: bool = False) -> None:
        """Stop our run at A1111, in the background (_stop_now says how): one that A1111 has not begun is
        watched until it begins, then interrupted, and an interrupted one waited for until A1111 answers, all for at
        most request_timeout_s. `generate`: the request, still outstanding (None: it failed); its answer ends the
        watch, and it is cancelled at the end. `release`:
        called at the end, passing this connector's turn on (no second run of ours at A1111 meanwhile).
        `interrupted`: the interrupt was sent already (by _watch); only the answer is waited for."""
        try:
            deadline = time.monotonic() + self.settings.request_timeout_s
            while self._session is not None and not self._session.closed:  # close() ends it
                action = "interrupt" if interrupted else \
                    self._stop_now(await self._task_state(task_id, headers), sent_at)
                if action == "interrupt":
                    if not interrupted and not self._session.closed:
                        await self._interrupt(headers)
                    # A1111 ends the run after its current step. Until then it still runs, with the
                    # `interrupted` flag of our interrupt: the turn passed now, the next job's request queued
                    # behind it and read that flag (a job_timestamp of the same second) as its own, reporting
                    # a whole generation cancelled. Waited for: its answer, or (the request gone: it timed
                    # out or dropped) A1111 saying our run is no longer active.
                    if generate is not None:
                        await asyncio.wait({generate}, timeout=max(0.0, deadline - time.monotonic()))
                    else:
                        while time.monotonic() < deadline and not self._session.closed and \
                                await self._task_state(task_id, headers) == "active":
                            await asyncio.sleep(self.settings.progress_interval_s)
                    return
                if action == "done" or time.monotonic() >= deadline:
                    return
                if generate is None:
                    await asyncio.sleep(self.settings.progress_interval_s)
                elif (await asyncio.wait({generate}, timeout=self.settings.progress_interval_s))[0]:
                    return  # A1111 answered: nothing of ours runs there now
        finally:
            if generate is not None and not generate.done():
                generate.cancel()
            elif generate is not None and not generate.cancelled():
                generate.exception()  # read: A1111 gone meanwhile is no "exception was never retrieved"
            release()

    async def _interrupted_by_others(self, answer: dict, headers: dict, readings: list) -> bool:
        """Whether a /progress reading of our run said `interrupted` (see the module's docstring); one more
        reading is taken now, as a short run can answer before the first poll (the flag stays set until the
        next run begins). A failed reading is no reading: the images are in hand."""
        with contextlib.suppress(RetryableJobError):
            status, state = await self._call("GET", "/sdapi/v1/progress?skip_current_image=true", headers,
                                             timeout=_http.STOP_GRACE_S)
            if status == 200 and isinstance(state, dict):
                self._note_reading(state, readings, after=True)
        try:
            info = json.loads(answer.get("info") or "{}")
        except (TypeError, ValueError):
            info = None
        ours = info.get("job_timestamp") if isinstance(info, dict) else None
        return any(interrupted and (ours is None or stamp == ours) for stamp, interrupted in readings)

    @staticmethod
    def _note_reading(state: dict, readings: list, after: bool = False) -> None:
        """Keep a /progress reading's (job_timestamp, interrupted) when it is of a running job (job_count not
        0; after the answer, A1111 has ended our run and says 0, so any reading counts then)."""
        detail = state.get("state")
        if not isinstance(detail, dict) or not (after or detail.get("job_count")):
            return
        readings.append((detail.get("job_timestamp"), detail.get("interrupted") is True))

    async def _watch(self, job, generate: asyncio.Task, cancelled: asyncio.Event, progress: ProgressFn,
                     headers: dict, logged: dict, readings: list, task_id: str, sent_at: float,
                     interrupted: list) -> None:
        """Poll /progress until the generation answers; on cancel, interrupt and wait for that answer, or,
        when A1111 has not begun our run (`task_id`, sent at `sent_at`; _stop_now), return at once (run()
        leaves, and stops it in the background). `logged`: the job's record fields (sampler, steps, size), on
        each job.progress record too; `readings` gets each reading's interrupted flag (_note_reading); `interrupted`
        gets True once the interrupt was sent."""
        reported = 0.0  # run() already said 0
        cancel_wait = asyncio.ensure_future(cancelled.wait())
        try:
            while not generate.done():
                await asyncio.wait({generate, cancel_wait}, timeout=self.settings.progress_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                if cancelled.is_set():
                    if self._stop_now(await self._task_state(task_id, headers), sent_at) == "interrupt":
                        await self._call("POST", "/sdapi/v1/interrupt", headers)
                        interrupted.append(True)
                        # A1111 answers once the current step ends. Shielded: a run() cancelled meanwhile
                        # (the worker's grace ran out) leaves it to the background stop, which holds the
                        # turn until A1111 answers (_stop).
                        await asyncio.shield(generate)
                    return
                if generate.done():
                    return
                status, state = await self._call("GET", "/sdapi/v1/progress?skip_current_image=true", headers)
                if status != 200 or not isinstance(state, dict):
                    continue
                self._note_reading(state, readings)
                try:
                    fraction = float(state.get("progress") or 0)
                except (TypeError, ValueError):  # not a number (another build, a proxy): the generation goes on
                    continue
                if not fraction >= 0:  # NaN or negative: no reading either
                    continue
                percent = min(99.0, fraction * 100)
                if percent > reported:
                    reported = percent
                    detail = state.get("state")
                    detail = detail if isinstance(detail, dict) else {}
                    message = f"step {detail.get('sampling_step', 0)}/{detail.get('sampling_steps', 0)}"
                    self.joblog.progress(job.id, round(percent, 1), message, **logged)
                    await progress(percent, message)
        except ServiceUnreachable as exc:
            if generate.done() and not generate.cancelled() and isinstance(generate.exception(), ServiceUnreachable):
                raise generate.exception() from None  # the generation itself never reached A1111
            # Else its POST went out: A1111 gone now is an attempt of the job (one that brings it down must
            # run out of retries), not a job that never reached it.
            raise RetryableJobError(str(exc)) from None
        finally:
            cancel_wait.cancel()

    def _result(self, job: ConnectorJob, status: int, answer: Any, fields: dict,
                retry_after_s: float | None = None) -> JobResult:
        if status != 200 or not isinstance(answer, dict):
            detail = answer.get("detail") if isinstance(answer, dict) else answer
            errors = answer.get("errors") if isinstance(answer, dict) else None
            text = f"A1111 {fields['endpoint']} answered {status}: {json.dumps(detail)[:500]}"
            if errors:
                text += f" ({str(errors)[:300]})"
            if status >= 500 and isinstance(answer, dict) and answer.get("error") == "HTTPException":
                # A1111 raised it on purpose: bad input (an init image or mask that does not decode, an image
                # URL it may not or cannot fetch). The same request fails the same way every time.
                hint = _BAD_INPUT_HINTS.get(str(detail), "")
                raise FatalJobError(f"A1111 {fields['endpoint']} refused the request: {str(detail)[:300]}"
                                    f"{hint} ({status})")
            if status >= 500 or status == 429:
                raise RetryableJobError(text, retry_after_s=retry_after_s)
            raise FatalJobError(text)
        directory = _http.job_dir(self.context.output_dir, job.id)
        files = []
        for index, encoded in enumerate(answer.get("images") or []):
            try:
                raw = base64.b64decode(encoded.split(",", 1)[-1], validate=True)
            except (binascii.Error, ValueError, AttributeError):
                raise FatalJobError(f"A1111 image {index} is not valid base64") from None
            path = _http.unique_path(directory, f"image-{index}{_http.sniff_image_suffix(raw)}")
            path.write_bytes(raw)
            files.append(OutputFile(str(path), _http.mime_for(path.name), len(raw)))
        try:
            info = json.loads(answer.get("info") or "{}")
        except (TypeError, ValueError):
            info = None
        if not isinstance(info, dict):  # not JSON, or JSON but not an object: kept as it came
            info = {"raw": answer.get("info")}
        data = {"seed": info.get("seed"), "all_seeds": info.get("all_seeds"), "infotexts": info.get("infotexts")}
        metadata = {"connector": self.name, **fields, "sd_model": info.get("sd_model_name"),
                    "sampler": info.get("sampler_name") or fields["sampler"], "steps": info.get("steps") or fields["steps"]}
        return JobResult(data=data, outputs=files, service_metadata=metadata)

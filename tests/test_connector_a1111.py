"""The a1111 connector against the fake A1111 API (tests/fakes/a1111.py) over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import time

import aiohttp
import pytest
from _helpers import connector_context, TRACEPARENT, Progress, job, wait_for
from aiohttp import web
from fakes._server import ServerThread
from fakes.a1111 import OOM, FakeA1111
from fakes.comfyui_nodes import png

from emp_machine.connectors._http import STOP_GRACE_S
from emp_machine.connectors.a1111 import A1111Connector
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError


@pytest.fixture
def fake(serve):
    return lambda **knobs: serve(FakeA1111, **knobs)


@pytest.fixture
def context(tmp_path):
    return connector_context(tmp_path, "a1111")


def connector(context, server, **settings):
    return A1111Connector.from_settings({"base_url": server.url, "progress_interval_s": 0.02, **settings}, context)


def run(conn, payload, progress=None, job_id="job-1"):
    progress = progress or Progress()

    async def main():
        try:
            return await conn.run(job(payload, job_id, service="a1111"), progress)
        finally:
            await conn.close()
    return asyncio.run(main()), progress


def test_txt2img_reports_steps_and_writes_images(fake, context, caplog):
    server = fake(step_s=0.03)
    caplog.set_level(logging.INFO, "test.a1111")
    result, progress = run(connector(context, server), {"prompt": "a cat", "steps": 10, "width": 32, "height": 16,
                                                        "batch_size": 2, "sampler_name": "Euler a", "seed": 7})
    assert len(result.outputs) == 2 and all(o.mime_type == "image/png" for o in result.outputs)
    assert open(result.outputs[0].path, "rb").read() == png(32, 16, 0x101010)
    assert result.data["all_seeds"] == [7, 8]
    assert result.service_metadata["sampler"] == "Euler a" and result.service_metadata["size"] == "32x16"
    middle = progress.percents[1:-1]
    assert len(middle) >= 3 and middle == sorted(middle) and all(0 < p < 100 for p in middle)
    assert progress.percents[0] == 0 and progress.percents[-1] == 100
    assert any(m.startswith("step ") and m.endswith("/10") for _, m in progress.seen)
    post = [r for r in server.requests if r[1] == "/sdapi/v1/txt2img"][0]
    assert post[2]["traceparent"] == TRACEPARENT and post[2]["x-job-id"] == "job-1"
    completed = [r for r in caplog.records if getattr(r, "event_type", "") == "job.completed"][0]
    fields = completed.fields
    assert (fields["sampler"], fields["steps"], fields["width"], fields["height"]) == ("Euler a", 10, 32, 16)


def test_progress_records_carry_sampler_steps_and_size(fake, context, caplog):
    server = fake(step_s=0.03)
    caplog.set_level(logging.DEBUG, "test.a1111")
    run(connector(context, server), {"prompt": "a cat", "steps": 10, "width": 32, "height": 16,
                                     "sampler_name": "DPM++ 2M"})
    records = [r.fields for r in caplog.records if getattr(r, "event_type", "") == "job.progress"]
    assert records, "no job.progress record"
    for fields in records:
        assert (fields["sampler"], fields["steps"], fields["width"], fields["height"]) == ("DPM++ 2M", 10, 32, 16)
        assert fields["job_id"] == "job-1" and 0 < fields["progress"] < 100


def test_img2img_is_chosen_by_init_images(fake, context):
    server = fake()
    init = base64.b64encode(png(8, 8, 0)).decode()
    result, _ = run(connector(context, server), {"init_images": [init], "steps": 2, "width": 8, "height": 8})
    assert len(result.outputs) == 1 and ("POST", "/sdapi/v1/img2img") in [r[:2] for r in server.requests]


@pytest.mark.parametrize("payload,fragment", [
    ({"endpoint": "img2img", "steps": 2}, "404.*Init image not found"),
    ({"steps": "many"}, "422.*valid integer"),
    ({"steps": 2, "sampler_name": "Nope"}, "404.*Sampler not found"),
])
def test_rejected_requests_are_permanent(fake, context, payload, fragment):
    with pytest.raises(FatalJobError, match=fragment):
        run(connector(context, fake()), payload)


def test_out_of_memory_500_is_retryable(fake, context):
    server = fake()
    server.fail_next = OOM
    with pytest.raises(RetryableJobError, match="500.*CUDA out of memory"):
        run(connector(context, server), {"steps": 2})


def test_cancel_interrupts_and_discards_the_partial_images(fake, context):
    server = fake(step_s=0.05)
    conn = connector(context, server)
    progress = Progress()
    progress.when(lambda p, m: p > 0, lambda: conn.cancel("job-1"))
    with pytest.raises(JobCancelled):
        run(conn, {"steps": 200, "width": 8, "height": 8}, progress)
    assert ("POST", "/sdapi/v1/interrupt") in [r[:2] for r in server.requests]
    assert list(context.output_dir.glob("**/*")) == []


def test_a_cancel_raised_by_the_progress_callback_still_interrupts_a1111(fake, context):
    """base.py lets the progress callback raise JobCancelled; the generation must not go on for nobody."""
    server = fake(step_s=0.05)
    conn = connector(context, server)
    progress = Progress()

    async def refuse():
        raise JobCancelled("job-1 was cancelled")
    progress.when(lambda p, m: p > 0, refuse)
    with pytest.raises(JobCancelled):
        run(conn, {"steps": 200, "width": 8, "height": 8}, progress)
    assert ("POST", "/sdapi/v1/interrupt") in [r[:2] for r in server.requests]


def test_a_cancelled_run_is_not_held_by_a_hung_interrupt(fake, context):
    # The worker cancels run() on a job timeout and on a drain; awaiting the interrupt (5 s) held the
    # drain's hand-back past its 2 s margin. It goes on in the background, the interrupt bounded by
    # STOP_GRACE_S; the stop then holds the turn until A1111 answers the run (here not interrupted: 80 steps).
    server = fake(step_s=0.05)
    server.hang_interrupt = True
    conn = connector(context, server, request_timeout_s=30)
    progress = Progress()
    running = asyncio.Event()

    async def started():
        running.set()
    progress.when(lambda p, m: p > 0, started)

    async def main():
        task = asyncio.create_task(conn.run(job({"steps": 80, "width": 8, "height": 8}, service="a1111"),
                                            progress))
        await asyncio.wait_for(running.wait(), 10)
        mark = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_in = time.monotonic() - mark
        await wait_for(lambda: ("POST", "/sdapi/v1/interrupt") in [r[:2] for r in server.requests], 10)
        await wait_for(lambda: not conn._stopping, 30)
        ran = list(server.runs)
        await conn.close()
        return cancelled_in, ran
    cancelled_in, ran = asyncio.run(main())
    assert cancelled_in < 1.0, cancelled_in
    assert [(r["done"], r["interrupted"]) for r in ran] == [(80, False)]  # the stop lasted until it ended


def test_timeout_refused_and_health(fake, context):
    server = fake(step_s=1)
    with pytest.raises(RetryableJobError, match="timed out"):
        run(connector(context, server, request_timeout_s=0.3), {"steps": 5})
    with pytest.raises(RetryableJobError, match="unreachable"):
        run(A1111Connector.from_settings({"base_url": "http://127.0.0.1:9"}, context), {"steps": 1})
    assert asyncio.run(connector(context, fake()).health()).healthy
    assert asyncio.run(connector(context, fake(ping=False)).health()).healthy  # falls back to /options
    down = asyncio.run(A1111Connector.from_settings({"base_url": "http://127.0.0.1:9"}, context).health())
    assert not down.healthy and "unreachable" in down.reason


class WrongShapes:
    """Not A1111 (it never answers so): the A1111 API as a proxy or another build might answer it, with a
    `/progress` body and a txt2img `info` of the test's choosing. The generation answers after three
    progress polls, so the connector has read the odd progress before it ends."""

    def __init__(self, progress: dict, info: str):
        self.progress_body, self.info, self.polls = progress, info, 0
        self._thread = ServerThread(self._app)

    @property
    def url(self) -> str:
        return self._thread.url

    def start(self) -> WrongShapes:
        self._thread.start()
        return self

    def close(self) -> None:
        self._thread.close()

    def _app(self) -> web.Application:
        self.polled = asyncio.Event()
        app = web.Application()
        app.router.add_get("/sdapi/v1/progress", self.progress)
        app.router.add_post("/sdapi/v1/txt2img", self.txt2img)
        return app

    async def progress(self, request):
        self.polls += 1
        if self.polls >= 3:
            self.polled.set()
        return web.json_response(self.progress_body)

    async def txt2img(self, request):
        await self.polled.wait()
        image = base64.b64encode(png(8, 8, 0x202020)).decode()
        return web.json_response({"images": [image], "parameters": await request.json(), "info": self.info})


INFO = json.dumps({"seed": 5, "all_seeds": [5], "infotexts": ["x"], "sampler_name": "Euler", "steps": 2})


@pytest.mark.parametrize("body,percents", [
    ({"progress": "n/a", "state": {}}, [0, 100]),
    ({"progress": {"value": 0.5}, "state": {}}, [0, 100]),
    ({"progress": float("nan"), "state": {}}, [0, 100]),  # NaN is valid JSON to Python's json module
    ({"progress": 0.5, "state": ["not", "an", "object"]}, [0, 50, 100]),
], ids=["text", "object", "nan", "state-list"])
def test_a_progress_reading_of_the_wrong_shape_is_skipped(serve, context, body, percents):
    server = serve(WrongShapes, body, INFO)
    result, progress = run(connector(context, server), {"prompt": "x", "steps": 2})
    assert len(result.outputs) == 1 and result.data["seed"] == 5
    assert server.polls >= 3
    assert progress.percents == percents


@pytest.mark.parametrize("info", [json.dumps([1, 2]), json.dumps("text"), "not json", json.dumps(None)])
def test_an_info_that_is_not_a_json_object_is_kept_raw(serve, context, info):
    server = serve(WrongShapes, {"progress": 0.5, "state": {}}, info)
    result, _ = run(connector(context, server), {"prompt": "x", "steps": 2, "sampler_name": "Euler a"})
    assert len(result.outputs) == 1
    assert result.data == {"seed": None, "all_seeds": None, "infotexts": None}
    assert result.service_metadata["sampler"] == "Euler a" and result.service_metadata["steps"] == 2


GOOD_INIT = base64.b64encode(png(8, 8, 0)).decode()


@pytest.mark.parametrize("payload,knobs,fragment", [
    ({"init_images": ["not-an-image"]}, {}, "Invalid encoded image: init_images and mask must be base64 images"),
    ({"init_images": ["data:image/png;base64," + base64.b64encode(b"hello").decode()]}, {},
     "Invalid encoded image"),
    ({"init_images": [GOOD_INIT], "mask": "bm90IGFuIGltYWdl"}, {}, "Invalid encoded image"),
    ({"init_images": ["http://127.0.0.1:9/cat.png"]}, {}, "Request to local resource not allowed: .*base64"),
    ({"init_images": ["https://example.com/cat.png"]}, {"api_enable_requests": False},
     "Requests not allowed: .*api_enable_requests"),
    ({"init_images": ["{url}/sdapi/v1/options"]}, {"api_forbid_local_requests": False}, "Invalid image url"),
], ids=["base64", "data-url", "mask", "local-url", "requests-off", "url-not-an-image"])
def test_a1111_refusing_bad_input_with_a_500_is_permanent(fake, context, payload, knobs, fragment):
    # A1111 answers its deliberate HTTPExceptions for bad input with 500 (decode_base64_to_image): the same
    # request fails the same way every time, so it is no retryable server error (it was).
    server = fake(**knobs)
    payload = {**payload, "steps": 2, "init_images": [i.replace("{url}", server.url) for i in payload["init_images"]]}
    with pytest.raises(FatalJobError, match=f"A1111 img2img refused the request: {fragment}") as caught:
        run(connector(context, server), payload)
    assert str(caught.value).endswith("(500)")


def test_a1111_500_that_is_not_an_http_exception_stays_retryable(fake, context):
    server = fake()
    server.fail_next = (500, {"error": "RuntimeError", "detail": "", "body": "", "errors": "CUDA error: launch failure"})
    with pytest.raises(RetryableJobError, match="500.*CUDA error"):
        run(connector(context, server), {"init_images": [GOOD_INIT], "steps": 2})


def test_an_interrupt_by_someone_else_cancels_the_job(fake, context):
    # The A1111 UI's Interrupt button (or another client) stops our generation: A1111 answers 200 with the
    # partial images, which used to complete the job. /progress said `interrupted` meanwhile.
    server = fake(step_s=0.05)
    progress = Progress()

    async def interrupt():
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/sdapi/v1/interrupt") as response:
                assert await response.json() == {}  # what A1111 answers
    progress.when(lambda p, m: p >= 10, interrupt)
    with pytest.raises(JobCancelled, match="someone else"):
        run(connector(context, server), {"steps": 100, "width": 8, "height": 8}, progress)
    assert progress.percents[-1] < 100 and list(context.output_dir.glob("**/*")) == []


def test_an_interrupt_by_someone_else_before_the_first_poll_is_caught_after_the_answer(fake, context):
    # No /progress poll during the run (a short generation): the one reading after the answer still shows it.
    server = fake(step_s=0.05)

    async def main():
        conn = connector(context, server, progress_interval_s=60)
        task = asyncio.create_task(conn.run(job({"steps": 100, "width": 8, "height": 8}, service="a1111"),
                                            Progress()))
        await wait_for(lambda: server.state["step"] >= 3, 10)
        async with aiohttp.ClientSession() as http:
            await http.post(server.url + "/sdapi/v1/interrupt")
        try:
            with pytest.raises(JobCancelled, match="someone else"):
                await task
        finally:
            await conn.close()
    asyncio.run(main())


def test_an_interrupted_run_before_ours_does_not_cancel_ours(fake, context):
    # Our request waits for A1111's queue lock behind another client's run, which is interrupted: /progress
    # says `interrupted` with that run's job_timestamp, not ours (the flag is reset when ours begins).
    server = fake(step_s=0.05)

    async def main():
        async with aiohttp.ClientSession() as http:
            other = asyncio.create_task(http.post(server.url + "/sdapi/v1/txt2img", json={"steps": 60}))
            await wait_for(lambda: server.state["steps"] == 60, 10)
            conn = connector(context, server)
            task = asyncio.create_task(conn.run(job({"steps": 5, "width": 8, "height": 8}, service="a1111"),
                                                Progress()))
            # >1 s into the other run: our run's job_timestamp (second resolution) is another second
            await wait_for(lambda: server.state["step"] >= 25, 10)
            async with http.post(server.url + "/sdapi/v1/interrupt"):
                pass
            (await other).release()
            try:
                return await task
            finally:
                await conn.close()
    result = asyncio.run(main())
    assert len(result.outputs) == 1


@pytest.mark.parametrize("how", ["timeout", "dropped"])
def test_a_generation_request_that_timed_out_or_dropped_is_interrupted(serve, context, how):
    # A1111 goes on generating after our request gave up (request_timeout_s) or lost its connection, holding
    # its queue lock for nobody: it is interrupted, in the background, as on a cancel.
    class Dropping(FakeA1111):
        async def txt2img(self, request):
            generation = asyncio.ensure_future(super().txt2img(request))
            await wait_for(lambda: self.state["step"] > 0, 5)
            request.transport.close()  # the connection is lost; the generation goes on
            return await generation

    server = serve(Dropping if how == "dropped" else FakeA1111, step_s=0.05)
    with pytest.raises(RetryableJobError, match="timed out" if how == "timeout" else "unreachable"):
        run(connector(context, server, request_timeout_s=0.5 if how == "timeout" else 30),
            {"steps": 400, "width": 8, "height": 8})

    async def stopped():
        await wait_for(lambda: server.state["job_count"] == 0, STOP_GRACE_S + 2)
    asyncio.run(stopped())
    assert ("POST", "/sdapi/v1/interrupt") in [r[:2] for r in server.requests]


def _job(name: str, steps: int, **payload):
    return job({"prompt": name, "steps": steps, "width": 8, "height": 8, **payload}, f"job-{name}", "a1111")


def _posts(server) -> int:
    return [r[1] for r in server.requests].count("/sdapi/v1/txt2img")


@pytest.mark.parametrize("how", ["cancel", "run-cancelled"])
def test_a_job_cancelled_while_another_of_this_worker_generates_leaves_that_one_alone(fake, context, how):
    # concurrency 2: job B waits for job A. A1111's interrupt is global: B's cancel (or its timeout) used to
    # stop A after a few of its 60 steps, and B then ran to the end for nobody. The connector now runs one
    # generation of its own at A1111 at a time: B waits here, and a cancel then sends nothing.
    server = fake(step_s=0.05)

    async def main():
        conn = connector(context, server)
        try:
            a = asyncio.create_task(conn.run(_job("a", 60), Progress()))
            await wait_for(lambda: server.state["step"] >= 3, 10)
            waiting = Progress()
            b = asyncio.create_task(conn.run(_job("b", 60), waiting))
            await wait_for(lambda: any(m.startswith("waiting for A1111") for _, m in waiting.seen)
                           or _posts(server) == 2, 10)
            if how == "cancel":
                await conn.cancel("job-b")
                with pytest.raises(JobCancelled):
                    await b
            else:  # the worker's timeout, a drain
                b.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await b
            assert not a.done()  # B's end did not wait for A's
            return await a
        finally:
            await conn.close()
    result = asyncio.run(main())
    assert len(result.outputs) == 1
    assert [(r["task_id"].startswith("emp-job-a-"), r["done"], r["interrupted"]) for r in server.runs] == \
        [(True, 60, False)]
    assert server.interrupts == [] and _posts(server) == 1


async def _cancel_past_its_grace(conn, server) -> None:
    """Job A runs, is cancelled (the interrupt goes out), and its run() is cancelled before A1111 answered, as
    the worker does once a cancel's grace ran out (a drain, the job's timeout)."""
    a = asyncio.create_task(conn.run(_job("a", 200), Progress()))
    await wait_for(lambda: server.state["step"] >= 2, 10)
    await conn.cancel("job-a")
    await wait_for(lambda: server.interrupts, 10)
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a


async def _job_b_after(conn, first):
    """`first(conn)` (job A's end), then job B (3 steps) on the same connector; returns B's result once every
    background stop of the connector has ended."""
    try:
        await first(conn)
        b = await conn.run(_job("b", 3), Progress())
        await wait_for(lambda: not conn._stopping, 10)
        return b
    finally:
        await conn.close()


def test_the_next_job_is_not_sent_before_an_interrupted_run_has_ended(fake, context):
    # A cancelled job whose run() the worker cancelled once its grace ran out (the interrupt sent, A1111 still
    # ending the run) passed the turn on at once: the next job's request queued behind the interrupted run,
    # read its `interrupted` flag (a job_timestamp of the same second) and a fully generated job was reported
    # cancelled. The turn now passes once A1111 has answered the interrupted run.
    server = fake(step_s=0.05)
    server.interrupt_lag_s = 1.0

    b = asyncio.run(_job_b_after(connector(context, server), lambda conn: _cancel_past_its_grace(conn, server)))
    assert len(b.outputs) == 1
    assert server.queued_behind == []
    a_run, b_run = server.runs
    assert a_run["task_id"].startswith("emp-job-a-") and a_run["interrupted"], a_run
    assert b_run["task_id"].startswith("emp-job-b-") and (b_run["done"], b_run["interrupted"]) == (3, False)
    assert len(server.interrupts) == 1 and server.interrupts[0] == a_run["task_id"]


def test_the_next_job_waits_for_an_interrupted_run_whose_request_timed_out(fake, context):
    # The request gone (timed out, dropped), the stop had no answer to wait for and passed the turn on at once:
    # the next job queued behind the run A1111 was still ending. It now waits until A1111 says the run is no
    # longer active (/internal/progress).
    server = fake(step_s=0.05)
    server.interrupt_lag_s = 0.5  # within request_timeout_s, which bounds the stop's wait too

    async def a_times_out(conn):
        with pytest.raises(RetryableJobError, match="timed out"):
            await conn.run(_job("a", 200), Progress())
    b = asyncio.run(_job_b_after(connector(context, server, request_timeout_s=2.0), a_times_out))
    assert len(b.outputs) == 1 and server.queued_behind == []
    a_run, b_run = server.runs
    assert a_run["interrupted"] and (b_run["done"], b_run["interrupted"]) == (3, False)


def test_a1111_going_away_during_a_background_stop_leaves_no_unretrieved_error(fake, context):
    # The stop waits for the interrupted run's answer; A1111 going away instead failed the request, and nobody
    # read that failure: asyncio logged "Task exception was never retrieved" with a traceback.
    server = fake(step_s=0.05)
    server.interrupt_lag_s = 30.0  # the run does not end: A1111 goes away first

    async def main():
        loop = asyncio.get_running_loop()
        complaints = []
        loop.set_exception_handler(lambda _, context: complaints.append(context.get("message")))
        conn = connector(context, server)
        try:
            await _cancel_past_its_grace(conn, server)
            assert conn._stopping
            await server._thread.acall(server._thread._stop())  # A1111 gone, its connections cut
            await wait_for(lambda: not conn._stopping, 10)
        finally:
            await conn.close()
        gc.collect()
        await asyncio.sleep(0)  # the handler is called from a task's finaliser, on the loop
        return complaints
    assert asyncio.run(main()) == []


def test_a_job_waiting_for_another_of_this_worker_reports_none_of_its_progress(fake, context):
    # A1111's /progress is of whatever it runs: B, sent while A ran, reported A's steps as its own.
    server = fake(step_s=0.03)

    async def main():
        conn = connector(context, server)
        try:
            a = asyncio.create_task(conn.run(_job("a", 40), Progress()))
            await wait_for(lambda: server.state["step"] >= 3, 10)
            progress = Progress()
            b = await conn.run(_job("b", 10), progress)
            await a
            return b, progress
        finally:
            await conn.close()
    b, progress = asyncio.run(main())
    assert len(b.outputs) == 1 and [r["done"] for r in server.runs] == [40, 10]
    steps = [m for _, m in progress.seen if m.startswith("step ")]
    assert steps and all(m.endswith("/10") for m in steps), progress.seen
    assert progress.seen[1] == (0.0, "waiting for A1111: another job of this worker is generating")


def test_a_cancel_of_a_run_queued_behind_another_clients_waits_until_it_begins(fake, context):
    # Two workers (or machines) on one A1111: B's request waits for A1111's queue lock while A (the other
    # connector's) generates. B's cancel used to interrupt A; B then ran to the end for nobody. Now B's run
    # ends at once, and its generation is interrupted as soon as A1111 begins it (/internal/progress of B's
    # force_task_id says "active").
    server = fake(step_s=0.05)

    async def main():
        mine, other = connector(context, server), connector(context, server)
        try:
            a = asyncio.create_task(other.run(_job("a", 60), Progress()))
            await wait_for(lambda: server.state["step"] >= 3, 10)
            b = asyncio.create_task(mine.run(_job("b", 60), Progress()))
            await wait_for(lambda: len(server.pending_tasks) == 1, 10)  # B queued behind A
            await mine.cancel("job-b")
            with pytest.raises(JobCancelled):
                await b
            assert not a.done()  # B's end did not wait for A's
            result = await a
            await wait_for(lambda: len(server.runs) == 2 and not mine._stopping, 10)
            return result
        finally:
            await mine.close()
            await other.close()
    result = asyncio.run(main())
    assert len(result.outputs) == 1
    a_run, b_run = server.runs
    assert a_run["task_id"].startswith("emp-job-a-") and (a_run["done"], a_run["interrupted"]) == (60, False)
    assert b_run["task_id"].startswith("emp-job-b-") and b_run["interrupted"] and b_run["done"] <= 10, b_run
    assert server.interrupts == [b_run["task_id"]]


def test_a_request_that_timed_out_queued_behind_another_clients_is_stopped_once_it_begins(fake, context):
    # Our request timed out while A1111 still had it queued behind another client's run: the interrupt went
    # to that run. It now waits (in the background) until ours begins.
    server = fake(step_s=0.05)

    async def main():
        async with aiohttp.ClientSession() as http:
            other = asyncio.create_task(http.post(server.url + "/sdapi/v1/txt2img",
                                                  json={"steps": 40, "force_task_id": "other"}))
            await wait_for(lambda: server.state["step"] >= 3, 10)
            conn = connector(context, server, request_timeout_s=1.5)
            try:
                with pytest.raises(RetryableJobError, match="timed out"):
                    await conn.run(_job("b", 60), Progress())
                (await other).release()
                await wait_for(lambda: len(server.runs) == 2 and not conn._stopping, 10)
            finally:
                await conn.close()
    asyncio.run(main())
    other_run, b_run = server.runs
    assert other_run == {"task_id": "other", "steps": 40, "done": 40, "interrupted": False}
    assert b_run["task_id"].startswith("emp-job-b-") and b_run["interrupted"] and b_run["done"] <= 10, b_run
    assert server.interrupts == [b_run["task_id"]]


@pytest.mark.parametrize("build", [{"internal_progress": False}, {"task_ids": False}],
                         ids=["no-internal-progress", "before-1.6"])
def test_a_build_that_cannot_name_our_run_is_interrupted_as_before(fake, context, build):
    # Without /internal/progress (404), or where A1111 never knows our force_task_id (before 1.6: still
    # unknown STOP_GRACE_S after the request went out), a cancel interrupts whatever runs, as before.
    server = fake(step_s=0.05, **build)

    async def main():
        conn = connector(context, server)
        progress = Progress()
        progress.when(lambda p, m: p > 0, lambda: conn.cancel("job-1"))
        try:
            with pytest.raises(JobCancelled):
                await conn.run(job({"steps": 400, "width": 8, "height": 8}, service="a1111"), progress)
            await wait_for(lambda: server.runs and not conn._stopping, STOP_GRACE_S + 5)
        finally:
            await conn.close()
    asyncio.run(main())
    assert server.runs[0]["interrupted"] and server.runs[0]["done"] < 200 and len(server.interrupts) == 1


def test_a_payloads_own_force_task_id_is_replaced_by_one_per_run(fake, context):
    # Kept, one id from a template shared by two jobs (or two attempts of one) named both runs: a stop of one
    # read the other's run as its own and interrupted it.
    server = fake()
    for job_id in ("job-1", "job-2"):
        run(connector(context, server), {"steps": 2, "width": 8, "height": 8, "force_task_id": "from-template"},
            job_id=job_id)
    ids = [r["task_id"] for r in server.runs]
    assert len(set(ids)) == 2 and "from-template" not in ids
    assert ids[0].startswith("emp-job-1-") and ids[1].startswith("emp-job-2-")


def test_a_job_arriving_as_the_turn_passes_still_hears_its_cancel(fake, context):
    # Just released, the lock reads free while it is promised to the waiter it woke: a job arriving in that turn
    # of the loop took a bare acquire() and waited out the next job's whole generation deaf to its cancel.
    conn = connector(context, fake())

    async def main():
        loop = asyncio.get_running_loop()
        turn = conn._turns()
        await turn.acquire()  # job A generating
        b = asyncio.ensure_future(turn.acquire())  # job B waiting
        await asyncio.sleep(0)
        cancelled = asyncio.Event()
        loop.call_later(0.05, cancelled.set)  # C's cancel, while B generates
        b.add_done_callback(lambda _: loop.call_later(3, turn.release))  # B's generation: 3 s
        turn.release()  # A done: B woken, not run yet; C arrives in this same turn of the loop
        assert not turn.locked()
        # (deaf to it, C got the turn once B's generation ended and went on to generate)
        with pytest.raises(JobCancelled):
            await conn._wait_turn(job({}, "job-c", service="a1111"), turn, cancelled, Progress())
        assert turn.locked()  # B's still: C took no turn
        await b
        await conn.close()
    asyncio.run(main())


def test_a_busy_answer_with_retry_after_reaches_the_queue(fake, context):
    # (a proxy in front of A1111 while it loads a model): retried when it said, not at once (mutation audit M6)
    server = fake()
    server.fail_next = (503, {"detail": "busy"}, {"Retry-After": "42"})
    with pytest.raises(RetryableJobError) as caught:
        run(connector(context, server), {"prompt": "a cat", "steps": 2})
    assert caught.value.retry_after_s == 42


def test_the_received_record_carries_the_generation_fields(fake, context, caplog):
    server = fake()
    caplog.set_level(logging.INFO, "test.a1111")
    run(connector(context, server), {"prompt": "a cat", "steps": 2, "width": 64, "height": 32,
                                     "sampler_name": "Euler"})
    [received] = [r.fields for r in caplog.records if getattr(r, "event_type", "") == "job.received"]
    assert (received["endpoint"], received["steps"], received["sampler"]) == ("txt2img", 2, "Euler")
    assert (received["width"], received["height"]) == (64, 32)

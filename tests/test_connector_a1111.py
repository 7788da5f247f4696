"""The a1111 connector against the fake A1111 API (tests/fakes/a1111.py) over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

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


def run(conn, payload, progress=None):
    progress = progress or Progress()

    async def main():
        try:
            return await conn.run(job(payload, service="a1111"), progress)
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
    ({"endpoint": "img2img", "steps": 2}, "422.*init_images.*Field required"),
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
    # drain's hand-back past its 2 s margin. It goes on in the background, bounded by STOP_GRACE_S.
    server = fake(step_s=0.05)
    server.hang_interrupt = True
    conn = connector(context, server, request_timeout_s=30)
    progress = Progress()
    running = asyncio.Event()

    async def started():
        running.set()
    progress.when(lambda p, m: p > 0, started)

    async def main():
        task = asyncio.create_task(conn.run(job({"steps": 400, "width": 8, "height": 8}, service="a1111"),
                                            progress))
        await asyncio.wait_for(running.wait(), 10)
        mark = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_in = time.monotonic() - mark
        await wait_for(lambda: not conn._stopping, STOP_GRACE_S + 2)  # the interrupt gives up on its own
        stopped_in = time.monotonic() - mark
        await conn.close()
        return cancelled_in, stopped_in
    cancelled_in, stopped_in = asyncio.run(main())
    assert cancelled_in < 1.0, cancelled_in
    assert stopped_in < STOP_GRACE_S + 1, stopped_in
    assert ("POST", "/sdapi/v1/interrupt") in [r[:2] for r in server.requests]


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

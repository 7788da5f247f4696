"""The a1111 connector against the fake A1111 API (tests/fakes/a1111.py) over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import logging

import pytest
from _helpers import connector_context, TRACEPARENT, Progress, job
from fakes.a1111 import OOM, FakeA1111
from fakes.comfyui_nodes import png

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

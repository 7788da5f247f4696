"""The openai connector against the fake OpenAI API (tests/fakes/openai.py) over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from _helpers import connector_context, TRACEPARENT, Progress, job
from fakes.openai import QUOTA, RATE_LIMITED, SERVER_ERROR, FakeOpenAI

from emp_machine.connectors.openai import OpenAIConnector
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError

KEY = "sk-test-7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e"


@pytest.fixture
def fake(serve):
    return lambda **knobs: serve(FakeOpenAI, KEY, **knobs)


@pytest.fixture
def context(tmp_path):
    return connector_context(tmp_path, "openai")


def connector(context, server, key=KEY, **settings):
    settings = {"base_url": server.url, "api_key_env": "EMP_TEST_OPENAI_KEY", **settings}
    return OpenAIConnector(OpenAIConnector.Settings(**settings), context, env={"EMP_TEST_OPENAI_KEY": key})


def run(conn, payload, progress=None):
    progress = progress or Progress()

    async def main():
        try:
            return await conn.run(job(payload, service="openai"), progress)
        finally:
            await conn.close()
    return asyncio.run(main()), progress


def test_image_generation_writes_files_and_records_usage(fake, context):
    server = fake()
    result, progress = run(connector(context, server),
                           {"model": "gpt-image-1", "prompt": "a red fox in snow", "n": 2, "size": "32x24"})
    assert [o.mime_type for o in result.outputs] == ["image/png", "image/png"]
    for output in result.outputs:
        assert open(output.path, "rb").read().startswith(b"\x89PNG") and output.size_bytes > 50
    assert "b64_json" not in json.dumps(result.to_json())  # references, never inline
    assert result.service_metadata["usage"]["input_tokens"] == 5
    assert result.service_metadata["request_id"].startswith("req_")
    assert progress.percents == [0, 100]
    path, headers, body = server.requests[0]
    assert path == "/v1/images/generations" and headers["authorization"] == f"Bearer {KEY}"
    assert headers["traceparent"] == TRACEPARENT and headers["x-job-id"] == "job-1" and "endpoint" not in body


def test_chat_and_responses_return_text_and_token_usage(fake, context, caplog):
    server = fake()
    caplog.set_level(logging.INFO, "test.openai")
    chat, _ = run(connector(context, server), {"model": "gpt-4o-mini",
                                                "messages": [{"role": "user", "content": "hello there"}]})
    assert chat.data["text"] == ["echo: hello there"] and chat.service_metadata["usage"]["total_tokens"] == 13
    completed = [r for r in caplog.records if getattr(r, "event_type", "") == "job.completed"][0]
    assert completed.fields["total_tokens"] == 13 and completed.fields["model"] == "gpt-4o-mini"
    assert completed.fields["request_id"] == chat.service_metadata["request_id"]
    responses, _ = run(connector(context, server, default_model="gpt-4.1"),
                       {"input": "draw it", "tools": [{"type": "image_generation"}]})
    assert responses.data["text"] == ["echo: draw it"] and len(responses.outputs) == 1
    assert responses.service_metadata["model"] == "gpt-4.1" and responses.service_metadata["endpoint"] == "responses"


def test_rate_limit_is_retried_after_the_servers_wait(fake, context):
    server = fake()
    server.script = [(429, RATE_LIMITED[1], {"retry-after-ms": "300"})]
    started = time.monotonic()
    result, _ = run(connector(context, server), {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    assert time.monotonic() - started >= 0.3 and len(server.requests) == 2 and result.data["text"] == ["echo: x"]


@pytest.mark.parametrize("answer", [RATE_LIMITED, SERVER_ERROR])
def test_persistent_429_and_5xx_are_retryable_with_the_servers_wait(fake, context, answer):
    server = fake()
    server.script = [answer] * 3
    with pytest.raises(RetryableJobError) as caught:
        run(connector(context, server, max_retries=1, max_retry_wait_s=0.05), {"model": "m", "prompt": "p"})
    assert len(server.requests) == 2 and f"answered {answer[0]}" in str(caught.value)
    assert caught.value.retry_after_s == (1.0 if answer is RATE_LIMITED else None)


@pytest.mark.parametrize("answer,fragment", [
    (QUOTA, "insufficient_quota"),
    ((400, {"error": {"message": "Your request was rejected as a result of our safety system.",
                      "type": "image_generation_user_error", "code": "content_policy_violation"}}, {}), "safety system"),
])
def test_other_4xx_and_quota_are_permanent(fake, context, answer, fragment):
    server = fake()
    server.script = [answer]
    with pytest.raises(FatalJobError, match=fragment):
        run(connector(context, server), {"model": "m", "prompt": "p"})
    assert len(server.requests) == 1


def test_api_key_never_leaks_into_errors_logs_or_results(fake, context, caplog):
    server = fake(echo_key=True)  # this service quotes the whole wrong key back
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-0123456789abcdef0123456789"
    with pytest.raises(FatalJobError) as caught:
        run(connector(context, server, key=wrong), {"model": "m", "prompt": "p"})
    assert "401" in str(caught.value) and "Incorrect API key provided: [REDACTED]" in str(caught.value)
    assert wrong in json.dumps(server.requests[0][1])  # it was sent, so the fake really echoed it
    assert wrong not in caplog.text and wrong not in str(caught.value)
    good, _ = run(connector(context, server), {"model": "m", "prompt": "p"})
    assert KEY not in json.dumps(good.to_json()) and KEY not in caplog.text
    assert "sk-" not in repr(connector(context, server).settings)


def test_missing_key_and_bad_payload_are_permanent(fake, context):
    server = fake()
    conn = connector(context, server, key="")
    assert not asyncio.run(conn.health()).healthy
    with pytest.raises(FatalJobError, match="EMP_TEST_OPENAI_KEY is not set"):
        run(conn, {"model": "m", "prompt": "p"})
    with pytest.raises(FatalJobError, match="needs an endpoint"):
        run(connector(context, server), {"model": "m"})
    assert server.requests == []


def test_timeout_and_refused_connection_are_retryable(fake, context):
    server = fake(delay_s=5)
    with pytest.raises(RetryableJobError, match="timed out"):
        run(connector(context, server, request_timeout_s=0.3), {"model": "m", "prompt": "p"})
    with pytest.raises(RetryableJobError, match="unreachable"):
        run(connector(context, server, base_url="http://127.0.0.1:9"), {"model": "m", "prompt": "p"})


def test_cancel_abandons_the_request(fake, context):
    server = fake(delay_s=5)
    conn = connector(context, server)
    progress = Progress()
    progress.when(lambda p, m: p == 0, lambda: conn.cancel("job-1"))
    started = time.monotonic()
    with pytest.raises(JobCancelled):
        run(conn, {"model": "m", "prompt": "p"}, progress)
    assert time.monotonic() - started < 2

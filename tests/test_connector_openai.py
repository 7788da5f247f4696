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


SHORT_RATE_LIMIT = (429, RATE_LIMITED[1], {"retry-after-ms": "50"})


@pytest.mark.parametrize("answer", [SHORT_RATE_LIMIT, SERVER_ERROR])
def test_persistent_429_and_5xx_are_retryable_with_the_servers_wait(fake, context, answer):
    server = fake()
    server.script = [answer] * 3
    with pytest.raises(RetryableJobError) as caught:
        run(connector(context, server, max_retries=1, max_retry_wait_s=0.2), {"model": "m", "prompt": "p"})
    assert len(server.requests) == 2 and f"answered {answer[0]}" in str(caught.value)
    assert caught.value.retry_after_s == (0.05 if answer is SHORT_RATE_LIMIT else None)


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


# --- protocol audit: answers that are not what they seem, and what the real API does that the fake hid ---

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
HTML = {"Content-Type": "text/html"}


@pytest.mark.parametrize("answer,payload,error,fragment", [
    ((200, b"<html><body>Please sign in to the proxy</body></html>", HTML), CHAT, RetryableJobError, "not JSON"),
    ((200, b'{"id": "chatcmpl-1", "choices": [{"mess', {}), CHAT, RetryableJobError, "cut short"),
    ((200, b'data: {"id": "c1", "choices": []}\n\ndata: [DONE]\n\n', {"Content-Type": "text/event-stream"}), CHAT,
     RetryableJobError, "not JSON"),
    ((200, b"\xff\xfe\x00garbage", {"Content-Type": "application/json"}), CHAT, RetryableJobError, "not UTF-8"),
    ((200, {"error": {"message": "The server is overloaded", "type": "server_error"}}, {}), CHAT, RetryableJobError,
     "with an error: server_error: The server is overloaded"),
    ((200, {"error": {"message": "bad model", "type": "invalid_request_error", "code": 404}}, {}), CHAT,
     FatalJobError, "with an error: invalid_request_error: bad model"),
    ((200, {"id": "resp_1", "object": "response", "status": "queued", "error": None, "output": []}, {}),
     {"model": "gpt-4.1", "input": "hi"}, RetryableJobError, "not finished (status queued)"),
    ((200, [1, 2], {}), CHAT, RetryableJobError, "JSON list"),
    ((200, {"created": 1, "data": ["https://x/y.png"]}, {}), {"model": "m", "prompt": "p"}, FatalJobError,
     "'data' that is not a list of JSON objects"),
])
def test_a_200_that_is_no_finished_result_never_completes_empty(fake, context, answer, payload, error, fragment):
    server = fake()
    server.script = [answer]
    with pytest.raises(error) as caught:
        run(connector(context, server, max_retries=0), payload)
    assert type(caught.value) is error and fragment in str(caught.value)


def test_responses_failed_with_an_error_object_is_classified_and_error_null_is_success(fake, context):
    server = fake()
    server.script = [(200, {"id": "resp_1", "object": "response", "status": "failed", "output": [],
                            "error": {"code": "invalid_prompt", "message": "prompt flagged"}}, {})]
    with pytest.raises(FatalJobError, match="invalid_prompt: prompt flagged"):
        run(connector(context, server), {"model": "gpt-4.1", "input": "hi"})
    result, _ = run(connector(context, server), {"model": "gpt-4.1", "input": "hi"})  # the fake sends no "error"
    assert result.data["status"] == "completed"


@pytest.mark.parametrize("field", ["stream", "background"])
def test_stream_and_background_are_refused_before_anything_is_sent(fake, context, field):
    server = fake()
    with pytest.raises(FatalJobError, match=f'"{field}": true.*remove "{field}"'):
        run(connector(context, server), {"model": "gpt-4.1", "input": "hi", field: True})
    assert server.requests == []
    result, _ = run(connector(context, server), {"model": "gpt-4.1", "input": "hi", field: False})
    assert result.data["text"] == ["echo: hi"]


def test_url_images_are_downloaded_and_their_signature_kept_nowhere(fake, context, caplog):
    server = fake()
    caplog.set_level(logging.DEBUG)
    result, _ = run(connector(context, server), {"model": "dall-e-3", "prompt": "a fox", "size": "16x16"})
    [output] = result.outputs
    assert output.mime_type == "image/png" and open(output.path, "rb").read().startswith(b"\x89PNG")
    [(fetched, headers)] = server.downloads
    assert "sig=" in fetched and "authorization" not in headers  # the key never goes to the image's host
    signature = fetched.split("sig=")[1]
    ours = lambda: "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records
                              if r.name != "aiohttp.access")  # the fake's own access log shows it, of course
    assert signature not in json.dumps(result.to_json()) and signature not in ours()
    assert result.data["revised_prompts"] == ["a fox, detailed"]
    # a URL that cannot be fetched (expired, say) is retryable, and its signature is not in the error
    server.script = [(200, {"created": 1, "data": [{"url": f"{server.url}/files/gone.png?se=1&sig=SECRETSIG"}]}, {})]
    with pytest.raises(RetryableJobError, match="answered 403") as caught:
        run(connector(context, server), {"model": "dall-e-3", "prompt": "a fox"})
    assert "SECRETSIG" not in str(caught.value) and "SECRETSIG" not in ours()
    assert not list((context.output_dir / "job-1").glob("*.part"))


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", ""])
def test_base_url_with_or_without_v1(fake, context, suffix):
    server = fake()
    result, _ = run(connector(context, server, base_url=server.url + suffix), CHAT)
    assert result.data["text"] == ["echo: hi"] and server.requests[0][0] == "/v1/chat/completions"


def test_a_wrong_base_url_names_the_url_called(fake, context):
    server = fake()
    with pytest.raises(FatalJobError) as caught:
        run(connector(context, server, base_url=server.url + "/openai"), CHAT)
    assert f"POST {server.url}/openai/v1/chat/completions answered 404" in str(caught.value)
    assert "Invalid URL (POST /openai/v1/chat/completions)" in str(caught.value)


def test_failures_carry_the_status_code_and_openais_request_id(fake, context, caplog):
    server = fake()
    caplog.set_level(logging.INFO, "test.openai")
    server.script = [(400, {"error": {"message": "bad size", "type": "invalid_request_error"}},
                      {"x-request-id": "req_abc123"})]
    with pytest.raises(FatalJobError) as caught:
        run(connector(context, server), {"model": "m", "prompt": "p"})
    assert "answered 400 (x-request-id req_abc123)" in str(caught.value)
    assert (caught.value.status_code, caught.value.request_id) == (400, "req_abc123")
    [record] = [r for r in caplog.records if getattr(r, "event_type", "") == "job.failed"]
    assert record.fields["status_code"] == 400 and record.fields["request_id"] == "req_abc123"


@pytest.mark.parametrize("status,headers,retried", [
    (408, {}, True), (409, {}, True), (400, {"x-should-retry": "true"}, True),
    (500, {"x-should-retry": "false"}, False), (429, {"x-should-retry": "false"}, False),
])
def test_retries_follow_the_sdks_rules(fake, context, status, headers, retried):
    server = fake()
    server.script = [(status, {"error": {"message": "m", "type": "t"}}, {"retry-after-ms": "10", **headers})]
    if retried:
        result, _ = run(connector(context, server), CHAT)
        assert len(server.requests) == 2 and result.data["text"] == ["echo: hi"]
    else:
        with pytest.raises(FatalJobError, match=f"answered {status}"):
            run(connector(context, server), CHAT)
        assert len(server.requests) == 1


def test_a_wait_longer_than_max_retry_wait_goes_back_to_the_queue(fake, context):
    server = fake()
    server.script = [RATE_LIMITED]  # retry-after: 1, our cap 0.05 s: not re-sent early in process
    started = time.monotonic()
    with pytest.raises(RetryableJobError) as caught:
        run(connector(context, server, max_retries=2, max_retry_wait_s=0.05), CHAT)
    assert len(server.requests) == 1 and caught.value.retry_after_s == 1.0 and time.monotonic() - started < 0.9


def test_a_reply_over_max_response_bytes_is_refused(fake, context):
    server = fake()
    server.script = [(200, b'{"id": "' + b"a" * 5000 + b'"}', {"Content-Type": "application/json"})]
    with pytest.raises(FatalJobError, match="max_response_bytes"):
        run(connector(context, server, max_response_bytes=1000), CHAT)
    result, _ = run(connector(context, server, max_response_bytes=1000), CHAT)
    assert result.data["text"] == ["echo: hi"]


def test_an_error_answers_size_never_makes_it_permanent(fake, context):
    server = fake()
    server.script = [(502, b"<html>" + b"x" * 5000 + b"</html>", {"Content-Type": "text/html"})]
    with pytest.raises(RetryableJobError, match="answered 502"):
        run(connector(context, server, max_response_bytes=1000, max_retries=0), CHAT)


def test_an_image_download_over_max_response_bytes_is_refused_and_leaves_no_file(fake, context):
    server = fake()  # the answer (~500 bytes) fits, the image (761 bytes) does not
    with pytest.raises(FatalJobError, match="downloading OpenAI's image .* max_response_bytes"):
        run(connector(context, server, max_response_bytes=700), {"model": "dall-e-3", "prompt": "a fox",
                                                                 "size": "256x256"})
    assert not [p for p in context.output_dir.rglob("*") if p.is_file()]

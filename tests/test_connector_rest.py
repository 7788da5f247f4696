"""The rest connector against a small in-process HTTP service with sync and async (submit + poll) APIs."""

from __future__ import annotations

import asyncio
import base64
import logging

import pytest
from _helpers import TRACEPARENT, Progress, job, wait_for
from aiohttp import web
from fakes._server import ServerThread
from pydantic import ValidationError

from emp_machine.connectors import _http
from emp_machine.connectors.base import ConnectorContext
from emp_machine.connectors.rest import RestConnector
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, ServiceUnreachable

TOKEN = "tok-5c2e8a91d4f7b3e6a0c9"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # not UTF-8: the 0x89 alone says so


class Service:
    """Sync: POST /run. Async: POST /tasks -> {"task": {"id"}}, GET /tasks/{id} advancing 25 % per poll.

    `{"slow": true}`: the task is created at once, its id answered only once `answer_submit` is set (a busy
    gateway). `hold_cancel` set: POST /tasks/{id}/cancel is recorded, then answered only once it is cleared."""

    def __init__(self):
        self.tasks: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.answer_submit = asyncio.Event()  # set from the test through the server's loop (release)
        self.cancel_answered = asyncio.Event()
        self.hold_cancel = False
        self.thread = ServerThread(self.app).start()

    def release(self, event: asyncio.Event) -> None:
        self.thread.loop.call_soon_threadsafe(event.set)

    def app(self):
        app = web.Application()
        app.router.add_post("/run", self.run)
        app.router.add_post("/tasks", self.submit)
        app.router.add_get("/tasks/{id}", self.status)
        app.router.add_post("/tasks/{id}/cancel", self.cancel)
        app.router.add_get("/search", self.search)
        app.router.add_post("/png", self.png)
        app.router.add_route("*", "/redirect", self.redirect)
        app.router.add_route("*", "/landing", self.landing)
        app.router.add_post("/big", self.big)
        app.router.add_get("/health-quoting", self.health_quoting)
        return app

    async def health_quoting(self, request):  # a failing health check that quotes the request's headers back
        self.record(request)
        return web.Response(status=503, text=f"auth backend down, got {request.headers.get('Authorization')}")

    async def search(self, request):
        self.record(request)
        return web.json_response({"output": {"query": request.query_string, "body": (await request.read()).decode()}})

    async def png(self, request):
        self.record(request)
        return web.Response(body=PNG, content_type="image/png")

    async def redirect(self, request):  # 307 to ?to= (a path here, or another origin), or to itself: a loop
        self.record(request)
        raise web.HTTPTemporaryRedirect(request.query.get("to") or "/redirect")

    async def landing(self, request):
        self.record(request)
        return web.json_response({"output": {"landed": request.method, "body": (await request.read()).decode()}})

    async def big(self, request):  # ?chunked=1: no Content-Length, the size shows only while reading
        self.record(request)
        body = b'{"output": "' + b"A" * (2 << 20) + b'"}'
        kind = "application/octet-stream" if request.query.get("binary") else "application/json"
        if not request.query.get("chunked"):  # ?status=503: a proxy's huge error page
            return web.Response(body=body, content_type=kind, status=int(request.query.get("status", 200)))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 1 << 16):
            await response.write(body[start:start + (1 << 16)])
        await response.write_eof()
        return response

    def record(self, request):
        self.requests.append((request.method, request.path, {k.lower(): v for k, v in request.headers.items()}))

    async def run(self, request):
        self.record(request)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"detail": f"bad token {request.headers.get('Authorization')}"}, status=401)
        body = await request.json()
        if body.get("echo"):  # a service that quotes the request's headers back
            return web.json_response({"headers": dict(request.headers)})
        if body.get("status"):
            wait = {"Retry-After": str(body["retry_after"])} if body.get("retry_after") else None
            return web.json_response({"detail": "forced"}, status=body["status"], headers=wait)
        if body.get("inline_image_bytes"):  # a service that answers with its image inline, as many do
            image = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (body["inline_image_bytes"] // 256)
            return web.json_response({"output": {"sum": sum(body["numbers"]),
                                                 "image": "data:image/png;base64," + base64.b64encode(image).decode()}})
        return web.json_response({"output": {"sum": sum(body["numbers"])}})

    async def submit(self, request):
        self.record(request)
        body = await request.json()
        task_id = f"t{len(self.tasks) + 1}"
        self.tasks[task_id] = {"polls": 0, "fail": body.get("fail"), "forever": body.get("forever")}
        if body.get("slow"):
            await self.answer_submit.wait()
        return web.json_response({"task": {"id": task_id}}, status=202)

    async def status(self, request):
        self.record(request)
        task = self.tasks[request.match_info["id"]]
        task["polls"] += 1
        if task.get("cancelled"):
            return web.json_response({"state": "cancelled"})
        if task["fail"] and task["polls"] >= 2:
            return web.json_response({"state": "failed", "error": {"message": "GPU fell off the bus"}})
        if task["polls"] >= 4 and not task["forever"]:
            return web.json_response({"state": "succeeded", "percent": 100, "result": {"url": "http://x/y.png"}})
        return web.json_response({"state": "running", "percent": 25 * task["polls"]})

    async def cancel(self, request):
        self.record(request)
        self.tasks[request.match_info["id"]]["cancelled"] = True
        if self.hold_cancel:
            await self.cancel_answered.wait()
        return web.json_response({})

    def cancels(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "POST" and path.endswith("/cancel")]


@pytest.fixture
def service():
    server = Service()
    yield server
    server.thread.close()


@pytest.fixture
def context(tmp_path):
    return ConnectorContext("m1", "m1-worker-0", tmp_path, logger=logging.getLogger("test.rest"))


def sync_connector(context, service, **settings):
    raw = {"submit_url": service.thread.url + "/run", "result_path": "output",
           "header_env": {"Authorization": "EMP_TEST_TOKEN"}, **settings}
    return RestConnector(RestConnector.Settings(**raw), context, env={"EMP_TEST_TOKEN": f"Bearer {TOKEN}"})


def async_connector(context, service, **settings):
    url = service.thread.url
    raw = {"mode": "async", "submit_url": url + "/tasks", "status_url": url + "/tasks/{task.id}",
           "cancel_url": url + "/tasks/{task.id}/cancel", "status_path": "state", "progress_path": "percent",
           "progress_scale": 100, "result_path": "result", "error_path": "error.message",
           "poll_interval_s": 0.01, **settings}
    return RestConnector(RestConnector.Settings(**raw), context, env={})


def run(conn, payload, progress=None):
    progress = progress or Progress()

    async def main():
        try:
            return await conn.run(job(payload, service="rest"), progress)
        finally:
            await conn.close()
    return asyncio.run(main()), progress


def test_sync_call_returns_the_result_at_the_path_with_headers_from_env(context, service):
    result, progress = run(sync_connector(context, service), {"numbers": [1, 2, 3]})
    assert result.data == {"sum": 6} and progress.percents == [0, 100]
    headers = service.requests[0][2]
    assert headers["authorization"] == f"Bearer {TOKEN}" and headers["traceparent"] == TRACEPARENT
    assert headers["x-job-id"] == "job-1" and headers["x-request-id"].startswith("req-")


@pytest.mark.parametrize("status,error", [(400, FatalJobError), (404, FatalJobError), (429, RetryableJobError),
                                          (503, RetryableJobError)])
def test_status_codes_are_classified(context, service, status, error):
    with pytest.raises(error) as caught:
        run(sync_connector(context, service), {"numbers": [], "status": status})
    assert type(caught.value) is error and f"answered {status}" in str(caught.value)


def test_a_header_variable_missing_from_the_workers_env_sends_nothing_and_is_unhealthy(context, service):
    # The machine exported MY_TOKEN but the group's env did not list it: the request went out with an empty
    # header, the service answered 401 and every job failed for good.
    raw = {"submit_url": service.thread.url + "/run", "result_path": "output", "header_env": {"X-Api-Key": "MY_TOKEN"}}
    conn = RestConnector(RestConnector.Settings(**raw), context, env={"OTHER": "x"})
    health = asyncio.run(conn.health())
    assert not health.healthy and "MY_TOKEN" in health.reason and "workers.<group>.env" in health.reason
    with pytest.raises(ServiceUnreachable, match="MY_TOKEN"):
        run(conn, {"numbers": [1]})
    assert service.requests == []


def test_secret_header_value_is_redacted(context, service, caplog):
    caplog.set_level(logging.DEBUG)
    conn = RestConnector(RestConnector.Settings(submit_url=service.thread.url + "/run",
                                                header_env={"Authorization": "T"}), context,
                         env={"T": "Bearer wrong-secret-value-123"})
    with pytest.raises(FatalJobError) as caught:  # the service quotes the bad token back
        run(conn, {"numbers": [1]})
    assert "401" in str(caught.value) and "wrong-secret-value-123" not in str(caught.value)
    assert "[REDACTED]" in str(caught.value) and "wrong-secret-value-123" not in caplog.text


def failed_record(caplog) -> dict:
    [record] = [r for r in caplog.records if getattr(r, "event_type", "") == "job.failed"]
    return record.fields


@pytest.mark.parametrize("status,error", [(400, "FatalJobError"), (503, "RetryableJobError")])
def test_failed_record_carries_the_status_code_and_error_type(context, service, caplog, status, error):
    caplog.set_level(logging.DEBUG, "test.rest")
    with pytest.raises((FatalJobError, RetryableJobError)):
        run(sync_connector(context, service), {"numbers": [], "status": status})
    fields = failed_record(caplog)
    assert (fields["method"], fields["endpoint"], fields["status_code"]) == ("POST", service.thread.url + "/run",
                                                                             status)
    assert fields["error.type"] == error and f"answered {status}" in fields["error.message"]


def test_failed_record_has_the_secret_header_redacted_and_no_status_without_an_answer(context, service, caplog):
    caplog.set_level(logging.DEBUG, "test.rest")
    conn = RestConnector(RestConnector.Settings(submit_url=service.thread.url + "/run",
                                                header_env={"Authorization": "T"}), context,
                         env={"T": "plain-looking-value-456"})
    with pytest.raises(FatalJobError):  # the service quotes the bad header back
        run(conn, {"numbers": [1]})
    fields = failed_record(caplog)
    assert fields["status_code"] == 401 and fields["error.type"] == "FatalJobError"
    assert "plain-looking-value-456" not in fields["error.message"] and "[REDACTED]" in fields["error.message"]
    caplog.clear()
    conn = RestConnector(RestConnector.Settings(submit_url=service.thread.url + "/run", result_path="output",
                                                header_env={"Authorization": "A", "X-Key": "K"}), context,
                         env={"A": f"Bearer {TOKEN}", "K": "plain-looking-value-789"})
    with pytest.raises(FatalJobError, match="nothing at 'output'") as raised:  # an answer quoting the header
        run(conn, {"echo": True})
    fields = failed_record(caplog)
    assert "plain-looking-value-789" not in fields["error.message"] and "[REDACTED]" in fields["error.message"]
    # The raised error becomes the job's `error` in Redis, which the API shows its users: redacted too.
    assert "plain-looking-value-789" not in str(raised.value) and "[REDACTED]" in str(raised.value)
    caplog.clear()
    with pytest.raises(RetryableJobError):  # nothing answered: no status code to report
        run(RestConnector.from_settings({"submit_url": "http://127.0.0.1:9/run"}, context), {})
    fields = failed_record(caplog)
    assert "status_code" not in fields and fields["error.type"] == "ServiceUnreachable"  # never reached it


@pytest.mark.parametrize("status, form", [(429, "seconds"), (503, "seconds"), (503, "an HTTP date")])
def test_a_services_retry_after_reaches_the_queue(context, service, status, form):
    # The job is retried when the service said it could take it again, not at once (mutation audit M6).
    import email.utils
    import time

    value = 42 if form == "seconds" else email.utils.formatdate(time.time() + 42, usegmt=True)
    with pytest.raises(RetryableJobError) as caught:
        run(sync_connector(context, service), {"numbers": [], "status": status, "retry_after": value})
    assert caught.value.retry_after_s == pytest.approx(42, abs=2)


def test_a_failing_health_check_that_quotes_a_secret_back_is_redacted(context, service):
    # The health reason is served on /health and written to worker:{id}; job errors are redacted a second time
    # on their way out, health reasons only here (mutation audit M6).
    conn = sync_connector(context, service, health_url=service.thread.url + "/health-quoting")

    async def main():
        try:
            return await conn.health()
        finally:
            await conn.close()

    health = asyncio.run(main())
    assert not health.healthy and "503" in health.reason
    assert TOKEN not in health.reason and "[REDACTED]" in health.reason, health.reason


def test_the_completed_record_carries_method_endpoint_and_status_code(context, service, caplog):
    caplog.set_level(logging.DEBUG, "test.rest")
    run(sync_connector(context, service), {"numbers": [1]})
    [record] = [r for r in caplog.records if getattr(r, "event_type", "") == "job.completed"]
    fields = record.fields
    assert (fields["method"], fields["endpoint"], fields["status_code"]) == ("POST", service.thread.url + "/run", 200)


def test_a_dot_segment_job_id_never_changes_the_services_path(context, service):
    # quote() leaves dots alone and the URL library drops dot segments: a job id `..` sent
    # `/tasks/{job_id}/cancel` to `/cancel` (another endpoint than configured). Refused, nothing sent.
    conn = sync_connector(context, service, submit_url=service.thread.url + "/tasks/{job_id}/run")

    async def main():
        try:
            return await conn.run(job({"x": 1}, job_id="..", service="rest"), Progress())
        finally:
            await conn.close()
    with pytest.raises(FatalJobError, match=r"\{job_id\} is '\.\.' here"):
        asyncio.run(main())
    assert service.requests == []


def test_a_job_id_with_control_characters_is_sent_percent_encoded(context, service):
    # aiohttp refused the raw id in x-job-id ("Forbidden control character"): the job failed for good,
    # blamed on the connector. Printable ids go as they are.
    conn = sync_connector(context, service)

    async def main():
        try:
            return await conn.run(job({"numbers": [1]}, job_id="a-\x1b[31mRED\r\nX: y", service="rest"), Progress())
        finally:
            await conn.close()
    assert asyncio.run(main()).data == {"sum": 1}
    assert service.requests[0][2]["x-job-id"] == "a-%1B[31mRED%0D%0AX: y"


def test_async_submit_then_poll_reports_progress_until_done(context, service):
    result, progress = run(async_connector(context, service), {"x": 1})
    assert result.data == {"url": "http://x/y.png"}
    assert progress.percents == [0, 25, 50, 75, 100]
    assert [r[1] for r in service.requests] == ["/tasks"] + ["/tasks/t1"] * 4


def test_async_failure_reported_by_the_service_is_permanent_with_its_message(context, service):
    with pytest.raises(FatalJobError, match="reports the job failed: GPU fell off the bus"):
        run(async_connector(context, service), {"fail": True})


def test_async_cancel_calls_the_cancel_url(context, service):
    conn = async_connector(context, service)
    progress = Progress()
    progress.when(lambda p, m: p >= 50, lambda: conn.cancel("job-1"))
    with pytest.raises(JobCancelled):
        run(conn, {"forever": True}, progress)
    assert ("POST", "/tasks/t1/cancel") in [r[:2] for r in service.requests]


def test_async_job_timeout_and_refused_connection_are_retryable(context, service):
    with pytest.raises(RetryableJobError, match="did not finish within 0.2 s"):
        run(async_connector(context, service, job_timeout_s=0.2), {"forever": True})
    with pytest.raises(RetryableJobError, match="unreachable"):
        run(RestConnector.from_settings({"submit_url": "http://127.0.0.1:9/run"}, context), {})


# --- cancellation audit: the service is told to stop its task however the job ends before it finished ---

def other_task(service) -> str:
    """A task of someone else's, already on the service: ours is then t2, and t1 must never be stopped."""
    service.tasks["t1"] = {"polls": 0, "fail": None, "forever": True}
    return "/tasks/t2/cancel"


def test_a_cancel_while_the_submit_is_answered_still_stops_the_task(context, service):
    # The service created the task, then answered the submit slowly: the cancel abandoned the submit and the
    # task ran on for nobody. The submit now finishes in the background and cancel_url gets its answer.
    ours = other_task(service)
    conn = async_connector(context, service)

    async def main():
        try:
            run = asyncio.ensure_future(conn.run(job({"slow": True}, service="rest"), Progress()))
            await wait_for(lambda: "t2" in service.tasks)
            await conn.cancel("job-1")
            with pytest.raises(JobCancelled):
                await run  # at once: the submit is still unanswered
            service.release(service.answer_submit)
            await wait_for(lambda: service.cancels() == [ours])
        finally:
            await conn.close()
    asyncio.run(main())


@pytest.mark.parametrize("slow", [False, True], ids=["polling", "submitting"])
def test_job_timeout_stops_the_task(context, service, slow):
    ours = other_task(service)
    conn = async_connector(context, service, job_timeout_s=0.5)

    async def main():
        try:
            with pytest.raises(RetryableJobError, match="did not finish within 0.5 s"):
                await conn.run(job({"forever": True, "slow": slow}, service="rest"), Progress())
            service.release(service.answer_submit)
            await wait_for(lambda: service.cancels() == [ours])
        finally:
            await conn.close()
    asyncio.run(main())


@pytest.mark.parametrize("slow", [False, True], ids=["polling", "submitting"])
def test_a_drain_stops_the_task_in_the_background(context, service, slow):
    # A drain (or the worker's job_timeout) cancels run(): the job goes back to pending and runs again
    # elsewhere, so the service must drop its copy; a cancel endpoint that hangs must not hold the hand-back.
    ours = other_task(service)
    service.hold_cancel = True
    conn = async_connector(context, service)
    progress = Progress()

    async def main():
        try:
            run = asyncio.ensure_future(conn.run(job({"forever": True, "slow": slow}, service="rest"), progress))
            await wait_for(lambda: "t2" in service.tasks if slow else any(p >= 50 for p in progress.percents))
            run.cancel()
            await asyncio.wait({run}, timeout=_http.STOP_GRACE_S / 2)
            assert run.cancelled()  # ended without waiting for the service's answer to the cancel
            service.release(service.answer_submit)
            await wait_for(lambda: service.cancels() == [ours])
        finally:
            service.release(service.cancel_answered)
            await conn.close()
    asyncio.run(main())


def test_without_a_cancel_url_a_cancel_during_the_submit_abandons_it(context, service):
    conn = async_connector(context, service, cancel_url=None)

    async def main():
        try:
            run = asyncio.ensure_future(conn.run(job({"slow": True}, service="rest"), Progress()))
            await wait_for(lambda: "t1" in service.tasks)
            await conn.cancel("job-1")
            with pytest.raises(JobCancelled):
                await run
            assert not conn._stopping  # nothing left going on in the background
        finally:
            service.release(service.answer_submit)
            await conn.close()
    asyncio.run(main())
    assert service.cancels() == []


def test_missing_result_path_and_bad_settings(context, service):
    with pytest.raises(FatalJobError, match="nothing at 'output.nope'"):
        run(sync_connector(context, service, result_path="output.nope"), {"numbers": [1]})
    with pytest.raises(ValidationError, match="status_url is required"):
        RestConnector.from_settings({"mode": "async", "submit_url": "http://x"}, context)


# --- protocol audit: GET payloads, binary replies, redirects carrying secrets, reply size ---

def test_get_sends_a_flat_payload_as_query_parameters(context, service):
    url = service.thread.url + "/search?fixed=1"
    result, _ = run(sync_connector(context, service, method="GET", submit_url=url),
                    {"q": "red fox", "n": 3, "tags": ["a", "b"], "hd": True, "skip": None})
    assert result.data == {"query": "fixed=1&q=red fox&n=3&tags=a&tags=b&hd=true", "body": ""}
    with pytest.raises(FatalJobError, match="'filter' holds a nested object"):
        run(sync_connector(context, service, method="GET", submit_url=url), {"filter": {"a": 1}})
    with pytest.raises(FatalJobError, match="must be a flat JSON object, not a list"):
        run(sync_connector(context, service, method="GET", submit_url=url), [1, 2])


def test_a_binary_reply_is_saved_as_an_output_file(context, service):
    result, _ = run(sync_connector(context, service, submit_url=service.thread.url + "/png"), {"x": 1})
    [output] = result.outputs
    assert output.mime_type == "image/png" and output.size_bytes == len(PNG) and output.path.endswith(".png")
    assert open(output.path, "rb").read() == PNG and result.data == {"mime_type": "image/png", "size_bytes": len(PNG)}
    assert output.path.startswith(str(context.output_dir / "job-1"))


def test_shared_exchange_decodes_a_binary_reply_without_raising(context, service):
    conn = sync_connector(context, service)

    async def main():
        try:
            return await conn._request("service", "POST", service.thread.url + "/png", {}, json={})
        finally:
            await conn.close()
    status, text = asyncio.run(main())
    assert status == 200 and text.startswith("\ufffdPNG")


SECRETS = {"header_env": {"Authorization": "A", "X-Api-Key": "K"}}
SECRET_ENV = {"A": f"Bearer {TOKEN}", "K": "key-0f1e2d3c4b5a6978"}


def secret_connector(context, url, **settings):
    return RestConnector(RestConnector.Settings(submit_url=url, result_path="output", **SECRETS, **settings),
                         context, env=SECRET_ENV)


def test_redirects_keep_secret_headers_on_the_same_origin_only(context, service):
    base = service.thread.url
    result, _ = run(secret_connector(context, f"{base}/redirect?to=/landing"), {"x": 1})
    assert result.data == {"landed": "POST", "body": '{"x": 1}'}  # 307: method and body kept
    landing = service.requests[-1][2]
    assert landing["x-api-key"] == SECRET_ENV["K"] and landing["authorization"] == f"Bearer {TOKEN}"
    service.requests.clear()
    other = base.replace("127.0.0.1", "localhost") + "/landing"  # same server, another origin
    result, _ = run(secret_connector(context, f"{base}/redirect?to={other}"), {"x": 1})
    assert result.data["landed"] == "POST"
    [first, landed] = [r[2] for r in service.requests]
    assert first["x-api-key"] == SECRET_ENV["K"] and landed["host"].startswith("localhost")
    assert "x-api-key" not in landed and "authorization" not in landed and landed["x-job-id"] == "job-1"


def test_a_redirect_loop_is_a_clear_permanent_error(context, service):
    with pytest.raises(FatalJobError, match="redirected more than 10 times"):
        run(secret_connector(context, service.thread.url + "/redirect"), {"x": 1})
    assert len(service.requests) == 11


@pytest.mark.parametrize("query", ["", "?chunked=1"])
def test_a_reply_over_max_response_bytes_is_refused(context, service, query):
    with pytest.raises(FatalJobError, match="max_response_bytes"):
        run(sync_connector(context, service, submit_url=service.thread.url + "/big" + query,
                           max_response_bytes=1 << 20), {})
    result, _ = run(sync_connector(context, service, submit_url=service.thread.url + "/big" + query), {})
    assert len(result.data) == 2 << 20


def test_an_error_answers_size_never_makes_it_permanent(context, service):
    # read_limited raised "too large" (permanent) before the status was looked at: a proxy's huge 503 page
    # failed the job for good. An error answer is read in part; its status decides.
    with pytest.raises(RetryableJobError, match="answered 503"):
        run(sync_connector(context, service, submit_url=service.thread.url + "/big?status=503",
                           max_response_bytes=1 << 20), {})


def test_a_binary_answer_over_max_response_bytes_is_refused_and_leaves_no_file(context, service):
    # streamed to disk without a bound, an answer that never ends filled the disk
    with pytest.raises(FatalJobError, match="max_response_bytes"):
        run(sync_connector(context, service, submit_url=service.thread.url + "/big?binary=1",
                           max_response_bytes=1 << 20), {})
    assert not [p for p in context.output_dir.rglob("*") if p.is_file()]

"""The rest connector against a small in-process HTTP service with sync and async (submit + poll) APIs."""

from __future__ import annotations

import asyncio
import base64
import logging

import pytest
from _helpers import TRACEPARENT, Progress, job
from aiohttp import web
from fakes._server import ServerThread
from pydantic import ValidationError

from emp_machine.connectors.base import ConnectorContext
from emp_machine.connectors.rest import RestConnector
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, ServiceUnreachable

TOKEN = "tok-5c2e8a91d4f7b3e6a0c9"


class Service:
    """Sync: POST /run. Async: POST /tasks -> {"task": {"id"}}, GET /tasks/{id} advancing 25 % per poll."""

    def __init__(self):
        self.tasks: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.thread = ServerThread(self.app).start()

    def app(self):
        app = web.Application()
        app.router.add_post("/run", self.run)
        app.router.add_post("/tasks", self.submit)
        app.router.add_get("/tasks/{id}", self.status)
        app.router.add_post("/tasks/{id}/cancel", self.cancel)
        return app

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
            return web.json_response({"detail": "forced"}, status=body["status"])
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
        return web.json_response({})


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


def test_missing_result_path_and_bad_settings(context, service):
    with pytest.raises(FatalJobError, match="nothing at 'output.nope'"):
        run(sync_connector(context, service, result_path="output.nope"), {"numbers": [1]})
    with pytest.raises(ValidationError, match="status_url is required"):
        RestConnector.from_settings({"mode": "async", "submit_url": "http://x"}, context)

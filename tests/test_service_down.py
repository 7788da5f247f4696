"""A worker whose service is down claims nothing and loses nothing (real worker processes, real Redis, a fake
ComfyUI that is killed and restarted on its port).

A job that never reached its service (connection refused: ServiceUnreachable) makes the worker check the
connector's health at once: unhealthy, the job goes back to the queue uncounted and claims pause until the
health check passes again; healthy (only the job's own address is unreachable), the attempt counts as before.
Before, each claim failed its job as retryable: a down service turned the whole queue into final failures
in seconds (200 jobs in 4.8 s), max_retries claims per job."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
import redis as redis_lib
from fakes.a1111 import FakeA1111
from fakes.comfyui import FakeComfyUI
from test_connector_comfyui import happy

from emp_machine.connectors.a1111 import A1111Connector
from emp_machine.connectors.comfyui import ComfyUIConnector
from emp_machine.connectors.openai import OpenAIConnector
from emp_machine.connectors.rest import RestConnector
from emp_machine.errors import RetryableJobError, ServiceUnreachable, classify
from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.redis_server import free_port
from _helpers import Progress, connector_context, job
from harness import Messages, WorkerProcs, wait_for

# Long leases: the health watch beats every 20 s, so within these tests only a job's own failure (and,
# once paused, the 1 s checks) can tell the worker its service is down.
MANIFEST = """
workers:
  comfy:
    connector: comfyui
    settings: {{base_url: "{comfy}", connect_timeout_s: 1}}
  deadurl:
    connector: rest
    job_types: [deadurl]
    settings: {{submit_url: "http://127.0.0.1:{closed}/run", health_url: "{comfy}/system_stats",
                connect_timeout_s: 1}}
"""


@pytest.fixture
def client(redis_server):
    c = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    c.flushall()
    yield c
    c.close()


@pytest.fixture
def comfy():
    server = FakeComfyUI(node_s=0.01, blur_s=0.01).start()
    yield server
    server.close()


@pytest.fixture
def workers(client, redis_server, comfy, tmp_path):
    procs = WorkerProcs(MANIFEST.format(comfy=comfy.url, closed=free_port()), tmp_path, redis_server.url)
    yield procs
    procs.close()


def kill(server: FakeComfyUI) -> None:
    asyncio.run(server.kill())  # connection refused from now on


def restart(server: FakeComfyUI) -> None:
    asyncio.run(server.restart())  # the same port


def events(workers, i: int, name: str) -> list[dict]:
    out = []
    for line in workers.log(i).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == name:
            out.append(record)
    return out


def health(client, workers, i: int) -> str:
    return json.loads(client.hget(f"worker:{workers.ids[i]}", "connector_statuses") or "{}").get(
        "comfyui", {}).get("health", "")


def claims(store, job_id) -> list[str]:
    return [e["ev"] for e in store.timeline(job_id).events if e["ev"] in ("claimed", "handed_back")]


def first_outcome(store, ids, timeout=15.0) -> str:
    """The first of `ids` that a claim ended (handed back or failed), once there is one."""
    def ended():
        return next((j for j in ids if any(e["ev"] in ("handed_back", "failed")
                                           for e in store.timeline(j).events)), None)
    return wait_for(ended, timeout, message="the first claim to end")


def stays(condition, seconds: float, message: str) -> None:
    """`condition` holds for the whole of `seconds` (what must NOT happen while a service is down: an
    observation window, not a synchronisation); fails at once when it stops holding."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), message
        time.sleep(0.05)


def test_jobs_wait_uncounted_while_the_service_is_down_and_all_run_once_it_is_back(client, comfy, workers):
    store = JobStore(client)
    workers.start(0)
    workers.wait_up(client, 0)
    warm = store.submit("comfyui", {"workflow": happy()})
    wait_for(lambda: client.hget(f"job:{warm}", "status") == "completed", 20, message="the warm-up job")

    msgs = Messages(client, "job_failed", "job_claimed")
    try:
        kill(comfy)
        ids = [store.submit("comfyui", {"workflow": happy()}) for _ in range(20)]
        # The first claim finds ComfyUI gone; the health check agrees: the job goes back and claims pause.
        first = first_outcome(store, ids)
        assert claims(store, first) == ["claimed", "handed_back"] and not msgs.of("job_failed"), \
            store.timeline(first).events
        wait_for(lambda: health(client, workers, 0) == "unhealthy", 5, message="connector_statuses unhealthy")
        (paused,) = wait_for(lambda: events(workers, 0, "worker.claims_paused"), 5, message="claims paused")
        assert "ComfyUI unreachable" in paused["reason"], paused
        # the worker's own record, though the job's failure asked for the check: not filed under the job
        assert "job_id" not in paused and "trace_id" not in paused, paused

        def nothing_burnt():
            return (not msgs.of("job_failed") and len(msgs.of("job_claimed")) <= 1
                    and all(client.hget(f"job:{j}", "status") == "pending" for j in ids))
        # Before the fix all 20 were failed for good within ~2 s (3 claims each).
        stays(nothing_burnt, 4.0, f"jobs claimed or failed while the service was down: "
                                  f"{len(msgs.of('job_claimed'))} claims, {len(msgs.of('job_failed'))} failures")
        for j in ids:
            row = client.hgetall(f"job:{j}")
            assert (row["status"], row.get("retry_count", "0")) == ("pending", "0"), row
        handed = [j for j in ids if "handed_back" in claims(store, j)]
        assert handed == [first], handed
        (event,) = [e for e in store.timeline(first).events if e["ev"] == "handed_back"]
        assert event["reason"] == "service unreachable"

        restart(comfy)
        wait_for(lambda: all(client.hget(f"job:{j}", "status") == "completed" for j in ids), 60,
                 message="every job to complete once ComfyUI is back")
        assert not msgs.of("job_failed")
        assert all(client.hget(f"job:{j}", "retry_count") in (None, "0") for j in ids)
        assert claims(store, first) == ["claimed", "handed_back", "claimed"]
        wait_for(lambda: health(client, workers, 0) == "healthy", 5, message="connector_statuses healthy")
        # Logged once each way, not per check.
        assert len(events(workers, 0, "worker.claims_paused")) == 1
        (resumed,) = events(workers, 0, "worker.claims_resumed")
        assert resumed["paused_s"] > 0
    finally:
        msgs.close()


def test_a_worker_started_while_its_service_is_down_claims_nothing_until_it_is_up(client, comfy, workers):
    store = JobStore(client)
    kill(comfy)
    ids = [store.submit("comfyui", {"workflow": happy()}) for _ in range(3)]
    workers.start(0)
    workers.wait_up(client, 0)
    stays(lambda: all(claims(store, j) == [] for j in ids), 2.0, "a job was claimed while ComfyUI was down")
    assert events(workers, 0, "worker.claims_paused")  # from its first health check, at registration
    restart(comfy)
    wait_for(lambda: all(client.hget(f"job:{j}", "status") == "completed" for j in ids), 30,
             message="the jobs to run once ComfyUI is up")
    assert all(claims(store, j) == ["claimed"] for j in ids)


def test_a_job_whose_own_address_is_unreachable_still_fails_after_max_retries(client, comfy, workers):
    # The rest worker's health URL answers (ComfyUI's /system_stats); its submit URL refuses connections.
    store = JobStore(client)
    workers.start(1)
    workers.wait_up(client, 1)
    msgs = Messages(client, "job_failed")
    try:
        job_id = store.submit("deadurl", {"numbers": [1]}, max_retries=3)
        wait_for(lambda: client.hget(f"job:{job_id}", "status") == "failed", 20, message="the job to fail")
        row = client.hgetall(f"job:{job_id}")
        assert row["retry_count"] == "3" and "unreachable" in row["error"], row
        failures = wait_for(lambda: len(msgs.of("job_failed", job_id=job_id)) == 3
                            and msgs.of("job_failed", job_id=job_id), 5, message="three job_failed")
        assert [f["can_retry"] for f in failures] == [True, True, False]
        assert claims(store, job_id) == ["claimed"] * 3  # never handed back
        assert not events(workers, 1, "worker.claims_paused")
        # Classified as never having reached the service (the connector kept the class through its
        # redaction); the health check said healthy, so each attempt counted.
        failed = [r for r in events(workers, 1, "job.failed") if r.get("job_id") == job_id and "connector_id" in r]
        assert [r.get("error.type") for r in failed] == ["ServiceUnreachable"] * 3, failed
    finally:
        msgs.close()


def test_a_drain_while_claims_are_paused_exits_at_once_leaving_the_jobs_pending(client, comfy, workers):
    store = JobStore(client)
    workers.start(0)
    workers.wait_up(client, 0)
    kill(comfy)
    ids = [store.submit("comfyui", {"workflow": happy()}) for _ in range(3)]
    first = first_outcome(store, ids)
    assert claims(store, first) == ["claimed", "handed_back"], store.timeline(first).events
    wait_for(lambda: events(workers, 0, "worker.claims_paused"), 5, message="claims to pause")
    started = time.monotonic()
    workers.signal(0, signal.SIGTERM)
    assert workers.wait_exit(0, timeout=10) == 0
    assert time.monotonic() - started < 3.0, "a paused worker's drain waited"
    for j in ids:
        row = client.hgetall(f"job:{j}")
        assert (row["status"], row.get("retry_count", "0")) == ("pending", "0"), row
    assert client.hget(f"worker:{workers.ids[0]}", "status") == "offline"


# -- the connectors: which errors say the job never reached its service ------------------------------------

def run_job(conn, payload, service, progress=None):
    async def main():
        try:
            return await conn.run(job(payload, service=service), progress or Progress())
        finally:
            await conn.close()
    return asyncio.run(main())


def test_a_connection_refused_before_the_job_reached_its_service_is_service_unreachable(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    context = connector_context(tmp_path, "down")
    key = "sk-test-0123456789abcdef"
    cases = [
        (ComfyUIConnector.from_settings({"base_url": closed}, context), {"workflow": happy()}, "comfyui"),
        (A1111Connector.from_settings({"base_url": closed}, context), {"prompt": "a cat"}, "a1111"),
        (RestConnector(RestConnector.Settings(submit_url=closed + "/run", header_env={"Authorization": "T"}),
                       context, env={"T": f"Bearer {key}"}), {"x": 1}, "rest"),
        (OpenAIConnector(OpenAIConnector.Settings(base_url=closed, api_key_env="K"), context, env={"K": key}),
         {"model": "m", "prompt": "p"}, "openai"),
    ]
    for conn, payload, service in cases:
        with pytest.raises(ServiceUnreachable) as caught:
            run_job(conn, payload, service)
        assert "unreachable at" in str(caught.value) and key not in str(caught.value), service
        assert classify(caught.value) is caught.value  # the worker sees the class the connector raised


def test_a_service_lost_after_it_took_the_job_is_an_ordinary_retryable_failure(tmp_path, comfy):
    # After the service took the job, losing it counts an attempt: a job that brings its service down must
    # run out of retries, not go back uncounted for ever.
    context = connector_context(tmp_path, "lost")
    closed = f"http://127.0.0.1:{free_port()}"
    rest = RestConnector(RestConnector.Settings(
        mode="async", submit_url=comfy.url + "/prompt", status_url=closed + "/status", status_path="state",
        poll_interval_s=0.01), context, env={})
    with pytest.raises(RetryableJobError) as caught:  # ComfyUI's POST /prompt takes it; the status URL refuses
        run_job(rest, {"prompt": happy(), "client_id": "c"}, "rest")
    assert type(caught.value) is RetryableJobError and "unreachable at" in str(caught.value), caught.value

    a1111 = FakeA1111(step_s=0.05).start()
    try:
        conn = A1111Connector.from_settings({"base_url": a1111.url, "progress_interval_s": 0.02}, context)
        progress = Progress()

        async def stop():  # mid-generation: the port closes at once, the running POST is cut 0.5 s later
            asyncio.run_coroutine_threadsafe(a1111._thread._stop(), a1111._thread.loop)
        progress.when(lambda p, m: 0 < p < 100, stop)
        with pytest.raises(RetryableJobError) as caught:
            run_job(conn, {"prompt": "a cat", "steps": 200, "width": 8, "height": 8}, "a1111", progress)
        # the next /progress poll was refused, while the generation's POST was in flight
        assert type(caught.value) is RetryableJobError and "/progress" in str(caught.value), caught.value
    finally:
        a1111.close()

    conn = ComfyUIConnector.from_settings({"base_url": comfy.url, "reconnect_timeout_s": 0.3}, context)
    progress = Progress()
    progress.when(lambda p, m: m.startswith("queued as prompt"), comfy.kill)
    with pytest.raises(RetryableJobError) as caught:
        run_job(conn, {"workflow": happy()}, "comfyui", progress)
    assert type(caught.value) is RetryableJobError, caught.value

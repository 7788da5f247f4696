"""A retry the service asked to wait for (HTTP Retry-After on a 429/503) is claimed by no worker before it is
due: fail(retry_delay_s=...) keeps the job in jobs:pending with our field `retry_at` (Redis clock, ms), which
the claim passes over. Real Redis, real loopback HTTP services, real worker processes; no fixed sleeps."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis as redis_lib
from _helpers import connector_context, job
from aiohttp import web
from fakes._server import ServerThread

from emp_machine.connectors.a1111 import A1111Connector
from emp_machine.connectors.rest import RestConnector
from emp_machine.errors import RetryableJobError
from emp_machine.runtime.jobs import MAX_RETRY_DELAY_S, JobStore
from harness import WorkerProcs, wait_for

W1 = {"worker_id": "w1", "machine_id": "m1", "services": ["sim"]}
W2 = {"worker_id": "w2", "machine_id": "m2", "services": ["sim"]}


def redis_ms(client) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def timeline_events(store, job_id, ev):
    return [e for e in store.timeline(job_id).events if e["ev"] == ev]


# ---- the store, against real Redis ----

def test_a_delayed_retry_is_claimed_by_no_worker_until_due_then_claimed(redis):
    store = JobStore(redis, avoid_reclaim_s=0)  # only the delay holds it back, not "this worker just failed it"
    job_id = store.submit("sim", {}, max_retries=3)
    assert store.claim(W1).id == job_id
    assert store.fail(job_id, "w1", "answered 429", retryable=True, retry_delay_s=0.5).outcome == "retried"
    stored = redis.hgetall(f"job:{job_id}")
    # Still pending and in jobs:pending (the API sees it as it always did), with our due time.
    assert stored["status"] == "pending" and redis.zscore("jobs:pending", job_id) is not None
    retry_at = int(stored["retry_at"])
    assert [e["retry_in_ms"] for e in timeline_events(store, job_id, "failed")] == [500]
    # Neither the failing worker nor any other takes it now; each is told when it becomes claimable.
    assert store.claim(W1) is None
    assert store.claim(W2) is None and 0 < store.claimable_in_s <= 0.502
    got = wait_for(lambda: store.claim(W2), timeout=5, message="the delayed retry to be claimed once due")
    assert got.id == job_id
    claimed = timeline_events(store, job_id, "claimed")[-1]
    assert claimed["worker_id"] == "w2" and claimed["t"] >= retry_at


def test_a_retry_without_a_delay_is_claimable_at_once_and_clears_an_earlier_delay(redis):
    store = JobStore(redis, avoid_reclaim_s=0)
    job_id = store.submit("sim", {}, max_retries=10)
    assert store.claim(W1).id == job_id
    store.fail(job_id, "w1", "answered 503", retryable=True, retry_delay_s=0.3)
    assert "retry_at" in redis.hgetall(f"job:{job_id}")
    assert wait_for(lambda: store.claim(W2), timeout=5, message="the delayed retry").id == job_id
    # A failure that names no delay (or none worth waiting for) is due at once, whatever an earlier one said.
    for delay in (None, 0, -1.0, float("nan")):
        assert store.fail(job_id, "w2", "connection reset", retryable=True, retry_delay_s=delay).outcome == "retried"
        assert "retry_at" not in redis.hgetall(f"job:{job_id}")
        again = store.claim(W2)
        assert again is not None and again.id == job_id, f"retry after delay {delay!r} not claimable at once"
    assert "retry_in_ms" not in timeline_events(store, job_id, "failed")[-1]


def test_the_delay_is_capped_and_a_final_failure_keeps_no_due_time(redis):
    store = JobStore(redis)
    job_id = store.submit("sim", {}, max_retries=2)
    assert store.claim(W1).id == job_id
    store.fail(job_id, "w1", "answered 429", retryable=True, retry_delay_s=86400.0)  # Retry-After: a day
    ahead_ms = int(redis.hget(f"job:{job_id}", "retry_at")) - redis_ms(redis)
    assert (MAX_RETRY_DELAY_S - 5) * 1000 < ahead_ms <= MAX_RETRY_DELAY_S * 1000
    assert store.claim(W2) is None and store.claimable_in_s <= MAX_RETRY_DELAY_S + 0.002
    # As if the 300 s had passed: the due time in the hash and in the index's delayed set (lib.lua).
    redis.hset(f"job:{job_id}", "retry_at", 0)
    redis.zadd("jobs:idx:delayed", {job_id: 0})
    assert wait_for(lambda: store.claim(W2), timeout=5, message="the retry once due").id == job_id
    outcome = store.fail(job_id, "w2", "answered 429", retryable=True, retry_delay_s=5)
    assert (outcome.outcome, outcome.retry_count) == ("failed", 2)
    assert "retry_at" not in redis.hgetall(f"job:{job_id}")


def hash_reads(redis) -> int:
    stats = redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("hgetall", "hmget", "hget"))


def test_claims_do_not_read_the_retries_that_wait_out_a_rate_limit(redis):
    # Retries keep their submission score, so forty of them waiting out a Retry-After sat at the head of
    # their queue and every claim of that type read all forty hashes before reaching a claimable job.
    store = JobStore(redis, avoid_reclaim_s=0)
    waiting = [store.submit("sim", {}, max_retries=5) for _ in range(40)]
    for job_id in waiting:
        assert store.claim(W1).id == job_id
        assert store.fail(job_id, "w1", "answered 429", retryable=True, retry_delay_s=60).outcome == "retried"
    fresh = store.submit("sim", {}, priority=10)  # a lower priority than theirs (50), queued after them
    redis.config_resetstat()
    assert store.claim(W2).id == fresh
    assert hash_reads(redis) <= 6, f"{hash_reads(redis)} hash reads for one claim"
    # They are still pending, in jobs:pending as the API sees them, and indexed (the counts agree).
    assert all(redis.zscore("jobs:pending", j) is not None for j in waiting)
    assert redis.zcard("jobs:pending") == redis.hlen("jobs:idx:of") == 40
    # Once due, they come back in their order: the oldest first.
    redis.zadd("jobs:idx:delayed", {j: 0 for j in waiting})
    redis.hset(f"job:{waiting[0]}", "retry_at", 0)
    got = wait_for(lambda: store.claim(W2), timeout=5, message="the first due retry")
    assert got.id == waiting[0]


def test_a_waiting_retry_that_the_api_removed_leaves_the_index_and_one_resubmitted_runs_at_once(redis):
    store = JobStore(redis, avoid_reclaim_s=0)
    gone, again = store.submit("sim", {}), store.submit("sim", {})
    for job_id in (gone, again):
        assert store.claim(W1).id == job_id
        store.fail(job_id, "w1", "answered 429", retryable=True, retry_delay_s=60)
    # The API cancels one (its own way: status, jobs:pending) and submits the other's id again.
    redis.hset(f"job:{gone}", "status", "cancelled")
    redis.zrem("jobs:pending", gone)
    store.submit("sim", {}, job_id=again)
    assert store.claim(W2).id == again, "a resubmitted job waited out its earlier attempt's delay"
    assert redis.zscore("jobs:idx:delayed", again) is None
    redis.zadd("jobs:idx:delayed", {gone: 0})  # due now
    claims = []  # a claim moves the due retries out of the delayed set (lib.lua's promote_due)
    wait_for(lambda: claims.append(store.claim(W2)) or redis.zcard("jobs:idx:delayed") == 0, timeout=5,
             message="the cancelled retry to leave the delayed set")
    assert claims == [None] * len(claims) and not redis.hexists("jobs:idx:of", gone)


# ---- the connectors: Retry-After of a real HTTP answer ends up on the RetryableJobError ----

class Limited:
    """Answers every request with `status` and the given headers, e.g. 429 + Retry-After."""

    def __init__(self, status: int, headers: dict[str, str]):
        self.status, self.headers = status, headers
        self.hits: list[float] = []  # time.monotonic() of each request other than a1111's progress poll
        self.thread = ServerThread(self.app).start()

    def app(self):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.answer)
        return app

    async def answer(self, request):
        if request.path == "/sdapi/v1/progress":  # a1111's progress poll while the generation is out
            return web.json_response({"progress": 0, "state": {}})
        self.hits.append(time.monotonic())
        return web.json_response({"error": "slow down"}, status=self.status, headers=self.headers)


@pytest.fixture
def limited():
    servers = []

    def start(status, headers):
        server = Limited(status, headers)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.thread.close()


def raised_by(connector, service):
    async def main():
        try:
            return await connector.run(job({"x": 1}, service=service), _no_progress)
        finally:
            await connector.close()
    with pytest.raises(RetryableJobError) as caught:
        asyncio.run(main())
    return caught.value


async def _no_progress(percent, message):
    return None


@pytest.mark.parametrize("status,headers,expected", [
    (429, {"Retry-After": "20"}, 20.0),
    (503, {"retry-after-ms": "1500"}, 1.5),
    (429, {}, None),
])
def test_rest_connector_carries_the_services_retry_after(limited, tmp_path, status, headers, expected):
    server = limited(status, headers)
    conn = RestConnector.from_settings({"submit_url": server.thread.url + "/submit"},
                                       connector_context(tmp_path, "rest"))
    error = raised_by(conn, "rest")
    assert f"answered {status}" in str(error) and error.retry_after_s == expected


@pytest.mark.parametrize("status,headers,expected", [(429, {"Retry-After": "7"}, 7.0), (503, {}, None)])
def test_a1111_connector_carries_the_services_retry_after(limited, tmp_path, status, headers, expected):
    server = limited(status, headers)
    conn = A1111Connector.from_settings({"base_url": server.thread.url, "progress_interval_s": 0.02},
                                        connector_context(tmp_path, "a1111"))
    error = raised_by(conn, "a1111")
    assert f"answered {status}" in str(error) and error.retry_after_s == expected


# ---- end to end: two worker processes and a rate-limited service ----

def test_workers_wait_out_the_services_retry_after_between_attempts(redis_server, limited, tmp_path):
    """The audit's case: two workers used to burn all attempts of a 429 in ~0.3 s. Each retry now starts no
    sooner than the service's Retry-After, and an idle worker takes it when due (not at its 5 s sweep)."""
    server = limited(429, {"retry-after-ms": "400"})
    hits = server.hits
    body = f"""
workers:
  r:
    connector: rest
    count: 2
    job_types: [rest429]
    settings:
      submit_url: {server.thread.url}/submit
"""
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    procs = WorkerProcs(body, tmp_path / "w", redis_server.url, machine_id="wra")
    try:
        with procs.running(client):
            store = JobStore(client)
            job_id = store.submit("rest429", {"x": 1}, max_retries=3)
            wait_for(lambda: client.hget(f"job:{job_id}", "status") == "failed", timeout=30,
                     message=f"job {job_id} to fail for good (hits so far {len(hits)})")
            failed = timeline_events(store, job_id, "failed")
    finally:
        client.close()
    assert len(hits) == 3
    gaps = [b - a for a, b in zip(hits, hits[1:])]
    assert all(gap >= 0.39 for gap in gaps), f"a retry came before the service's Retry-After: {gaps}"
    assert all(gap < 2.5 for gap in gaps), f"an idle worker did not come back when the retry was due: {gaps}"
    assert [e.get("retry_in_ms") for e in failed] == [400, 400, None]

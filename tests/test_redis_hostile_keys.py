"""A Redis that is not a clean dev Redis: stray keys of another type where the job contract writes (another
tool's, a clobbered key). No job is ever stranded by one, one odd job:{id} never stops the others, and one
worker's stray key never makes the machine report Redis unreachable. Real Redis, as the other job tests."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import redis as redis_lib
import redis.asyncio as aioredis

from emp_machine.runtime import hardware, plan
from emp_machine.runtime import manifest as mf
from emp_machine.runtime import status as st
from emp_machine.runtime.aggregate import Aggregator
from emp_machine.runtime.jobs import AsyncJobStore, JobStore, Ownership, contract_fields, submission_score
from emp_machine.supervisor.control import ProcessInfo
from harness import wait_for


def caps(worker_id="w1", services=("sim",)):
    return {"worker_id": worker_id, "machine_id": "m1", "services": list(services)}


def api_write(redis, job_id, service="sim", priority=50):
    """A job as the EMP API writes it (hash + jobs:pending only, never indexed by us)."""
    pipe = redis.pipeline(transaction=False)
    pipe.hset(f"job:{job_id}", mapping=contract_fields(job_id, service, {"steps": 1}, priority=priority))
    pipe.zadd("jobs:pending", {job_id: submission_score(priority, int(time.time() * 1000))})
    pipe.execute()


def stray(redis, key, kind):
    redis.delete(key)
    if kind == "list":
        redis.rpush(key, "another tool's")
    else:
        redis.set(key, "another tool's")


def where(redis, job_id, worker_id="w1"):
    """Where a job is findable again: the queue (and our index), a lease, its worker's jobs:active."""
    def safe(check):
        try:
            return bool(check())
        except redis_lib.ResponseError:
            return False
    return {"status": redis.hget(f"job:{job_id}", "status"),
            "pending": safe(lambda: redis.zscore("jobs:pending", job_id) is not None),
            "indexed": safe(lambda: redis.hexists("jobs:idx:of", job_id)),
            "lease": safe(lambda: redis.zscore("jobs:leases", job_id) is not None),
            "active": safe(lambda: redis.hexists(f"jobs:active:{worker_id}", job_id))}


# ---- 1. a script that fails halfway never strands its job ----

@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
@pytest.mark.parametrize("key,kind,want", [("worker:w1", "list", "hash"), ("jobs:active:w1", "string", "hash"),
                                           ("jobs:leases", "string", "zset")])
def test_a_claim_meeting_a_stray_key_changes_nothing_and_names_the_key(redis, key, kind, want, functions):
    store = JobStore(redis, functions=functions)
    job_id = store.submit("sim", {"steps": 1})
    stray(redis, key, kind)
    for _ in range(8):  # a worker retrying its claim: one job lost per retry, before
        with pytest.raises(redis_lib.ResponseError) as err:
            store.claim(caps(), start=True)
        assert f"{key} holds a {kind}" in str(err.value) and want in str(err.value)
        assert "delete or rename" in str(err.value)
    assert where(redis, job_id) == {"status": "pending", "pending": True, "indexed": True, "lease": False,
                                    "active": False}
    assert redis.type(key) == kind  # the stray key is not ours to change
    redis.delete(key)  # the operator removes it: the job is claimed as usual
    job = store.claim(caps(), start=True)
    assert job is not None and job.id == job_id
    assert where(redis, job_id) == {"status": "in_progress", "pending": False, "indexed": False, "lease": True,
                                    "active": True}


def _claimed(redis, **options):
    store = JobStore(redis, **options)
    job_id = store.submit("sim", {"steps": 1})
    job = store.claim(caps(), start=True)
    assert job.id == job_id
    return store, job


def _owned_still(redis, job_id):
    assert where(redis, job_id) == {"status": "in_progress", "pending": False, "indexed": False, "lease": True,
                                    "active": True}


@pytest.mark.parametrize("key,kind", [("worker:w1", "list"), ("jobs:completed", "string")])
def test_a_completion_meeting_a_stray_key_leaves_the_job_running_and_its_retry_lands(redis, key, kind):
    store, job = _claimed(redis)
    stray(redis, key, kind)
    with pytest.raises(redis_lib.ResponseError, match=f"{key} holds a {kind}"):
        store.complete(job.id, "w1", {"ok": 1}, token=job.token)
    _owned_still(redis, job.id)  # before: completed in its hash, the result nowhere, a retry said 'ok'
    redis.delete(key)
    assert store.complete(job.id, "w1", {"ok": 1}, token=job.token) == Ownership.OK
    assert json.loads(redis.hget("jobs:completed", job.id))["data"] == {"ok": 1}
    assert redis.hget(f"job:{job.id}", "status") == "completed"


@pytest.mark.parametrize("key,kind,retryable", [("worker:w1", "list", True), ("jobs:pending", "string", True),
                                                ("jobs:failed", "string", False)])
def test_a_failure_meeting_a_stray_key_leaves_the_job_running(redis, key, kind, retryable):
    store, job = _claimed(redis)
    stray(redis, key, kind)
    with pytest.raises(redis_lib.ResponseError, match=f"{key} holds a {kind}"):
        store.fail(job.id, "w1", "boom", retryable=retryable, token=job.token)
    _owned_still(redis, job.id)
    redis.delete(key)
    outcome = store.fail(job.id, "w1", "boom", retryable=retryable, token=job.token)
    assert outcome.outcome == ("retried" if retryable else "failed")
    if retryable:
        assert where(redis, job.id)["pending"] and where(redis, job.id)["indexed"]


@pytest.mark.parametrize("key,kind", [("worker:w1", "list"), ("jobs:pending", "string")])
def test_a_hand_back_meeting_a_stray_key_leaves_the_job_running(redis, key, kind):
    store, job = _claimed(redis)
    stray(redis, key, kind)
    with pytest.raises(redis_lib.ResponseError, match=f"{key} holds a {kind}"):
        store.hand_back(job.id, "w1", "draining", token=job.token)
    _owned_still(redis, job.id)  # before: pending in its hash, outside jobs:pending
    redis.delete(key)
    assert store.hand_back(job.id, "w1", "draining", token=job.token) == Ownership.OK
    assert where(redis, job.id)["pending"]


def test_the_reaper_requeues_a_job_whose_worker_keys_are_stray(redis):
    store, job = _claimed(redis, lease_s=0.05)
    other = JobStore(redis, lease_s=0.05)
    other.submit("sim", {"steps": 1})
    other_job = other.claim(caps("w2"), start=True)
    stray(redis, "worker:w1", "list")  # another tool's key where w1's hash was
    reaped: set[str] = set()  # both leases (50 ms) run out; before, the reap raised with w1's job stranded
    wait_for(lambda: reaped.update(store.reap_expired_leases()) or reaped == {job.id, other_job.id}, 5,
             message="both jobs re-queued")
    state = where(redis, job.id)
    assert state["status"] == "pending" and state["pending"] and state["indexed"] and not state["lease"]
    assert redis.type("worker:w1") == "list"  # left alone
    assert store.claim(caps("w3"), start=True).id in (job.id, other_job.id)


# ---- 2. one job:{id} of another type never stops the other jobs ----

@pytest.mark.parametrize("via", ["indexed", "api_hint", "api_reconcile"])
def test_a_job_key_of_another_type_is_dropped_and_the_others_are_claimed(redis, via):
    store = JobStore(redis, reconcile_min_interval_s=0, index_check_interval_s=0)
    if via == "indexed":
        bad = store.submit("sim", {}, priority=90)
    else:
        bad = "job-bad"
        api_write(redis, bad, priority=90)
    stray(redis, f"job:{bad}", "string")
    good = {store.submit("sim", {}, priority=50) for _ in range(3)}
    got = set()
    for _ in range(3):
        job = store.claim(caps(), start=True, hints=[bad] if via == "api_hint" else [])
        assert job is not None
        got.add(job.id)
    assert got == good
    assert store.claim(caps(), start=True) is None
    assert redis.zscore("jobs:pending", bad) is None and not redis.hexists("jobs:idx:of", bad)
    assert redis.get(f"job:{bad}") == "another tool's"  # not ours to delete
    events = [json.loads(e) for e in redis.lrange(f"job:{bad}:events", 0, -1)]
    assert events[-1]["ev"] == "dropped" and f"job:{bad} holds a string" in events[-1]["reason"]


def test_a_running_job_whose_hash_was_clobbered_is_missing_to_its_worker(redis):
    store, job = _claimed(redis)
    store.submit("sim", {})
    second = store.claim(caps(), start=True)
    stray(redis, f"job:{job.id}", "string")
    beat = store.heartbeat("w1")  # before: WRONGTYPE, so no lease of the worker's was renewed
    assert beat.lost == [job.id] and beat.renewed == [second.id]
    assert not redis.hexists("jobs:active:w1", job.id)
    assert store.complete(job.id, "w1", {}, token=job.token) == Ownership.MISSING


def _upkeep_fails(redis):
    """A claimable sim job (indexed), and an API job of another type whose indexing raises: its job type's
    class list is a stray string, so every reconcile and sweep step that adopts it fails."""
    api_write(redis, "job-other", service="other")
    stray(redis, "jobs:idx:classes:other", "string")


def test_a_failing_reconcile_or_sweep_never_fails_the_claim(redis, caplog):
    store = JobStore(redis, reconcile_min_interval_s=0.5, busy_sweep_interval_s=0)
    first, second = store.submit("sim", {}), store.submit("sim", {})
    _upkeep_fails(redis)
    with caplog.at_level(logging.WARNING, logger="emp.jobs"):
        # a reconcile (the counts disagree) that raises, then the claim anyway
        assert store.claim(caps(), start=True).id == first
        # no reconcile now (its interval), the job claimed, then the busy sweep step raises: the job is the
        # caller's all the same (it used to raise here, the job claimed and lost until its lease ran out)
        assert store.claim(caps(), start=True).id == second
    failures = [r for r in caplog.records if r.getMessage() == "jobs.index_upkeep_failed"]
    assert len(failures) == 1, "logged once while the error stays the same"
    assert "WRONGTYPE" in failures[0].fields["error"]


def test_a_failing_reconcile_never_fails_the_async_claim(redis_url, redis):
    first = JobStore(redis).submit("sim", {})
    _upkeep_fails(redis)

    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await AsyncJobStore(client).claim(caps(), start=True)
        finally:
            await client.aclose()

    assert asyncio.run(scenario()).id == first


# ---- 3. one worker's stray key is that worker's problem, not Redis's ----

def _row(name: str, pid: int) -> ProcessInfo:
    now = int(time.time())
    return ProcessInfo(name=name, state="RUNNING", pid=pid, start=now - 5, now=now, restarts=0,
                       exit_status=None, errored_reason="", restart_in=None, description="")


def test_a_stray_worker_key_is_that_workers_unhealthy_reason_not_redis_unreachable(redis_url, redis, tmp_path):
    manifest = mf.loads(f"machine: {{type: test, id: hk, state_dir: {tmp_path / 'state'}}}\n"
                        f"redis: {{url: '{redis_url}'}}\n"
                        "workers: {sim: {connector: simulation, count: 2}}\n", environ={})
    the_plan = plan.build(manifest, hardware.probe(), resolved_manifest=tmp_path / "manifest.json", environ={})
    w0, w1 = (w.worker_id for w in the_plan.workers)
    for wid in (w0, w1):
        JobStore(redis).set_worker_status(wid, "idle")
    stray(redis, f"worker:{w1}", "list")

    async def scenario():
        client = st.redis_client(redis_url)
        inbox: asyncio.Queue = asyncio.Queue()
        poller = asyncio.create_task(st.poll_redis(client, redis_url, [w0, w1], inbox))
        try:
            polled = await asyncio.wait_for(inbox.get(), 10)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await client.aclose()
        agg = Aggregator(the_plan, {"sim": ("simulation",)}, "test", health_url="")
        agg.set_phase("ready", True)
        agg.set_processes(tuple(_row(s.name, 100 + i) for i, s in enumerate(the_plan.specs)))
        agg.set_redis(polled.ok, polled.reason, list(polled.rows))
        agg.commit()
        return polled, json.loads(agg.health_body), agg.message("periodic")

    polled, health, message = asyncio.run(scenario())
    assert polled.ok, polled.reason  # before: the whole read failed, so "Redis unreachable"
    assert health["components"]["redis"] == {"healthy": True, "reason": ""}
    services = {name: s for name, s in health["services"].items() if s.get("kind") == "worker"}
    (bad,) = [s for s in services.values() if not s["healthy"]]
    assert f"worker:{w1} holds a list" in bad["reason"] and "delete or rename" in bad["reason"]
    assert sum(s["healthy"] for s in services.values()) == 1, services
    published = message["status"]["workers"]
    assert published[w0]["is_connected"] and not published[w1]["is_connected"]

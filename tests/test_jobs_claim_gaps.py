"""Claim gaps found by audit: API jobs hidden by stale index entries, and how soon a failed job comes back
to the worker that failed it. Real Redis, real worker processes."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from emp_machine.runtime.jobs import JobSignals, JobStore, contract_fields, submission_score
from harness import WorkerProcs, wait_for


def caps(worker_id="w1", services=("sim",)):
    return {"worker_id": worker_id, "machine_id": "m1", "services": list(services)}


def api_write(pipe, job_id, service="sim"):
    """The job as the EMP API writes it (hash + jobs:pending), with no job_submitted anyone hears."""
    pipe.hset(f"job:{job_id}", mapping=contract_fields(job_id, service, {"steps": 1, "step_ms": 1}))
    pipe.zadd("jobs:pending", {job_id: submission_score(50, int(time.time() * 1000))})


def stale_entries(redis, count, service="other"):
    """Index entries of jobs a Node machine then claimed: it removes them from jobs:pending, not from our
    index. Jobs of a type no emp worker serves, so no claim ever meets them at a queue head."""
    pipe = redis.pipeline(transaction=False)
    for i in range(count):
        api_write(pipe, f"{service}-{i}", service)
    pipe.execute()
    JobStore(redis).reconcile()
    assert redis.hlen("jobs:idx:of") == count
    pipe = redis.pipeline(transaction=False)
    for i in range(count):
        pipe.zrem("jobs:pending", f"{service}-{i}")
        pipe.hset(f"job:{service}-{i}", "status", "assigned")
    pipe.execute()


def commands(redis, name):
    return int(redis.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_api_job_is_claimed_although_stale_index_entries_make_the_counts_agree(redis, functions):
    stale_entries(redis, 1)
    pipe = redis.pipeline(transaction=False)
    api_write(pipe, "sim-1")
    pipe.execute()
    assert redis.zcard("jobs:pending") == redis.hlen("jobs:idx:of") == 1  # the count sees nothing missing
    store = JobStore(redis, reconcile_min_interval_s=0, index_check_interval_s=0, functions=functions)
    assert store.claim(caps()).id == "sim-1"
    assert redis.hlen("jobs:idx:of") == 0  # the stale entry was pruned on the way


def test_sweep_work_per_claim_is_bounded_and_reaches_every_stale_entry(redis):
    stale_entries(redis, 3000)
    pipe = redis.pipeline(transaction=False)
    api_write(pipe, "sim-1")
    pipe.execute()
    store = JobStore(redis, sweep_interval_s=0)
    assert store.claim(caps()).id == "sim-1"
    assert redis.hlen("jobs:idx:of") > 1500  # one step pruned one chunk, not the whole index
    claims = 0
    while redis.hlen("jobs:idx:of") and claims < 30:  # each claim that finds nothing takes one step
        assert store.claim(caps()) is None
        claims += 1
    assert redis.hlen("jobs:idx:of") == 0 and claims >= 3


def test_a_claim_that_gets_a_job_never_sweeps_and_idle_ones_sweep_once_per_interval(redis):
    store = JobStore(redis, sweep_interval_s=3600, busy_sweep_interval_s=3600)
    store.submit("sim", {}, job_id="j1")
    redis.config_resetstat()
    assert store.claim(caps()).id == "j1"
    assert commands(redis, "zscan") == commands(redis, "hscan") == 0
    assert store.claim(caps()) is None and store.claim(caps()) is None
    assert commands(redis, "zscan") == commands(redis, "hscan") == 1


def test_idle_workers_share_one_sweep_step_per_interval(redis):
    # Each idle store took its own step every interval: 64 idle workers with 20k jobs of another type pending
    # kept Redis 17.7 % busy adopting the same chunks over and over.
    stores = [JobStore(redis, sweep_interval_s=3600, busy_sweep_interval_s=3600) for _ in range(4)]
    redis.config_resetstat()
    for i, store in enumerate(stores):
        assert store.claim(caps(f"w{i}")) is None
    assert commands(redis, "zscan") == commands(redis, "hscan") == 1


def test_the_sweep_goes_on_where_another_workers_step_ended(redis):
    pipe = redis.pipeline(transaction=False)
    for i in range(1500):  # jobs of a type nobody here serves: each step looks at one chunk of them
        api_write(pipe, f"o{i}", service="other")
    pipe.execute()
    JobStore(redis).reconcile()  # indexed: the counts agree, so a claim that finds nothing takes a sweep step
    first, second = (JobStore(redis, sweep_interval_s=3600, busy_sweep_interval_s=3600) for _ in range(2))
    assert first.claim(caps("w1")) is None
    ended = int(redis.hget("jobs:sweep:cursors", "pending"))
    assert ended != 0  # more to go
    redis.delete("jobs:sweep:gate")  # the interval is over
    expected = int(redis.zscan("jobs:pending", ended, count=500)[0])
    assert second.claim(caps("w2")) is None
    assert int(redis.hget("jobs:sweep:cursors", "pending")) == expected


def test_a_job_another_types_sweep_step_finds_wakes_the_idle_workers_of_its_type(redis, redis_url):
    # The job was unindexed because nobody heard of it, and the worker whose step found it cannot run it: its
    # own workers found it only at their next fallback claim (up to 5 s later).
    stale_entries(redis, 1)  # the counts agree: only a sweep step finds the job below
    pipe = redis.pipeline(transaction=False)
    api_write(pipe, "hidden", service="gen")
    pipe.execute()

    async def scenario() -> bool:
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            async with JobSignals(client, ["gen"]) as signals:
                signals.arm()
                sweeper = JobStore(redis, sweep_interval_s=0)  # a "sim" worker: its idle claim takes the step
                assert await asyncio.to_thread(sweeper.claim, caps()) is None
                return await signals.wait(10)  # (False: the 10 s passed without a wake-up)
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) is True
    assert JobStore(redis).claim(caps("w2", services=("gen",))).id == "hidden"


@pytest.mark.parametrize("stray", ["string", "hash"])
def test_a_sweep_gate_that_never_expires_is_taken_over(redis, stray):
    # no TTL: it would hold every step for ever (or, passed, let every store step again)
    if stray == "string":
        redis.set("jobs:sweep:gate", "left by something else")
    else:
        redis.hset("jobs:sweep:gate", "a", "b")
    stores = [JobStore(redis, sweep_interval_s=3600, busy_sweep_interval_s=3600) for _ in range(2)]
    redis.config_resetstat()
    assert stores[0].claim(caps("w1")) is None and stores[1].claim(caps("w2")) is None
    assert commands(redis, "zscan") == 1  # the first took it over, with an expiry, and stepped; not the second
    assert redis.pttl("jobs:sweep:gate") > 0


def test_stray_sweep_cursors_do_not_stop_the_sweep(redis):
    redis.rpush("jobs:sweep:cursors", "left by something else")  # HMGET on it: WRONGTYPE at every step
    store = JobStore(redis, sweep_interval_s=0)
    redis.config_resetstat()
    assert store.claim(caps()) is None
    assert commands(redis, "zscan") == 1
    assert redis.type("jobs:sweep:cursors") == "hash"


def test_a_worker_that_never_runs_out_of_work_still_finds_a_hidden_api_job(redis):
    # Stale entries make the counts agree and every claim gets a job, so the idle sweep never runs: the API
    # job (priority 90) waited behind all 300 indexed jobs (priority 50) until the queue drained.
    stale_entries(redis, 1)
    store = JobStore(redis, busy_sweep_interval_s=0.05)
    for i in range(300):
        store.submit("sim", {}, job_id=f"j{i}")
    redis.hset("job:hidden", mapping=contract_fields("hidden", "sim", {}, priority=90))
    redis.zadd("jobs:pending", {"hidden": submission_score(90, int(time.time() * 1000))})
    assert redis.zcard("jobs:pending") == redis.hlen("jobs:idx:of")  # the count sees nothing missing
    claimed = []
    deadline = time.monotonic() + 10
    while "hidden" not in claimed and time.monotonic() < deadline:
        job = store.claim(caps())
        assert job is not None  # never idle: there is always more work
        claimed.append(job.id)
    assert "hidden" in claimed and len(claimed) < 300, len(claimed)


def test_claim_says_when_the_job_it_just_failed_becomes_claimable_by_it(redis):
    store = JobStore(redis, avoid_reclaim_s=30)
    store.submit("sim", {}, job_id="flaky")
    store.claim(caps("w1"))
    assert store.claim(caps("w1")) is None and store.claimable_in_s is None  # nothing passed over
    store.fail("flaky", "w1", "transient", retryable=True)
    assert store.claim(caps("w1")) is None
    assert 29 < store.claimable_in_s <= 30.01
    store.submit("sim", {}, job_id="other", priority=10)
    assert store.claim(caps("w1")).id == "other" and store.claimable_in_s is None  # passed over, took the next
    assert JobStore(redis).claim(caps("w2")).id == "flaky"  # any other worker takes it at once


def test_a_lone_worker_retries_the_job_it_failed_well_before_10_s(redis, redis_url, tmp_path):
    procs = WorkerProcs("workers:\n  sim:\n    connector: simulation\n", tmp_path, redis_url)
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        job_id = store.submit("simulation", {"steps": 1, "step_ms": 1, "fail_attempts": 1})
        # The default avoid window (1 s) and the claim's hint bring it back; not the 10 s window, nor the
        # worker's 5 s fallback sweep.
        wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "completed", timeout=4.0,
                 message=f"the retry to complete (now {redis.hget(f'job:{job_id}', 'status')})")
        evs = [(e["ev"], e.get("worker_id")) for e in store.timeline(job_id).events]
        wid = procs.ids[0]
        assert [ev for ev in evs if ev[0] in ("claimed", "failed", "completed")] == [
            ("claimed", wid), ("failed", wid), ("claimed", wid), ("completed", wid)]
        failed, reclaimed = [e["t"] for e in store.timeline(job_id).events if e["ev"] in ("failed", "claimed")][1:3]
        assert 1000 <= reclaimed - failed < 2500  # it waited out the window, and not much longer
    finally:
        procs.close()


def test_an_idle_worker_claims_an_api_job_hidden_by_stale_entries_within_its_sweep(redis, redis_url, tmp_path):
    procs = WorkerProcs("workers:\n  sim:\n    connector: simulation\n", tmp_path, redis_url)
    try:
        procs.start()
        procs.wait_up(redis)
        pipe = redis.pipeline(transaction=False)
        api_write(pipe, "other-1", "other")
        pipe.execute()
        JobStore(redis).reconcile()
        # One transaction, so the worker never sees the counts disagree in between.
        pipe = redis.pipeline(transaction=True)
        pipe.zrem("jobs:pending", "other-1")
        pipe.hset("job:other-1", "status", "assigned")
        api_write(pipe, "sim-1", "simulation")
        pipe.execute()
        assert redis.zcard("jobs:pending") == redis.hlen("jobs:idx:of") == 1
        wait_for(lambda: redis.hget("job:sim-1", "status") == "completed", timeout=12.0,
                 message="the API job to be claimed by the idle worker's fallback sweep")
        assert json.loads(redis.hget("jobs:completed", "sim-1"))["success"] is True
    finally:
        procs.close()


def test_resubmitting_a_job_id_leaves_one_index_entry(redis):
    store = JobStore(redis)
    store.submit("sim", {"steps": 1}, job_id="J1")
    store.submit("sim", {"steps": 1}, job_id="J1")  # a producer retrying after a lost reply
    assert redis.zcard("jobs:idx:queue:sim:0") == 1
    assert store.claim(caps()).id == "J1"
    assert redis.zcard("jobs:idx:queue:sim:0") == 0
    assert store.claim(caps()) is None


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
@pytest.mark.parametrize("where", [1, -1], ids=["duplicate-ahead", "duplicate-behind"])
def test_a_leftover_duplicate_index_entry_is_dropped_not_read_forever(tmp_path, functions, where):
    # A job queued twice by a version before index_add removed the old entry: once the job ran, the claim
    # read the leftover entry, tried to drop the job's own (already gone) entry instead, read the leftover
    # again, and never returned: Redis answered BUSY to everyone until SHUTDOWN NOSAVE. A private server,
    # so a regression cannot wedge the session's.
    from pathlib import Path

    import redis as redis_lib

    from emp_machine.runtime.redis_server import PrivateRedis

    with PrivateRedis(Path(tmp_path)) as server:
        client = redis_lib.Redis.from_url(server.url, decode_responses=True, socket_timeout=5)
        store = JobStore(client, functions=functions)
        store.submit("sim", {"steps": 1}, job_id="J0")  # a job that stays pending, read around the leftover
        store.submit("sim", {"steps": 1}, job_id="J1")
        queue = "jobs:idx:queue:sim:0"
        (member, score), = [(m, s) for m, s in client.zrange(queue, 0, -1, withscores=True) if m.endswith("|J1")]
        client.zadd(queue, {"000000000000000|J1": score + where})  # the leftover, beside the indexed entry
        claimed = store.claim(caps())
        assert claimed.id in ("J0", "J1")
        store.complete(claimed.id, "w1", {"ok": True})
        second = store.claim(caps())  # reads the leftover (or what remains of J1) and drops it
        assert second is not None and second.id != claimed.id
        store.complete(second.id, "w1", {"ok": True})
        assert store.claim(caps()) is None
        assert client.zcard(queue) == 0 and client.ping()


def test_a_leftover_duplicate_of_a_cancelled_job_is_dropped_with_its_indexed_entry(tmp_path):
    # The leftover is read first and its job (cancelled) is dropped with the job's indexed entry, another
    # member of the same queue: the cursor steps back over both and still finds the pending job behind them.
    from pathlib import Path

    import redis as redis_lib

    from emp_machine.runtime.redis_server import PrivateRedis

    with PrivateRedis(Path(tmp_path)) as server:
        client = redis_lib.Redis.from_url(server.url, decode_responses=True, socket_timeout=5)
        store = JobStore(client)
        for job_id in ("J0", "J1", "J2"):
            store.submit("sim", {"steps": 1}, job_id=job_id)
        queue = "jobs:idx:queue:sim:0"
        top = max(score for _, score in client.zrange(queue, 0, -1, withscores=True))
        client.zadd(queue, {"000000000000000|J1": top + 1})  # read before every other entry
        assert store.cancel("J1", "user")
        assert [store.claim(caps()).id for _ in range(2)] == ["J0", "J2"]
        assert store.claim(caps()) is None
        assert client.zcard(queue) == 0 and client.hlen("jobs:idx:of") == 0


# -- values and ids that broke the scripts (found by fuzzing them, helper-30) ----------------------------------

@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
@pytest.mark.parametrize("created_at, priority", [("nan", "50"), ("inf", "50"), ("-inf", "1e300")])
def test_a_job_with_a_time_that_is_no_number_never_stops_the_claims(redis, functions, created_at, priority):
    # tonumber took 'nan'/'inf': the job's index score was NaN and the ZADD in adopt raised in every claim,
    # for every worker of every type, and in every reconcile.
    store = JobStore(redis, functions=functions, index_check_interval_s=0, reconcile_min_interval_s=0)
    store.submit("sim", {}, job_id="good")
    pipe = redis.pipeline(transaction=False)
    api_write(pipe, "odd", service="img")
    pipe.hset("job:odd", mapping={"created_at": created_at, "priority": priority})
    pipe.execute()
    assert store.claim(caps("w2", services=("img",)), hints=["odd"]).id == "odd"  # adopted, ordered, claimed
    assert store.claim(caps()).id == "good"
    store.submit("sim", {}, job_id="own", created_at=created_at)  # our own submit takes it too
    assert store.reconcile().adopted == 0 and store.claim(caps()).id == "own"


def test_a_time_out_of_the_index_range_keeps_its_priority(redis):
    # The index scores P * 2^42 - t: a workflow_datetime in microseconds (~1.7e15) lost ~386 priority levels.
    store = JobStore(redis)
    now_ms = int(time.time() * 1000)
    store.submit("sim", {}, job_id="low", priority=10)
    store.submit("sim", {}, job_id="high", priority=90, workflow_datetime_ms=now_ms * 1000)
    store.submit("sim", {}, job_id="past", priority=90, workflow_datetime_ms=-5)
    assert [store.claim(caps()).id for _ in range(3)] == ["past", "high", "low"]


def test_a_job_whose_timeline_key_is_another_jobs_hash_is_still_claimed_whole(redis):
    # Job `a:events` (its hash is job:a:events) makes job a's timeline key a hash: the claim of a raised
    # WRONGTYPE after it had assigned the job, so a was never handed to a worker, on every later claim too.
    pipe = redis.pipeline(transaction=False)
    api_write(pipe, "a:events", service="other")
    api_write(pipe, "a")
    pipe.execute()
    store = JobStore(redis)
    job = store.claim(caps())
    assert job.id == "a" and redis.hget("job:a", "status") == "assigned" and redis.hexists("jobs:active:w1", "a")
    assert store.complete("a", "w1", {"ok": True}, token=job.token) == "ok"
    assert redis.hget("job:a", "status") == "completed" and redis.type("job:a:events") == "hash"
    with pytest.raises(ValueError, match="timeline or progress key"):
        store.submit("sim", {}, job_id="b:progress")  # our own submit refuses such an id
    assert not redis.exists("job:b:progress")


def api_rewrite(redis, job_id, service="sim", priority=50, requirements=None):
    """The API writing an id again (a resubmission, a priority change): hash, jobs:pending, job_submitted."""
    redis.hset(f"job:{job_id}", mapping=contract_fields(job_id, service, {}, priority=priority,
                                                         requirements=requirements))
    redis.zadd("jobs:pending", {job_id: submission_score(priority, int(time.time() * 1000))})
    redis.publish("job_submitted", json.dumps({"job_id": job_id, "service_required": service}))


def test_an_id_the_api_writes_again_is_indexed_again_from_its_announcement(redis):
    # adopt() stopped at "already indexed": the old entry kept the old type, requirements and priority, so a
    # worker that did not meet the new requirements claimed the job, and its new type never saw it.
    store = JobStore(redis)
    store.submit("other", {}, job_id="x")
    store.submit("sim", {}, job_id="y")
    store.submit("sim", {}, job_id="a", priority=50)
    store.submit("sim", {}, job_id="b", priority=50)
    api_rewrite(redis, "x", service="sim", priority=10)  # another type now
    api_rewrite(redis, "y", priority=60, requirements={"hardware": {"gpu_memory_gb": 80}})  # needs 80 GB now
    api_rewrite(redis, "b", priority=90)  # raised
    small = {**caps(), "hardware": {"gpu_memory_gb": 8}}
    hints = ["x", "y", "b"]
    assert store.claim(small, hints=hints).id == "b"  # first, as jobs:pending says
    assert [store.claim(small).id for _ in range(2)] == ["a", "x"]  # x: found under its new type
    assert store.claim(small) is None  # y is not for an 8 GB worker any more
    assert store.claim({**caps("w2"), "hardware": {"gpu_memory_gb": 80}}).id == "y"


def test_a_rewritten_id_nobody_announced_is_indexed_again_by_a_sweep_step(redis):
    store = JobStore(redis, sweep_interval_s=0)
    store.submit("other", {}, job_id="x")
    api_rewrite(redis, "x", service="sim")  # as if no worker heard its job_submitted
    assert store.claim(caps()).id == "x"  # the claim found nothing, swept, re-indexed x and claimed again

"""The embedded Redis forgets jobs that finished more than a week ago (jobs.expire_finished, run by the machine
on its own Redis only): it kept every job's hash, progress hash and result for good, ~280 MB a day at 1.5 jobs/s
(long-run audit). Real Redis, the machine's own RESP client."""

from __future__ import annotations

import asyncio
import json

from emp_machine.runtime import jobs
from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.resp import MiniRedis

W = {"worker_id": "w1", "machine_id": "m1", "services": ["sim"]}
DAY_MS = 86400 * 1000


def finish(store: JobStore, ok: bool) -> str:
    job_id = store.submit("sim", {}, max_retries=1)
    assert store.claim(W, start=True).id == job_id
    if ok:
        store.progress(job_id, "w1", 50)
        store.complete(job_id, "w1", {"ok": 1})
    else:
        store.fail(job_id, "w1", "boom", retryable=False)
    return job_id


def expire(redis_url: str, now_ms: int) -> int:
    async def main():
        client = MiniRedis(redis_url)
        try:
            return await jobs.expire_finished(client, now_ms)
        finally:
            await client.aclose()
    return asyncio.run(main())


def test_finished_jobs_older_than_the_retention_are_forgotten_and_the_rest_kept(redis, redis_url):
    store = JobStore(redis)
    done, failed = finish(store, True), finish(store, False)
    running = store.submit("sim", {})
    assert store.claim(W, start=True).id == running
    now = int(redis.time()[0]) * 1000
    assert expire(redis_url, now) == 0  # all of them are recent
    assert redis.exists(f"job:{done}", f"job:{failed}", f"job:{done}:progress") == 3
    # Eight days later: the finished two go (hash, progress, result), the running one stays.
    assert expire(redis_url, now + 8 * DAY_MS) == 2
    assert not redis.exists(f"job:{done}", f"job:{done}:progress", f"job:{failed}")
    assert not redis.hexists("jobs:completed", done) and not redis.hexists("jobs:failed", failed)
    assert redis.hget(f"job:{running}", "status") == "in_progress"


def test_a_resubmitted_id_and_unreadable_entries_are_handled(redis, redis_url):
    store = JobStore(redis)
    old = finish(store, True)
    store.submit("sim", {}, job_id=old)  # the same id queued again: its hash is the new job's
    redis.hset("jobs:failed", "ghost", "not json")  # no hash, no readable time: kept (nothing says it is old)
    redis.hset("jobs:failed", "orphan", json.dumps({"failed_at": "2020-01-01T00:00:00.000Z"}))
    now = int(redis.time()[0]) * 1000
    # The orphan entry goes, and the resubmitted id's old result entry; its hash (pending again) stays.
    assert expire(redis_url, now + 8 * DAY_MS) == 2
    assert redis.hget(f"job:{old}", "status") == "pending" and redis.zscore("jobs:pending", old) is not None
    assert redis.hexists("jobs:failed", "ghost") and not redis.hexists("jobs:failed", "orphan")


def test_a_job_that_finished_again_recently_keeps_its_hash_and_odd_entries_do_not_stop_expiry(redis, redis_url):
    store = JobStore(redis)
    again = finish(store, True)
    now = int(redis.time()[0]) * 1000
    # Long ago it completed; resubmitted, it failed again just now: its old completed entry goes, its hash stays.
    redis.hset("jobs:completed", again, json.dumps({"success": True, "data": {}, "completed_at": "2020-01-01T00:00:00.000Z"}))
    # (its hash's completed_at is the old run's: only the recent failed_at says the hash is current)
    redis.hset(f"job:{again}", mapping={"status": "failed", "failed_at": jobs.iso_now(),
                                        "completed_at": "2020-01-01T00:00:00.000Z"})
    redis.hset("jobs:failed", again, json.dumps({"failed_at": jobs.iso_now()}))
    # Entries whose time is no text, one without a hash but with a progress hash left behind.
    redis.hset("jobs:failed", "null-time", json.dumps({"failed_at": None}))
    redis.hset("jobs:failed", "num-time", json.dumps({"failed_at": 5}))
    redis.hset("jobs:failed", "gone", json.dumps({"failed_at": "2020-01-01T00:00:00.000Z"}))
    redis.hset("job:gone:progress", "progress", "40")
    assert expire(redis_url, now) == 2  # again's old completed entry, gone's entry (with its progress hash)
    assert redis.hget(f"job:{again}", "status") == "failed" and redis.hexists("jobs:failed", again)
    assert not redis.hexists("jobs:completed", again)
    assert not redis.exists("job:gone:progress") and redis.hexists("jobs:failed", "null-time")


def test_cancelled_jobs_are_forgotten_too(redis, redis_url):
    # A cancel (the API's, or ours) fails the job in its hash and writes no jobs:failed entry: the clean-up,
    # which walked jobs:completed and jobs:failed only, kept every cancelled job's hash for good (soak BL:
    # 194 of every 10,000 jobs in its mix). Running, queued, and one resubmitted since.
    store = JobStore(redis)
    running = store.submit("sim", {})
    assert store.claim(W, start=True).id == running
    store.progress(running, "w1", 40)
    assert store.cancel(running, "user")
    assert store.progress(running, "w1", 50) is jobs.Ownership.CANCELLED  # the worker sees it
    queued = store.submit("sim", {})
    assert store.cancel(queued, "user")
    again = store.submit("sim", {})
    assert store.cancel(again, "user")
    store.submit("sim", {}, job_id=again)  # the same id queued again since: its hash is the new job's
    assert redis.zscore("jobs:cancelled", running) and redis.zscore("jobs:cancelled", queued)
    now = int(redis.time()[0]) * 1000
    assert expire(redis_url, now) == 0
    assert redis.exists(f"job:{running}", f"job:{running}:progress", f"job:{queued}") == 3
    assert expire(redis_url, now + 8 * DAY_MS) == 2
    assert not redis.exists(f"job:{running}", f"job:{running}:progress", f"job:{queued}")
    assert redis.hget(f"job:{again}", "status") == "pending"
    assert not redis.zcard("jobs:cancelled")


def test_a_resubmitted_id_claimed_but_not_started_keeps_its_hash(redis, redis_url):
    # `assigned` is running as much as in_progress is: an old result entry of the id goes, the current hash
    # (with the old run's completed_at still in it) stays (mutation audit M1).
    store = JobStore(redis)
    old = finish(store, True)
    redis.hset("jobs:completed", old, json.dumps({"success": True, "completed_at": "2020-01-01T00:00:00.000Z"}))
    store.submit("sim", {}, job_id=old)
    assert store.claim(W).id == old  # claimed, not started: assigned
    redis.hset(f"job:{old}", "completed_at", "2020-01-01T00:00:00.000Z")
    assert expire(redis_url, int(redis.time()[0]) * 1000) == 1
    assert redis.hget(f"job:{old}", "status") == "assigned" and not redis.hexists("jobs:completed", old)


def test_every_chunk_of_old_cancels_is_forgotten_in_one_run(redis, redis_url):
    # More cancels than one call takes: the run goes on to the last chunk (mutation audit M1: a pass that
    # stopped after its first chunk left the rest for the next run, a day later, and fell behind for good).
    count = jobs._CHUNK * 2 + 5
    long_ago = int(redis.time()[0]) * 1000 - 9 * DAY_MS
    pipe = redis.pipeline()
    for i in range(count):
        pipe.zadd("jobs:cancelled", {f"c{i}": long_ago})
        pipe.hset(f"job:c{i}", mapping={"status": "failed", "failed_at": "2020-01-01T00:00:00.000Z"})
    pipe.execute()
    assert expire(redis_url, int(redis.time()[0]) * 1000) == count
    assert redis.zcard("jobs:cancelled") == 0 and not redis.exists(*(f"job:c{i}" for i in range(count)))

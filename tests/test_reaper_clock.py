"""The reaper and the Redis host's clock (reap.lua's two phases). Leases hold absolute Redis TIME: a clock step
forward by more than the time left on a lease made it look expired, and the reaper re-queued the jobs of live,
beating workers (each ran twice). An expired lease is now only noted when first seen, and reaped by a later
call once it stayed expired, unrenewed, for one renewal interval and a half. A step is simulated the way it
looks to the reaper: the job's lease moved into the past (`ZADD jobs:leases <past> id`). Real Redis, real
worker processes where it matters."""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_lib

from emp_machine.runtime.jobs import JobStore
from harness import Messages, WorkerProcs, wait_for

CAPS = {"worker_id": "w1", "machine_id": "m1", "services": ["sim"]}
SEEN = "jobs:reap_seen"


def server_ms(client) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def claimed(redis, store, caps=CAPS) -> str:
    store.register_worker(caps["worker_id"], caps["machine_id"], caps)
    job_id = store.submit("sim", {})
    assert store.claim(caps, start=True).id == job_id
    return job_id


def test_a_live_workers_job_whose_lease_looks_expired_stays_with_it_and_runs_once(redis, redis_url, tmp_path):
    # A 9 s lease: the worker beats every 3 s; the reapers (the worker's own and ours) wait 4.5 s after first
    # seeing the lease expired. The step: the lease looks a minute expired, as after a +60 s clock step.
    procs = WorkerProcs("workers:\n  sim:\n    connector: simulation\n    count: 1\n    lease: 9s\n",
                        tmp_path, redis_url)
    store = JobStore(redis, lease_s=9)
    messages = Messages(redis, "job_claimed", "complete_job", "job_requeued")
    try:
        with procs.running(redis):
            job_id = store.submit("simulation", {"steps": 80, "step_ms": 100})  # 8 s of work
            wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "in_progress", 15, message="job running")
            stepped = server_ms(redis) - 60_000
            redis.zadd("jobs:leases", {job_id: stepped})
            reaped: list[str] = []
            noted: list[float] = []

            def renewed():
                reaped.extend(store.reap_expired_leases())
                if redis.zscore(SEEN, job_id) is not None:
                    noted.append(1)
                lease = redis.zscore("jobs:leases", job_id)
                return lease is not None and lease > server_ms(redis)

            wait_for(renewed, 15, 0.05, message=f"the worker's next beat to renew the lease\n{procs.log(0)[-3000:]}")
            assert reaped == [] and noted  # seen expired, noted, not reaped: the beat came first
            wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "completed", 20,
                     message=f"job to complete\n{procs.log(0)[-3000:]}")
            assert store.reap_expired_leases() == [] and redis.zscore(SEEN, job_id) is None  # note dropped
            wait_for(lambda: messages.of("complete_job", job_id=job_id), message="complete_job")
        events = [e["ev"] for e in store.timeline(job_id).events]
        assert events.count("claimed") == 1 and events.count("started") == 1 and "lease_expired" not in events
        assert len(messages.of("job_claimed", job_id=job_id)) == 1
        assert len(messages.of("complete_job", job_id=job_id)) == 1 and not messages.of("job_requeued", job_id=job_id)
    finally:
        messages.close()


def _machines_reaper(url: str, lease_s: float):
    """One round of the machine's own reaper (jobs.reap_with over its MiniRedis), as a plain call."""
    import asyncio

    from emp_machine.runtime import jobs
    from emp_machine.runtime.resp import MiniRedis

    async def round_() -> list[str]:
        client = MiniRedis(url)
        try:
            return await jobs.reap_with(client, lease_s)
        finally:
            await client.aclose()
    return lambda: asyncio.run(round_())


@pytest.mark.parametrize("reaper", ["worker's", "machine's"])
def test_an_expired_lease_is_noted_first_and_reaped_one_confirm_later(redis, redis_url, reaper):
    # (the machine reaps too, with its own call: passing it no confirmation wait passed every test, M12's M27)
    store = JobStore(redis, lease_s=0.3, avoid_reclaim_s=0)  # beats every 0.2 s: confirm 0.7 s
    reap = store.reap_expired_leases if reaper == "worker's" else _machines_reaper(redis_url, 0.3)
    job_id = claimed(redis, store)
    redis.zadd("jobs:leases", {job_id: 0})
    first = time.monotonic()
    assert reap() == [] and redis.zscore(SEEN, job_id) is not None
    assert redis.hget(f"job:{job_id}", "status") == "in_progress"
    reaped: list[str] = []
    wait_for(lambda: reaped.extend(reap()) or reaped, 5, 0.01, message="the reap")
    assert reaped == [job_id] and time.monotonic() - first >= 0.6
    assert redis.hget(f"job:{job_id}", "status") == "pending" and redis.zscore(SEEN, job_id) is None
    # The worker it was taken from was dead after all: the job runs again elsewhere.
    assert store.claim({**CAPS, "worker_id": "w2"}).id == job_id


def test_a_lease_renewed_after_the_note_is_not_reaped_on_the_old_note(redis):
    store = JobStore(redis, lease_s=0.3, avoid_reclaim_s=0)
    job_id = claimed(redis, store)
    redis.zadd("jobs:leases", {job_id: 0})
    assert store.reap_expired_leases(confirm_s=0.3) == []
    noted = redis.zscore(SEEN, job_id)
    wait_for(lambda: server_ms(redis) > noted + 400, 5, 0.01, message="the note to age past the confirm")
    # Renewed since the note, then expired again (a second step before any reaper saw it renewed): a new
    # lease, so a new note; the old one's age counts for nothing.
    redis.zadd("jobs:leases", {job_id: server_ms(redis) - 1})
    assert store.reap_expired_leases(confirm_s=0.3) == []
    assert redis.zscore(SEEN, job_id) > noted
    # Renewed by a beat: the note goes with the next call.
    assert store.heartbeat("w1").renewed == [job_id]
    assert store.reap_expired_leases(confirm_s=0.3) == [] and redis.zscore(SEEN, job_id) is None


def test_notes_of_jobs_no_longer_leased_are_dropped(redis):
    store = JobStore(redis, lease_s=30, avoid_reclaim_s=0)
    job_id = claimed(redis, store)
    redis.zadd("jobs:leases", {job_id: 0})
    assert store.reap_expired_leases() == [] and redis.zscore(SEEN, job_id) is not None
    assert store.complete(job_id, "w1", {}) == "ok"  # finished in time: its lease goes
    assert store.reap_expired_leases() == [] and redis.zcard(SEEN) == 0
    # A reaper of an older version reaped a noted job at first sight (its lease gone): the note goes too.
    other = claimed(redis, store, {**CAPS, "worker_id": "w2"})
    redis.zadd("jobs:leases", {other: 0})
    assert store.reap_expired_leases() == [] and redis.zscore(SEEN, other) is not None
    redis.zrem("jobs:leases", other)
    assert store.reap_expired_leases() == [] and redis.zcard(SEEN) == 0


def test_zero_confirm_reaps_at_first_sight(redis):
    store = JobStore(redis, lease_s=30, avoid_reclaim_s=0)
    job_id = claimed(redis, store)
    redis.zadd("jobs:leases", {job_id: 0})
    assert store.reap_expired_leases(confirm_s=0) == [job_id] and redis.zcard(SEEN) == 0


def test_concurrent_reapers_with_two_phases_requeue_each_job_exactly_once(redis, redis_url):
    store = JobStore(redis, lease_s=30)
    ids = [store.submit("sim", {}) for _ in range(40)]
    for i in range(40):
        store.claim({**CAPS, "worker_id": f"w{i}"})
    redis.zadd("jobs:leases", {job_id: 0 for job_id in ids})
    results: list[list[str]] = []
    barrier = threading.Barrier(4)

    def reap():
        client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
        reaper = JobStore(client, lease_s=0.3)  # confirm 0.7 s
        barrier.wait()
        got: list[str] = []
        end = time.monotonic() + 10
        while redis.zcard("jobs:leases") and time.monotonic() < end:
            got.extend(reaper.reap_expired_leases(limit=3))
        results.append(got)
        client.close()

    threads = [threading.Thread(target=reap) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    reaped = [job for got in results for job in got]
    assert sorted(reaped) == sorted(ids)  # each once, none lost
    assert redis.zcard("jobs:pending") == 40 and redis.zcard("jobs:leases") == 0 and redis.zcard(SEEN) == 0


def test_a_stray_key_where_the_notes_live_changes_nothing_and_is_named(redis):
    store = JobStore(redis, lease_s=0.3, avoid_reclaim_s=0)
    job_id = claimed(redis, store)
    redis.zadd("jobs:leases", {job_id: 0})
    redis.set(SEEN, "another tool's")
    with pytest.raises(redis_lib.ResponseError, match=f"{SEEN} holds a string"):
        store.reap_expired_leases(confirm_s=0)
    assert redis.hget(f"job:{job_id}", "status") == "in_progress" and redis.zscore("jobs:leases", job_id) == 0
    redis.delete(SEEN)
    assert store.reap_expired_leases(confirm_s=0) == [job_id]

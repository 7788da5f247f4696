"""Hand-back, cancel, leases, the reaper, stuck jobs and the timeline (real server, short leases)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from emp_machine.runtime.jobs import JobStore

CAPS = {"worker_id": "w1", "machine_id": "m1", "services": ["sim"]}
CAPS2 = {"worker_id": "w2", "machine_id": "m2", "services": ["sim"]}


def until(predicate, deadline_s=5.0, what="condition"):
    """Poll `predicate` until it returns something truthy; fail at the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what} not met within {deadline_s} s")


@pytest.fixture
def store(redis):
    return JobStore(redis, lease_s=0.3, avoid_reclaim_s=0)


def test_hand_back_returns_the_job_without_counting_an_attempt(store, redis):
    job_id = store.submit("sim", {}, priority=60)
    score = redis.zscore("jobs:pending", job_id)
    store.register_worker("w1", "m1", CAPS)
    store.claim(CAPS)
    store.start(job_id, "w1")
    assert store.hand_back(job_id, "w1", "drain") == "ok"
    stored = redis.hgetall(f"job:{job_id}")
    assert stored["status"] == "pending" and stored["retry_count"] == "0" and stored["worker_id"] == ""
    assert redis.zscore("jobs:pending", job_id) == score
    assert redis.hlen("jobs:active:w1") == 0 and redis.zscore("jobs:leases", job_id) is None
    assert redis.hget("worker:w1", "status") == "idle"
    assert store.claim(CAPS2).id == job_id


def test_cancel_while_running_is_seen_by_progress_and_blocks_completion(store, redis):
    job_id = store.submit("sim", {})
    store.claim(CAPS)
    store.start(job_id, "w1")
    assert store.is_cancelled(job_id) is False
    assert store.cancel(job_id, "user") is True
    assert store.is_cancelled(job_id) is True
    assert store.progress(job_id, "w1", 50) == "cancelled"
    assert redis.hget(f"job:{job_id}:progress", "progress") is None
    assert store.complete(job_id, "w1", {"x": 1}) == "cancelled"
    stored = redis.hgetall(f"job:{job_id}")
    assert stored["status"] == "failed" and stored["error"] == "Job cancelled by user"
    assert redis.hexists("jobs:completed", job_id) == 0
    assert redis.hlen("jobs:active:w1") == 0 and redis.zscore("jobs:leases", job_id) is None
    assert store.fail(job_id, "w1", "stopped", retryable=True).outcome == "cancelled"
    assert redis.hget(f"job:{job_id}", "error") == "Job cancelled by user"


def test_cancel_of_a_finished_or_unknown_job_does_nothing(store, redis):
    job_id = store.submit("sim", {})
    store.claim(CAPS)
    store.complete(job_id, "w1", {})
    assert store.cancel(job_id, "late") is False
    assert redis.hget(f"job:{job_id}", "status") == "completed"
    assert store.cancel("nope", "x") is False


def test_expired_lease_is_reaped_with_retry_count_kept(store, redis):
    sub = redis.pubsub(ignore_subscribe_messages=True)
    sub.subscribe("job_requeued")
    failed = redis.pubsub(ignore_subscribe_messages=True)
    failed.subscribe("job_failed")
    job_id = store.submit("sim", {}, max_retries=5)
    store.claim(CAPS)
    store.fail(job_id, "w1", "once", retryable=True)
    store.claim(CAPS)
    store.start(job_id, "w1")
    # w1 "dies": no heartbeat. The reaper re-queues the job once the lease runs out.
    assert until(lambda: store.reap_expired_leases(), what="lease expiry") == [job_id]
    stored = redis.hgetall(f"job:{job_id}")
    assert stored["status"] == "pending" and stored["retry_count"] == "1" and stored["worker_id"] == ""
    assert redis.hexists("jobs:active:w1", job_id) == 0
    seen = []

    def lease_message():
        msg = sub.get_message(timeout=0.05)
        if msg:
            seen.append(json.loads(msg["data"]))
        return [m for m in seen if m["reason"] == "lease_expired"]
    [msg] = until(lease_message, what="job_requeued message for the expired lease")
    assert msg["job_id"] == job_id and msg["worker_id"] == "w1" and msg["service_required"] == "sim"
    assert [m["reason"] for m in seen] == ["retry", "lease_expired"]
    sub.close()
    # The contract's channel hears it too, as it hears a retry: the attempt ended, the job waits again.
    announced = []

    def failed_messages():
        msg = failed.get_message(timeout=0.05)
        if msg:
            announced.append(json.loads(msg["data"]))
        return len(announced) == 2 and announced
    retry, lost = until(failed_messages, what="job_failed for the retry and for the reaped job")
    assert retry["error"] == "once" and retry["retry_count"] == 1
    assert {k: lost[k] for k in ("job_id", "worker_id", "status", "can_retry", "retry_count", "error")} == {
        "job_id": job_id, "worker_id": "w1", "status": "pending", "can_retry": True, "retry_count": 1,
        "error": "worker lost: lease expired"}
    assert lost["failed_at"].endswith("Z") and isinstance(lost["timestamp"], int)
    failed.close()
    # The dead worker learns it lost the job; another worker runs it.
    assert store.claim(CAPS2).id == job_id
    assert store.complete(job_id, "w1", {}) == "lost"
    assert redis.hget(f"job:{job_id}", "worker_id") == "w2"
    assert redis.zscore("jobs:leases", job_id) is not None  # w2's lease untouched by w1
    assert store.complete(job_id, "w2", {}) == "ok"


def _worker_status_messages(redis):
    """A subscription to worker_status and a poller returning every message seen so far."""
    sub = redis.pubsub(ignore_subscribe_messages=True)
    sub.subscribe("worker_status")
    seen = []

    def poll():
        while msg := sub.get_message(timeout=0.05):
            seen.append(json.loads(msg["data"]))
        return seen
    return sub, poll


def test_a_job_cancelled_under_a_worker_that_then_died_leaves_its_active_jobs(store, redis):
    # The API's cancel fails the job in its hash and leaves the worker's bookkeeping to the worker; a worker
    # that died meanwhile never clears it. The reaper, finding the lease expired on a job no longer running,
    # removes the entry (it is not re-queued: cancelled stays cancelled). Mutation audit M1.
    job_id = store.submit("sim", {})
    store.claim(CAPS, start=True)
    assert store.cancel(job_id, "user")
    redis.zadd("jobs:leases", {job_id: 0})  # w1 died: its lease ran out
    assert store.reap_expired_leases(confirm_s=0) == []
    assert not redis.hexists("jobs:active:w1", job_id)
    assert redis.hget(f"job:{job_id}", "status") == "failed" and redis.zscore("jobs:pending", job_id) is None


def test_reaping_a_worker_whose_heartbeat_key_is_gone_sets_it_offline(store, redis):
    sub, seen = _worker_status_messages(redis)
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {})
    store.claim(CAPS)
    store.start(job_id, "w1")
    assert redis.hget("worker:w1", "status") == "busy"
    redis.delete("worker:w1:heartbeat")  # its machine died a minute ago: the 60 s key lapsed, no beat since
    assert until(lambda: store.reap_expired_leases(), what="lease expiry") == [job_id]
    stored = redis.hgetall("worker:w1")
    assert stored["status"] == "offline" and stored["current_job_id"] == ""
    until(lambda: any(m["new_status"] == "offline" for m in seen()), what="worker_status offline")
    assert [(m["old_status"], m["new_status"]) for m in seen()][-1] == ("busy", "offline")
    assert not [m for m in seen() if m["new_status"] == "idle" and m["old_status"] == "busy"]
    assert redis.hexists("jobs:reaped_workers", "w1") == 0
    sub.close()


OFFLINE_TTL_S = 86400  # lib.lua's: a worker hash left offline goes after a day


def test_a_worker_hash_left_offline_expires_unless_the_worker_comes_back(store, redis):
    """A worker gone for good (removed from its manifest, its machine's id changed, the machine destroyed)
    stayed in Redis as worker:{id}, offline, for ever, where whatever lists worker:* found it."""
    store.register_worker("w1", "m1", CAPS)
    assert redis.ttl("worker:w1") == -1
    store.set_worker_status("w1", "offline")  # a clean exit
    assert 0 < redis.ttl("worker:w1") <= OFFLINE_TTL_S
    store.register_worker("w1", "m1", CAPS)  # the same worker back (a restart, the next boot)
    assert redis.ttl("worker:w1") == -1


def test_a_worker_the_reaper_set_offline_expires_unless_it_beats_or_claims_again(store, redis):
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {})
    store.claim(CAPS)
    redis.delete("worker:w1:heartbeat")  # dead: its key lapsed
    assert until(lambda: store.reap_expired_leases(), what="lease expiry") == [job_id]
    assert redis.hget("worker:w1", "status") == "offline" and 0 < redis.ttl("worker:w1") <= OFFLINE_TTL_S
    store.heartbeat("w1")  # alive after all (a stall past the key's 60 s)
    assert redis.hget("worker:w1", "status") == "idle" and redis.ttl("worker:w1") == -1
    redis.hset("worker:w1", "status", "offline")  # set offline again meanwhile, and then it claims
    redis.expire("worker:w1", OFFLINE_TTL_S)
    assert store.claim(CAPS).id == job_id
    assert redis.hget("worker:w1", "status") == "busy" and redis.ttl("worker:w1") == -1


def test_reaped_worker_with_a_live_heartbeat_key_is_idle_until_the_key_lapses(store, redis):
    """A 0.3 s lease runs out long before the 60 s heartbeat key: reaped as idle (it may be alive, its loop
    stalled), then offline once the key lapsed unrenewed; a worker that beats again stays idle."""
    sub, seen = _worker_status_messages(redis)
    caps3 = {**CAPS, "worker_id": "w3", "machine_id": "m1"}
    store.register_worker("w1", "m1", CAPS)
    store.register_worker("w3", "m1", caps3)
    a, b = store.submit("sim", {}), store.submit("sim", {})
    store.claim(CAPS)
    store.claim(caps3)
    reaped = []  # the two leases end a moment apart: one reap may take one of them, the next the other
    until(lambda: reaped.extend(store.reap_expired_leases(limit=10)) or len(reaped) == 2, what="lease expiry")
    assert sorted(reaped) == sorted([a, b])
    assert redis.hget("worker:w1", "status") == "idle" and redis.hget("worker:w3", "status") == "idle"
    assert store.reap_expired_leases() == [] and redis.hget("worker:w1", "status") == "idle"  # key still there
    redis.pexpire("worker:w1:heartbeat", 50)  # w1 is dead: its key lapses
    until(lambda: not redis.exists("worker:w1:heartbeat"), what="w1's heartbeat key lapsing")
    store.heartbeat("w3")  # w3 was only stalled: it beats again
    assert store.reap_expired_leases() == []
    assert redis.hgetall("worker:w1")["status"] == "offline" and redis.hget("worker:w1", "current_job_id") == ""
    assert redis.hget("worker:w3", "status") == "idle"
    until(lambda: [(m["worker_id"], m["old_status"], m["new_status"]) for m in seen()
                   if m["new_status"] == "offline"] == [("w1", "idle", "offline")], what="worker_status offline")
    assert redis.hlen("jobs:reaped_workers") == 0  # both settled: nothing left to watch
    sub.close()


def test_a_worker_that_died_idle_is_set_offline_once_its_heartbeat_key_lapsed(store, redis):
    """No lease to reap: the worker was killed while idle (or its whole machine went). It used to stay "idle"
    in worker:{id} for good, counted as capacity by the monitor."""
    sub, seen = _worker_status_messages(redis)
    store.register_worker("w1", "m1", CAPS)
    store.register_worker("w3", "m1", {**CAPS, "worker_id": "w3"})
    store.heartbeat("w3")
    # As if 60 s had passed without a beat from w1: its key lapsed, its noted expiry is past.
    redis.delete("worker:w1:heartbeat")
    redis.zadd("jobs:worker_beats", {"w1": 0})
    assert store.reap_expired_leases() == []
    assert redis.hget("worker:w1", "status") == "offline" and redis.hget("worker:w3", "status") == "idle"
    until(lambda: [(m["worker_id"], m["old_status"], m["new_status"]) for m in seen()
                   if m["new_status"] == "offline"] == [("w1", "idle", "offline")], what="worker_status offline")
    # Alive after all (a partition, a stall past the key's 60 s): its next beat makes it idle again.
    store.heartbeat("w1")
    assert redis.hget("worker:w1", "status") == "idle"
    until(lambda: [(m["worker_id"], m["new_status"]) for m in seen()][-1:] == [("w1", "idle")],
          what="worker_status idle again")
    # A worker that registers again (supervisord restarted it) is idle and watched again; a clean exit is not.
    store.register_worker("w1", "m1", CAPS)
    assert redis.hget("worker:w1", "status") == "idle" and redis.zscore("jobs:worker_beats", "w1") is not None
    store.set_worker_status("w3", "offline")
    assert redis.zscore("jobs:worker_beats", "w3") is None
    sub.close()


def test_heartbeat_renews_the_lease(store, redis):
    job_id = store.submit("sim", {})
    store.register_worker("w1", "m1", CAPS)
    store.claim(CAPS)
    first = redis.zscore("jobs:leases", job_id)
    end = time.monotonic() + 1.0  # > 3 leases
    while time.monotonic() < end:
        assert store.heartbeat("w1").renewed == [job_id]
        assert store.reap_expired_leases() == []
        time.sleep(0.05)
    assert redis.zscore("jobs:leases", job_id) > first
    assert redis.hget(f"job:{job_id}", "status") == "assigned"


def test_heartbeat_reports_cancelled_and_lost_jobs(store, redis):
    cancelled = store.submit("sim", {}, priority=90)
    lost = store.submit("sim", {}, priority=10)
    store.claim(CAPS)
    store.claim(CAPS)
    store.cancel(cancelled, "user")
    redis.hset(f"job:{lost}", mapping={"worker_id": "someone-else"})
    result = store.heartbeat("w1")
    assert (result.renewed, result.cancelled, result.lost) == ([], [cancelled], [lost])
    assert redis.hlen("jobs:active:w1") == 0


def test_concurrent_reapers_requeue_each_job_exactly_once(redis, redis_url):
    import redis as redis_lib
    store = JobStore(redis, lease_s=0.2)
    ids = [store.submit("sim", {}) for _ in range(40)]
    for i in range(40):
        store.claim({**CAPS, "worker_id": f"w{i}"})
    until(lambda: redis.zcount("jobs:leases", "-inf", int(time.time() * 1000) - 50) == 40, what="leases expire")
    results: list[list[str]] = []
    barrier = threading.Barrier(4)

    def reap():
        client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
        reaper = JobStore(client)
        barrier.wait()
        got = []
        while batch := reaper.reap_expired_leases(limit=3, confirm_s=0):  # at first sight
            got.extend(batch)
        results.append(got)
        client.close()

    threads = [threading.Thread(target=reap) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    reaped = [job for got in results for job in got]
    assert sorted(reaped) == sorted(ids)  # each once, none lost
    assert redis.zcard("jobs:pending") == 40 and redis.zcard("jobs:leases") == 0


def test_stuck_jobs_lists_expired_leases_and_dead_workers(store, redis):
    store.register_worker("w1", "m1", CAPS)
    store.register_worker("w2", "m2", CAPS2)
    a = store.submit("sim", {}, priority=90)
    b = store.submit("sim", {}, priority=10)
    store.claim(CAPS)
    store.claim(CAPS2)
    assert store.stuck_jobs() == []
    redis.delete("worker:w2:heartbeat")  # w2 stopped heartbeating
    stuck = store.stuck_jobs()
    assert [(s.job_id, s.worker_id, s.heartbeat_alive) for s in stuck] == [(b, "w2", False)]
    until(lambda: len(store.stuck_jobs()) == 2, what="w1's lease expiring")
    by_id = {s.job_id: s for s in store.stuck_jobs()}
    assert by_id[a].lease_expired and by_id[a].heartbeat_alive and by_id[a].status == "assigned"


def test_timeline_records_each_step(redis):
    store = JobStore(redis, avoid_reclaim_s=0)
    job_id = store.submit("sim", {})
    store.claim(CAPS)
    store.start(job_id, "w1")
    store.fail(job_id, "w1", "flaky", retryable=True)
    store.claim(CAPS2)
    store.hand_back(job_id, "w2", "drain")
    store.claim(CAPS2)
    store.start(job_id, "w2")
    store.progress(job_id, "w2", 50, "half")
    store.complete(job_id, "w2", {"ok": True})
    timeline = store.timeline(job_id)
    assert [e["ev"] for e in timeline.events] == [
        "submitted", "claimed", "started", "failed", "claimed", "handed_back", "claimed", "started", "completed"]
    failed = timeline.events[3]
    assert failed["error"] == "flaky" and failed["can_retry"] is True and failed["retry_count"] == 1
    assert timeline.events[4]["worker_id"] == "w2" and timeline.events[4]["machine_id"] == "m2"
    times = [e["t"] for e in timeline.events]
    assert times == sorted(times)
    assert timeline.job["status"] == "completed" and timeline.progress["progress"] == "50"
    assert 0 < redis.ttl(f"job:{job_id}:events") <= 7 * 86400


def test_operations_on_a_missing_job_say_so(store):
    assert store.start("nope", "w1") == "missing"
    assert store.progress("nope", "w1", 10) == "missing"
    assert store.complete("nope", "w1", {}) == "missing"
    assert store.hand_back("nope", "w1") == "missing"
    assert store.fail("nope", "w1", "x", retryable=True).outcome == "missing"


def test_text_holding_a_lone_surrogate_is_written_with_a_replacement_character(store, redis):
    # A service's message cut inside an emoji ("\ud83d" alone: valid JSON, not UTF-8-encodable) passed on as a
    # progress message or an error: the client's encoder raised, so a progress update failed a job that would
    # have succeeded, and a failure could not be written at all (handed back and run again for ever).
    cut = "CUDA out of memory \ud83d"
    job_id = store.submit("sim", {}, max_retries=0)
    store.claim(CAPS, start=True)
    assert store.progress(job_id, "w1", 50, f"step 1 {cut}", estimated_completion=cut) == "ok"
    assert redis.hget(f"job:{job_id}:progress", "message") == "step 1 CUDA out of memory \ufffd"
    outcome = store.fail(job_id, "w1", cut, retryable=False)
    assert outcome.outcome == "failed"
    assert redis.hget(f"job:{job_id}", "error") == "CUDA out of memory \ufffd"
    other = store.submit("sim", {})
    store.claim(CAPS, start=True)
    assert store.hand_back(other, "w1", f"drain {cut}") == "ok"
    assert store.claim(CAPS, start=True).id == other
    assert store.complete(other, "w1", {"ok": True}, cut) == "ok"


def test_a_job_with_an_empty_id_is_claimed_as_a_job_not_read_as_none(store, redis):
    # The claim's reply said "none" by an empty id: a producer's job with id '' was taken out of jobs:pending
    # and marked running, then read as no job (its JSON as the wait): handed back and claimed again for ever.
    from emp_machine.runtime.jobs import contract_fields, submission_score

    redis.hset("job:", mapping=contract_fields("", "sim", {}))
    redis.zadd("jobs:pending", {"": submission_score(50, int(time.time() * 1000))})
    job = store.claim(CAPS, start=True)
    assert job is not None and job.id == "" and job.service_required == "sim"
    assert store.claim(CAPS) is None  # nothing else queued: none, as before

"""Sizes the claim's index must stay cheap at (real Redis, FCALL and EVALSHA): many requirement classes (one per
customer with customer_isolation, or one per distinct requirements JSON), many workers' memos, and a job retried
thousands of times (its timeline). See docs/jobs.md's index section."""

from __future__ import annotations

import datetime as dt
import json
import random
import time

import pytest

from emp_machine.runtime import queries
from emp_machine.runtime.jobs import JobStore, contract_fields, submission_score

MODES = pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
BASE_MS = 1_700_000_000_000


def caps(worker_id="w1", **extra):
    return {"worker_id": worker_id, "machine_id": "m1", "services": ["sim"], **extra}


def store_of(redis, functions):
    # No sweep steps: what a claim costs is the claim script alone.
    return JobStore(redis, functions=functions, sweep_interval_s=3600, busy_sweep_interval_s=3600)


def iso(ms):
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def api_write(redis, jobs):
    """Jobs as the EMP API writes them (job hash + jobs:pending only): [(id, priority, created ms, fields)]."""
    pipe = redis.pipeline(transaction=False)
    for n, (job_id, priority, ms, extra) in enumerate(jobs):
        pipe.hset(f"job:{job_id}", mapping=contract_fields(job_id, "sim", {}, priority=priority,
                                                          created_at=iso(ms), **extra))
        pipe.zadd("jobs:pending", {job_id: submission_score(priority, ms)})
        if n % 2000 == 1999:
            pipe.execute()
    pipe.execute()


def commands(redis):
    """Redis commands run so far (the scripts' inner calls included), less the FCALL/EVALSHA calls."""
    stats = redis.info("commandstats")
    return sum(v["calls"] for k, v in stats.items()
               if k not in ("cmdstat_fcall", "cmdstat_evalsha", "cmdstat_info", "cmdstat_config|resetstat"))


def claim_retrying(store, worker, tries=50):
    """Claim as the worker does: again at once while the claim says a job may be claimable within ms."""
    for _ in range(tries):
        job = store.claim(worker)
        if job is not None or store.claimable_in_s is None or store.claimable_in_s > 0.05:
            return job
    return None


@MODES
def test_a_claims_cost_does_not_grow_with_the_number_of_classes(redis, functions):
    # 5,000 customers with isolation: 5,000 classes. The claim used to match every class (HKEYS) and read the
    # head of each matching queue: ~5,000 Redis calls per claim.
    n = 5000
    api_write(redis, [(f"j{i}", 50, BASE_MS + i, {"requirements": {"customer_isolation": "loose"},
                                                  "customer_id": f"cust{i}"}) for i in range(n)])
    store = store_of(redis, functions)
    store.reconcile()
    assert store.claim(caps()).id == "j0"  # the oldest: loads the library, matches the first classes
    for expected in ("j1", "j2", "j3"):
        before = commands(redis)
        job = store.claim(caps())
        used = commands(redis) - before
        assert job.id == expected
        assert used < 40, f"one claim ran {used} Redis commands with {n} classes"


@MODES
def test_claims_across_many_classes_come_in_priority_then_age_order(redis, functions):
    rng = random.Random(7)
    jobs, n = [], 600
    for i in range(n):  # 200 classes (distinct requirements), random priorities and ages, several per class
        jobs.append((f"j{i}", rng.choice((10, 50, 90)), BASE_MS + rng.randrange(1_000_000),
                     {"requirements": {"tag": f"c{i % 200}"}}))
    api_write(redis, jobs)
    store = store_of(redis, functions)
    store.reconcile()
    worker = caps(tag=[f"c{k}" for k in range(200)])
    expected = [j[0] for j in sorted(jobs, key=lambda j: (-j[1], j[2]))]
    got = []
    for _ in range(n):
        job = store.claim(worker)
        got.append(job.id)
        if len(got) % 3 == 0:  # a job of another class arrives now and then, through our own submit
            store.submit("sim", {}, job_id=f"late{len(got)}", priority=5, requirements={"tag": "c3"})
    assert got == expected
    assert {store.claim(worker).id for _ in range(n // 3)} == {f"late{k}" for k in range(3, n + 1, 3)}
    assert store.claim(worker) is None
    assert redis.zcard("jobs:idx:heads:sim") == 0 and redis.hlen("jobs:idx:classes:sim") == 0


@MODES
def test_a_matching_job_behind_thousands_of_unmet_classes_is_found_at_bounded_cost(redis, functions):
    # 5,000 classes of higher priority that this worker cannot run (GPU memory it lacks), one lower one it can.
    # The claim used to match all 5,000 every time, and past 4,096 answers its memo was emptied whole: every
    # claim read and matched thousands of classes again.
    api_write(redis, [(f"big{i}", 90, BASE_MS + i, {"requirements": {"hardware": {"gpu_memory_gb": 100 + i}}})
                      for i in range(5000)])
    api_write(redis, [("mine", 10, BASE_MS, {})])
    store = store_of(redis, functions)
    store.reconcile()
    worker = caps(hardware={"gpu_memory_gb": 8})
    store.claim(worker)  # the library's first sight of this worker
    job = claim_retrying(store, worker)
    if not functions:
        # Under EVAL nothing survives a call: a claim looks at the 2,000 best classes only (docs/jobs.md).
        assert job is None
        return
    assert job is not None and job.id == "mine"  # claims went on where the one before stopped
    store.submit("sim", {}, job_id="mine2", priority=10)
    before = commands(redis)
    assert claim_retrying(store, worker).id == "mine2"
    assert commands(redis) - before < 300  # three claims: heads read in chunks, the classes' answers kept


@MODES
def test_an_index_from_the_previous_version_without_heads_still_serves_every_job(redis, functions):
    api_write(redis, [(f"j{i}", 50 + i % 3, BASE_MS + i, {"requirements": {"tag": f"c{i % 40}"}})
                      for i in range(120)])
    store = store_of(redis, functions)
    store.reconcile()
    redis.delete("jobs:idx:heads:sim")  # as the previous version left it
    worker = caps(tag=[f"c{k}" for k in range(40)])
    got = [claim_retrying(store, worker).id for _ in range(120)]
    assert sorted(got) == sorted(f"j{i}" for i in range(120))
    assert got[:40] == [f"j{i}" for i in range(120) if i % 3 == 2][:40]  # once listed, priority order again
    assert store.claim(worker) is None


@MODES
def test_stale_heads_left_by_an_older_version_are_corrected_or_found(redis, functions):
    store = store_of(redis, functions)
    for i, tag in enumerate(("a", "b", "c")):
        store.submit("sim", {}, job_id=f"{tag}1", priority=50 - i, requirements={"tag": tag})
    worker = caps(tag=["a", "b", "c", "d"])
    heads = "jobs:idx:heads:sim"
    cls = {m: redis.hget("jobs:idx:of", f"{m}1").split("\n")[1] for m in "abc"}
    # an older version's claim took b1's head and left its bound: corrected when read
    redis.zadd(heads, {cls["b"]: redis.zscore(heads, cls["b"]) + 10**9})
    # an older version's submit (index_add without heads): class d, best priority, unlisted in heads
    store.submit("sim", {}, job_id="d1", priority=99, requirements={"tag": "d"})
    cls["d"] = redis.hget("jobs:idx:of", "d1").split("\n")[1]
    redis.zrem(heads, cls["d"])
    # an older version's index_remove: class gone, its head still listed
    redis.zadd(heads, {"f" * 40: 10**15})
    got = [claim_retrying(store, worker).id for _ in range(4)]
    assert sorted(got) == ["a1", "b1", "c1", "d1"]
    # the listed ones in priority order (d1 is found when the claim compares the counts: at once under EVAL,
    # within a second, or at once by a claim that finds nothing, under FCALL)
    assert [j for j in got if j != "d1"] == ["a1", "b1", "c1"]
    assert claim_retrying(store, worker) is None
    assert redis.zcard(heads) == 0 and redis.hlen("jobs:idx:classes:sim") == 0


def test_the_claim_memo_is_bounded_for_the_whole_library(redis):
    # 200 workers (each worker id its own capability set) x 2,000 classes none of them meets: the memo held
    # 1,024 sets x 4,096 answers (p9 of the size audit: 300 x 4,000 took 84 MB of Lua memory).
    api_write(redis, [(f"j{i}", 50, BASE_MS + i, {"requirements": {"hardware": {"gpu_memory_gb": 100 + i}}})
                      for i in range(2000)])
    store = store_of(redis, True)
    store.reconcile()
    redis.function_flush()  # a fresh library: only this test's memo
    store.claim(caps("w-first"))
    assert store.uses_functions
    base = redis.info("memory")["used_memory_vm_functions"]
    for w in range(200):
        assert store.claim(caps(f"worker-{w:04d}")) is None
    grown = redis.info("memory")["used_memory_vm_functions"] - base
    assert grown < 10 * 2**20, f"the memo grew by {grown / 2**20:.1f} MB"


@MODES
def test_a_timeline_is_bounded_with_a_marker_saying_how_many_events_were_dropped(redis, functions):
    store = JobStore(redis, functions=functions, avoid_reclaim_s=0, sweep_interval_s=3600,
                     busy_sweep_interval_s=3600)
    store.submit("sim", {}, job_id="x", max_retries=10_000)
    cycles = 400  # claimed + failed per cycle, after submitted: 801 events
    for k in range(cycles):
        job = store.claim(caps(f"w{k % 2}"))
        assert job.id == "x"
        assert store.fail("x", f"w{k % 2}", "boom", retryable=True).outcome == "retried"
    events = [json.loads(e) for e in redis.lrange("job:x:events", 0, -1)]
    assert len(events) <= 500 + 100 + 2
    assert events[0]["ev"] == "submitted"
    assert events[1]["ev"] == "events_dropped"
    assert events[1]["dropped"] + len(events) - 1 == 1 + 2 * cycles  # every event but the marker is one
    assert [e["ev"] for e in events[-2:]] == ["claimed", "failed"]
    assert redis.ttl("job:x:events") > 0
    view = queries.timeline(store, "x")  # the marker renders as any other step
    assert [s["event"] for s in view["steps"]][:2] == ["submitted", "events_dropped"]
    assert "dropped=" in view["steps"][1]["detail"]


def unmet_classes(redis, n=2500, priority=90):
    """n classes of better jobs a worker with 8 GB cannot run (one GPU size each), ahead of anything lower."""
    api_write(redis, [(f"big{i}", priority, BASE_MS + i, {"requirements": {"hardware": {"gpu_memory_gb": 100 + i}}})
                      for i in range(n)])


def capped_claim(store, worker):
    """A claim that stops at the 2,000 heads cap finding nothing (it remembers where, under FCALL)."""
    assert store.claim(worker) is None


def test_a_claim_after_a_capped_one_takes_a_better_job_submitted_into_an_earlier_class(redis):
    # The claim that went on where a capped one stopped looked only past it: a better job queued meanwhile
    # into a class ranked before (here a new one, ranked first) was passed for a worse one further on.
    unmet_classes(redis)
    api_write(redis, [("low", 10, BASE_MS, {})])
    store = store_of(redis, True)
    store.reconcile()
    worker = caps(hardware={"gpu_memory_gb": 8}, tag=["x"])
    capped_claim(store, worker)
    store.submit("sim", {}, job_id="urgent", priority=95, requirements={"tag": "x"})
    assert store.claim(worker).id == "urgent"
    assert claim_retrying(store, worker).id == "low"


def test_a_claim_after_a_capped_one_sees_a_job_queued_below_an_early_class_bound(redis):
    # A matching class ranked early whose only job the worker passes over (another workflow's): a job of the
    # worker's workflow queued into it leaves jobs:idx:heads as it was (bound unchanged, no new class).
    store = store_of(redis, True)
    store.submit("sim", {}, job_id="other-wf", priority=99, requirements={"tag": "x"}, workflow_id="wf2")
    unmet_classes(redis)
    api_write(redis, [("low", 10, BASE_MS, {"workflow_id": "wf1"})])
    store.reconcile()
    worker = caps(hardware={"gpu_memory_gb": 8}, tag=["x"], workflow_id="wf1")
    capped_claim(store, worker)
    heads = redis.zrevrange("jobs:idx:heads:sim", 0, -1, withscores=True)
    store.submit("sim", {}, job_id="mine", priority=95, requirements={"tag": "x"}, workflow_id="wf1")
    assert redis.zrevrange("jobs:idx:heads:sim", 0, -1, withscores=True) == heads
    assert store.claim(worker).id == "mine"


def test_a_claim_after_a_capped_one_goes_on_from_the_class_it_stopped_at_when_classes_before_left(redis):
    # Classes before the cap left meanwhile (another worker took their jobs): the ranks moved up, and going
    # on at the saved rank passed over the classes that moved before it.
    unmet_classes(redis)
    api_write(redis, [("next", 90, BASE_MS + 2010, {"requirements": {"tag": "x"}}), ("low", 10, BASE_MS, {})])
    store = store_of(redis, True)
    store.reconcile()
    worker = caps(hardware={"gpu_memory_gb": 8}, tag=["x"])
    capped_claim(store, worker)
    big = caps("w-big", hardware={"gpu_memory_gb": 100_000})
    for i in range(100):
        assert store.claim(big).id == f"big{i}"
    assert redis.zcard("jobs:idx:heads:sim") < 2500  # emptied classes left the heads
    assert claim_retrying(store, worker).id == "next"


def test_a_class_listed_in_heads_but_not_in_classes_is_never_taken_for_no_requirements(redis):
    # An older version's removal (classes and queue, not heads) left a class in heads alone; meets() read it
    # as having no requirements and the library's memo kept that answer: the class's later jobs went to any
    # worker, customer isolation broken (the fuzzer's seed 8).
    store = JobStore(redis, reconcile_min_interval_s=0, index_check_interval_s=0, sweep_interval_s=0)
    outsider = {"worker_id": "wcpu", "machine_id": "m", "services": ["b"]}  # no customer_access at all
    strict = {"customer_isolation": "strict"}
    assert store.claim(outsider) is None
    store.submit("b", {}, job_id="X", requirements=strict, customer_id="c2")
    _, cls, tag = redis.hget("jobs:idx:of", "X").split("\n")
    redis.hdel("jobs:idx:of", "X")  # an older version's index_remove: no heads update
    redis.zrem(f"jobs:idx:queue:b:{cls}", f"{tag}|X")
    redis.hdel("jobs:idx:classes:b", cls)
    redis.delete("job:X")  # and the API deleted the job
    assert store.claim(outsider) is None
    store.submit("b", {}, job_id="Y", requirements=strict, customer_id="c2")
    assert store.claim(outsider) is None  # Y is customer c2's, isolated
    allowed = {"isolation": "strict", "allowed_customers": ["c2"]}
    assert store.claim({**outsider, "worker_id": "w2", "customer_access": allowed}).id == "Y"


def test_a_job_the_api_writes_again_is_not_held_back_by_the_old_attempts_retry_delay(redis):
    # While a job waited out a retry delay in jobs:idx:delayed, the API wrote its id again as a new job (no
    # retry_at): the '@<due>' entry still counted as current, so the new job waited up to the old due time.
    store = JobStore(redis, reconcile_min_interval_s=0, index_check_interval_s=0, sweep_interval_s=0)
    w1 = {"worker_id": "w1", "machine_id": "m", "services": ["a"]}
    store.submit("a", {}, job_id="X")
    job = store.claim(w1)
    store.fail("X", "w1", "429", retryable=True, token=job.token, retry_delay_s=120)
    assert redis.hget("jobs:idx:of", "X").startswith("@")
    now = int(time.time() * 1000)
    redis.delete("job:X")
    redis.hset("job:X", mapping=contract_fields("X", "a", {}, priority=50, created_at=iso(now)))
    redis.zadd("jobs:pending", {"X": submission_score(50, now)})
    got = store.claim({**w1, "worker_id": "w2"}, hints=["X"])
    assert got is not None and got.id == "X"


def test_a_first_claim_that_stops_at_the_heads_cap_says_to_claim_again(redis):
    # Under FCALL a capped claim remembers where it stopped and says "again in 1 ms"; a capability set new to
    # the library (a worker's first claim) said nothing, and its worker slept until its 5 s fallback sweep.
    unmet_classes(redis)
    api_write(redis, [("low", 10, BASE_MS, {})])
    store = store_of(redis, True)
    store.reconcile()
    capped_claim(store, caps("fresh", hardware={"gpu_memory_gb": 8}))
    assert store.claimable_in_s is not None and store.claimable_in_s <= 0.01


def test_jobs_of_other_types_do_not_keep_a_capped_claim_from_going_on(redis):
    # The resume point was checked against one counter for every job type: with jobs of any other type queued
    # between claims, each claim started over at the best, stopped at the cap again and said "again in 1 ms"
    # (1.3 ms of Redis time each): the worker never reached its job, and busy-looped.
    unmet_classes(redis)
    api_write(redis, [("low", 10, BASE_MS, {})])
    store = store_of(redis, True)
    store.reconcile()
    other = JobStore(redis, sweep_interval_s=3600, busy_sweep_interval_s=3600)
    worker = caps(hardware={"gpu_memory_gb": 8})
    for n in range(5):
        job = store.claim(worker)
        if job is not None:
            break
        other.submit("othertype", {}, job_id=f"o{n}")
    assert job is not None and job.id == "low"


def test_a_capped_claim_restarted_by_jobs_of_its_own_type_waits_longer_before_the_next(redis):
    # A steady stream of jobs of its own type restarts every capped claim (a better job may be among them);
    # the hint to claim again is then 100 ms, not 1 ms, so an idle worker does not busy-loop over the cap.
    unmet_classes(redis)
    store = store_of(redis, True)
    store.reconcile()
    worker = caps(hardware={"gpu_memory_gb": 8})
    capped_claim(store, worker)
    assert store.claimable_in_s <= 0.01
    api_write(redis, [("big-more", 90, BASE_MS + 9999, {"requirements": {"hardware": {"gpu_memory_gb": 999}}})])
    store.reconcile()
    capped_claim(store, worker)
    assert 0.05 <= store.claimable_in_s <= 0.2


@MODES
def test_a_queue_whose_class_entry_was_lost_is_matched_again_from_its_jobs(redis, functions):
    # A class unknown to jobs:idx:classes is not met (never "no requirements"); with jobs waiting in its queue,
    # nothing gave the entry back and they waited for ever. The claim writes it again from the head job.
    store = JobStore(redis, functions=functions, reconcile_min_interval_s=0, index_check_interval_s=0,
                     sweep_interval_s=0)
    store.submit("b", {}, job_id="X", requirements={"hardware": {"gpu_memory_gb": 24}})
    _, cls, _ = redis.hget("jobs:idx:of", "X").split("\n")
    redis.hdel("jobs:idx:classes:b", cls)  # the class entry lost, X still in its queue
    small = {"worker_id": "w0", "machine_id": "m", "services": ["b"], "hardware": {"gpu_memory_gb": 8}}
    assert store.claim(small) is None  # the entry comes back with X's own requirements: still not for 8 GB
    assert redis.hexists("jobs:idx:classes:b", cls)
    big = {"worker_id": "w1", "machine_id": "m", "services": ["b"], "hardware": {"gpu_memory_gb": 80}}
    assert claim_retrying(store, big).id == "X"

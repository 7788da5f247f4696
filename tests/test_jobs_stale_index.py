"""A job id the EMP API writes again (HSET job:{id} + ZADD jobs:pending + PUBLISH job_submitted) with another
job type, requirements or customer, while this claim had no hint of it (another machine's worker, a worker
restarting, a claim racing the message): its index entry is stale. The claim never runs a job from a stale
entry; it indexes the job again where its hash says. Our own submit of an id again drops the earlier job's
retry bookkeeping. Real Redis, both ways of calling the scripts (FCALL and EVALSHA)."""

from __future__ import annotations

import time

import pytest

from emp_machine.runtime.jobs import JobStore, contract_fields, submission_score

MODES = pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])


def caps(worker_id="w1", services=("sim",), **extra):
    return {"worker_id": worker_id, "machine_id": "m1", "services": list(services), **extra}


def store_of(redis, functions):
    # No sweep steps, so only the claim script itself can notice a stale entry.
    return JobStore(redis, functions=functions, sweep_interval_s=3600, busy_sweep_interval_s=3600)


def api_rewrite_unheard(redis, job_id, service="sim", priority=50, requirements=None, customer_id=""):
    """The API writing an id again; nobody hears its job_submitted (no subscriber, no hint passed on)."""
    score = redis.zscore("jobs:pending", job_id)
    redis.hset(f"job:{job_id}", mapping=contract_fields(job_id, service, {}, priority=priority,
                                                         requirements=requirements, customer_id=customer_id))
    redis.zadd("jobs:pending", {job_id: score if score is not None
                                else submission_score(priority, int(time.time() * 1000))})


def indexed_type(redis, job_id):
    return (redis.hget("jobs:idx:of", job_id) or "").split("\n")[0]


@MODES
def test_a_job_written_again_with_another_type_is_not_claimed_by_the_old_type(redis, functions):
    store = store_of(redis, functions)
    for i in range(3):
        store.submit("sim", {}, job_id=f"job-{i}")
        api_rewrite_unheard(redis, f"job-{i}", service=f"user-chosen-{i}")
    assert store.claim(caps()) is None  # a simulation-only worker gets none of them
    assert all(redis.hget(f"job:job-{i}", "status") == "pending" for i in range(3))
    assert [indexed_type(redis, f"job-{i}") for i in range(3)] == ["user-chosen-0", "user-chosen-1", "user-chosen-2"]
    assert redis.zcard("jobs:idx:queue:sim:0") == 0
    job = store.claim(caps("w2", services=("user-chosen-1",)))  # a worker of the new type gets it
    assert job.id == "job-1" and job.service_required == "user-chosen-1"


@MODES
def test_a_job_whose_requirements_changed_is_not_claimed_by_a_worker_that_no_longer_meets_them(redis, functions):
    store = store_of(redis, functions)
    store.submit("sim", {}, job_id="y")
    api_rewrite_unheard(redis, "y", requirements={"hardware": {"gpu_memory_gb": 80}})  # needs 80 GB now
    assert store.claim(caps(hardware={"gpu_memory_gb": 8})) is None
    assert redis.hget("job:y", "status") == "pending"
    assert store.claim(caps("w2", hardware={"gpu_memory_gb": 80})).id == "y"


@MODES
def test_a_job_moved_to_another_customer_under_isolation_is_not_claimed_for_the_old_one(redis, functions):
    # The same requirements text, another customer: the class differs only by the customer it isolates.
    store = store_of(redis, functions)
    req = {"customer_isolation": "loose"}
    store.submit("sim", {}, job_id="c", requirements=req, customer_id="acme")
    api_rewrite_unheard(redis, "c", requirements=req, customer_id="globex")
    only_acme = caps(customer_access={"allowed_customers": ["acme"]})
    assert store.claim(only_acme) is None
    assert store.claim(caps("w2", customer_access={"allowed_customers": ["globex"]})).id == "c"


@MODES
def test_a_rewrite_that_keeps_the_class_leaves_the_entry_alone(redis, functions):
    # No isolation asked: another customer (or a new payload) is the same class, so the job stays where it is
    # queued and is claimed from there.
    store = store_of(redis, functions)
    req = {"hardware": {"gpu_memory_gb": 8}}
    store.submit("sim", {}, job_id="k", requirements=req, customer_id="acme")
    entry = redis.hget("jobs:idx:of", "k")
    api_rewrite_unheard(redis, "k", requirements=req, customer_id="globex")
    seq = redis.get("jobs:idx:seq")
    assert store.claim(caps(hardware={"gpu_memory_gb": 8})).id == "k"
    assert redis.get("jobs:idx:seq") == seq and entry.startswith("sim\n")  # never indexed again


@MODES
def test_stale_entries_read_mid_queue_leave_the_order_of_the_other_jobs_unchanged(redis, functions):
    # Jobs held back (their retry not due) keep the cursor reading further into the queue, so the stale
    # entries are dropped from inside a buffer read ahead: the walk must still reach every job, in order.
    store = store_of(redis, functions)
    far = int(time.time() * 1000) + 3_600_000
    order = ["held-0", "held-1", "stale-0", "held-2", "stale-1", "g0", "stale-2", "g1", "g2", "held-3", "g3"]
    for n, job_id in enumerate(order):
        store.submit("sim", {}, job_id=job_id, priority=100 - n)
        if job_id.startswith("held"):
            redis.hset(f"job:{job_id}", "retry_at", far)
    for i in range(3):
        api_rewrite_unheard(redis, f"stale-{i}", service="img", priority=100 - order.index(f"stale-{i}"))
    assert [store.claim(caps()).id for _ in range(4)] == ["g0", "g1", "g2", "g3"]
    assert store.claim(caps()) is None
    assert [redis.hget(f"job:stale-{i}", "status") for i in range(3)] == ["pending"] * 3
    assert [store.claim(caps("w2", services=("img",))).id for _ in range(3)] == ["stale-0", "stale-1", "stale-2"]
    assert sorted(redis.hkeys("jobs:idx:of")) == ["held-0", "held-1", "held-2", "held-3"]


@MODES
def test_a_leftover_stale_entry_beside_the_jobs_current_one_is_only_removed(redis, functions):
    # The job was indexed again under its new type already (an announcement another worker heard); an entry
    # left in the old queue is removed, and the current one kept as it is.
    store = store_of(redis, functions)
    store.submit("sim", {}, job_id="a", priority=60)
    store.submit("sim", {}, job_id="x", priority=70)
    store.submit("sim", {}, job_id="b", priority=50)
    (member, score), = [(m, s) for m, s in redis.zrange("jobs:idx:queue:sim:0", 0, -1, withscores=True)
                        if m.endswith("|x")]
    api_rewrite_unheard(redis, "x", service="img", priority=70)
    assert store_of(redis, functions).claim(caps("w9", services=("none",)), hints=["x"]) is None  # heard it
    redis.zadd("jobs:idx:queue:sim:0", {member: score})  # the leftover
    current = redis.hget("jobs:idx:of", "x")
    assert current.startswith("img\n")
    assert [store.claim(caps()).id for _ in range(2)] == ["a", "b"]
    assert redis.zcard("jobs:idx:queue:sim:0") == 0 and redis.hget("jobs:idx:of", "x") == current
    assert store.claim(caps("w2", services=("img",))).id == "x"


@MODES
def test_our_resubmit_drops_the_earlier_jobs_retry_bookkeeping(redis, functions):
    store = store_of(redis, functions)
    job_id = store.submit("sim", {}, job_id="r")
    job = store.claim(caps())
    assert store.fail(job_id, "w1", "busy", retryable=True, token=job.token, retry_delay_s=600).outcome == "retried"
    held = redis.hmget(f"job:{job_id}", "retry_at", "last_failed_worker", "failed_at", "failed_token")
    assert all(held)  # fail.lua's bookkeeping for the earlier job
    assert store.claim(caps()) is None
    store.submit("sim", {"again": True}, job_id=job_id)  # the same id, a new job
    assert redis.hmget(f"job:{job_id}", "retry_at", "last_failed_worker", "failed_at", "failed_token") == [None] * 4
    again = store.claim(caps())  # neither held back nor left to other workers
    assert again is not None and again.id == job_id
    assert store.fail(job_id, "w1", "late", retryable=True, token=job.token).outcome != "retried"  # the old attempt

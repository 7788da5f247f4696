"""Claim order and matching rules, including jobs written by the EMP API alone (real server)."""

from __future__ import annotations

import json
import time

import pytest

from emp_machine.runtime.jobs import JobStore, contract_fields, submission_score


def caps(worker_id="w1", services=("sim",), **extra):
    return {"worker_id": worker_id, "machine_id": "m1", "services": list(services), **extra}


def api_submit(redis, job_id, service="sim", priority=50, created_ms=None, **options):
    """What the TypeScript API does: job hash + jobs:pending, nothing of ours."""
    created_ms = created_ms or int(time.time() * 1000)
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created_ms / 1000)) + f".{created_ms % 1000:03d}Z"
    fields = contract_fields(job_id, service, {}, priority=priority, created_at=iso, **options)
    redis.hset(f"job:{job_id}", mapping=fields)
    redis.zadd("jobs:pending", {job_id: submission_score(priority, created_ms)})
    redis.publish("job_submitted", json.dumps({"job_id": job_id, "service_required": service}))


@pytest.fixture(params=[True, False], ids=["fcall", "evalsha"])
def store(redis, request):
    """Every claim rule holds both as a function library (the default) and as EVALSHA scripts."""
    return JobStore(redis, reconcile_min_interval_s=0, functions=request.param)


def claim_all(store, worker):
    out = []
    while (job := store.claim(worker)) is not None:
        out.append(job.id)
    return out


def test_highest_priority_first_then_oldest(store):
    # Order within one priority is by created_at (ms); ids are chosen so that id order would disagree.
    low = store.submit("sim", {}, job_id="low", priority=10)
    first = store.submit("sim", {}, job_id="z-first", priority=50, created_at="2026-01-01T00:00:00.001Z")
    second = store.submit("sim", {}, job_id="a-second", priority=50, created_at="2026-01-01T00:00:00.002Z")
    high = store.submit("sim", {}, job_id="high", priority=90)
    wf = store.submit("sim", {}, job_id="wf", priority=1, workflow_priority=95)
    assert claim_all(store, caps()) == [wf, high, first, second, low]


def test_fifo_within_one_priority_even_within_one_second(store):
    # The contract score cannot tell these apart (same second): the index orders them by ms.
    base = 1_700_000_000_000
    ids = [store.submit("sim", {}, job_id=f"j{9 - i}", workflow_priority=50, workflow_datetime_ms=base + i * 3)
           for i in range(6)]
    assert claim_all(store, caps()) == ids


def test_jobs_of_one_millisecond_and_workflow_steps_go_in_queue_order(store):
    # Equal index scores: the same created_at ms, and a workflow's steps sharing workflow_datetime. Ids
    # are chosen so that id order (the sorted set's own tie-break) would disagree with queue order.
    same_ms = "2026-01-01T00:00:00.001Z"
    ids = [store.submit("sim", {}, job_id=f"j{9 - i}", created_at=same_ms) for i in range(4)]
    steps = [store.submit("sim", {}, job_id=f"step-{9 - i}", priority=1, workflow_id="wf", workflow_priority=60,
                          workflow_datetime_ms=1_700_000_000_000, current_step=i + 1, total_steps=4)
             for i in range(4)]
    assert claim_all(store, caps()) == steps + ids


def test_jobs_indexed_before_members_carried_a_tag_are_still_claimed(store, redis):
    # An index written by the previous version: bare ids in the class queue, "<type>\n<class>" in jobs:idx:of.
    for job_id, created in (("old-1", 1_700_000_000_000), ("old-2", 1_700_000_000_500)):
        redis.hset(f"job:{job_id}", mapping=contract_fields(job_id, "sim", {}, workflow_datetime_ms=created))
        redis.zadd("jobs:pending", {job_id: submission_score(50, created)})
        redis.zadd("jobs:idx:queue:sim:0", {job_id: 50 * 2**42 - created})
        redis.hset("jobs:idx:of", job_id, "sim\n0")
    redis.hset("jobs:idx:classes:sim", "0", '["",""]')
    redis.zrem("jobs:pending", "old-2")  # removed under us: the claim must drop it from the old index too
    new = store.submit("sim", {}, job_id="new", workflow_datetime_ms=1_700_000_001_000)
    assert claim_all(store, caps()) == ["old-1", new]
    assert redis.zcard("jobs:idx:queue:sim:0") == 0 and redis.hlen("jobs:idx:of") == 0


def test_api_submitted_jobs_are_claimed_in_order_with_ours(store, redis):
    now = int(time.time() * 1000)
    api_submit(redis, "api-old", created_ms=now - 60_000)
    store.submit("sim", {}, job_id="ours")
    api_submit(redis, "api-high", priority=70, created_ms=now)
    # No hints: the claim notices jobs:pending holds jobs the index lacks and reconciles.
    assert claim_all(store, caps()) == ["api-high", "api-old", "ours"]
    assert redis.zcard("jobs:pending") == 0 and redis.hlen("jobs:idx:of") == 0


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_unindexed_jobs_are_looked_for_once_per_interval_and_whenever_a_claim_finds_nothing(redis, functions):
    store = JobStore(redis, reconcile_min_interval_s=0, index_check_interval_s=3600, functions=functions)
    store.submit("sim", {}, job_id="ours-1", priority=10)
    store.submit("sim", {}, job_id="ours-2", priority=10)
    assert store.claim(caps()).id == "ours-1"  # the store's first claim looks first: nothing unindexed yet
    api_submit(redis, "api-high", priority=90)  # and no worker heard its job_submitted
    assert store.claim(caps()).id == "ours-2"  # within the interval the claim does not look first
    assert store.claim(caps()).id == "api-high"  # finding nothing indexed, it looks, reconciles, claims
    assert store.claim(caps()) is None and redis.zcard("jobs:pending") == 0


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_with_no_interval_every_claim_looks_first_so_priority_order_is_exact(redis, functions):
    store = JobStore(redis, reconcile_min_interval_s=0, index_check_interval_s=0, functions=functions)
    store.submit("sim", {}, job_id="ours-1", priority=10)
    store.submit("sim", {}, job_id="ours-2", priority=10)
    assert store.claim(caps()).id == "ours-1"
    api_submit(redis, "api-high", priority=90)
    assert claim_all(store, caps()) == ["api-high", "ours-2"]


def test_hints_index_api_jobs_in_the_claim_round_trip(redis):
    store = JobStore(redis, reconcile_min_interval_s=3600)  # rule out the reconcile path
    store.reconcile()
    api_submit(redis, "api-1")
    assert store.claim(caps(), hints=["api-1", "no-such-job"]).id == "api-1"


@pytest.mark.parametrize("kind", ["other type", "unmet requirements"])
def test_matching_job_behind_5000_non_matching_is_claimed(store, redis, kind):
    pipe = redis.pipeline(transaction=False)
    for i in range(5000):
        if kind == "other type":
            fields = contract_fields(f"x{i}", "other", {}, priority=90)
        else:
            fields = contract_fields(f"x{i}", "sim", {}, priority=90, requirements={"hardware": {"gpu_memory_gb": 80}})
        pipe.hset(f"job:x{i}", mapping=fields)
        pipe.zadd("jobs:pending", {f"x{i}": submission_score(90, int(time.time() * 1000))})
    pipe.execute()
    store.reconcile()
    store.submit("sim", {}, job_id="target", priority=1)
    started = time.perf_counter()
    assert store.claim(caps(hardware={"gpu_memory_gb": 24})).id == "target"
    assert time.perf_counter() - started < 0.5
    assert redis.zcard("jobs:pending") == 5000


def test_job_types_from_services_or_job_service_required_map(store):
    store.submit("a", {}, job_id="ja")
    store.submit("b", {}, job_id="jb")
    store.submit("c", {}, job_id="jc")
    assert store.claim(caps(services=["x"])) is None
    assert store.claim(caps(services=[], job_service_required_map=["b"])).id == "jb"
    mapped = caps(services=[], job_service_required_map=[{"job_service_required": "c", "worker_service": "c1"}])
    assert store.claim(mapped).id == "jc"
    assert store.claim(caps(services=["a"])).id == "ja"


def test_workflow_restricted_worker_takes_only_its_workflow(store):
    store.submit("sim", {}, job_id="free", priority=90)
    store.submit("sim", {}, job_id="other", priority=80, workflow_id="wf-2")
    store.submit("sim", {}, job_id="mine", priority=10, workflow_id="wf-1")
    assert store.claim(caps(workflow_id="wf-1")).id == "mine"
    assert store.claim(caps(workflow_id="wf-1")) is None
    assert store.claim(caps()).id == "free"


WORKER = {
    "hardware": {"gpu_memory_gb": 24, "ram_gb": 64, "cpu_cores": 8, "gpu_model": "RTX 4090"},
    "models": {"sim": ["sdxl", "flux"]},
    "customer_access": {"isolation": "strict", "allowed_customers": ["acme"], "denied_customers": ["evil"]},
    "region": "eu", "features": ["fp8", "lora"], "version": 3, "extras": {"vae": "fast"},
}

RULES = [
    ("no requirements", "", "", True),
    ("gpu memory fits", {"hardware": {"gpu_memory_gb": 24}}, "", True),
    ("gpu memory too small", {"hardware": {"gpu_memory_gb": 48}}, "", False),
    ("ram too small", {"hardware": {"ram_gb": 128}}, "", False),
    ("cpu fits", {"hardware": {"cpu_cores": 4, "ram_gb": "all"}}, "", True),
    ("cpu too few", {"hardware": {"cpu_cores": 16}}, "", False),
    ("strict isolation, allowed customer", {"customer_isolation": "strict"}, "acme", True),
    ("strict isolation, customer not allowed", {"customer_isolation": "strict"}, "other", False),
    ("strict isolation, denied customer", {"customer_isolation": "strict"}, "evil", False),
    ("models available", {"models": ["sdxl"]}, "", True),
    ("model missing", {"models": ["sdxl", "sd3"]}, "", False),
    ("models by service, available", {"models": {"sim": ["sdxl", "flux"]}}, "", True),
    ("models by service, one missing", {"models": {"sim": ["sdxl", "sd3"]}}, "", False),
    ("models by service, another service's entry is not this job's", {"models": {"sim": ["flux"],
                                                                                "other": ["sd3"]}}, "", True),
    ("models by service, no entry for this service", {"models": {"other": ["sd3"]}}, "", True),
    ("models by service, one name", {"models": {"sim": "flux"}}, "", True),
    ("models by service, unreadable entry", {"models": {"sim": 5}}, "", False),
    ("models as one name", {"models": "flux"}, "", True),
    ("models as one missing name", {"models": "sd3"}, "", False),
    ("models all", {"models": "all"}, "", True),
    ("models unreadable", {"models": 5}, "", False),
    ("array contains all", {"features": ["fp8", "lora"]}, "", True),
    ("array lacks one", {"features": ["fp8", "int4"]}, "", False),
    ("membership", {"features": "lora"}, "", True),
    ("number at least", {"version": 2}, "", True),
    ("number too low", {"version": 4}, "", False),
    ("equality", {"region": "eu"}, "", True),
    ("inequality", {"region": "us"}, "", False),
    ("nested object", {"extras": {"vae": "fast"}}, "", True),
    ("unknown capability", {"quantum": True}, "", False),
    ("positive_requirements form", {"positive_requirements": {"region": "eu"}}, "", True),
    ("positive_requirements form fails", {"positive_requirements": {"region": "us"}}, "", False),
    ("negative hardware hit", {"negative_requirements": {"hardware": {"gpu_model": "RTX 4090"}}}, "", False),
    ("negative hardware miss", {"negative_requirements": {"hardware": {"gpu_model": "A100"}}}, "", True),
    ("negative capability hit", {"negative_requirements": {"region": "eu"}}, "", False),
    ("negative with positive", {"positive_requirements": {"region": "eu"},
                                "negative_requirements": {"features": "int4"}}, "", True),
    ("malformed JSON counts as none", "{not json", "", True),
    ("non-object JSON counts as none", "[1,2]", "", True),
    # valid JSON deeper than cjson decodes (the API's JSON.parse takes it) is not "none": that switched off
    # strict isolation and the GPU need; it matches no worker
    ("deep JSON with strict isolation", '{"customer_isolation":"strict","meta":' + "[" * 1001 + "]" * 1001 + "}",
     "other", False),
    ("deep JSON with a GPU need", '{"hardware":{"gpu_memory_gb":80},"meta":' + "[" * 1001 + "]" * 1001 + "}",
     "", False),
    ("deep JSON within cjson's depth", '{"negative_requirements":{"meta":' + "[" * 900 + "]" * 900 + "}}", "",
     True),
    # "no preference", as JS clients send it: met (each kept the job pending for ever)
    ("null capability", {"region": None}, "", True),
    ("empty list capability", {"features": []}, "", True),
    ("empty list of an unknown capability", {"quantum": []}, "", True),
    ("false of a capability the worker lacks", {"debug": False}, "", True),
    ("null in a nested object", {"extras": {"vae": None}}, "", True),
    ("null in an object the worker lacks", {"tuning": {"level": None}}, "", True),
    ("a value in an object the worker lacks", {"tuning": {"level": 2}}, "", False),
    ("negative null rejects nobody", {"negative_requirements": {"region": None, "features": []}}, "", True),
    # NaN (cjson reads it; JSON.stringify never writes it) matched every worker: unmet
    ("NaN gpu memory", '{"hardware":{"gpu_memory_gb":NaN}}', "", False),
]


@pytest.mark.parametrize("requirements,customer,expected", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_matching_rules(store, requirements, customer, expected):
    store.submit("sim", {}, job_id="job", requirements=requirements, customer_id=customer)
    job = store.claim(caps(**WORKER))
    assert (job is not None) is expected


# A worker without a GPU publishes no gpu_memory_gb (nor a model): a requirement of 0 or less asks for none.
GPULESS = [
    ("zero gpu memory", {"hardware": {"gpu_memory_gb": 0}}, True),
    ("zero gpu memory as text", {"hardware": {"gpu_memory_gb": "0"}}, True),
    ("negative gpu memory", {"hardware": {"gpu_memory_gb": -1}}, True),
    ("zero of an unpublished amount", {"hardware": {"vram_slots": 0.0}}, True),
    ("some gpu memory", {"hardware": {"gpu_memory_gb": 0.5}}, False),
    ("a gpu model", {"hardware": {"gpu_model": "RTX 4090"}}, False),
    ("cores it has", {"hardware": {"cpu_cores": 2, "gpu_memory_gb": 0}}, True),
    ("more cores than it has", {"hardware": {"cpu_cores": 3, "gpu_memory_gb": 0}}, False),
]


@pytest.mark.parametrize("requirements,expected", [r[1:] for r in GPULESS], ids=[r[0] for r in GPULESS])
def test_a_missing_hardware_amount_counts_as_zero(store, requirements, expected):
    store.submit("sim", {}, job_id="job", requirements=requirements)
    job = store.claim(caps(hardware={"cpu_cores": 2, "ram_gb": 4.0}))
    assert (job is not None) is expected


def test_a_worker_without_hardware_takes_a_job_needing_no_gpu(store):
    store.submit("sim", {}, job_id="job", requirements={"hardware": {"gpu_memory_gb": 0}})
    assert store.claim(caps()).id == "job"


def test_strict_isolation_needs_a_strict_worker(store):
    store.submit("sim", {}, job_id="job", requirements={"customer_isolation": "strict"}, customer_id="acme")
    assert store.claim(caps(customer_access={"isolation": "loose"})) is None
    assert store.claim(caps(customer_access={"isolation": "strict", "allowed_customers": ["acme"]})).id == "job"


ISOLATION = [
    ("strict worker, customer allowed", {"isolation": "strict", "allowed_customers": ["acme"]}, True),
    ("strict worker without an allow list", {"isolation": "strict"}, False),
    ("strict worker, empty allow list", {"isolation": "strict", "allowed_customers": []}, False),
    ("strict worker, another customer allowed", {"isolation": "strict", "allowed_customers": ["other"]}, False),
    ("strict worker, customer allowed and denied", {"isolation": "strict", "allowed_customers": ["acme"],
                                                    "denied_customers": ["acme"]}, False),
    ("loose worker, customer allowed", {"isolation": "loose", "allowed_customers": ["acme"]}, False),
    ("worker without customer_access", None, False),
]


@pytest.mark.parametrize("access,expected", [r[1:] for r in ISOLATION], ids=[r[0] for r in ISOLATION])
def test_strict_isolation_rules(store, access, expected):
    # Contract: strict needs a strict worker, the customer in its allow list and not in its deny list.
    store.submit("sim", {}, job_id="job", requirements={"customer_isolation": "strict"}, customer_id="acme")
    worker = caps() if access is None else caps(customer_access=access)
    assert (store.claim(worker) is not None) is expected


def test_isolation_classes_are_per_customer(store):
    # Same requirements, different customers: one worker may serve one customer and not the other.
    store.submit("sim", {}, job_id="evil-job", priority=90, requirements={"customer_isolation": "strict"},
                 customer_id="evil")
    store.submit("sim", {}, job_id="acme-job", priority=10, requirements={"customer_isolation": "strict"},
                 customer_id="acme")
    assert claim_all(store, caps(**WORKER)) == ["acme-job"]


def test_job_with_missing_hash_is_removed_from_the_queue(store, redis):
    store.submit("sim", {}, job_id="gone", priority=90)
    store.submit("sim", {}, job_id="ok", priority=10)
    redis.delete("job:gone")
    assert store.claim(caps()).id == "ok"
    assert redis.zscore("jobs:pending", "gone") is None and redis.hexists("jobs:idx:of", "gone") == 0


def test_api_job_with_missing_hash_is_removed_by_adoption(store, redis):
    redis.zadd("jobs:pending", {"ghost": 1})
    assert store.claim(caps()) is None
    assert redis.zcard("jobs:pending") == 0


@pytest.mark.parametrize("status,noted", [("PENDING", True), ("queued", True), ("Pending ", True),
                                          ("failed", True), ("assigned", False), ("in_progress", False)])
def test_a_queued_job_whose_status_is_not_pending_leaves_the_queue_with_a_timeline_event(store, redis, status,
                                                                                          noted):
    """A producer's own word ('PENDING', 'queued') left without a trace; a live job's status (another claimer
    of a mixed fleet took it) is not the timeline's news."""
    api_submit(redis, "odd")
    redis.hset("job:odd", "status", status)
    api_submit(redis, "fine")
    assert claim_all(store, caps()) == ["fine"]
    assert redis.zscore("jobs:pending", "odd") is None
    events = [{k: json.loads(e).get(k) for k in ("ev", "status")} for e in redis.lrange("job:odd:events", 0, -1)]
    assert ({"ev": "dropped", "status": status} in events) is noted, events


def test_requirements_too_deep_to_decode_leave_an_event_saying_no_worker_matches(store, redis):
    deep = '{"customer_isolation":"strict","meta":' + "[" * 1001 + "]" * 1001 + "}"
    store.submit("sim", {}, job_id="deep", requirements=deep)
    assert store.claim(caps(**WORKER)) is None
    events = [json.loads(e) for e in redis.lrange("job:deep:events", 0, -1)]
    assert any(e.get("ev") == "unmatchable" and "nested deeper" in e.get("reason", "") for e in events), events


def test_cancelled_pending_job_is_never_claimed(store, redis):
    store.submit("sim", {}, job_id="cancelled", priority=90)
    store.submit("sim", {}, job_id="live", priority=10)
    assert store.cancel("cancelled", "user asked") is True
    assert redis.zscore("jobs:pending", "cancelled") is not None  # the API leaves it queued
    assert claim_all(store, caps()) == ["live"]
    assert redis.zscore("jobs:pending", "cancelled") is None
    assert redis.hget("job:cancelled", "status") == "failed"


def test_worker_does_not_reclaim_a_job_it_just_failed_while_others_can(redis):
    store = JobStore(redis, avoid_reclaim_s=30)
    store.submit("sim", {}, job_id="flaky")
    store.claim(caps("w1"))
    store.fail("flaky", "w1", "transient", retryable=True)
    assert store.claim(caps("w1")) is None
    assert store.claim(caps("w2")).id == "flaky"


def test_failed_job_comes_back_to_the_same_worker_after_the_avoid_window(redis):
    store = JobStore(redis, avoid_reclaim_s=0.2)
    store.submit("sim", {}, job_id="flaky")
    store.claim(caps("w1"))
    store.fail("flaky", "w1", "transient", retryable=True)
    assert store.claim(caps("w1")) is None
    deadline = time.monotonic() + 5
    job = None
    while job is None and time.monotonic() < deadline:
        job = store.claim(caps("w1"))
    assert job is not None and job.id == "flaky"


def test_index_entry_of_a_job_removed_by_someone_else_is_dropped(store, redis):
    store.submit("sim", {}, job_id="removed", priority=90)
    store.submit("sim", {}, job_id="kept", priority=10)
    redis.zrem("jobs:pending", "removed")
    assert store.claim(caps()).id == "kept"
    assert redis.hexists("jobs:idx:of", "removed") == 0


def test_reconcile_adopts_and_prunes(store, redis):
    api_submit(redis, "api-1")
    store.submit("sim", {}, job_id="stale")
    redis.zrem("jobs:pending", "stale")
    redis.zadd("jobs:pending", {"ghost": 5})
    report = store.reconcile()
    assert (report.adopted, report.removed_missing, report.pruned) == (1, 1, 1)
    assert redis.hlen("jobs:idx:of") == redis.zcard("jobs:pending") == 1


def test_reconcile_adopts_the_job_right_behind_a_chunk_of_vanished_ids(store, redis):
    # A whole chunk of queued ids whose hashes are gone: removed, they shift the ranks after them, and the
    # next chunk must start where the first API job now is (mutation audit M12: counting them in skipped it).
    redis.zadd("jobs:pending", {f"gone-{i}": i for i in range(500)})
    api_submit(redis, "api-behind")
    redis.zadd("jobs:pending", {"api-behind": 10_000})
    report = store.reconcile()
    assert (report.adopted, report.removed_missing) == (1, 500), report
    assert redis.hexists("jobs:idx:of", "api-behind")


def test_capabilities_need_a_worker_id(store):
    with pytest.raises(ValueError, match="worker_id"):
        store.claim({"services": ["sim"]})

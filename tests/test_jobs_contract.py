"""The job contract's wire shape, field by field (../shared/emp-redis-contract.md), on a real server."""

from __future__ import annotations

import calendar
import json
import re
import time

import pytest

from emp_machine.runtime.jobs import JobStore, submission_score

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CONTRACT_JOB_FIELDS = {
    "id", "service_required", "priority", "payload", "requirements", "customer_id", "created_at", "status",
    "retry_count", "max_retries", "workflow_id", "workflow_priority", "workflow_datetime", "current_step",
    "total_steps", "job_trace_id", "job_span_id", "workflow_trace_id", "workflow_span_id", "ctx",
}
CAPS = {"worker_id": "w1", "machine_id": "m1", "services": ["sim"]}


class Listener:
    """A real subscription that collects JSON messages; `wait_for` polls it against a deadline."""

    def __init__(self, redis, *channels):
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(*channels)
        self.messages: list[tuple[str, dict]] = []

    def wait_for(self, channel: str, count: int = 1, deadline_s: float = 5.0) -> list[dict]:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            got = [m for c, m in self.messages if c == channel]
            if len(got) >= count:
                return got
            msg = self.pubsub.get_message(timeout=0.05)
            if msg and msg["type"] == "message":
                self.messages.append((msg["channel"], json.loads(msg["data"])))
        raise AssertionError(f"{count} message(s) on {channel} not received; got {self.messages}")

    def close(self):
        self.pubsub.close()


@pytest.fixture
def store(redis):
    return JobStore(redis)


@pytest.fixture
def listen(redis):
    made = []

    def make(*channels):
        made.append(Listener(redis, *channels))
        return made[-1]
    yield make
    for item in made:
        item.close()


def test_submit_writes_every_contract_field_as_the_api_does(store, redis, listen):
    sub = listen("job_submitted")
    trace = {"job_trace_id": "a" * 32, "job_span_id": "b" * 16, "workflow_trace_id": "temp-trace-id",
             "workflow_span_id": ""}
    job_id = store.submit("sim", {"steps": 2}, priority=70, requirements={"hardware": {"gpu_memory_gb": 8}},
                          customer_id="c1", max_retries=5, workflow_id="wf1", workflow_priority=80,
                          workflow_datetime_ms=1_700_000_000_123, current_step=1, total_steps=3, trace=trace,
                          ctx={"k": "v"})
    job = redis.hgetall(f"job:{job_id}")
    assert set(job) == CONTRACT_JOB_FIELDS
    assert job["id"] == job_id and job["service_required"] == "sim" and job["priority"] == "70"
    assert json.loads(job["payload"]) == {"steps": 2}
    assert json.loads(job["requirements"]) == {"hardware": {"gpu_memory_gb": 8}}
    assert job["customer_id"] == "c1" and job["status"] == "pending"
    assert job["retry_count"] == "0" and job["max_retries"] == "5"
    assert job["workflow_id"] == "wf1" and job["workflow_priority"] == "80"
    assert job["workflow_datetime"] == "1700000000123"
    assert job["current_step"] == "1" and job["total_steps"] == "3"
    assert job["job_trace_id"] == "a" * 32 and job["workflow_trace_id"] == "temp-trace-id"
    assert json.loads(job["ctx"]) == {"k": "v"}
    assert ISO.match(job["created_at"])
    # P and T come from the workflow fields when present.
    assert redis.zscore("jobs:pending", job_id) == submission_score(80, 1_700_000_000_123)
    # ... which is the contract's P x 10^15 - floor(T_ms / 1000), written out independently of our code (the
    # EMP API scores its own submissions so: a formula changed in both jobs.py and lib.lua must still fail here)
    assert redis.zscore("jobs:pending", job_id) == float(80 * 10**15 - 1_700_000_000)
    [msg] = sub.wait_for("job_submitted")
    assert msg["job_id"] == job_id and msg["service_required"] == "sim" and msg["priority"] == 70


def test_submit_defaults_are_empty_strings_and_score_uses_created_at(store, redis):
    job_id = store.submit("sim", {})
    job = redis.hgetall(f"job:{job_id}")
    for name in ("requirements", "customer_id", "workflow_id", "workflow_priority", "workflow_datetime",
                 "current_step", "total_steps", "job_trace_id", "job_span_id"):
        assert job[name] == "", name
    assert job["priority"] == "50" and job["max_retries"] == "3"
    created = calendar.timegm(time.strptime(job["created_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    created_ms = int(created * 1000) + int(job["created_at"][20:23])
    assert redis.zscore("jobs:pending", job_id) == submission_score(50, created_ms)
    assert redis.zscore("jobs:pending", job_id) == float(50 * 10**15 - created_ms // 1000)


def test_claim_transitions_and_messages(store, redis, listen):
    sub = listen("job_claimed", "update_job_progress", "worker_status")
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {})
    job = store.claim(CAPS)
    assert job.id == job_id
    assert redis.zscore("jobs:pending", job_id) is None
    stored = redis.hgetall(f"job:{job_id}")
    assert stored["status"] == "assigned" and stored["worker_id"] == "w1" and ISO.match(stored["assigned_at"])
    active = json.loads(redis.hget("jobs:active:w1", job_id))
    assert active["id"] == job_id and active["status"] == "assigned"
    worker = redis.hgetall("worker:w1")
    assert worker["status"] == "busy" and worker["current_job_id"] == job_id
    assert ISO.match(worker["last_status_change"])
    [claimed] = sub.wait_for("job_claimed")
    assert claimed == {"job_id": job_id, "worker_id": "w1", "status": "claimed", "message": "Job claimed by worker",
                       "claimed_at": stored["assigned_at"], "timestamp": claimed["timestamp"],
                       "service_required": "sim", "customer_id": "", "workflow_id": "", "current_step": "",
                       "total_steps": ""}
    assert isinstance(claimed["timestamp"], int) and claimed["timestamp"] > 1_600_000_000_000
    [progress] = sub.wait_for("update_job_progress")
    assert progress["job_id"] == job_id and progress["worker_id"] == "w1" and progress["progress"] == 0
    assert isinstance(progress["timestamp"], int) and progress["timestamp"] > 1_600_000_000_000
    statuses = sub.wait_for("worker_status", 2)
    assert statuses[-1] == {"worker_id": "w1", "old_status": "idle", "new_status": "busy",
                            "current_job_id": job_id, "timestamp": statuses[-1]["timestamp"]}


def test_job_claimed_leaves_out_what_a_sparse_job_hash_lacks(store, redis, listen):
    # A producer that writes fewer fields than the contract (no workflow or step fields): the message has
    # no keys for them rather than nulls or empty strings.
    sub = listen("job_claimed")
    redis.hset("job:sparse", mapping={"id": "sparse", "service_required": "sim", "priority": "50",
                                      "payload": "{}", "status": "pending", "created_at": "2026-01-01T00:00:00.000Z",
                                      "customer_id": 'c"1'})
    redis.zadd("jobs:pending", {"sparse": submission_score(50, 1_767_225_600_000)})
    store.reconcile()
    assert store.claim(CAPS).id == "sparse"
    [claimed] = sub.wait_for("job_claimed")
    assert set(claimed) == {"job_id", "worker_id", "status", "message", "claimed_at", "timestamp",
                            "service_required", "customer_id"}
    assert claimed["customer_id"] == 'c"1' and claimed["service_required"] == "sim"


@pytest.mark.parametrize("step, total, want_step, want_total", [
    ("2", "3", 2, 3),                  # numbers, as update_job_progress and complete_job send them
    ("two", "3.5", "two", 3.5),        # not a number: the text as it is
    ("nan", "inf", "nan", "inf"),      # tonumber takes these, JSON cannot hold them: the text
    ("", "", "", ""),                  # absent
])
def test_job_claimed_sends_steps_by_the_same_rule_as_the_other_messages(store, redis, listen, step, total,
                                                                        want_step, want_total):
    sub = listen("job_claimed")
    job_id = store.submit("sim", {}, workflow_id="wf")
    redis.hset(f"job:{job_id}", mapping={"current_step": step, "total_steps": total})
    assert store.claim(CAPS).id == job_id
    [claimed] = sub.wait_for("job_claimed")
    assert (claimed["current_step"], claimed["total_steps"]) == (want_step, want_total)
    assert claimed["workflow_id"] == "wf" and claimed["job_id"] == job_id


def test_job_claimed_of_a_sparse_hash_sends_its_steps_as_numbers_too(store, redis, listen):
    sub = listen("job_claimed")
    redis.hset("job:sparse", mapping={"id": "sparse", "service_required": "sim", "priority": "50",
                                      "payload": "{}", "status": "pending", "created_at": "2026-01-01T00:00:00.000Z",
                                      "current_step": "4", "total_steps": "x"})
    redis.zadd("jobs:pending", {"sparse": submission_score(50, 1_767_225_600_000)})
    store.reconcile()
    assert store.claim(CAPS).id == "sparse"
    [claimed] = sub.wait_for("job_claimed")
    assert (claimed["current_step"], claimed["total_steps"]) == (4, "x")
    assert "workflow_id" not in claimed and "customer_id" not in claimed


def test_register_worker_and_heartbeat_key(store, redis):
    store.register_worker("w1", "m1", CAPS, {"sim": "active"})
    worker = redis.hgetall("worker:w1")
    assert worker["worker_id"] == "w1" and worker["machine_id"] == "m1" and worker["status"] == "idle"
    assert json.loads(worker["capabilities"]) == CAPS
    assert json.loads(worker["connector_statuses"]) == {"sim": "active"}
    assert ISO.match(worker["last_heartbeat"]) and worker["current_job_id"] == ""
    assert 55 <= redis.ttl("worker:w1:heartbeat") <= 60
    store.heartbeat("w1")
    assert 55 <= redis.ttl("worker:w1:heartbeat") <= 60
    store.set_worker_status("w1", "offline")
    assert redis.hget("worker:w1", "status") == "offline"
    assert redis.exists("worker:w1:heartbeat") == 0


def test_progress_writes_hash_and_message(store, redis, listen):
    sub = listen("update_job_progress")
    job_id = store.submit("sim", {})
    store.claim(CAPS)
    assert store.start(job_id, "w1") == "ok"
    stored = redis.hgetall(f"job:{job_id}")
    assert stored["status"] == "in_progress" and ISO.match(stored["started_at"])
    assert store.progress(job_id, "w1", 42.5, "working", current_step=2, total_steps=4,
                          estimated_completion="2030-01-01T00:00:00.000Z") == "ok"
    hash_ = redis.hgetall(f"job:{job_id}:progress")
    assert hash_["progress"] == "42.5" and hash_["status"] == "in_progress" and hash_["message"] == "working"
    assert ISO.match(hash_["updated_at"])
    msg = sub.wait_for("update_job_progress", 2)[-1]
    assert msg == {"job_id": job_id, "worker_id": "w1", "progress": 42.5, "status": "in_progress",
                   "message": "working", "current_step": 2, "total_steps": 4,
                   "estimated_completion": "2030-01-01T00:00:00.000Z", "timestamp": msg["timestamp"]}


def test_progress_message_always_lists_steps_and_estimated_completion(store, redis, listen):
    # The contract lists them in every update_job_progress: '' when unknown, never left out.
    sub = listen("update_job_progress")
    job_id = store.submit("sim", {})
    store.claim(CAPS, start=True)
    assert store.progress(job_id, "w1", 10, "warming up") == "ok"
    msg = sub.wait_for("update_job_progress", 2)[-1]
    assert msg == {"job_id": job_id, "worker_id": "w1", "progress": 10, "status": "in_progress",
                   "message": "warming up", "current_step": "", "total_steps": "", "estimated_completion": "",
                   "timestamp": msg["timestamp"]}


def test_complete_transitions_and_message(store, redis, listen):
    sub = listen("complete_job", "worker_status")
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {}, workflow_id="wf", current_step=2, total_steps=3, workflow_priority=60,
                          workflow_datetime_ms=1_700_000_000_000)
    store.claim(CAPS)
    store.start(job_id, "w1")
    redis.hset("worker:w1", "last_status_change", "2000-01-01T00:00:00.000Z")  # to see it written again
    result = {"outputs": [{"path": "/out/a.png", "mime": "image/png", "size": 10}], "empty": []}
    assert store.complete(job_id, "w1", result, "done") == "ok"
    stored = redis.hgetall(f"job:{job_id}")
    assert stored["status"] == "completed" and ISO.match(stored["completed_at"])
    assert redis.hexists("jobs:active:w1", job_id) == 0
    done = json.loads(redis.hget("jobs:completed", job_id))
    assert done == {"success": True, "data": result, "completed_at": stored["completed_at"]}
    [msg] = sub.wait_for("complete_job")
    assert msg == {"job_id": job_id, "worker_id": "w1", "progress": 100, "status": "completed",
                   "message": "done", "result": result, "timestamp": msg["timestamp"], "workflow_id": "wf",
                   "current_step": 2, "total_steps": 3, "workflow_priority": 60,
                   "workflow_datetime": 1_700_000_000_000}
    assert redis.hget("worker:w1", "status") == "idle"
    changed = redis.hget("worker:w1", "last_status_change")
    assert ISO.match(changed) and changed > "2000-01-01T00:00:00.000Z"
    idle = sub.wait_for("worker_status", 3)[-1]
    assert idle == {"worker_id": "w1", "old_status": "busy", "new_status": "idle", "current_job_id": "",
                    "timestamp": idle["timestamp"]}  # the contract's fields, current_job_id "" when idle
    assert isinstance(idle["timestamp"], int)
    assert redis.zscore("jobs:leases", job_id) is None


def test_a_worker_running_several_jobs_names_one_and_says_so_when_it_ends(store, redis, listen):
    # concurrency > 1: a second claim rewrote current_job_id without a message, and the end of the job the last
    # worker_status named left the API shown the worker busy with it while the hash named another (helper-187,
    # 3 of 3). And which remaining job the hash named after another's end was HKEYS' pick (jobs:active holds
    # JSON past listpack size: a hashtable, in no order).
    sub = listen("worker_status")
    store.register_worker("w1", "m1", CAPS)
    jobs = [store.submit("sim", {}) for _ in range(5)]
    for job_id in jobs:
        assert store.claim(CAPS, start=True).id == job_id

    def named():
        return redis.hget("worker:w1", "current_job_id")

    assert named() == jobs[0]  # the one the idle -> busy message named, as long as it runs
    for job_id in jobs[1:4]:
        assert store.complete(job_id, "w1", {}, "done") == "ok"
        assert named() == jobs[0]
    assert store.complete(jobs[0], "w1", {}, "done") == "ok"
    assert named() == jobs[4]
    assert store.complete(jobs[4], "w1", {}, "done") == "ok"
    messages = sub.wait_for("worker_status", 4)
    while messages[-1]["new_status"] != "idle":
        messages = sub.wait_for("worker_status", len(messages) + 1)
    assert [(m["old_status"], m["new_status"], m["current_job_id"]) for m in messages] == [
        ("", "idle", ""), ("idle", "busy", jobs[0]), ("busy", "busy", jobs[4]), ("busy", "idle", "")]


def test_a_result_with_nan_or_infinity_is_written_as_json_the_api_can_parse(store, redis, listen):
    # Python's json writes NaN and Infinity as bare words, which JSON.parse refuses: the API would never
    # learn the job finished. They become null, as JSON.stringify writes them.
    sub = listen("complete_job")
    job_id = store.submit("sim", {})
    store.claim(CAPS, start=True)
    result = {"score": float("nan"), "scores": [1.5, float("inf"), {"low": float("-inf")}], "n": 3}
    assert store.complete(job_id, "w1", result, "done") == "ok"
    expected = {"score": None, "scores": [1.5, None, {"low": None}], "n": 3}
    stored = redis.hget("jobs:completed", job_id)
    assert "NaN" not in stored and "Infinity" not in stored
    assert json.loads(stored)["data"] == expected
    [msg] = sub.wait_for("complete_job")
    assert msg["result"] == expected


def test_jobs_we_create_get_job_prefixed_ids(store, redis):
    job_id = store.submit("sim", {})
    assert re.fullmatch(r"job-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", job_id)
    assert redis.hget(f"job:{job_id}", "id") == job_id


def test_complete_can_record_progress_100_in_the_same_round_trip(store, redis, listen):
    sub = listen("update_job_progress", "complete_job")
    store.register_worker("w1", "m1", CAPS)
    job_id = store.submit("sim", {}, workflow_id="wf", current_step=2, total_steps=5)
    store.claim(CAPS)
    store.start(job_id, "w1")
    assert store.complete(job_id, "w1", {"x": 1}, "finished", final_progress=True) == "ok"
    progress = redis.hgetall(f"job:{job_id}:progress")
    assert (progress["progress"], progress["status"], progress["message"]) == ("100", "in_progress", "finished")
    assert ISO.match(progress["updated_at"])
    msg = sub.wait_for("update_job_progress", 2)[-1]
    # As progress.lua writes it: the steps always listed (numbers here), the estimate at 100 % is now.
    assert msg == {"job_id": job_id, "worker_id": "w1", "progress": 100, "status": "in_progress",
                   "message": "finished", "current_step": 2, "total_steps": 5,
                   "estimated_completion": progress["updated_at"], "timestamp": msg["timestamp"]}
    assert sub.wait_for("complete_job")[0]["timestamp"] >= msg["timestamp"]
    # a cancelled job records nothing, not even the progress
    other = store.submit("sim", {})
    store.claim(CAPS)
    store.cancel(other, "stop")
    assert store.complete(other, "w1", {}, "finished", final_progress=True) == "cancelled"
    assert redis.hgetall(f"job:{other}:progress") == {}


def test_retry_then_final_failure_with_can_retry_always_set(redis, listen):
    store = JobStore(redis, avoid_reclaim_s=0)
    sub = listen("job_failed")
    job_id = store.submit("sim", {}, max_retries=3, priority=40)
    score = redis.zscore("jobs:pending", job_id)
    retried_at = []
    for attempt in (1, 2):
        assert store.claim(CAPS).id == job_id
        assert store.fail(job_id, "w1", f"boom {attempt}", retryable=True).outcome == "retried"
        stored = redis.hgetall(f"job:{job_id}")
        retried_at.append(stored["failed_at"])
        assert stored["status"] == "pending" and stored["worker_id"] == "" and stored["assigned_at"] == ""
        assert stored["retry_count"] == str(attempt) and stored["last_failed_worker"] == "w1"
        assert stored["error"] == f"boom {attempt}" and ISO.match(stored["failed_at"])
        assert redis.zscore("jobs:pending", job_id) == score  # the submission formula, not a new one
        assert redis.hexists("jobs:active:w1", job_id) == 0
    assert store.claim(CAPS).id == job_id
    outcome = store.fail(job_id, "w1", "boom 3", retryable=True)
    assert (outcome.outcome, outcome.retry_count) == ("failed", 3)
    stored = redis.hgetall(f"job:{job_id}")
    assert stored["status"] == "failed" and stored["retry_count"] == "3" and stored["error"] == "boom 3"
    assert redis.zscore("jobs:pending", job_id) is None
    assert json.loads(redis.hget("jobs:failed", job_id)) == {
        "error": "boom 3", "failed_at": stored["failed_at"], "retry_count": 3}
    msgs = sub.wait_for("job_failed", 3)
    assert [m["can_retry"] for m in msgs] == [True, True, False]
    for n, (msg, failed_at) in enumerate(zip(msgs, retried_at), 1):  # a retry's message, whole
        assert msg == {"job_id": job_id, "worker_id": "w1", "status": "pending", "error": f"boom {n}",
                       "failed_at": failed_at, "retry_count": n, "can_retry": True, "timestamp": msg["timestamp"]}
    assert msgs[-1] == {"job_id": job_id, "worker_id": "w1", "status": "failed", "error": "boom 3",
                        "failed_at": stored["failed_at"], "retry_count": 3, "can_retry": False,
                        "timestamp": msgs[-1]["timestamp"]}
    assert store.claim(CAPS) is None


def test_permanent_failure_is_final_at_once(store, redis, listen):
    sub = listen("job_failed")
    job_id = store.submit("sim", {})
    store.claim(CAPS)
    assert store.fail(job_id, "w1", "bad payload", retryable=False).outcome == "failed"
    assert redis.hget(f"job:{job_id}", "status") == "failed"
    assert sub.wait_for("job_failed")[0]["can_retry"] is False


def test_final_job_failed_carries_the_workflow_fields_as_complete_job_does(store, redis, listen):
    sub = listen("job_failed", "complete_job")
    job_id = store.submit("sim", {}, workflow_id="wf-9", current_step=2, total_steps=3, workflow_priority=70,
                          workflow_datetime_ms=1_700_000_000_000)
    store.claim(CAPS, start=True)
    assert store.fail(job_id, "w1", "boom", retryable=False).outcome == "failed"
    [msg] = sub.wait_for("job_failed")
    assert msg == {"job_id": job_id, "worker_id": "w1", "status": "failed", "error": "boom",
                   "failed_at": redis.hget(f"job:{job_id}", "failed_at"), "retry_count": 1, "can_retry": False,
                   "timestamp": msg["timestamp"], "workflow_id": "wf-9", "current_step": 2, "total_steps": 3,
                   "workflow_priority": 70, "workflow_datetime": 1_700_000_000_000}
    # the same fields, typed the same way, as the job's completion would have carried them
    other = store.submit("sim", {}, workflow_id="wf-9", current_step=2, total_steps=3, workflow_priority=70,
                         workflow_datetime_ms=1_700_000_000_000)
    store.claim(CAPS, start=True)
    assert store.complete(other, "w1", {}, "done") == "ok"
    [done] = sub.wait_for("complete_job")
    names = ("workflow_id", "current_step", "total_steps", "workflow_priority", "workflow_datetime")
    assert {k: done[k] for k in names} == {k: msg[k] for k in names}
    # a text that is no number stays text, and absent fields stay out
    third = store.submit("sim", {}, current_step=1)
    redis.hset(f"job:{third}", "total_steps", "many")
    store.claim(CAPS, start=True)
    store.fail(third, "w1", "boom", retryable=False)
    last = sub.wait_for("job_failed", 2)[-1]
    assert (last["current_step"], last["total_steps"]) == (1, "many")
    assert "workflow_id" not in last and "workflow_priority" not in last and "workflow_datetime" not in last


@pytest.mark.parametrize("field, value", [
    ("requirements", {"hardware": {"gpu_memory_gb": float("nan")}}),
    ("requirements", {"min": [float("inf")]}),
    ("ctx", {"weight": float("-inf")}),
    ("ctx", {"a": {"b": float("nan")}}),
])
def test_submit_refuses_nan_in_requirements_and_ctx(store, redis, field, value):
    """Python's json writes `NaN`, which the EMP API's JSON.parse refuses: a ValueError naming the field, and
    nothing written (the CLI's submit turns such a ValueError into `job not submitted: ...`)."""
    from emp_machine.runtime.jobs import contract_fields

    with pytest.raises(ValueError, match=f"^{field} holds NaN or Infinity"):
        contract_fields("j", "sim", {}, **{field: value})
    with pytest.raises(ValueError, match=f"^{field} holds NaN or Infinity"):
        store.submit("sim", {}, **{field: value})
    assert redis.keys("job*") == [] and redis.zcard("jobs:pending") == 0


def test_a_heartbeat_moves_the_workers_entry_in_the_beats_index(store, redis):
    # jobs:worker_beats is how the reaper finds a worker killed while idle (its heartbeat key lapsed, no job to
    # reap): each beat must move the worker's entry with its key, or the entry lapses under a live worker, is
    # dropped, and the worker's later death is never seen (shown idle for good). Mutation audit M1.
    store.register_worker("w1", "m1", CAPS)
    redis.zadd("jobs:worker_beats", {"w1": 0})  # as the registration's entry stands a minute later
    store.heartbeat("w1")
    seconds, micros = redis.time()
    now_ms = seconds * 1000 + micros // 1000
    assert now_ms + 55_000 <= redis.zscore("jobs:worker_beats", "w1") <= now_ms + 60_000


def test_a_fail_retried_after_it_landed_returns_what_it_did(redis):
    # A fail whose reply was lost is sent again with the same claim token: it changes nothing and says what
    # the first did, with its count (the worker's job.retry / job.failed events carry it). Mutation audit M1.
    store = JobStore(redis, avoid_reclaim_s=0)
    job_id = store.submit("sim", {}, max_retries=2)
    job = store.claim(CAPS)
    first = store.fail(job_id, "w1", "boom", retryable=True, token=job.token)
    assert (first.outcome, first.retry_count) == ("retried", 1)
    again = store.fail(job_id, "w1", "boom", retryable=True, token=job.token)
    assert (again.outcome, again.retry_count) == ("retried", 1)
    job = store.claim(CAPS)
    final = store.fail(job_id, "w1", "boom", retryable=True, token=job.token)
    assert (final.outcome, final.retry_count) == ("failed", 2)
    again = store.fail(job_id, "w1", "boom", retryable=True, token=job.token)
    assert (again.outcome, again.retry_count) == ("failed", 2)
    assert redis.hget(f"job:{job_id}", "retry_count") == "2"


def test_cancel_and_hand_back_messages_are_the_contracts(store, redis, listen):
    # cancel_job {job_id, worker_id, reason, timestamp}; a hand-back announces the job on job_requeued, which
    # wakes idle workers (without it the job waited for their fallback sweep). Mutation audit M1.
    # A drain's hand-back is no failure: nothing on job_failed; an attempt lost with its worker process is
    # said there too, as the reaper says an expired lease (helper-188).
    sub = listen("cancel_job", "job_requeued", "job_failed")
    running, back, lost = store.submit("sim", {}), store.submit("sim", {}), store.submit("sim", {})
    assert {store.claim(CAPS).id for _ in range(3)} == {running, back, lost}
    assert store.cancel(running, "not needed")
    [cancel] = sub.wait_for("cancel_job")
    assert cancel == {"job_id": running, "worker_id": "w1", "reason": "not needed", "timestamp": cancel["timestamp"]}
    assert isinstance(cancel["timestamp"], int)
    assert store.hand_back(back, "w1", "drain") == "ok"
    [requeued] = sub.wait_for("job_requeued")
    assert requeued == {"job_id": back, "service_required": "sim", "reason": "drain",
                        "timestamp": requeued["timestamp"]}
    assert store.hand_back(lost, "w1", "not running on its worker", lost=True) == "ok"
    sub.wait_for("job_requeued", 2)
    [failed] = [m for c, m in sub.messages if c == "job_failed"]  # the lost one's alone, before its requeue
    assert failed == {"job_id": lost, "worker_id": "w1", "status": "pending",
                      "error": "attempt lost: not running on its worker", "failed_at": failed["failed_at"],
                      "retry_count": 0, "can_retry": True, "timestamp": failed["timestamp"]}
    assert ISO.match(failed["failed_at"]) and redis.hget(f"job:{lost}", "retry_count") == "0"


@pytest.mark.parametrize("end", ["never", "completed", "failed"])
def test_a_jobs_timeline_always_expires_and_its_end_renews_it(store, redis, end):
    # A job that never ends (its producer gone) must not keep its timeline for ever: it expires from the first
    # event; the end of a job gives it the full week again from then. Mutation audit M1.
    job_id = store.submit("sim", {}, max_retries=1)
    key = f"job:{job_id}:events"
    assert 7 * 86400 - 60 <= redis.ttl(key) <= 7 * 86400
    if end == "never":
        return
    redis.expire(key, 100)  # as if the job had waited almost a week
    store.claim(CAPS, start=True)
    if end == "completed":
        assert store.complete(job_id, "w1", {}) == "ok"
    else:
        assert store.fail(job_id, "w1", "boom", retryable=False).outcome == "failed"
    assert redis.ttl(key) > 7 * 86400 - 60


def test_the_cancelled_jobs_index_keeps_eight_days(store, redis):
    # Ours (the embedded Redis's clean-up reads it); on a shared Redis nothing else trims it. Mutation audit M1.
    seconds, _ = redis.time()
    redis.zadd("jobs:cancelled", {"ancient": seconds * 1000 - 9 * 86400 * 1000,
                                  "recent": seconds * 1000 - 86400 * 1000})
    job_id = store.submit("sim", {})
    assert store.cancel(job_id, "user")
    assert set(redis.zrange("jobs:cancelled", 0, -1)) == {"recent", job_id}

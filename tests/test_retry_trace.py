"""A retried job's attempts in one trace: the failed attempt's job span is written into the job hash (when its
producer gave none), and the retry is its child. Each attempt was a trace of its own, and `emp-machine job`
had no trace id to show (found by audit BY)."""

from __future__ import annotations

import json
import re

from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.queries import timeline
from harness import WorkerProcs, wait_for

CAPS = {"worker_id": "w1", "machine_id": "m1", "services": ["trsim"]}
TRACE, SPAN = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7


def test_a_failed_attempt_names_its_trace_in_the_hash_unless_the_producer_gave_one(redis):
    store = JobStore(redis, avoid_reclaim_s=0)  # (the worker that failed a job claims it again at once)
    plain = store.submit("trsim", {}, job_id="tr-plain")
    job = store.claim(CAPS, start=True)
    assert job.id == plain and job.fields["job_trace_id"] == ""
    assert store.fail(plain, "w1", "transient", retryable=True, token=job.token, trace=(TRACE, SPAN)).outcome == \
        "retried"
    again = store.claim(CAPS, start=True)
    assert (again.fields["job_trace_id"], again.fields["job_span_id"]) == (f"{TRACE:032x}", f"{SPAN:016x}")
    # the next attempt's failure keeps the first one's (the trace already has its root attempt)
    assert store.fail(plain, "w1", "for good", retryable=False, token=again.token, trace=(1, 2)).outcome == "failed"
    assert redis.hget(f"job:{plain}", "job_trace_id") == f"{TRACE:032x}"

    given = store.submit("trsim", {}, job_id="tr-given", trace={"job_trace_id": "ab" * 16, "job_span_id": "cd" * 8},
                         max_retries=10)
    job = store.claim(CAPS, start=True)
    store.fail(given, "w1", "transient", retryable=True, token=job.token, trace=(TRACE, SPAN))
    assert (redis.hget(f"job:{given}", "job_trace_id"), redis.hget(f"job:{given}", "job_span_id")) == \
        ("ab" * 16, "cd" * 8)  # the producer's context stays the job's
    # a producer's placeholder or half a context is none (as the reader takes them): replaced by the attempt's
    for junk in ({"job_trace_id": "temp-trace-id", "job_span_id": ""}, {"job_trace_id": "", "job_span_id": "cd" * 8},
                 {"job_trace_id": "0" * 32, "job_span_id": "cd" * 8}):
        redis.hset(f"job:{given}", mapping={**junk, "traceparent": "garbage"})
        job = store.claim(CAPS, start=True)
        store.fail(given, "w1", "transient", retryable=True, token=job.token, trace=(TRACE, SPAN))
        assert (redis.hget(f"job:{given}", "job_trace_id"), redis.hget(f"job:{given}", "job_span_id")) == \
            (f"{TRACE:032x}", f"{SPAN:016x}"), junk
        assert timeline(store, given)["trace_id"] == f"{TRACE:032x}"
    redis.hset(f"job:{given}", "traceparent", f"00-{'12' * 16}-{'34' * 8}-01")
    redis.hset(f"job:{given}", mapping={"job_trace_id": "", "job_span_id": ""})
    job = store.claim(CAPS, start=True)
    store.fail(given, "w1", "for good", retryable=False, token=job.token, trace=(TRACE, SPAN))
    assert redis.hget(f"job:{given}", "job_trace_id") == ""  # a W3C traceparent is the producer's word too


def test_a_retry_runs_in_the_trace_of_the_attempt_that_failed(redis, redis_url, tmp_path):
    procs = WorkerProcs("workers:\n  sim:\n    connector: simulation\n", tmp_path, redis_url)
    store = JobStore(redis)
    try:
        procs.start()
        procs.wait_up(redis)
        job_id = store.submit("simulation", {"steps": 1, "step_ms": 1, "fail_attempts": 1})
        wait_for(lambda: redis.hget(f"job:{job_id}", "status") == "completed", timeout=10,
                 message="the retry to complete")
        trace = redis.hget(f"job:{job_id}", "job_trace_id")
        assert re.fullmatch(r"[0-9a-f]{32}", trace) and re.fullmatch(r"[0-9a-f]{16}",
                                                                     redis.hget(f"job:{job_id}", "job_span_id"))
        # (the worker logs each step after its Redis write: wait for the last one)
        wait_for(lambda: '"job.completed"' in procs.log(0), timeout=5, message="job.completed logged")
        records = [json.loads(line) for line in procs.log(0).splitlines() if line.startswith("{")]
        mine = [r for r in records if r.get("job_id") == job_id and r.get("trace_id")]
        events = {r.get("event_type") or r.get("message") for r in mine}
        assert {"job.retry", "job.completed"} <= events, events
        assert {r["trace_id"] for r in mine} == {trace}, [(r.get("message"), r["trace_id"]) for r in mine]
        assert timeline(store, job_id)["trace_id"] == trace  # what `emp-machine job` shows
    finally:
        procs.close()


def test_the_job_command_names_the_trace_of_a_producer_that_wrote_only_a_traceparent(redis):
    store = JobStore(redis)
    job_id = store.submit("trsim-tp", {}, job_id="tr-tp")
    redis.hset(f"job:{job_id}", "traceparent", f"00-{TRACE:032x}-{SPAN:016x}-01")
    assert timeline(store, job_id)["trace_id"] == f"{TRACE:032x}"
    redis.hset(f"job:{job_id}", "traceparent", "00-" + "0" * 32 + f"-{SPAN:016x}-01")  # an invalid (zero) id
    assert timeline(store, job_id)["trace_id"] == ""

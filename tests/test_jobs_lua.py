"""Each Lua script called directly with EVAL: its KEYS/ARGV interface and raw reply (real server)."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from emp_machine.runtime.jobs import contract_fields, script_source, submission_score

KEYS = ["jobs:pending", "jobs:idx:of", "jobs:leases"]
CAPS = json.dumps({"worker_id": "w1", "machine_id": "m1", "services": ["sim"]})


def run(redis, name, *args):
    return redis.eval(script_source(name), len(KEYS), *KEYS, *args)


def lib(redis, body, *args):
    return redis.eval(script_source("adopt").split("-- adopt.lua")[0] + body, len(KEYS), *KEYS, *args)


def submit(redis, job_id, **options):
    fields = contract_fields(job_id, "sim", {}, **options)
    return run(redis, "submit", job_id, *[x for kv in fields.items() for x in kv])


def claim(redis, caps=CAPS, lease_ms=60_000, avoid_ms=0, may_reconcile="0", *hints, start="0"):
    return run(redis, "claim", caps, lease_ms, avoid_ms, may_reconcile, start, *hints)


@pytest.mark.parametrize("text,ms", [
    ("2025-11-22T10:00:00.123Z", 1763805600123),
    ("2025-11-22T10:00:00Z", 1763805600000),
    ("2025-11-22T12:00:00.5+02:00", 1763805600500),
    ("1763805600123", 1763805600123),
    ("1763805600.123456", 1763805600123),  # the upstream claim's assigned_at form
    ("2000-02-29T23:59:59.999Z", 951868799999),
])
def test_lib_time_parsing_and_iso(redis, text, ms):
    parsed, back = lib(redis, "local ms = time_ms(ARGV[1]); return {ms, iso(ms)}", text)
    assert parsed == ms
    assert back == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def test_lib_iso_keeps_the_time_right_across_seconds_and_days(redis):
    # iso() keeps the last second's text; switching seconds and days back and forth must not reuse a stale
    # one, and the milliseconds of one second each come out right.
    stamps = [951868799999, 951868800000, 951868799998, 951868799001, 951868799000, 1763805600123]
    assert lib(redis, "local out = {} for i = 1, #ARGV do out[i] = iso(tonumber(ARGV[i])) end return out",
               *stamps) == [
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z" for ms in stamps]


def test_lib_time_and_number_texts(redis):
    # ms_text() and int_text() stand in for string.format('%d', n) in messages: the same text, with the
    # second's text and the small numbers kept, so switching seconds must not reuse a stale one.
    stamps = [951868799999, 951868800000, 951868799001, 1763805600123, 1763805600007, 999]
    assert lib(redis, "local out = {} for i = 1, #ARGV do out[i] = ms_text(tonumber(ARGV[i])) end return out",
               *stamps) == [str(ms) for ms in stamps]
    numbers = [0, 7, 255, 256, 1000, 12345678901]
    assert lib(redis, "iso(1763805600123) local out = {} for i = 1, #ARGV do out[i] = int_text(tonumber(ARGV[i])) "
                      "end return out", *numbers) == [str(n) for n in numbers]


def test_lib_unparsable_time_is_nil(redis):
    assert lib(redis, "return time_ms(ARGV[1]) == nil and 1 or 0", "yesterday") == 1


def test_submit_script_returns_the_exact_score(redis):
    score = submit(redis, "j1", priority=50, workflow_datetime_ms=1_763_805_600_999)
    assert float(score) == submission_score(50, 1_763_805_600_999) == redis.zscore("jobs:pending", "j1")
    assert redis.hget("jobs:idx:of", "j1").startswith("sim\n0\n")


@pytest.mark.parametrize("fields,priority,time_ms", [
    ({"workflow_priority": "0", "priority": "90"}, 90, None),  # the API's workflow_priority || priority
    ({"workflow_priority": "70", "priority": "90"}, 70, None),
    ({"priority": "0"}, 0, None),
    ({"priority": "nan"}, 50, None),  # junk that tonumber() takes: ZADD would fail on a NaN score
    ({"workflow_priority": "inf", "priority": "20"}, 20, None),
    ({"workflow_datetime": "0"}, 50, "created"),  # workflow_datetime || created_at
    ({"workflow_datetime": "1763805600999"}, 50, 1_763_805_600_999),
])
def test_submission_score_falls_back_as_the_api_does(redis, fields, priority, time_ms):
    job = contract_fields("j1", "sim", {}, priority=50)
    job.update(fields)
    score = float(run(redis, "submit", "j1", *[x for kv in job.items() for x in kv]))
    created = int(datetime.fromisoformat(job["created_at"].replace("Z", "+00:00")).timestamp() * 1000)
    assert score == submission_score(priority, created if time_ms in (None, "created") else time_ms)


def test_adopt_script(redis):
    redis.hset("job:api", mapping=contract_fields("api", "sim", {}))
    redis.zadd("jobs:pending", {"api": 1, "ghost": 2})
    assert run(redis, "adopt", "0", "api", "ghost", "not-queued") == [1, 1]  # ARGV[1]: the deep check, off
    assert run(redis, "adopt", "0", "api") == [0, 0]
    assert run(redis, "adopt", "1", "api") == [0, 0]  # on: the entry still says what the hash says
    assert redis.zrange("jobs:pending", 0, -1) == ["api"]


def test_prune_script(redis):
    submit(redis, "j1")
    submit(redis, "j2")
    redis.zrem("jobs:pending", "j1")
    assert run(redis, "prune", "j1", "j2") == 1
    assert redis.hkeys("jobs:idx:of") == ["j2"]


def test_claim_script_reply_and_reconcile_flag(redis):
    assert claim(redis) == ["", 0]
    redis.hset("job:api", mapping=contract_fields("api", "sim", {}))
    redis.zadd("jobs:pending", {"api": 1})
    assert claim(redis, CAPS, 60_000, 0, "1") == ["", 1]  # unindexed job: reconcile first
    assert claim(redis, CAPS, 60_000, 0, "0") == ["", 1]  # not asked, but nothing indexed: it looks anyway
    reply = claim(redis, CAPS, 60_000, 0, "0", "api")  # hint adopts it in the same call
    assert reply[:2] == ["api", 0]
    fields = json.loads(reply[2])
    assert fields == redis.hgetall("job:api") == json.loads(redis.hget("jobs:active:w1", "api"))
    assert fields["status"] == "assigned" and fields["worker_id"] == "w1"
    assert redis.zscore("jobs:leases", "api") > time.time() * 1000 + 50_000


def test_claim_can_start_the_job_in_the_same_call(redis):
    submit(redis, "j1")
    reply = claim(redis, start="1")
    assert reply[0] == "j1"
    job = redis.hgetall("job:j1")
    assert job["status"] == "in_progress" and job["started_at"] and job["worker_id"] == "w1"
    events = [json.loads(e)["ev"] for e in redis.lrange("job:j1:events", 0, -1)]
    assert events == ["submitted", "claimed", "started"]
    assert run(redis, "progress", "j1", "w1", "30", "msg", "", "", "") == "ok"  # owned as after start.lua


def test_start_and_progress_scripts(redis):
    submit(redis, "j1")
    claim(redis)
    assert run(redis, "start", "j1", "other") == "lost"
    assert run(redis, "start", "j1", "w1") == "ok"
    assert run(redis, "progress", "j1", "w1", "30", "msg", "", "", "") == "ok"
    assert redis.hget("job:j1:progress", "progress") == "30"


def test_complete_script_splices_the_result_verbatim(redis):
    submit(redis, "j1")
    claim(redis)
    assert run(redis, "complete", "j1", "w1", '{"a":[],"b":{}}', "done") == "ok"
    assert redis.hget("jobs:completed", "j1").startswith('{"success":true,"data":{"a":[],"b":{}},')


def test_fail_script(redis):
    submit(redis, "j1", max_retries=2)
    claim(redis)
    assert run(redis, "fail", "j1", "w1", "e1", "1") == ["retried", 1]
    claim(redis)
    assert run(redis, "fail", "j1", "w1", "e2", "1") == ["failed", 2]
    assert run(redis, "fail", "j1", "w1", "e3", "1") == ["cancelled", 0]  # a failed job is not ours


def test_hand_back_script(redis):
    submit(redis, "j1")
    claim(redis)
    assert run(redis, "hand_back", "j1", "w1", "drain") == "ok"
    assert redis.hget("job:j1", "retry_count") == "0" and redis.zscore("jobs:pending", "j1") is not None


def test_heartbeat_script(redis):
    submit(redis, "j1")
    claim(redis, CAPS, 1)
    assert run(redis, "heartbeat", "w1", 60_000, 60) == ["ok", "j1"]
    assert redis.zscore("jobs:leases", "j1") > time.time() * 1000 + 50_000
    assert redis.ttl("worker:w1:heartbeat") > 55


def test_reap_script(redis):
    submit(redis, "j1")
    claim(redis, CAPS, -1)  # already expired
    assert run(redis, "reap", 10) == ["j1"]
    assert run(redis, "reap", 10) == []
    assert redis.hget("job:j1", "status") == "pending"


def test_worker_status_script(redis):
    assert run(redis, "worker_status", "w1", "idle", 60, "machine_id", "m1") == ""
    assert run(redis, "worker_status", "w1", "offline", 0) == "idle"
    assert redis.hget("worker:w1", "machine_id") == "m1" and redis.exists("worker:w1:heartbeat") == 0


def test_cancel_script(redis):
    submit(redis, "j1")
    assert run(redis, "cancel", "j1", "why") == 1
    assert run(redis, "cancel", "j1", "why") == 0
    assert run(redis, "cancel", "nope", "why") == 0


def test_non_finite_numbers_in_a_job_hash_break_no_script(redis):
    # tonumber() takes 'nan' and 'inf'; cjson.encode and ZADD refuse them. A job hash with such junk (a buggy
    # producer's) once made every script that announced the job fail, the reaper's among them, so no
    # expired lease was reaped any more. Now they count as absent (or stay text in messages).
    from emp_machine.runtime.jobs import JobStore

    fields = contract_fields("nan-job", "sim", {}, priority=50)
    fields.update(retry_count="nan", max_retries="inf", workflow_priority="nan", current_step="nan",
                  total_steps="inf")
    redis.hset("job:nan-job", mapping=fields)
    store = JobStore(redis, lease_s=0.001, avoid_reclaim_s=0)
    redis.zadd("jobs:pending", {"nan-job": submission_score(50, 0)})  # as the API writes it
    assert run(redis, "adopt", "0", "nan-job")[0] == 1  # indexed: its index score came out finite
    caps = {"worker_id": "w1", "machine_id": "m1", "services": ["sim"]}
    assert store.claim(caps, start=True).id == "nan-job"
    assert store.progress("nan-job", "w1", 50, "half", current_step=1, total_steps=2) == "ok"
    assert store.fail("nan-job", "w1", "boom", retryable=True).outcome == "retried"
    assert store.claim(caps, start=True).id == "nan-job"
    deadline = time.monotonic() + 5
    while not store.reap_expired_leases() and time.monotonic() < deadline:
        pass  # the 1 ms lease expires within a few calls
    assert redis.hget("job:nan-job", "status") == "pending"
    assert store.claim(caps, start=True).id == "nan-job"
    assert store.complete("nan-job", "w1", {"ok": True}) == "ok"

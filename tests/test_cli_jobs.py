"""The job commands against a running machine (real supervisord, real workers): `submit --wait` follows a
job to its end, `job <id>` prints its timeline with retries, `stuck` lists nothing while all is well."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from emp_machine.runtime.jobs import JobStore
from harness import wait_for

MACHINE = """
workers:
  sim:
    connector: simulation
    count: 2
    stop_grace: 2s
"""


@pytest.fixture
def machine(machine_factory, redis):
    m = machine_factory(MACHINE)
    m.wait_ready()
    for name in ("worker-0", "worker-1"):
        wait_for(lambda: '"worker.spawned"' in m.log_of(name), timeout=20, message=f"{name} up")
    return m


def test_submit_wait_job_timeline_and_stuck(machine, redis):
    out = machine.cli("submit", "--type", "simulation", "--payload", '{"steps": 4, "step_ms": 120}', "--wait")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    job_id = lines[0].strip()
    assert lines[-1] == f"{job_id}: completed"
    assert any(line.startswith("progress 100%") for line in lines) and "\r" not in out.stdout  # no bar: no tty
    assert redis.hget(f"job:{job_id}", "status") == "completed"

    shown = machine.cli("job", job_id)
    assert shown.returncode == 0, shown.stderr
    assert f"job {job_id}  type simulation  status completed  retries 0/3" in shown.stdout
    table = shown.stdout.splitlines()
    steps = [line.split()[1] for line in table[next(i for i, l in enumerate(table) if l.startswith("AT (UTC)")) + 1:]]
    assert steps == ["submitted", "claimed", "started", "completed"], shown.stdout
    doc = json.loads(machine.cli("job", job_id, "--json").stdout)
    assert doc["status"] == "completed" and doc["total_ms"] >= 400
    assert len(doc["trace_id"]) == 32 and int(doc["trace_id"], 16)  # submit starts the job's trace
    assert [s["event"] for s in doc["steps"]] == steps
    assert doc["steps"][1]["worker_id"] == redis.hget(f"job:{job_id}", "worker_id") == doc["worker_id"]

    failing = machine.cli("submit", "--type", "simulation", "--max-retries", "2", "--wait",
                          "--payload", '{"steps": 1, "step_ms": 0, "fail_at_step": 1}')
    assert failing.returncode == 1
    bad_id = failing.stdout.splitlines()[0].strip()
    assert failing.stdout.splitlines()[-1] == f"{bad_id}: failed (simulated failure at step 1 of 1)"
    doc = json.loads(machine.cli("job", bad_id, "--json").stdout)
    assert doc["retry_count"] == 2 and doc["error"] == "simulated failure at step 1 of 1"
    evs = [(s["event"], "can_retry=True" in s["detail"]) for s in doc["steps"] if s["event"] == "failed"]
    assert evs == [("failed", True), ("failed", False)]

    stuck = machine.cli("stuck")
    assert stuck.returncode == 0 and stuck.stdout.strip() == "no stuck jobs"
    missing = machine.cli("job", "no-such-job")
    assert missing.returncode == 1 and "no job no-such-job" in missing.stderr
    assert JobStore(redis).timeline(job_id).job["status"] == "completed"


# -- what the job commands refuse, and keys they cannot read (no machine: the CLI against the test Redis) --
def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emp_machine", *args, "--redis", redis_url],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args, message", [
    (("--max-retries", "-1"), "argument --max-retries: expected 0 or more, got -1"),
    (("--type", ""), "argument --type: a job type is needed"),
    (("--type", "  "), "argument --type: a job type is needed"),
    (("--payload", "NaN"), "job not submitted: payload holds NaN or Infinity"),
    (("--payload", '{"a": Infinity}'), "job not submitted: payload holds NaN or Infinity"),
])
def test_submit_refuses_jobs_no_worker_or_api_could_run(redis, redis_url, args, message):
    """A job a worker rejects (max_retries -1), never claims (type '') or the API cannot parse (NaN) is
    refused with a clear error and nothing is written."""
    base = {"--type": "simulation", "--payload": "{}"}
    base.update(dict(zip(args[::2], args[1::2])))
    out = _cli(redis_url, "submit", *[x for pair in base.items() for x in pair])
    assert out.returncode in (1, 2) and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert redis.keys("job*") == []


def test_submit_refuses_a_payload_nested_too_deeply_to_read(redis, redis_url, tmp_path):
    # valid JSON past Python's recursion limit (~1,000 levels on 3.11, ~10,000 on 3.13): a traceback
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    out = _cli(redis_url, "submit", "--type", "simulation", "--payload", f"@{tmp_path / 'deep.json'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "--payload is JSON nested too deeply to read (past Python's recursion limit)" in out.stderr
    assert redis.keys("job*") == []


def test_job_shows_fields_that_are_not_utf8_with_a_replacement_character(redis, redis_url):
    # Another producer's bytes, which the worker fails as a malformed job: reading them raised out of `job`.
    redis.hset("job:latin", mapping={"id": "latin", "status": "failed", "service_required": "simulation",
                                     "workflow_id": b"wf-\xff", "error": b"malformed \xff job"})
    redis.rpush("job:latin:events", b'{"t": 1, "ev": "dropped", "reason": "caf\xe9"}')
    out = _cli(redis_url, "job", "latin")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "reason=caf\ufffd" in out.stdout and "error malformed \ufffd job" in out.stdout
    out = _cli(redis_url, "job", "latin", "--json")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "failed" and doc["steps"][0]["detail"] == "reason=caf\ufffd", doc


def test_submit_still_takes_zero_retries(redis, redis_url):
    out = _cli(redis_url, "submit", "--type", "simulation", "--payload", '{"a": 1.5}', "--max-retries", "0")
    assert out.returncode == 0, out.stderr
    job = redis.hgetall(f"job:{out.stdout.strip()}")
    assert job["max_retries"] == "0" and job["payload"] == '{"a":1.5}'


def test_store_submit_refuses_nan_payload(redis):
    """The Python API: contract_fields refuses NaN/Infinity with a ValueError naming the payload."""
    store = JobStore(redis)
    for payload in (float("nan"), {"a": [float("inf")]}, {"a": -float("inf")}):
        with pytest.raises(ValueError, match="payload holds NaN or Infinity"):
            store.submit("simulation", payload)
    assert redis.keys("job*") == []


def test_job_names_a_key_of_the_wrong_kind(redis, redis_url):
    redis.rpush("job:x:events", json.dumps({"t": 1, "ev": "submitted"}))
    redis.set("job:str", "x")
    out = _cli(redis_url, "job", "x:events")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "cannot read job x:events: job:x:events holds a list, where the job contract keeps a hash" in out.stderr
    out = _cli(redis_url, "job", "str")
    assert out.returncode == 1 and "job:str holds a string" in out.stderr and "Traceback" not in out.stderr
    redis.hset("job:p", mapping={"id": "p", "status": "pending"})
    redis.set("job:p:progress", "50")
    out = _cli(redis_url, "job", "p")
    assert out.returncode == 1 and "job:p:progress holds a string" in out.stderr, out.stderr


def test_job_shows_unreadable_events_and_the_rest(redis, redis_url):
    store = JobStore(redis)
    job_id = store.submit("simulation", {"steps": 1})
    redis.rpush(f"job:{job_id}:events", "not json", "5", json.dumps({"ev": "odd", "t": "abc"}),
                json.dumps({"ev": "far", "t": 1e30}))
    store.cancel(job_id, "stop")
    out = _cli(redis_url, "job", job_id)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    rows = out.stdout.splitlines()
    rows = rows[next(i for i, line in enumerate(rows) if line.startswith("AT (UTC)")) + 1:]
    assert [row.split()[1] for row in rows] == ["submitted", "unreadable", "unreadable", "odd", "far",
                                                "cancel_requested"]
    assert "raw=not json" in rows[1] and rows[1].startswith("-") and "raw=5" in rows[2]
    doc = json.loads(_cli(redis_url, "job", job_id, "--json").stdout)
    assert [s["at_ms"] is None for s in doc["steps"]] == [False, True, True, True, False, False]
    assert doc["steps"][5]["since_previous_ms"] is not None


def test_stuck_names_an_active_key_of_the_wrong_kind(redis, redis_url):
    redis.hset("job:a4", mapping={"id": "a4", "status": "in_progress", "worker_id": "w8"})
    redis.hset("jobs:active:w8", "a4", "{}")
    out = _cli(redis_url, "stuck")
    assert out.returncode == 0 and "a4" in out.stdout and "worker heartbeat missing" in out.stdout, out.stderr
    redis.set("jobs:active:w7", "x")
    out = _cli(redis_url, "stuck")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "cannot list stuck jobs: jobs:active:w7 holds a string" in out.stderr
    redis.delete("jobs:active:w7")
    for write in (lambda: redis.set("job:a4", "x"), lambda: redis.rpush("job:a4", "x")):
        redis.delete("job:a4")
        write()  # the job an active hash names is no hash: that key is named
        kind = redis.type("job:a4")
        out = _cli(redis_url, "stuck")
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert (f"cannot read the stuck jobs: job:a4 holds a {kind}, where the job contract keeps a hash"
                in out.stderr), out.stderr


def test_job_redacts_an_unreadable_event(redis, redis_url):
    store = JobStore(redis)
    job_id = store.submit("simulation", {"steps": 1})
    redis.rpush(f"job:{job_id}:events", "oops api_key=sk-abcdefghijklmnop1234 password=hunter2hunter2")
    for args in ((), ("--json",)):
        out = _cli(redis_url, "job", job_id, *args)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert "sk-abcdefghijklmnop1234" not in out.stdout and "hunter2" not in out.stdout, out.stdout
        assert "raw=oops api_key=[REDACTED] password=[REDACTED]" in out.stdout, out.stdout


def test_job_and_stuck_show_control_characters_escaped_never_raw(redis, redis_url):
    # Job ids, errors and progress messages are the producer's or a service's: printed raw, ESC sequences set
    # the terminal's title, erased lines, or forged lines of output ("FAKE: job completed fine").
    job_id = "a-\x1b]0;TITLE\x07\x1b[2K"
    store = JobStore(redis)
    store.submit("sim", {}, job_id=job_id)
    redis.hset(f"job:{job_id}", mapping={"status": "in_progress", "worker_id": "w9\x1b[31m",
                                          "error": "boom\nFAKE: job completed fine"})
    redis.hset("jobs:active:w9\x1b[31m", job_id, "{}")
    for args in (("job", job_id), ("stuck",)):
        out = _cli(redis_url, *args)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout, out.stdout
        assert "a-\\x1b]0;TITLE\\x07\\x1b[2K" in out.stdout, out.stdout
    out = _cli(redis_url, "job", job_id)
    assert "boom\\x0aFAKE: job completed fine" in out.stdout and "\nFAKE" not in out.stdout, out.stdout


def test_submit_writes_the_apis_fields_with_the_default_priority(redis, redis_url):
    # The contract's default priority is 50: a CLI job at 0 would sink below every API job (the score is
    # P x 10^15 - seconds). Mutation audit M9: no test submitted without --priority and read the hash.
    from emp_machine.runtime.jobs import contract_fields

    out = _cli(redis_url, "submit", "--type", "sim", "--payload", '{"a": 1}')
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    job = redis.hgetall(f"job:{job_id}")
    assert set(job) == set(contract_fields("x", "sim", {})), job
    assert (job["priority"], job["status"], job["max_retries"], job["payload"]) == ("50", "pending", "3", '{"a":1}')
    assert 49e15 < redis.zscore("jobs:pending", job_id) <= 50e15


def _running(redis, job_id: str, worker: str, *, lease_ms: int | None, heartbeat: bool) -> None:
    redis.hset(f"job:{job_id}", mapping={"id": job_id, "status": "in_progress", "worker_id": worker,
                                          "assigned_at": "2026-01-01T00:00:00.000Z", "service_required": "sim"})
    redis.hset(f"jobs:active:{worker}", job_id, "{}")
    if lease_ms is not None:
        redis.zadd("jobs:leases", {job_id: lease_ms})
    if heartbeat:
        redis.set(f"worker:{worker}:heartbeat", "1", ex=60)


def test_stuck_lists_a_dead_workers_job_and_nothing_else(redis, redis_url):
    # Mutation audit M9: three rules no test held. A job a Node worker of the API runs has no lease of ours
    # (its claim writes none): not stuck. A dead worker's jobs:active entry for a job retried onto a live
    # worker since is not that job's state. And each --json row is whole.
    now_ms = int(redis.time()[0]) * 1000
    _running(redis, "healthy", "wa", lease_ms=now_ms + 600_000, heartbeat=True)
    _running(redis, "node-claimed", "wn", lease_ms=None, heartbeat=True)
    _running(redis, "dead", "wd", lease_ms=now_ms + 600_000, heartbeat=False)
    _running(redis, "moved", "wm", lease_ms=now_ms + 600_000, heartbeat=True)
    redis.hset("jobs:active:wgone", "moved", "{}")  # its first worker, dead, never cleared its entry
    out = _cli(redis_url, "stuck", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"job_id": "dead", "worker_id": "wd", "status": "in_progress",
                                       "assigned_at": "2026-01-01T00:00:00.000Z", "lease_expired": False,
                                       "heartbeat_alive": False, "reason": "worker heartbeat missing"}]

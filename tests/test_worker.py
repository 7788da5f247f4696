"""The worker's job lifecycle through real `emp-machine worker` processes and the session's real Redis:
completion checked field by field against the contract, priority/FIFO, retries, timeouts, cancel,
malformed payloads. The processes are shared by this module (started once): each test uses its own jobs
and waits on conditions with deadlines."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis as redis_lib

from emp_machine.runtime.jobs import JobStore, contract_fields
from harness import Messages, WorkerProcs, wait_for

MANIFEST = """
workers:
  sim:
    connector: simulation
    count: 2
    job_types: [simulation, slowsim]
    lease: 3s
    job_timeouts: {slowsim: 500ms}
  solo:
    connector: simulation
    job_types: [ordered]
  duo:
    connector: simulation
    job_types: [duo]
    concurrency: 2
"""
CHANNELS = ("update_job_progress", "complete_job", "job_failed", "job_claimed", "worker_status", "cancel_job")


@pytest.fixture(scope="module")
def client(redis_server):
    c = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    c.flushall()
    yield c
    c.close()


@pytest.fixture(scope="module")
def workers(client, redis_server, tmp_path_factory):
    procs = WorkerProcs(MANIFEST, tmp_path_factory.mktemp("workers"), redis_server.url)
    with procs.running(client):
        yield procs


@pytest.fixture
def store(client, workers):
    return JobStore(client)


@pytest.fixture
def messages(client):
    msgs = Messages(client, *CHANNELS)
    yield msgs
    msgs.close()


def status_of(client, job_id):
    return client.hget(f"job:{job_id}", "status")


def wait_status(client, job_id, *statuses, timeout=10.0):
    return wait_for(lambda: status_of(client, job_id) in statuses and status_of(client, job_id), timeout,
                    message=f"job {job_id} to reach {statuses} (now {status_of(client, job_id)})")


def events(store, job_id):
    return [e["ev"] for e in store.timeline(job_id).events]


ISO = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


def test_a_job_completes_with_progress_and_the_contract_fields(client, store, workers, messages):
    job_id = store.submit("simulation", {"steps": 4, "step_ms": 150}, workflow_id="wf-1", current_step=2,
                          total_steps=3, workflow_priority=70, workflow_datetime_ms=1_700_000_000_000)
    wait_status(client, job_id, "completed")
    wait_for(lambda: messages.of("complete_job", job_id=job_id), message="complete_job")

    job = client.hgetall(f"job:{job_id}")
    assert job["status"] == "completed" and job["worker_id"] in workers.ids[:2]
    wid = job["worker_id"]
    import re
    for name in ("assigned_at", "started_at", "completed_at"):
        assert re.match(ISO, job[name]), (name, job[name])
    assert job["assigned_at"] <= job["started_at"] <= job["completed_at"]
    assert job["retry_count"] == "0"

    done = messages.of("complete_job", job_id=job_id)
    assert len(done) == 1
    msg = done[0]
    assert set(msg) == {"job_id", "worker_id", "progress", "status", "message", "result", "timestamp",
                        "workflow_id", "current_step", "total_steps", "workflow_priority", "workflow_datetime"}
    assert (msg["worker_id"], msg["progress"], msg["status"]) == (wid, 100, "completed")
    assert (msg["workflow_id"], msg["current_step"], msg["total_steps"]) == ("wf-1", 2, 3)
    assert (msg["workflow_priority"], msg["workflow_datetime"]) == (70, 1_700_000_000_000)
    assert isinstance(msg["timestamp"], int) and abs(msg["timestamp"] / 1000 - time.time()) < 30
    assert msg["result"] == {"data": {"steps": 4}, "outputs": [],
                             "service_metadata": {"connector": "simulation", "attempt": 1}}

    stored = json.loads(client.hget("jobs:completed", job_id))
    assert stored == {"success": True, "data": msg["result"], "completed_at": job["completed_at"]}
    assert not client.hexists(f"jobs:active:{wid}", job_id)
    assert client.zscore("jobs:pending", job_id) is None

    progress = client.hgetall(f"job:{job_id}:progress")
    assert progress["progress"] == "100" and progress["status"] == "in_progress"
    assert re.match(ISO, progress["updated_at"])
    updates = messages.of("update_job_progress", job_id=job_id)
    percents = [u["progress"] for u in updates]
    assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(percents), percents
    assert [p for p in percents if p not in (0, 100)] == [25, 50, 75], percents  # steps slower than the throttle
    assert set(updates[0]) == {"job_id", "worker_id", "progress", "timestamp"}  # the claim's (contract)
    for u in updates[1:]:
        assert set(u) == {"job_id", "worker_id", "progress", "status", "message", "current_step", "total_steps",
                          "estimated_completion", "timestamp"}, u
        assert u["worker_id"] == wid and u["status"] == "in_progress" and isinstance(u["timestamp"], int)
        assert (u["current_step"], u["total_steps"]) == (2, 3) and re.match(ISO, u["estimated_completion"])
    assert [u["message"] for u in updates[1:]] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    claimed = messages.of("job_claimed", job_id=job_id)
    assert len(claimed) == 1
    assert events(store, job_id) == ["submitted", "claimed", "started", "completed"]
    wait_for(lambda: client.hget(f"worker:{wid}", "status") == "idle", message="worker idle again")
    assert client.hget(f"worker:{wid}", "current_job_id") == ""
    assert client.exists(f"worker:{wid}:heartbeat")
    caps = json.loads(client.hget(f"worker:{wid}", "capabilities"))
    assert caps["worker_id"] == wid and caps["services"] == ["simulation", "slowsim"]


def test_progress_is_throttled_keeping_the_latest_value(client, store, messages):
    # 40 steps of 5 ms: without the throttle 41 writes; with it about one per 100 ms, plus 0 and 100
    job_id = store.submit("simulation", {"steps": 40, "step_ms": 5})
    wait_status(client, job_id, "completed")
    wait_for(lambda: messages.of("complete_job", job_id=job_id), message="complete_job")
    percents = [u["progress"] for u in messages.of("update_job_progress", job_id=job_id)]
    assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(percents), percents
    assert len(percents) <= 8, percents


def test_priority_then_fifo_through_a_real_worker(client, store, messages):
    blocker = store.submit("ordered", {"steps": 1, "step_ms": 400})
    wait_status(client, blocker, "in_progress")
    ids = {}
    for name, priority in [("low-1", 10), ("mid-1", 50), ("high-1", 90), ("mid-2", 50), ("low-2", 10),
                           ("high-2", 90), ("mid-3", 50)]:
        ids[name] = store.submit("ordered", {"steps": 0}, priority=priority)
    for job_id in ids.values():
        wait_status(client, job_id, "completed")
    by_id = {v: k for k, v in ids.items()}
    # Announced with the hash write; our subscriber hears the last one a moment after the hash says so.
    wait_for(lambda: len([m for m in messages.of("complete_job") if m["job_id"] in by_id]) == len(ids),
             message="every complete_job")
    order = [by_id[m["job_id"]] for m in messages.of("complete_job") if m["job_id"] in by_id]
    assert order == ["high-1", "high-2", "mid-1", "mid-2", "mid-3", "low-1", "low-2"]


def test_retry_up_to_max_retries_then_final_failure(client, store, messages):
    job_id = store.submit("simulation", {"steps": 2, "step_ms": 0, "fail_at_step": 1}, max_retries=3)
    wait_status(client, job_id, "failed")
    wait_for(lambda: len(messages.of("job_failed", job_id=job_id)) == 3, message="three job_failed")
    failed = messages.of("job_failed", job_id=job_id)
    assert [(m["can_retry"], m["retry_count"], m["status"]) for m in failed] == [
        (True, 1, "pending"), (True, 2, "pending"), (False, 3, "failed")]
    for m in failed:
        assert m["error"] == "simulated failure at step 1 of 2"
        assert m["worker_id"] in workers_ids(client) and isinstance(m["timestamp"], int)
    job = client.hgetall(f"job:{job_id}")
    assert job["retry_count"] == "3" and job["error"] == "simulated failure at step 1 of 2"
    assert json.loads(client.hget("jobs:failed", job_id)) == {
        "error": job["error"], "failed_at": job["failed_at"], "retry_count": 3}
    assert not client.hexists("jobs:completed", job_id)
    assert events(store, job_id).count("started") == 3


def workers_ids(client):
    return {k.split(":")[1] for k in client.keys("worker:*:heartbeat")}


def test_a_permanent_error_fails_at_once(client, store, messages):
    job_id = store.submit("simulation", {"steps": 2, "step_ms": 0, "fail_at_step": 2, "fail_retryable": False})
    wait_status(client, job_id, "failed")
    wait_for(lambda: messages.of("job_failed", job_id=job_id), message="job_failed")
    (msg,) = messages.of("job_failed", job_id=job_id)
    assert msg["can_retry"] is False and msg["retry_count"] == 1


def test_a_secret_in_a_service_error_is_redacted_before_it_reaches_redis(client, store, messages):
    secret = "sk-abcdefghijklmnopqrst"
    job_id = store.submit("simulation", {
        "steps": 1, "step_ms": 0, "fail_at_step": 1, "fail_retryable": False,
        "fail_message": f"upstream rejected key {secret} for https://u:hunter22@x.example/v1"})
    wait_status(client, job_id, "failed")
    (msg,) = wait_for(lambda: messages.of("job_failed", job_id=job_id), message="job_failed")
    error = client.hget(f"job:{job_id}", "error")
    assert error == "upstream rejected key sk-[REDACTED] for https://u:[REDACTED]@x.example/v1"
    assert msg["error"] == error
    timeline = json.dumps(store.timeline(job_id).events)
    assert "rejected key sk-[REDACTED]" in timeline
    assert not any(s in text for s in (secret, "hunter22") for text in (json.dumps(msg), timeline))


def test_timeout_per_job_type_fails_as_retryable(client, store, messages):
    job_id = store.submit("slowsim", {"steps": 1, "step_ms": 0, "hang": True}, max_retries=2)
    wait_status(client, job_id, "failed", timeout=15)
    wait_for(lambda: len(messages.of("job_failed", job_id=job_id)) == 2, message="two job_failed")
    failed = messages.of("job_failed", job_id=job_id)
    assert [(m["can_retry"], m["retry_count"]) for m in failed] == [(True, 1), (False, 2)]
    assert all(m["error"] == "job timed out after 0.5s" for m in failed), failed
    assert not client.hexists("jobs:completed", job_id)


def test_cancel_while_running_stops_the_job_and_never_completes_it(client, store, workers, messages):
    job_id = store.submit("simulation", {"steps": 1, "step_ms": 0, "hang": True})
    wait_status(client, job_id, "in_progress")
    wid = client.hget(f"job:{job_id}", "worker_id")
    wait_for(lambda: messages.of("update_job_progress", job_id=job_id, progress=100), message="steps done")
    assert store.cancel(job_id, "user pressed stop")  # what the EMP API does
    wait_for(lambda: not client.hexists(f"jobs:active:{wid}", job_id), message="the worker to let go")
    wait_for(lambda: client.hget(f"worker:{wid}", "status") == "idle", message="worker idle")
    job = client.hgetall(f"job:{job_id}")
    assert job["status"] == "failed" and job["error"] == "Job cancelled by user"
    assert not client.hexists("jobs:completed", job_id)
    assert not messages.of("complete_job", job_id=job_id)
    assert client.zscore("jobs:leases", job_id) is None
    assert "cancelled" in events(store, job_id)
    # the worker serves the next job
    after = [store.submit("simulation", {"steps": 1, "step_ms": 0}) for _ in range(3)]
    for other in after:
        wait_status(client, other, "completed")


def test_a_cancelled_pending_job_is_never_run(client, store, messages):
    blocker = store.submit("ordered", {"steps": 1, "step_ms": 300})
    wait_status(client, blocker, "in_progress")
    job_id = store.submit("ordered", {"steps": 1, "step_ms": 0})
    assert store.cancel(job_id, "changed my mind")
    follower = store.submit("ordered", {"steps": 1, "step_ms": 0}, priority=1)
    wait_status(client, follower, "completed")
    assert status_of(client, job_id) == "failed"
    assert "started" not in events(store, job_id)
    assert client.zscore("jobs:pending", job_id) is None


def submit_raw(client, job_type, payload_text):
    """A job as the EMP API writes it (hash + jobs:pending + job_submitted), with a raw payload string."""
    job_id = f"raw-{uuid.uuid4()}"
    fields = contract_fields(job_id, job_type, None)
    fields["payload"] = payload_text
    client.hset(f"job:{job_id}", mapping=fields)
    client.zadd("jobs:pending", {job_id: 50e15 - int(time.time())})
    client.publish("job_submitted", json.dumps({"job_id": job_id, "service_required": job_type,
                                                "priority": 50}))
    return job_id


def test_a_malformed_payload_fails_that_job_alone(client, store, workers, messages):
    pids = [p.pid for p in workers.procs.values()]
    bad = submit_raw(client, "simulation", "{not json")
    good = submit_raw(client, "simulation", '{"steps": 1, "step_ms": 0}')
    wait_status(client, bad, "failed")
    wait_status(client, good, "completed")
    job = client.hgetall(f"job:{bad}")
    assert job["error"].startswith("malformed job payload: not JSON"), job["error"]
    (msg,) = wait_for(lambda: messages.of("job_failed", job_id=bad), message="job_failed")
    assert msg["can_retry"] is False
    assert all(p.poll() is None for p in workers.procs.values())
    assert [p.pid for p in workers.procs.values()] == pids
    # a payload of the wrong shape is a permanent, clear error from the connector
    odd = submit_raw(client, "simulation", '[1, 2]')
    wait_status(client, odd, "failed")
    assert client.hget(f"job:{odd}", "error") == "simulation payload must be a JSON object, got list"


def test_concurrency_2_keeps_the_worker_busy_until_its_last_job_ends(client, store, workers, messages):
    wid = workers.ids[3]
    long_job = store.submit("duo", {"steps": 1, "step_ms": 0, "hang": True})
    short_job = store.submit("duo", {"steps": 2, "step_ms": 100})
    wait_status(client, short_job, "completed")
    assert status_of(client, long_job) == "in_progress"
    assert {client.hget(f"job:{j}", "worker_id") for j in (long_job, short_job)} == {wid}
    worker = client.hgetall(f"worker:{wid}")
    assert (worker["status"], worker["current_job_id"]) == ("busy", long_job)
    assert store.cancel(long_job, "done with it")
    wait_for(lambda: client.hget(f"worker:{wid}", "status") == "idle", message="idle after the last job")
    assert client.hget(f"worker:{wid}", "current_job_id") == ""

    def changes():
        return [(m["old_status"], m["new_status"]) for m in messages.of("worker_status", worker_id=wid)]

    # The announcement is published with the hash write, but reaches our subscriber a moment later.
    wait_for(lambda: ("busy", "idle") in changes(), message="the busy -> idle announcement")
    assert changes()[-1] == ("busy", "idle") and ("busy", "idle") not in changes()[:-1], changes()


def test_a_job_reaped_while_running_is_not_completed_by_its_first_worker(client, store, workers, messages):
    job_id = store.submit("simulation", {"steps": 3, "step_ms": 150})
    wait_status(client, job_id, "in_progress")
    first = client.hget(f"job:{job_id}", "worker_id")
    client.zadd("jobs:leases", {job_id: 0})  # as if its heartbeats had stopped reaching Redis
    assert store.reap_expired_leases(confirm_s=0) == [job_id]
    wait_status(client, job_id, "completed")
    wait_for(lambda: messages.of("complete_job", job_id=job_id), message="complete_job")
    (done,) = messages.of("complete_job", job_id=job_id)
    evs = [(e["ev"], e.get("worker_id")) for e in store.timeline(job_id).events]
    assert evs.index(("lease_expired", first)) < evs.index(("completed", done["worker_id"]))
    assert done["worker_id"] != first, evs  # the second run's worker, never the one that lost it
    assert evs.count(("completed", done["worker_id"])) == 1
    # And the first worker stopped its run when its next progress write said the job was no longer its own:
    # the only word it gets (the reap removed the job from its jobs:active, so no heartbeat names it). Running
    # on to the end, it held its slot and its service for a job another worker ran (mutation audit M4).
    index = workers.ids.index(first)

    def said(event):
        return [line for line in workers.log(index).splitlines() if f'"{event}"' in line and job_id in line]

    wait_for(lambda: said("job.lost"), timeout=10,
             message=f"the first worker to stop the job\n{workers.log(index)[-2000:]}")
    assert not said("job.not_completed"), workers.log(index)[-2000:]


def test_a_concurrency_1_worker_frees_its_slot_once_per_job(client, store, workers, messages):
    # The slot is freed when the connector is done (the next claim overlaps the finishing write) and must
    # not be freed again when the job's task ends: a slot freed twice would let the next two jobs run at once.
    wid = workers.ids[2]  # "solo": concurrency 1
    for _ in range(3):
        done = store.submit("ordered", {"steps": 1, "step_ms": 0})
        wait_status(client, done, "completed")
    hanging = store.submit("ordered", {"steps": 1, "step_ms": 0, "hang": True})
    wait_status(client, hanging, "in_progress")
    waiting = store.submit("ordered", {"steps": 0})
    time.sleep(0.5)  # an observation window for a claim that must not happen, not a synchronisation
    assert status_of(client, waiting) == "pending"
    assert client.hget(f"job:{hanging}", "worker_id") == wid
    assert store.cancel(hanging, "done with it")
    wait_status(client, waiting, "completed")
    assert client.hget(f"job:{waiting}", "worker_id") == wid


def test_a_worker_groups_own_otel_variables_apply_to_its_workers_telemetry(redis_server, tmp_path):
    """OTEL_* in a group's `env` (which supervisord hands to its workers) reach those workers' telemetry: the
    resolved manifest holds only the machine's. Each process honours its own, as OTel users expect."""
    from harness import WorkerProcs
    from otlp_receiver import OtlpReceiver, attributes

    receiver = OtlpReceiver().start()
    body = f"""
    telemetry:
      otlp_endpoint: {receiver.endpoint}
      export: {{interval: 0.1s, metrics_interval: 1s}}
    workers:
      a:
        connector: simulation
        job_types: [otelenv]
        env:
          OTEL_SERVICE_NAME: group-a-workers
          OTEL_RESOURCE_ATTRIBUTES: "team=group-a"
          OTEL_EXPORTER_OTLP_HEADERS: "x-group=a"
      b:
        connector: simulation
        job_types: [otelenv]
    """
    procs = WorkerProcs(body, tmp_path / "w", redis_server.url, machine_id="wenv")
    c = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    a, b = procs.ids

    def seen():  # service.instance.id -> (service.name, team, x-group header) of what arrived
        out = {}
        for req in list(receiver.requests):
            groups = getattr(req.request, {"/v1/traces": "resource_spans", "/v1/logs": "resource_logs",
                                           "/v1/metrics": "resource_metrics"}[req.path])
            for group in groups:
                attrs = attributes(group.resource.attributes)
                out[attrs.get("service.instance.id")] = (attrs.get("service.name"), attrs.get("team"),
                                                         req.headers.get("x-group"))
        return out

    try:
        with procs.running(c, timeout=40):
            wait_for(lambda: {a, b} <= set(seen()), 20, message=f"both workers' records, got {seen()}")
    finally:
        c.close()
        receiver.stop()
    assert seen()[a] == ("group-a-workers", "group-a", "a")
    assert seen()[b] == ("emp-machine", None, None)  # the other group's workers keep the manifest's


def test_an_invalid_otel_variable_in_a_groups_env_is_a_clear_error_naming_it(redis_server, tmp_path):
    from harness import WorkerProcs

    body = """
    workers:
      bad:
        connector: simulation
        job_types: [otelenv]
        env:
          OTEL_EXPORTER_OTLP_ENDPOINT: "ftp://user:hunter2@collector:4318"
    """
    procs = WorkerProcs(body, tmp_path / "w", redis_server.url, machine_id="wbad")
    try:
        procs.start()
        code = procs.wait_exit(0, timeout=30)
        out = procs.log(0)
    finally:
        procs.close()
    assert code == 2, out
    assert "workers.bad.env" in out and "OTEL_EXPORTER_OTLP_ENDPOINT" in out and "fix or unset it" in out, out
    assert "telemetry.otlp_endpoint" in out  # the setting it stands for
    assert "Traceback" not in out and "hunter2" not in out, out


def test_a_cancel_missed_while_the_signals_reconnect_stops_the_job_at_once(client, redis_server, tmp_path):
    """The API writes the cancel, then publishes it; a worker whose subscription was down at that moment missed
    the message and stopped the job only at its next heartbeat (a third of the lease: 20 s by default). Now it
    looks at its running jobs' hashes once subscribed again. The lease here is 10 min: the heartbeat cannot be
    the one that notices within this test."""
    procs = WorkerProcs("""
workers:
  patient:
    connector: simulation
    job_types: [patient]
    lease: 600s
""", tmp_path, redis_server.url, machine_id="missed")
    with procs.running(client):
        store = JobStore(client)
        job_id = store.submit("patient", {"steps": 1, "step_ms": 0, "hang": True})
        wait_status(client, job_id, "in_progress")
        wid = client.hget(f"job:{job_id}", "worker_id")
        # Its steps done (their progress writes would see the cancel too), it hangs:
        wait_for(lambda: client.hget(f"job:{job_id}:progress", "progress") == "100", message="steps done")
        # The API's cancel with its message lost: the hash only.
        client.hset(f"job:{job_id}", mapping={"status": "failed", "error": "Job cancelled by user"})
        assert client.client_kill_filter(_type="pubsub") >= 1
        wait_for(lambda: not client.hexists(f"jobs:active:{wid}", job_id), timeout=15,
                 message="the worker to let the cancelled job go")
        wait_for(lambda: client.hget(f"worker:{wid}", "status") == "idle", message="worker idle")
        assert "cancelled" in events(store, job_id)
        follower = store.submit("patient", {"steps": 1, "step_ms": 0})
        wait_status(client, follower, "completed")


def test_a_cancelled_unsampled_job_is_not_kept_as_a_failed_trace(redis_server, tmp_path):
    """A cancel is no error: the JobCancelled that ended the job's service.call made that span an error, and the
    tail rule then kept every cancelled job's trace as a failed one, whatever the sampling. An unsampled
    cancelled job sends nothing now; an unsampled failed one still sends its whole trace."""
    from otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver().start()
    body = f"""
    telemetry:
      otlp_endpoint: {receiver.endpoint}
      export: {{interval: 0.1s, metrics_interval: 30s}}
    workers:
      tail:
        connector: simulation
        job_types: [tailcxl]
    """
    procs = WorkerProcs(body, tmp_path / "w", redis_server.url, machine_id="wtail")
    c = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    store = JobStore(c)
    traces = {"cxl": "c1" * 16, "bad": "b1" * 16}

    def submit(name: str, payload: dict) -> str:
        # As the EMP API writes a job, with the producer's unsampled traceparent in the same hash write (set
        # after the submission, an idle worker could claim the job first and trace it under an id of its own)
        job_id = f"tail-{name}-{uuid.uuid4()}"
        fields = {**contract_fields(job_id, "tailcxl", payload, max_retries=0),
                  "traceparent": f"00-{traces[name]}-{'c' * 16}-00"}
        c.hset(f"job:{job_id}", mapping=fields)
        c.zadd("jobs:pending", {job_id: 50e15 - int(time.time())})
        c.publish("job_submitted", json.dumps({"job_id": job_id, "service_required": "tailcxl", "priority": 50}))
        return job_id

    def spans_of(name: str) -> list:
        return [s for s in receiver.spans() if s.trace_id.hex() == traces[name]]

    try:
        with procs.running(c, timeout=40):
            cancelled = submit("cxl", {"steps": 1, "step_ms": 0, "hang": True})
            wait_for(lambda: c.hget(f"job:{cancelled}", "status") == "in_progress", 20, message="the job running")
            assert store.cancel(cancelled, "user pressed stop")
            wait_for(lambda: not c.hexists(f"jobs:active:{procs.ids[0]}", cancelled), 20,
                     message="the worker to let go")
            failed = submit("bad", {"steps": 2, "step_ms": 0, "fail_at_step": 1, "fail_retryable": False})
            wait_for(lambda: c.hget(f"job:{failed}", "status") == "failed", 20, message="the failing job")
            # the failed job's trace arrives whole; the cancelled one's, buffered before it, would be there too
            try:
                wait_for(lambda: {"job.execution", "service.call"} <= {s.name for s in spans_of("bad")}, 45,
                         message="the failed job's trace")
            except AssertionError as exc:  # what did arrive, and the worker's last lines
                raise AssertionError(f"{exc}; spans received: "
                                     f"{sorted((s.name, s.trace_id.hex()[:8]) for s in receiver.spans())}; "
                                     f"worker log: {procs.log(0)[-1500:]}") from None
    finally:
        c.close()
        receiver.stop()
    assert spans_of("cxl") == [], [(s.name, s.status.code) for s in spans_of("cxl")]

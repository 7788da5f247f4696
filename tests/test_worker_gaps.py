"""What a real worker process tells Redis beyond the job lifecycle: its capabilities (probed hardware with
the manifest's keys over it), its connector's health in `connector_statuses`, progress messages with the
contract's step and estimate fields, a heartbeat within the contract's 30 s whatever the lease, and job
counts written malformed by a producer (one job fails, nothing loops)."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis as redis_lib

from emp_machine.runtime import hardware as hw
from emp_machine.runtime.hardware import probe as hardware_probe
from emp_machine.runtime.jobs import JobStore, contract_fields, submission_score
from harness import Messages, WorkerProcs, wait_for

SECRET = "hunter22"
MANIFEST = """
workers:
  big:
    connector: simulation
    job_types: [gapsim]
    lease: 300s
    capabilities:
      hardware: {{gpu_memory_gb: 24, gpu_model: test-gpu}}
  sick:
    connector: simulation
    job_types: [sicksim]
    settings: {{unhealthy_reason: "cannot reach http://u:{secret}@svc.example/x"}}
  rest:
    connector: rest
    job_types: [gaprest]
    lease: 3s
    settings: {{submit_url: "{url}/run", health_url: "{url}/health"}}
  slowhealth:
    connector: simulation
    job_types: [slowhealthsim]
    lease: 3s
    settings: {{health_delay_ms: 2500}}
  cut:
    connector: rest
    job_types: [cutrest]
    settings: {{mode: async, submit_url: "{url}/cut", status_url: "{url}/cut/{{id}}", poll_interval_s: 0.05,
                health_url: "{url}/health"}}
"""
ISO = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.startswith("/cut/"):  # a service's error cut inside an emoji: "\ud83d" alone, valid JSON
            return self._json({"status": "failed", "error": "CUDA out of memory \ud83d"})
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/cut":
            self.send_error(404)
            return
        self._json({"id": "c1"})

    def _json(self, body):
        data = json.dumps(body).encode()  # ensure_ascii: the lone surrogate goes as the escape \ud83d
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(redis_server):
    c = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    c.flushall()
    yield c
    c.close()


@pytest.fixture(scope="module")
def workers(client, redis_server, service, tmp_path_factory):
    url = f"http://127.0.0.1:{service.server_address[1]}"
    procs = WorkerProcs(MANIFEST.format(secret=SECRET, url=url), tmp_path_factory.mktemp("gaps"), redis_server.url)
    with procs.running(client):
        yield procs


@pytest.fixture
def store(client, workers):
    return JobStore(client)


@pytest.fixture
def messages(client):
    msgs = Messages(client, "update_job_progress", "complete_job", "job_failed")
    yield msgs
    msgs.close()


def worker_hash(client, workers, group):
    return client.hgetall(f"worker:{workers.ids[list(workers.manifest.workers).index(group)]}")


def status_of(client, job_id):
    return client.hget(f"job:{job_id}", "status")


def wait_status(client, job_id, *statuses, timeout=10.0):
    return wait_for(lambda: status_of(client, job_id) in statuses, timeout,
                    message=f"job {job_id} to reach {statuses} (now {status_of(client, job_id)})")


def at(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# -- capabilities ------------------------------------------------------------------------------------------

def test_capabilities_carry_cpu_cores_and_the_manifest_hardware_over_the_probed(client, workers):
    caps = json.loads(worker_hash(client, workers, "big")["capabilities"])
    hardware = caps["hardware"]
    # What the worker may use (affinity, cgroup quota and memory limit), not the host's counts.
    assert hardware["cpu_cores"] == hw.usable_cpus()
    assert hardware["ram_gb"] == round(hw.usable_memory() / 2**30, 1)  # kept beside the override
    assert (hardware["gpu_memory_gb"], hardware["gpu_model"]) == (24, "test-gpu")
    assert caps["performance"] == {"concurrent_jobs": 1} and caps["services"] == ["gapsim"]
    plain = json.loads(worker_hash(client, workers, "sick")["capabilities"])["hardware"]
    probed = hardware_probe()
    assert (plain["cpu_cores"], plain["ram_gb"]) == (hw.usable_cpus(), hardware["ram_gb"])
    assert ("gpu_model" in plain) == bool(probed.gpus) and ("gpu_memory_gb" in plain) == bool(probed.gpus)


def test_a_job_requiring_cores_ram_and_gpu_memory_is_claimed_by_a_worker_that_has_them(client, store, workers):
    job_id = store.submit("gapsim", {"steps": 1, "step_ms": 0},
                          requirements={"hardware": {"cpu_cores": 1, "ram_gb": 0.1, "gpu_memory_gb": 24}})
    wait_status(client, job_id, "completed")
    too_big = store.submit("gapsim", {"steps": 1, "step_ms": 0},
                           requirements={"hardware": {"cpu_cores": hw.usable_cpus() + 1}})
    after = store.submit("gapsim", {"steps": 1, "step_ms": 0}, priority=1)
    wait_status(client, after, "completed")
    assert status_of(client, too_big) == "pending"
    assert store.cancel(too_big, "no worker has that many cores")


# -- connector_statuses ------------------------------------------------------------------------------------

def test_connector_statuses_report_the_connectors_health_redacted(client, workers):
    assert json.loads(worker_hash(client, workers, "big")["connector_statuses"]) == {
        "simulation": {"status": "active", "health": "healthy"}}
    sick = worker_hash(client, workers, "sick")["connector_statuses"]
    assert json.loads(sick) == {"simulation": {"status": "active", "health": "unhealthy",
                                               "reason": "cannot reach http://u:[REDACTED]@svc.example/x"}}
    assert SECRET not in sick


def test_connector_statuses_follow_the_service_health_and_go_inactive_when_the_worker_stops(client, workers,
                                                                                              service):
    def rest_status():
        return json.loads(worker_hash(client, workers, "rest")["connector_statuses"])["rest"]

    assert rest_status() == {"status": "active", "health": "healthy"}
    _Health.status = 503
    try:
        wait_for(lambda: rest_status()["health"] == "unhealthy", message="the unhealthy service to show")
        status = rest_status()
        assert (status["status"], status["health"]) == ("active", "unhealthy") and "503" in status["reason"]
    finally:
        _Health.status = 200
    wait_for(lambda: rest_status() == {"status": "active", "health": "healthy"}, message="healthy again")
    index = list(workers.manifest.workers).index("rest")
    workers.signal(index, signal.SIGTERM)
    assert workers.wait_exit(index) == 0
    row = worker_hash(client, workers, "rest")
    assert row["status"] == "offline"
    assert json.loads(row["connector_statuses"]) == {"rest": {"status": "inactive", "health": "healthy"}}
    # Each change of health was also an event, in the worker's telemetry (read back from its buffer).
    from test_connector_telemetry import read_buffer

    recorded = read_buffer(workers.state_dir / "telemetry" / f"{workers.ids[index]}.db")
    checks = [(r[4]["healthy"], r[2]) for r in recorded.logs if r[7] == "service.health_check"]
    assert checks == [(False, "WARNING"), (True, "INFO")], checks
    unhealthy = next(r[4] for r in recorded.logs if r[7] == "service.health_check")
    assert "503" in unhealthy["reason"] and unhealthy["connector_id"] == f"rest-{index}"


# -- progress messages -------------------------------------------------------------------------------------

def test_progress_messages_carry_steps_and_an_estimated_completion(client, store, workers, messages):
    job_id = store.submit("gapsim", {"steps": 4, "step_ms": 200}, workflow_id="wf-9", current_step=2,
                          total_steps=5)
    wait_status(client, job_id, "completed")
    (done,) = wait_for(lambda: messages.of("complete_job", job_id=job_id), message="complete_job")
    updates = messages.of("update_job_progress", job_id=job_id)
    assert set(updates[0]) == {"job_id", "worker_id", "progress", "timestamp"}  # the claim's (contract)
    sent = updates[1:]
    assert [u["progress"] for u in sent] == [25, 50, 75, 100]
    for u in sent:
        assert set(u) == {"job_id", "worker_id", "progress", "status", "message", "current_step", "total_steps",
                          "estimated_completion", "timestamp"}, u
        assert (u["worker_id"], u["status"]) == (done["worker_id"], "in_progress")
        assert (u["current_step"], u["total_steps"]) == (2, 5)
        assert re.match(ISO, u["estimated_completion"]), u
        assert isinstance(u["timestamp"], int)
    # Estimated at 25 % after ~200 ms of a ~800 ms job: the end, within a generous margin of when it was.
    first = sent[0]
    assert abs(at(first["estimated_completion"]) - done["timestamp"] / 1000) < 1.5, (first, done["timestamp"])
    assert abs(at(sent[-1]["estimated_completion"]) - sent[-1]["timestamp"] / 1000) < 0.5  # at 100 %: now


def test_progress_without_workflow_steps_sends_them_empty(client, store, workers, messages):
    # The contract lists current_step and total_steps in every progress message: '' when the job has none.
    job_id = store.submit("gapsim", {"steps": 2, "step_ms": 150})
    wait_status(client, job_id, "completed")
    wait_for(lambda: messages.of("complete_job", job_id=job_id), message="complete_job")
    sent = messages.of("update_job_progress", job_id=job_id)[1:]
    assert sent
    for u in sent:
        assert set(u) == {"job_id", "worker_id", "progress", "status", "message", "current_step", "total_steps",
                          "estimated_completion", "timestamp"}, u
        assert (u["current_step"], u["total_steps"]) == ("", ""), u


# -- malformed counts ----------------------------------------------------------------------------------------

def submit_raw(client, job_type, **fields):
    """A job as the EMP API writes it (hash + jobs:pending + job_submitted), with fields overridden."""
    job_id = f"raw-{uuid.uuid4()}"
    row = {**contract_fields(job_id, job_type, {"steps": 1, "step_ms": 0}), **fields}
    client.hset(f"job:{job_id}", mapping=row)
    client.zadd("jobs:pending", {job_id: submission_score(50, int(time.time() * 1000))})
    client.publish("job_submitted", json.dumps({"job_id": job_id, "service_required": job_type, "priority": 50}))
    return job_id


def claims(store, job_id):
    return [e["ev"] for e in store.timeline(job_id).events if e["ev"] in ("claimed", "handed_back")]


def test_a_retry_count_written_as_a_float_is_read_as_the_count(client, store, workers, messages):
    job_id = submit_raw(client, "gapsim", retry_count="1.0")
    wait_status(client, job_id, "completed")
    (done,) = wait_for(lambda: messages.of("complete_job", job_id=job_id), message="complete_job")
    assert done["result"]["service_metadata"]["attempt"] == 2
    assert claims(store, job_id) == ["claimed"]


@pytest.mark.parametrize("field, value", [("retry_count", "x"), ("retry_count", "1.5"), ("max_retries", "lots")])
def test_a_count_that_is_no_number_fails_that_job_alone_and_never_loops(client, store, workers, messages,
                                                                       field, value):
    pid = workers.procs[0].pid
    job_id = submit_raw(client, "gapsim", **{field: value})
    wait_status(client, job_id, "failed")
    (failed,) = wait_for(lambda: messages.of("job_failed", job_id=job_id), message="job_failed")
    error = f"malformed job: job field {field} must be a whole number >= 0, got {value!r}"
    assert failed["error"] == error and failed["can_retry"] is False
    assert client.hget(f"job:{job_id}", "error") == error
    assert claims(store, job_id) == ["claimed"]  # claimed once, never handed back and claimed again
    assert not client.hexists("jobs:completed", job_id)
    good = store.submit("gapsim", {"steps": 1, "step_ms": 0})
    wait_status(client, good, "completed")
    assert workers.procs[0].pid == pid and workers.procs[0].poll() is None


# -- heartbeat -----------------------------------------------------------------------------------------------

def test_a_slow_connector_health_check_never_delays_the_heartbeat(client, store, workers):
    # A beat is a third of the 3 s lease; the health check answers in 2.5 s. It used to run inside the beat
    # loop, so beats came 3.5 s apart and the reaper re-queued the job again and again: it never completed.
    job_id = store.submit("slowhealthsim", {"steps": 14, "step_ms": 500})
    wait_status(client, job_id, "completed", "failed", timeout=30)
    assert status_of(client, job_id) == "completed"
    events = [e["ev"] for e in store.timeline(job_id).events]
    assert events.count("claimed") == 1 and "lease_expired" not in events, events
    health = json.loads(worker_hash(client, workers, "slowhealth")["connector_statuses"])
    assert health["simulation"]["health"] == "healthy"  # the check still runs, in its own task


# -- bytes that are not UTF-8 --------------------------------------------------------------------------------

def test_a_job_hash_holding_bytes_that_are_not_utf8_fails_that_job_alone(client, store, workers, messages):
    # Another producer wrote latin-1 into the payload. Decoding the claim's reply raised, the worker died
    # with the job claimed, and after its restart it was handed back, claimed again and killed it again.
    pid = workers.procs[0].pid
    job_id = submit_raw(client, "gapsim", payload=b'{"steps": 1, "prompt": "caf\xe9"}')
    wait_status(client, job_id, "failed")
    error = (f"malformed job: job:{job_id} holds bytes that are not UTF-8 text in payload; its producer must "
             f"write every job field as UTF-8")
    (failed,) = wait_for(lambda: messages.of("job_failed", job_id=job_id), message="job_failed")
    assert failed["error"] == error and failed["can_retry"] is False
    assert client.hget(f"job:{job_id}", "error") == error
    events = [json.loads(e)["ev"] for e in client.lrange(f"job:{job_id}:events", 0, -1)]
    assert events.count("claimed") == 1 and "handed_back" not in events, events
    good = store.submit("gapsim", {"steps": 1, "step_ms": 0, "prompt": "café"})
    wait_status(client, good, "completed")
    assert workers.procs[0].pid == pid and workers.procs[0].poll() is None


def test_an_id_that_is_not_utf8_in_the_queue_keeps_no_other_job_from_being_indexed(client, store, workers):
    # A job id that is not UTF-8 in jobs:pending (another producer's bytes). The reconcile and the sweep read
    # the queue decoded: both failed at it, every time, so a job the API submitted while no worker heard
    # job_submitted was never indexed, never claimed. The id is now passed over (no worker can run a job its
    # id cannot name) and logged, and the rest of the queue is indexed.
    client.zadd("jobs:pending", {b"raw-\xff": submission_score(50, int(time.time() * 1000))})
    try:
        unheard = f"raw-{uuid.uuid4()}"  # as the API writes it, its job_submitted missed
        client.hset(f"job:{unheard}", mapping=contract_fields(unheard, "gapsim", {"steps": 1, "step_ms": 0}))
        client.zadd("jobs:pending", {unheard: submission_score(50, int(time.time() * 1000))})
        heard = store.submit("gapsim", {"steps": 1, "step_ms": 0})  # wakes the worker: its claim reconciles
        wait_status(client, heard, "completed")
        wait_status(client, unheard, "completed")
        log = workers.log(0)
        lines = [x for x in log.splitlines() if "jobs.unreadable_job_id" in x]
        assert len(lines) == 1 and json.loads(lines[0]).get("job_id") == "raw-\ufffd", lines
        assert "index_upkeep_failed" not in log and "claim failed" not in log
        assert workers.procs[0].poll() is None
        assert client.zscore("jobs:pending", b"raw-\xff") is not None  # left where its producer put it
    finally:
        client.zrem("jobs:pending", b"raw-\xff")


# -- text a service or a producer sends that Python reads but cannot pass on as it is ----------------------

def test_an_error_holding_a_lone_surrogate_fails_the_job_once(client, store, workers, messages):
    # A service's error cut inside an emoji ("\ud83d" alone is valid JSON): writing the failure raised
    # UnicodeEncodeError, the job task died with the job running, and the heartbeat handed it back to be run
    # again, for ever, its retry count never moving.
    job_id = store.submit("cutrest", {"prompt": "x"})
    wait_status(client, job_id, "failed")
    assert "CUDA out of memory \ufffd" in client.hget(f"job:{job_id}", "error")
    (failed,) = wait_for(lambda: messages.of("job_failed", job_id=job_id), message="job_failed")
    assert "\ufffd" in failed["error"]
    assert claims(store, job_id) == ["claimed"]
    cut = list(workers.manifest.workers).index("cut")
    assert "job task failed unexpectedly" not in workers.log(cut)


def test_a_job_with_an_empty_id_fails_as_malformed_once(client, store, workers, messages):
    # The claim's reply said "none" by an empty id: the job was taken and marked running, read as no job,
    # then handed back and claimed again for ever, the worker shown busy with it meanwhile.
    client.hset("job:", mapping=contract_fields("", "gapsim", {"steps": 1, "step_ms": 0}))
    client.zadd("jobs:pending", {"": submission_score(50, int(time.time() * 1000))})
    client.publish("job_submitted", json.dumps({"job_id": "", "service_required": "gapsim", "priority": 50}))
    try:
        wait_status(client, "", "failed")
        assert client.hget("job:", "error").startswith("malformed job: its id is empty")
        assert [e["ev"] for e in store.timeline("").events].count("claimed") == 1
        assert client.zscore("jobs:pending", "") is None and not client.hexists(f"jobs:active:{workers.ids[0]}", "")
        good = store.submit("gapsim", {"steps": 1, "step_ms": 0})
        wait_status(client, good, "completed")
        assert "claim failed unexpectedly" not in workers.log(0)
    finally:
        client.delete("job:", "job::events", "job::progress")
        client.zrem("jobs:pending", "")


def test_a_payload_nested_too_deeply_to_read_fails_as_malformed_not_as_the_connectors_fault(client, store, workers):
    depth = 100_000  # valid JSON; Python's reader stops at ~1,000 levels on 3.11, ~10,000 on 3.13 (RecursionError)
    job_id = submit_raw(client, "gapsim", payload="[" * depth + "]" * depth)
    wait_status(client, job_id, "failed")
    assert client.hget(f"job:{job_id}", "error") == ("malformed job payload: JSON nested too deeply to read (past "
                                                     "Python's recursion limit)")
    assert claims(store, job_id) == ["claimed"]  # failed for good, not retried

"""A Redis that refuses writes for a passing reason (maxmemory reached, a replica after a failover, another
client's long script) or refuses our credentials, against real worker processes and a private server each.

A refused finishing write used to be taken for the end of the job's chances: "job result not recorded", the
heartbeat handed the job back and it ran again. It is retried now, as an outage is (a refused script changed
nothing), and the worker's log lines say what Redis said (their fields used to be dropped)."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest
import redis as redis_lib

from emp_machine.runtime.jobs import JobStore
from emp_machine.runtime.redis_server import PrivateRedis, free_port
from harness import WorkerProcs, wait_for

SECRET = "s3cretPASSxyz"
REFUSED = "finishing write not accepted"  # the worker's line when Redis refuses a finishing write (retried)
GAVE_UP = "job result not recorded"  # the worker's line when it gives a result up


@pytest.fixture
def server(tmp_path):
    with PrivateRedis(tmp_path / "redis") as srv:
        yield srv


@pytest.fixture
def client(server):
    c = redis_lib.Redis(port=server.port, decode_responses=True)
    yield c
    c.close()


def _workers(tmp_path, url, lease="10s", count=1):
    return WorkerProcs(f"workers:\n  sim:\n    connector: simulation\n    count: {count}\n    lease: {lease}\n",
                       tmp_path / "w", url)


def _lines(log: str, message_part: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if message_part in str(record.get("message", "")):
            out.append(record)
    return out


def _claims(store, job_id) -> int:
    return [e["ev"] for e in store.timeline(job_id).events].count("claimed")


def _oom(client) -> None:
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # far below what is used: every write is refused with OOM


def _run_through_refusal(client, procs, refuse, allow) -> tuple[JobStore, str]:
    """A job whose completion meets Redis refusing writes: refuse once it runs, allow again once the worker
    met the refusal at its finishing write (or gave the result up). Returns the store and the job id."""
    store = JobStore(client)
    job_id = store.submit("simulation", {"steps": 2, "step_ms": 300})
    wait_for(lambda: client.hget(f"job:{job_id}", "status") == "in_progress", 10, message="the job to run")
    refuse()
    wait_for(lambda: REFUSED in procs.log(0) or GAVE_UP in procs.log(0), 15,
             message=f"the completion to meet the refusal\n{procs.log(0)[-3000:]}")
    allow()
    wait_for(lambda: client.hget(f"job:{job_id}", "status") == "completed", 30,
             message=f"the job to complete\n{procs.log(0)[-3000:]}")
    return store, job_id


def _assert_completed_once(store, procs, job_id, code):
    log = procs.log(0)
    assert _claims(store, job_id) == 1, [e["ev"] for e in store.timeline(job_id).events]  # never run twice
    assert GAVE_UP not in log
    (line,) = _lines(log, REFUSED)[:1]
    assert f"Redis refused the command ({code})" in line["message"]
    assert line["job_id"] == job_id and f"Redis refused the command ({code})" in line["error"]


def test_a_completion_refused_at_maxmemory_is_retried_not_run_again(server, client, tmp_path):
    procs = _workers(tmp_path, server.url)
    try:
        procs.start()
        procs.wait_up(client)
        store, job_id = _run_through_refusal(client, procs, lambda: _oom(client),
                                             lambda: client.config_set("maxmemory", 0))
        _assert_completed_once(store, procs, job_id, "OOM")
        assert "maxmemory" in _lines(procs.log(0), REFUSED)[0]["error"]  # what Redis said, not only its code
        assert procs.procs[0].poll() is None
    finally:
        procs.close()


def test_a_completion_refused_by_a_read_only_replica_is_retried_after_the_failover(server, client, tmp_path):
    procs = _workers(tmp_path, server.url)
    nowhere = free_port()  # a primary nobody answers on: the server stays a replica with its data, read-only
    try:
        procs.start()
        procs.wait_up(client)
        store, job_id = _run_through_refusal(
            client, procs, lambda: client.execute_command("REPLICAOF", "127.0.0.1", str(nowhere)),
            lambda: client.execute_command("REPLICAOF", "NO", "ONE"))
        _assert_completed_once(store, procs, job_id, "READONLY")
    finally:
        procs.close()


def test_a_completion_refused_as_busy_by_another_clients_script_is_retried(server, client, tmp_path):
    loop = "local x = 0 for i = 1, tonumber(ARGV[1]) do x = x + i end return 1"
    started = time.monotonic()
    client.eval(loop, 0, 2_000_000)
    per_s = 2_000_000 / max(1e-3, time.monotonic() - started)
    client.config_set("busy-reply-threshold", 50)  # ms: other clients get BUSY soon after the script starts
    procs = _workers(tmp_path, server.url)
    sock = None

    def busy():
        nonlocal sock
        sock = socket.create_connection(("127.0.0.1", server.port))
        args = [b"EVAL", loop.encode(), b"0", str(int(per_s * 3)).encode()]  # about 3 s
        sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))

    def script_done():
        sock.settimeout(30)
        assert sock.recv(100).startswith(b":1")  # the script's reply: Redis answers the others again

    try:
        procs.start()
        procs.wait_up(client)
        store, job_id = _run_through_refusal(client, procs, busy, script_done)
        _assert_completed_once(store, procs, job_id, "BUSY")
    finally:
        if sock is not None:
            sock.close()
        procs.close()


def test_a_worker_started_while_redis_refuses_writes_waits_instead_of_exiting(server, client, tmp_path):
    # Registering met OOM: the ResponseError ended the worker, and supervisord restarted it into the same.
    _oom(client)
    procs = _workers(tmp_path, server.url)
    try:
        procs.start()
        wait_for(lambda: "at start; retrying" in procs.log(0) or procs.procs[0].poll() is not None, 20,
                 message=f"start-up to meet the refusal\n{procs.log(0)[-3000:]}")
        assert procs.procs[0].poll() is None, procs.log(0)[-3000:]
        (line,) = _lines(procs.log(0), "at start; retrying")[:1]
        assert line["message"] == "Redis refused the command (OOM) at start; retrying"
        assert "maxmemory" in line["error"]
        client.config_set("maxmemory", 0)
        procs.wait_up(client)
        store = JobStore(client)
        job_id = store.submit("simulation", {"steps": 1, "step_ms": 0})
        wait_for(lambda: client.hget(f"job:{job_id}", "status") == "completed", 10, message="a job to complete")
    finally:
        procs.close()


def test_heartbeat_and_claim_failures_say_what_redis_said(server, client, tmp_path):
    procs = _workers(tmp_path, server.url, lease="1.5s")  # a beat every 0.5 s
    try:
        procs.start()
        procs.wait_up(client)
        _oom(client)
        client.publish("job_submitted", "{}")  # wakes the idle worker: its claim meets OOM
        wait_for(lambda: _lines(procs.log(0), "heartbeat failed") and _lines(procs.log(0), "claim failed"), 15,
                 message=f"a failed heartbeat and claim\n{procs.log(0)[-3000:]}")
        for message in ("heartbeat failed", "claim failed"):
            line = _lines(procs.log(0), message)[0]
            assert line["error"].startswith("Redis refused the command (OOM): OutOfMemoryError: "), line
            assert "maxmemory" in line["error"]
        client.config_set("maxmemory", 0)
        job_id = JobStore(client).submit("simulation", {"steps": 1, "step_ms": 0})
        wait_for(lambda: client.hget(f"job:{job_id}", "status") == "completed", 15, message="a job to complete")
        assert procs.procs[0].poll() is None
    finally:
        procs.close()


def test_a_refusal_outlasting_the_lease_is_logged_with_the_job_and_the_reason(server, client, tmp_path):
    # Given up after the lease, the result is not recorded (the job runs again): the line says why and which.
    procs = _workers(tmp_path, server.url, lease="1s")
    try:
        procs.start()
        procs.wait_up(client)
        store = JobStore(client)
        job_id = store.submit("simulation", {"steps": 2, "step_ms": 200})
        wait_for(lambda: client.hget(f"job:{job_id}", "status") == "in_progress", 10, message="the job to run")
        _oom(client)
        wait_for(lambda: GAVE_UP in procs.log(0), 20, message=f"the worker to give up\n{procs.log(0)[-3000:]}")
        client.config_set("maxmemory", 0)
        (line,) = _lines(procs.log(0), GAVE_UP)[:1]
        assert line["message"] == "job result not recorded: Redis refused the command (OOM); the job will run again"
        assert line["job_id"] == job_id and "maxmemory" in line["error"]
        (gave_up,) = _lines(procs.log(0), "giving up a finishing write")[:1]
        assert gave_up["job_id"] == job_id and "OOM" in gave_up["message"]
        wait_for(lambda: client.hget(f"job:{job_id}", "status") == "completed", 20, message="the job to run again")
    finally:
        procs.close()


@pytest.mark.parametrize("password", ["WRONG" + SECRET, None])
def test_refused_credentials_are_logged_as_such_without_the_password(server, client, tmp_path, password):
    client.config_set("requirepass", SECRET)
    url = f"redis://:{password}@127.0.0.1:{server.port}/0" if password else server.url  # WRONGPASS / NOAUTH
    procs = _workers(tmp_path, url)
    try:
        procs.start()
        wait_for(lambda: "at start; retrying" in procs.log(0) or procs.procs[0].poll() is not None, 20,
                 message=f"start-up to meet the refusal\n{procs.log(0)[-3000:]}")
        (line,) = _lines(procs.log(0), "at start; retrying")[:1]
        assert line["message"] == "Redis refused our credentials at start; retrying"
        reply = "invalid username-password pair" if password else "Authentication required"
        assert line["error"].startswith(f"Redis refused our credentials ({reply}"), line
        assert "REDIS_URL" in line["error"]
        procs.signal(0, signal.SIGTERM)
        assert procs.wait_exit(0, timeout=10) == 0
        log = procs.log(0)
        assert SECRET not in log and "unreachable" not in log.lower()
    finally:
        procs.close()
